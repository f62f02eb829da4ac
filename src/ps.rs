//! Parameter-server mode: TensorFlow's ps/worker design (between-graph replication), on
//! the same model, data, optimizer and QUIC transport as the ring.
//!
//! ```text
//!             ps task 0                ps task 1          each ps task holds a shard of
//!        [layers.0.weight, ..]    [layers.0.bias, ..]    the variables and its optimizer
//!           ^   |   ^   |            ^   |   ^   |
//!      push |   |   |   | pull  push |   |   |   | pull
//!           |   v   |   v            |   v   |   v
//!          worker 0  worker 1 ....  (every worker talks to every ps task)
//! ```
//!
//! The cluster file ([`crate::cluster`]) lists the ps and worker tasks. Variables are
//! placed on the ps tasks by tensor ([`placement`]). Worker 0 is the chief: it builds the
//! initial parameters from the seed and sends each ps task its shard, logs progress and
//! writes the summary. Each step every worker computes the gradient of its own batch (the
//! same [`crate::data::Sampler`] shards as the ring's ranks), pushes each ps task its slice
//! and waits for the new values of every slice, which it uses for the next step.
//!
//! - [`SyncMode::Sync`]: a ps task waits for all N workers, sums their gradients in worker
//!   order 0..N-1, multiplies by 1/N, applies the optimizer once and answers everyone.
//!   Only the summation order differs from the ring's, so the parameters match ring mode
//!   to rounding (the tests bound the difference).
//! - [`SyncMode::Async`]: a ps task applies each worker's gradient, scaled by 1/N, as it
//!   arrives and answers that worker alone; gradient staleness is recorded and reported.
//!
//! Per step each worker sends S bytes (its gradient) and receives S (the parameters), so
//! the ps tasks together take in and send out N·S: the ps links are the bottleneck as N
//! grows, unless more ps tasks share the load. The ring sends 2(N−1)/N·S per rank.
//!
//! A ps task ends when every worker has said it is done. Any lost peer ends the run for
//! everyone: QUIC's idle timeout (`--peer-timeout`) notices silent peers, and a task that
//! stops with an error closes its connections with the reason, so no one waits forever.

mod core;
mod net;
pub mod placement;
mod server;
pub mod wire;
mod worker;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

pub use placement::{Placement, Strategy};
pub use server::{PsReport, run_ps_task};
pub use worker::run_worker;

use crate::auth::Security;
use crate::cluster::{ClusterError, ClusterSpec, Job, Task};
use crate::data::Dataset;
use crate::model::Mlp;
use crate::train::{self, TrainConfig, TrainError};
use crate::transport::{Hello, PROTOCOL_VERSION, TransportOptions};

/// Version of the ps protocol of [`wire`]; tasks with different versions refuse each other.
pub const PS_PROTOCOL: u32 = 1;

/// When a ps task applies gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Once per step, with the average of every worker's gradient.
    #[default]
    Sync,
    /// As each worker's gradient arrives.
    Async,
}

impl SyncMode {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SyncMode::Sync => "sync",
            SyncMode::Async => "async",
        }
    }
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SyncMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(SyncMode::Sync),
            "async" => Ok(SyncMode::Async),
            other => Err(format!(
                "unknown ps update mode {other:?}: expected sync or async"
            )),
        }
    }
}

/// The settings of parameter-server mode on top of [`TrainConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PsOptions {
    /// When gradients are applied.
    pub sync: SyncMode,
    /// How variables are placed on the ps tasks.
    pub strategy: Strategy,
}

