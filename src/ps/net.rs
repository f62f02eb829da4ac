//! Connections between workers and ps tasks: endpoints, dialling, accepting, the hello.
//!
//! Every task binds one quinn endpoint ([`crate::transport::endpoint`]) at its address in
//! the cluster file. Each worker dials every ps task, retrying until the connect timeout
//! since tasks start in any order; each ps task accepts until all workers have arrived.
//! On the connection's one bidirectional stream the worker sends its
//! [`crate::transport::Hello`] first and the ps task answers with its own; the job of each
//! side travels in the fingerprint under [`JOB_KEY`] and is checked apart from the other
//! fields, which must all agree ([`Hello::differences`]).

use std::time::Duration;

use tokio::time::{Instant, sleep, timeout, timeout_at};
use tracing::{info, warn};

use super::PsError;
use super::wire::{MAX_HELLO, why_lost};
use crate::cluster::{Job, Task};
use crate::ring::Rank;
use crate::transport::{Hello, TransportError, TransportOptions, bind_addr, endpoint};

/// The fingerprint key that carries the sender's job.
pub const JOB_KEY: &str = "job";
/// Application close code for a normal end of run.
pub const CLOSE_DONE: u32 = 0;
/// Application close code for a task that stops because of an error.
pub const CLOSE_ERROR: u32 = 1;

/// One worker–ps connection after a successful handshake.
#[derive(Debug)]
pub struct Link {
    /// The task at the other end.
    pub peer: Task,
    /// The connection.
    pub conn: quinn::Connection,
    /// Our half of the stream.
    pub send: quinn::SendStream,
    /// Their half of the stream.
    pub recv: quinn::RecvStream,
    /// The largest frame accepted from the peer.
    pub max_frame: usize,
}

/// Binds `me`'s endpoint; must run inside a tokio runtime.
pub fn bind(me: &Task, opts: &TransportOptions) -> Result<quinn::Endpoint, PsError> {
    let addr = bind_addr(me.addr);
    endpoint(Rank(me.index), addr, opts).map_err(|e| match e {
        TransportError::Bind { source, .. } => PsError::Bind {
            task: *me,
            addr,
            source,
        },
        other => PsError::Quic(other.to_string()),
    })
}

