//! A ps task: accepts every worker, then feeds their messages to [`Core`] and sends its
//! replies, until every worker is done.
//!
//! One current-thread tokio runtime runs it all. A reader task per worker turns its stream
//! into frames on one channel, so the core sees messages in arrival order; replies are
//! written in the order the core returns them.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tracing::{info, info_span, warn};

use super::core::Core;
use super::net::{self, CLOSE_DONE, CLOSE_ERROR, Link};
use super::wire::{self, Msg, StreamFail};
use super::{PsError, PsOptions, Setup};
use crate::cluster::{ClusterSpec, Job, Task};
use crate::train::TrainConfig;

/// What a ps task did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsReport {
    /// The task.
    pub task: Task,
    /// Updates it applied (steps in sync mode, pushes in async mode).
    pub updates: u64,
    /// Parameters it held.
    pub shard_len: usize,
    /// The tensors it held, by name.
    pub tensors: Vec<String>,
}

/// Runs ps task `index` of `cluster` until every worker is done.
pub fn run_ps_task(
    cfg: &TrainConfig,
    opts: &PsOptions,
    cluster: &ClusterSpec,
    index: usize,
) -> Result<PsReport, PsError> {
    let me = cluster.task(Job::Ps, index)?;
    let _span = info_span!("ps", task = index).entered();
    let setup = Setup::new(cfg, opts, cluster)?;
    let shard = setup.placement.shard(index).clone();
    if shard.is_empty() {
        warn!("this ps task holds no variables: there are more ps tasks than tensors");
    }
    let tensors: Vec<String> = shard.tensors.iter().map(|(n, _)| n.clone()).collect();
    info!(params = shard.len(), tensors = ?tensors, sync = %opts.sync, "ps task ready");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PsError::Quic(format!("tokio runtime: {e}")))?;
    let core = Core::new(opts.sync, setup.workers, shard.len(), cfg.optim.clone());
    let updates = rt.block_on(serve(&setup, me, cluster.all(Job::Worker), core))?;
    info!(updates, "all workers done");
    Ok(PsReport {
        task: me,
        updates,
        shard_len: shard.len(),
        tensors,
    })
}

async fn serve(setup: &Setup, me: Task, workers: Vec<Task>, core: Core) -> Result<u64, PsError> {
    let opts = &setup.transport;
    let ep = net::bind(&me, opts)?;
    let deadline = Instant::now() + opts.connect_timeout;
    let max_frame = wire::max_frame(setup.placement.shard(me.index).len());
    let hello = setup.hello(&me);
    let links = net::accept_workers(&ep, &me, &hello, &workers, max_frame, deadline, opts).await;
    let links = match links {
        Ok(links) => links,
        Err(e) => {
            net::close_endpoint(&ep, CLOSE_ERROR, &format!("{me} stopped: {e}")).await;
            return Err(e);
        }
    };
    info!("every worker connected");

    let mut streams = spawn_readers(links);
    let result = run(core, &mut streams.sends, &workers, streams.events).await;
    match result {
        Ok(updates) => {
            finish(&ep, &mut streams.sends, &streams.conns, opts.peer_timeout).await;
            Ok(updates)
        }
        Err(e) => {
            net::close_endpoint(&ep, CLOSE_ERROR, &format!("{me} stopped: {e}")).await;
            Err(e)
        }
    }
}

type Event = (usize, Result<Bytes, StreamFail>);

/// The workers' connections once their receive streams belong to reader tasks.
struct Streams {
    sends: Vec<quinn::SendStream>,
    conns: Vec<quinn::Connection>,
    /// Frames from every worker, in arrival order.
    events: mpsc::Receiver<Event>,
}

/// Moves each worker's receive stream into a reader task.
fn spawn_readers(links: Vec<Link>) -> Streams {
    let (tx, rx) = mpsc::channel::<Event>(64);
    let mut sends = Vec::with_capacity(links.len());
    let mut conns = Vec::with_capacity(links.len());
    for (w, link) in links.into_iter().enumerate() {
        let Link {
            conn,
            send,
            mut recv,
            max_frame,
            ..
        } = link;
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let frame = wire::read_frame(&mut recv, max_frame).await;
                let failed = frame.is_err();
                if tx.send((w, frame)).await.is_err() || failed {
                    break;
                }
            }
        });
        sends.push(send);
        conns.push(conn);
    }
    Streams {
        sends,
        conns,
        events: rx,
    }
}

/// Feeds frames to the core and sends its replies until every worker is done. Returns the
/// number of updates applied.
async fn run(
    mut core: Core,
    sends: &mut [quinn::SendStream],
    workers: &[Task],
    mut events: mpsc::Receiver<Event>,
) -> Result<u64, PsError> {
    while !core.finished() {
        // Readers hold the sender until they have delivered their stream's failure, which
        // ends this loop first; an empty channel is still reported, not assumed away.
        let Some((w, frame)) = events.recv().await else {
            return Err(PsError::Quic("every worker reader stopped".into()));
        };
        let peer = workers[w];
        let frame = match frame {
            Ok(frame) => frame,
            Err(StreamFail::Lost(reason)) => return Err(PsError::Lost { peer, reason }),
            Err(StreamFail::TooLarge { len, max }) => {
                let detail = format!("sent a frame of {len} bytes, more than the agreed {max}");
                return Err(PsError::Protocol { peer, detail });
            }
        };
        let msg = Msg::decode(&frame).map_err(|e| PsError::Protocol {
            peer,
            detail: e.to_string(),
        })?;
        let outs = core
            .handle(w, msg)
            .map_err(|detail| PsError::Protocol { peer, detail })?;
        for out in outs {
            for &t in &out.to {
                let sent = wire::write_frame(&mut sends[t], out.frame.clone()).await;
                sent.map_err(|fail| PsError::Lost {
                    peer: workers[t],
                    reason: describe(fail),
                })?;
            }
        }
    }
    Ok(core.version())
}

fn describe(fail: StreamFail) -> String {
    match fail {
        StreamFail::Lost(reason) => reason,
        StreamFail::TooLarge { len, max } => format!("frame of {len} bytes above {max}"),
    }
}

/// Ends the run cleanly: finishes every stream, waits until the workers have read their
/// last message and closed, then closes the endpoint.
async fn finish(
    ep: &quinn::Endpoint,
    sends: &mut [quinn::SendStream],
    conns: &[quinn::Connection],
    peer_timeout: Duration,
) {
    for s in sends.iter_mut() {
        let _ = s.finish();
    }
    let all_closed = async {
        for c in conns {
            c.closed().await;
        }
    };
    if timeout(peer_timeout, all_closed).await.is_err() {
        warn!("some workers did not close their connections in time; closing anyway");
    }
    net::close_endpoint(ep, CLOSE_DONE, "done").await;
}