/// Why a ps or worker task failed. [`PsError::exit_code`] maps each kind to the exit
/// status, with the same meaning as in ring mode.
#[derive(Debug, thiserror::Error)]
pub enum PsError {
    /// The cluster file is unusable, or the task is not in it.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// Bad flags or data, or the summary could not be written.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The task's address could not be bound.
    #[error(
        "{task}: cannot bind {addr}: {source}; is another process using that port? change \
         it in the cluster file"
    )]
    Bind {
        /// This task.
        task: Task,
        /// The address bound.
        addr: std::net::SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// QUIC or TLS could not be configured.
    #[error("cannot configure QUIC: {0}")]
    Quic(String),
    /// A ps task did not answer in time.
    #[error(
        "could not reach {ps} within {secs} s ({last}); is it running, and is UDP port {port} \
         open? raise --connect-timeout if tasks start far apart",
        port = .ps.addr.port()
    )]
    Unreachable {
        /// The ps task.
        ps: Task,
        /// The connect timeout in seconds.
        secs: u64,
        /// The last error seen.
        last: String,
    },
    /// Some workers never connected to a ps task.
    #[error(
        "{ps}: {} did not connect within {secs} s; are they running with the same cluster \
         file? raise --connect-timeout if tasks start far apart",
        list_tasks(.missing)
    )]
    WorkersMissing {
        /// This ps task.
        ps: Task,
        /// The workers that did not connect.
        missing: Vec<Task>,
        /// The connect timeout in seconds.
        secs: u64,
    },
    /// A peer's configuration differs from ours.
    #[error(
        "configuration differs from {peer}'s: {}; start every task with the same flags",
        list_fields(.fields)
    )]
    Mismatch {
        /// The peer.
        peer: Task,
        /// (field, our value, their value) for each differing field.
        fields: Vec<(String, String, String)>,
    },
    /// The peer at an address is not the task the cluster file says.
    #[error("{peer} answered as {claimed}; check that every task uses the same cluster file")]
    WrongPeer {
        /// The expected task.
        peer: Task,
        /// What it said it was.
        claimed: String,
    },
    /// A peer refused us.
    #[error("{peer} refused the connection: {reason}")]
    Refused {
        /// The peer.
        peer: Task,
        /// The reason it gave.
        reason: String,
    },
    /// The connection to a peer is gone.
    #[error("lost {peer}: {reason}")]
    Lost {
        /// The peer.
        peer: Task,
        /// What the transport said.
        reason: String,
    },
    /// A peer sent something the protocol does not allow.
    #[error("{peer} broke the ps protocol: {detail}")]
    Protocol {
        /// The peer.
        peer: Task,
        /// What was wrong.
        detail: String,
    },
}

impl PsError {
    /// The process exit code: 2 for bad input (flags, cluster file, data, configuration that
    /// differs between tasks, a port in use), 3 for a lost or misbehaving peer, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            PsError::Cluster(_) => 2,
            PsError::Train(e) => e.exit_code(),
            PsError::Bind { .. } | PsError::Mismatch { .. } | PsError::WrongPeer { .. } => 2,
            PsError::Quic(_) => 1,
            PsError::Unreachable { .. }
            | PsError::WorkersMissing { .. }
            | PsError::Refused { .. }
            | PsError::Lost { .. }
            | PsError::Protocol { .. } => 3,
        }
    }
}

fn list_tasks(tasks: &[Task]) -> String {
    let names: Vec<String> = tasks.iter().map(Task::to_string).collect();
    names.join(", ")
}

fn list_fields(fields: &[(String, String, String)]) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|(name, ours, theirs)| format!("{name}: here {ours}, there {theirs}"))
        .collect();
    parts.join("; ")
}

/// What every task of a cluster builds before it connects.
struct Setup {
    data: Dataset,
    model: Mlp,
    placement: Placement,
    fingerprint: BTreeMap<String, String>,
    workers: usize,
    transport: TransportOptions,
}

impl Setup {
    fn new(cfg: &TrainConfig, opts: &PsOptions, cluster: &ClusterSpec) -> Result<Setup, PsError> {
        train::validate(cfg)?;
        crate::ingraph::reject_ring_only(cfg, "ps")?;
        let data = Dataset::load(&cfg.data, cfg.seed).map_err(TrainError::from)?;
        let model = Mlp::new(data.features, &cfg.hidden, data.classes);
        let placement = Placement::new(&model.tensors(), cluster.ps_count(), opts.strategy);
        let mut fingerprint = train::fingerprint(cfg, &model, &data);
        // The ring's segment size, buckets and digest checks play no part here.
        fingerprint.remove("segment");
        fingerprint.remove("check_every");
        fingerprint.remove("bucket_size");
        let mut put = |k: &str, v: String| fingerprint.insert(k.to_string(), v);
        put("mode", "ps".into());
        put("ps_protocol", PS_PROTOCOL.to_string());
        put("ps_tasks", cluster.ps_count().to_string());
        put("ps_sync", opts.sync.to_string());
        put("ps_strategy", opts.strategy.to_string());
        put("placement", placement.describe());
        let mut addrs = cluster.tasks(Job::Ps).to_vec();
        addrs.extend_from_slice(cluster.tasks(Job::Worker));
        let security = Security::resolve(cfg.key.as_deref(), cfg.insecure, &addrs)
            .map_err(TrainError::from)?;
        let transport = TransportOptions {
            connect_timeout: cfg.connect_timeout,
            peer_timeout: cfg.peer_timeout,
            segment: cfg.segment,
            security,
            wire: crate::frame::Wire::F32,
        };
        Ok(Setup {
            data,
            model,
            placement,
            fingerprint,
            workers: cluster.worker_count(),
            transport,
        })
    }

    /// The hello of `me`; its job travels in the fingerprint under [`net::JOB_KEY`].
    fn hello(&self, me: &Task) -> Hello {
        let mut fingerprint = self.fingerprint.clone();
        fingerprint.insert(net::JOB_KEY.into(), me.job.to_string());
        Hello {
            protocol: PROTOCOL_VERSION,
            rank: me.index,
            world: self.workers,
            fingerprint,
        }
    }
}