/// Dials ps task `ps` until it answers and agrees, or the deadline passes.
pub async fn dial(
    ep: &quinn::Endpoint,
    hello: &Hello,
    ps: Task,
    max_frame: usize,
    deadline: Instant,
    opts: &TransportOptions,
) -> Result<Link, PsError> {
    let mut backoff = Duration::from_millis(50);
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        let attempt = async {
            let connecting = ep.connect(ps.addr, crate::auth::SERVER_NAME);
            let conn = connecting.map_err(|e| e.to_string())?.await;
            let conn = conn.map_err(|e| e.to_string())?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_hello(&mut send, hello).await?;
            let theirs = read_hello(&mut recv).await;
            Ok::<_, String>((conn, send, recv, theirs))
        };
        let per_try = Duration::from_secs(3).min(deadline - Instant::now());
        match timeout(per_try, attempt).await {
            Ok(Ok((conn, send, recv, Ok(theirs)))) => {
                check(&ps, hello, &theirs, Some(ps.index)).inspect_err(|_| {
                    conn.close(CLOSE_ERROR.into(), b"configuration mismatch");
                })?;
                info!(peer = %ps, "connected to the ps task");
                let (peer, max_frame) = (ps, max_frame);
                return Ok(Link {
                    peer,
                    conn,
                    send,
                    recv,
                    max_frame,
                });
            }
            Ok(Ok((conn, _, _, Err(e)))) => {
                // Connected, but it closed instead of answering: it refused us.
                if let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.close_reason() {
                    let reason = String::from_utf8_lossy(&c.reason).into_owned();
                    return Err(PsError::Refused { peer: ps, reason });
                }
                last = e;
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = "no answer".into(),
        }
        sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    let secs = opts.connect_timeout.as_secs();
    Err(PsError::Unreachable { ps, secs, last })
}

/// Accepts connections until every worker in `workers` has arrived and agrees, or the
/// deadline passes. Anyone else is refused with a reason and the wait goes on.
pub async fn accept_workers(
    ep: &quinn::Endpoint,
    me: &Task,
    hello: &Hello,
    workers: &[Task],
    max_frame: usize,
    deadline: Instant,
    opts: &TransportOptions,
) -> Result<Vec<Link>, PsError> {
    let mut links: Vec<Option<Link>> = workers.iter().map(|_| None).collect();
    while links.iter().any(Option::is_none) {
        let incoming = match timeout_at(deadline, ep.accept()).await {
            Ok(Some(incoming)) => incoming,
            _ => {
                let missing = (0..workers.len()).filter(|&w| links[w].is_none());
                return Err(PsError::WorkersMissing {
                    ps: *me,
                    missing: missing.map(|w| workers[w]).collect(),
                    secs: opts.connect_timeout.as_secs(),
                });
            }
        };
        let remote = incoming.remote_address();
        let greet = async {
            let conn = incoming.await.map_err(|e| e.to_string())?;
            let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
            let theirs = read_hello(&mut recv).await?;
            Ok::<_, String>((conn, send, recv, theirs))
        };
        let (conn, mut send, recv, theirs) = match timeout(Duration::from_secs(5), greet).await {
            Ok(Ok(greeted)) => greeted,
            Ok(Err(e)) => {
                warn!(%remote, "a connection attempt failed before its hello: {e}");
                continue;
            }
            Err(_) => {
                warn!(%remote, "a connection sent no hello within 5 s; dropped it");
                continue;
            }
        };

        let index = theirs.rank;
        let is_worker = theirs.fingerprint.get(JOB_KEY).map(String::as_str) == Some("worker");
        let refusal = if !is_worker || index >= workers.len() {
            Some(format!(
                "{me} accepts only worker tasks 0 to {} of its cluster, not {}",
                workers.len().saturating_sub(1),
                claimed(&theirs)
            ))
        } else if links[index].is_some() {
            Some(format!(
                "{me} already has a connection from worker task {index}"
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            warn!(%remote, "refused a connection: {reason}");
            conn.close(CLOSE_ERROR.into(), reason.as_bytes());
            continue;
        }

        if let Err(e) = write_hello(&mut send, hello).await {
            warn!(%remote, "lost a connection while answering its hello: {e}");
            continue;
        }
        let peer = workers[index];
        if let Err(e) = check(&peer, hello, &theirs, None) {
            // Give the worker a moment to read our hello and report the same mismatch.
            let _ = timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(CLOSE_ERROR.into(), b"configuration mismatch");
            return Err(e);
        }
        info!(%peer, "accepted a worker");
        links[index] = Some(Link {
            peer,
            conn,
            send,
            recv,
            max_frame,
        });
    }
    Ok(links.into_iter().flatten().collect())
}

/// Checks a peer's hello against ours: its job (the other one), its index when one is
/// expected, then every other field.
fn check(peer: &Task, ours: &Hello, theirs: &Hello, index: Option<usize>) -> Result<(), PsError> {
    let want = match peer.job {
        Job::Ps => "ps",
        Job::Worker => "worker",
    };
    let job = theirs.fingerprint.get(JOB_KEY).map(String::as_str);
    let same_protocol = theirs.protocol == ours.protocol;
    if same_protocol && (job != Some(want) || index.is_some_and(|i| i != theirs.rank)) {
        return Err(PsError::WrongPeer {
            peer: *peer,
            claimed: claimed(theirs),
        });
    }
    let strip = |h: &Hello| {
        let mut h = h.clone();
        h.fingerprint.remove(JOB_KEY);
        h
    };
    let fields = Hello::differences(&strip(ours), &strip(theirs));
    if fields.is_empty() {
        return Ok(());
    }
    Err(PsError::Mismatch {
        peer: *peer,
        fields,
    })
}

/// What a hello says its sender is, in words.
fn claimed(h: &Hello) -> String {
    match h.fingerprint.get(JOB_KEY) {
        Some(job) => format!("{job} task {}", h.rank),
        None => format!("rank {} of a ring of {}", h.rank, h.world),
    }
}

async fn write_hello(stream: &mut quinn::SendStream, hello: &Hello) -> Result<(), String> {
    let msg = serde_json::to_vec(hello).map_err(|e| e.to_string())?;
    let len = (msg.len() as u32).to_le_bytes();
    stream.write_all(&len).await.map_err(|e| e.to_string())?;
    stream.write_all(&msg).await.map_err(|e| e.to_string())
}

async fn read_hello(stream: &mut quinn::RecvStream) -> Result<Hello, String> {
    let lost = |e: quinn::ReadExactError| match e {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => why_lost(&c),
        other => other.to_string(),
    };
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.map_err(lost)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HELLO {
        return Err(format!("hello of {len} bytes exceeds {MAX_HELLO}"));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await.map_err(lost)?;
    serde_json::from_slice(&buf).map_err(|e| format!("unreadable hello: {e}"))
}

/// Closes the endpoint with `reason` and waits briefly for the close to go out.
pub async fn close_endpoint(ep: &quinn::Endpoint, code: u32, reason: &str) {
    // A close reason must fit in one packet; keep it short.
    let reason: String = reason.chars().take(600).collect();
    ep.close(code.into(), reason.as_bytes());
    let _ = timeout(Duration::from_secs(1), ep.wait_idle()).await;
}
