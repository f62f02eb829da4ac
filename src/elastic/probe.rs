//! The control plane of elastic mode: every rank answers "who are you, and where are you?"
//! at its hosts-file address, for the whole life of the process.
//!
//! A probe is one short QUIC connection on an endpoint built by
//! [`crate::transport::endpoint`]: the prober opens a stream, sends a
//! [`ProbeRequest`] as JSON and finishes the stream; the answerer replies with its
//! [`PeerStatus`] as JSON, finishes, and waits for the prober to close. The ring itself runs
//! on a second, per-process data port that each rank announces in its status, so the
//! control endpoint stays free to answer while the ring is trained, torn down or re-formed.
//!
//! [`Control`] runs the endpoint on its own thread with a current-thread tokio runtime, like
//! [`CommHandle`](crate::transport::CommHandle) does for the ring.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::debug;

use crate::auth::SERVER_NAME;
use crate::ring::Rank;
use crate::transport::{self, TransportError, TransportOptions};

/// Largest probe request or status accepted, in bytes.
const MAX_MESSAGE: usize = 16 * 1024;
/// How long an answerer gives one probe connection, start to end.
const ANSWER_LIMIT: Duration = Duration::from_secs(3);

/// Where a rank is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Looking for peers, forming a ring or agreeing on the state: reachable for a new ring.
    Forming,
    /// Training in the ring of [`PeerStatus::members`].
    Training,
    /// Done: the run reached its last step.
    Finished,
}

/// What a rank answers to a probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The answering rank (its line in the hosts file).
    pub rank: usize,
    /// Where it is.
    pub phase: Phase,
    /// Generation of the last ring it formed (0: none yet).
    pub generation: u64,
    /// Hosts-file ranks of that ring, in ring order.
    pub members: Vec<usize>,
    /// Steps its state has completed.
    pub step: u64,
    /// Where its ring endpoint listens.
    pub data_addr: SocketAddr,
    /// While forming: the ring it is ready to form. A rank dials only once every member
    /// proposes the same ring, so that attempts start together and views agree.
    pub proposal: Option<Proposal>,
}

/// A ring that a rank is ready to form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The new ring's generation.
    pub generation: u64,
    /// Its members, hosts-file ranks in ring order.
    pub members: Vec<usize>,
}

/// What a prober sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRequest {
    /// The probing rank.
    pub from: usize,
    /// Asks a training rank to re-form its ring at the next step boundary, so the prober
    /// can join.
    pub join: bool,
}

/// This rank's status and whether someone asked to join, shared with the answerer.
#[derive(Debug)]
struct Shared {
    status: PeerStatus,
    join_requested: bool,
}

struct ProbeJob {
    targets: Vec<SocketAddr>,
    request: ProbeRequest,
    limit: Duration,
    reply: std::sync::mpsc::Sender<Vec<Option<PeerStatus>>>,
}

/// The control endpoint of one rank: answers probes in the background, sends probes on
/// request. Dropping it closes the endpoint.
pub struct Control {
    shared: Arc<Mutex<Shared>>,
    jobs: Option<mpsc::UnboundedSender<ProbeJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("status", &self.lock().status)
            .finish()
    }
}

impl Control {
    /// Binds the control endpoint at `addr` (this rank's hosts-file address) and starts
    /// answering probes with `status`.
    pub fn start(
        addr: SocketAddr,
        opts: &TransportOptions,
        status: PeerStatus,
    ) -> Result<Control, TransportError> {
        let rank = Rank(status.rank);
        let shared = Arc::new(Mutex::new(Shared {
            status,
            join_requested: false,
        }));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let (opts, for_thread) = (opts.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name(format!("ringtrain-control-{}", rank.0))
            .spawn(move || control_thread(rank, addr, opts, for_thread, ready_tx, jobs_rx))
            .map_err(|e| TransportError::Config(format!("cannot start a thread: {e}")))?;
        let mut control = Control {
            shared,
            jobs: Some(jobs_tx),
            thread: Some(thread),
        };
        let ready = ready_rx.recv().unwrap_or_else(|_| {
            Err(TransportError::Config(
                "the control thread died during set-up".into(),
            ))
        });
        match ready {
            Ok(()) => Ok(control),
            Err(e) => {
                control.stop();
                Err(e)
            }
        }
    }

    /// Probes every address in `targets` at once and returns, by position, the status of
    /// each that answered within `limit`.
    pub fn probe(
        &self,
        targets: &[SocketAddr],
        request: &ProbeRequest,
        limit: Duration,
    ) -> Vec<Option<PeerStatus>> {
        let none = || vec![None; targets.len()];
        let Some(jobs) = &self.jobs else {
            return none();
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let job = ProbeJob {
            targets: targets.to_vec(),
            request: request.clone(),
            limit,
            reply: tx,
        };
        if jobs.send(job).is_err() {
            return none();
        }
        rx.recv_timeout(limit + Duration::from_secs(2))
            .unwrap_or_else(|_| none())
    }

    /// Changes what this rank answers.
    pub fn update(&self, f: impl FnOnce(&mut PeerStatus)) {
        f(&mut self.lock().status);
    }

    /// What this rank answers now.
    pub fn status(&self) -> PeerStatus {
        self.lock().status.clone()
    }

    /// Enters `phase`; entering [`Phase::Forming`] also forgets any join request, since the
    /// ring about to form will look for every live rank anyway.
    pub fn set_phase(&self, phase: Phase) {
        let mut shared = self.lock();
        shared.status.phase = phase;
        if phase == Phase::Forming {
            shared.join_requested = false;
        }
    }

    /// Whether a rank outside the ring asked to join since the ring formed.
    pub fn join_requested(&self) -> bool {
        self.lock().join_requested
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    fn stop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The shared state stays consistent under a panic (every update is one assignment), so a
/// poisoned lock is used as it is.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn control_thread(
    rank: Rank,
    addr: SocketAddr,
    opts: TransportOptions,
    shared: Arc<Mutex<Shared>>,
    ready: std::sync::mpsc::Sender<Result<(), TransportError>>,
    mut jobs: mpsc::UnboundedReceiver<ProbeJob>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(TransportError::Config(format!("tokio runtime: {e}"))));
            return;
        }
    };
    rt.block_on(async move {
        let ep = match transport::endpoint(rank, transport::bind_addr(addr), &opts) {
            Ok(ep) => ep,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                incoming = ep.accept() => match incoming {
                    Some(incoming) => {
                        tasks.spawn(answer(incoming, shared.clone()));
                    }
                    None => break,
                },
                job = jobs.recv() => match job {
                    Some(job) => {
                        tasks.spawn(probe_all(ep.clone(), job));
                    }
                    None => break,
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        tasks.abort_all();
        ep.close(0u32.into(), b"done");
        let _ = timeout(Duration::from_millis(500), ep.wait_idle()).await;
    });
}

/// Answers one probe with this rank's status; notes a join request while training.
async fn answer(incoming: quinn::Incoming, shared: Arc<Mutex<Shared>>) {
    let remote = incoming.remote_address();
    let work = async {
        let conn = incoming.await.map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let body = recv
            .read_to_end(MAX_MESSAGE)
            .await
            .map_err(|e| e.to_string())?;
        let request: ProbeRequest =
            serde_json::from_slice(&body).map_err(|e| format!("not a probe: {e}"))?;
        let status = {
            let mut shared = lock(&shared);
            if request.join && shared.status.phase == Phase::Training {
                shared.join_requested = true;
            }
            shared.status.clone()
        };
        let reply = serde_json::to_vec(&status).expect("a status always serializes");
        send.write_all(&reply).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        // The prober closes once it has read the reply; closing first could lose it.
        let _ = conn.closed().await;
        Ok::<_, String>(request)
    };
    match timeout(ANSWER_LIMIT, work).await {
        Ok(Ok(request)) => debug!(%remote, from = request.from, "answered a probe"),
        Ok(Err(e)) => debug!(%remote, "a probe connection failed: {e}"),
        Err(_) => debug!(%remote, "a probe connection did not finish in time"),
    }
}

async fn probe_all(ep: quinn::Endpoint, job: ProbeJob) {
    let request = serde_json::to_vec(&job.request).expect("a probe always serializes");
    let mut set = JoinSet::new();
    for (i, addr) in job.targets.iter().copied().enumerate() {
        let (ep, request) = (ep.clone(), request.clone());
        set.spawn(async move {
            let result = timeout(job.limit, probe(&ep, addr, &request)).await;
            let status = match result {
                Ok(Ok(status)) => Some(status),
                Ok(Err(e)) => {
                    debug!(%addr, "probe failed: {e}");
                    None
                }
                Err(_) => None,
            };
            (i, status)
        });
    }
    let mut out = vec![None; job.targets.len()];
    while let Some(done) = set.join_next().await {
        if let Ok((i, status)) = done {
            out[i] = status;
        }
    }
    let _ = job.reply.send(out);
}

async fn probe(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    request: &[u8],
) -> Result<PeerStatus, String> {
    let conn = ep
        .connect(addr, SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(request).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let body = recv.read_to_end(MAX_MESSAGE).await;
    conn.close(0u32.into(), b"probed");
    let body = body.map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| format!("unreadable status from {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> TransportOptions {
        TransportOptions {
            connect_timeout: Duration::from_secs(5),
            peer_timeout: Duration::from_secs(2),
            segment: 1024,
            security: crate::auth::Security::Unauthenticated,
            wire: crate::frame::Wire::F32,
        }
    }

    fn status(rank: usize, data_addr: SocketAddr) -> PeerStatus {
        PeerStatus {
            rank,
            phase: Phase::Forming,
            generation: 0,
            members: Vec::new(),
            step: 0,
            data_addr,
            proposal: None,
        }
    }

    #[test]
    fn probes_see_live_ranks_and_miss_dead_ones() {
        let addrs = crate::launch::free_local_addrs(3).unwrap();
        let a = Control::start(addrs[0], &opts(), status(0, addrs[0])).unwrap();
        let b = Control::start(addrs[1], &opts(), status(1, addrs[1])).unwrap();
        b.update(|s| {
            s.phase = Phase::Training;
            s.step = 7;
        });
        let request = ProbeRequest {
            from: 0,
            join: true,
        };
        let seen = a.probe(&addrs[1..], &request, Duration::from_millis(500));
        assert_eq!(seen.len(), 2);
        let got = seen[0].as_ref().expect("rank 1 answers");
        assert_eq!((got.rank, got.phase, got.step), (1, Phase::Training, 7));
        assert!(seen[1].is_none(), "nobody listens at {}", addrs[2]);
        assert!(b.join_requested(), "a join probe marks a training rank");
        b.set_phase(Phase::Forming);
        assert!(!b.join_requested(), "forming forgets join requests");
    }
}
