//! The step loop of one rank: load data, build the replica, form the ring, train, report.
//!
//! Each step a rank computes the gradient of its own batch, appends its loss, sums the
//! buffer over the ring, divides by the world size and applies the optimizer. Because the
//! summed buffer is bit-identical on every rank and the optimizer is deterministic, the
//! replicas stay bit-identical; every `check_every` steps (and at the end) the ranks compare
//! a digest of their parameters to prove it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tracing::{debug, info};

use crate::auth::{AuthError, Security};
use crate::bucket::Buckets;
use crate::checkpoint::{self, Checkpoint, CheckpointError};
use crate::collective::CommError;
use crate::data::{DataError, DataSpec, Dataset, Sampler};
use crate::hosts::{Hosts, HostsError};
use crate::model::{Mlp, Workspace};
use crate::optim::{OptimConfig, Optimizer, OptimizerKind};
use crate::progress::Progress;
use crate::ring::Rank;
use crate::timeline::{Timeline, TimelineError, Track};
use crate::transport::TransportOptions;
use crate::transport::{CommHandle, Hello, PROTOCOL_VERSION, Pending, RingPlace, TransportError};

/// Everything that shapes a training run of one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Epochs to run when `steps` is not set.
    pub epochs: u64,
    /// Total steps to run; overrides `epochs`.
    pub steps: Option<u64>,
    /// Samples per rank per step.
    pub batch_size: usize,
    /// Optimizer and its hyperparameters.
    pub optim: OptimConfig,
    /// Hidden layer widths.
    pub hidden: Vec<usize>,
    /// Seed of the data, the initial parameters and the shuffling.
    pub seed: u64,
    /// Which dataset.
    pub data: DataSpec,
    /// Compare parameter digests every this many steps (0: only at the end).
    pub check_every: u64,
    /// Log a progress line every this many steps.
    pub log_every: u64,
    /// Transport settings.
    pub connect_timeout: Duration,
    /// Silence after which a neighbour counts as lost.
    pub peer_timeout: Duration,
    /// All-reduce segment size in elements.
    pub segment: usize,
    /// How gradients travel on the ring (`--compress`).
    pub compress: crate::frame::Wire,
    /// Where the summary JSON goes, if anywhere.
    pub metrics_out: Option<PathBuf>,
    /// Where the Chrome trace goes (each rank inserts `.rankN`, see [`crate::timeline`]).
    pub timeline: Option<PathBuf>,
    /// Where rank 0 saves the final weights as safetensors (see [`crate::export`]).
    pub save: Option<PathBuf>,
    /// How rank 0 shows progress.
    pub progress: crate::progress::ProgressMode,
    /// Where rank 0 writes checkpoints (and where `resume` looks), if anywhere.
    pub checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every this many steps (0: never).
    pub checkpoint_every: u64,
    /// How many checkpoints to keep.
    pub keep_checkpoints: usize,
    /// Start from the newest intact checkpoint in `checkpoint_dir`, if there is one.
    pub resume: bool,
    /// The cluster key file from `ringtrain keygen`, if any (see [`crate::auth`]).
    pub key: Option<PathBuf>,
    /// Allow an unauthenticated ring on addresses that are not loopback.
    pub insecure: bool,
    /// Survive lost ranks and admit rejoining ones (see [`crate::elastic`]).
    pub elastic: bool,
    /// Gradient bucket size cap in bytes (see [`crate::bucket`]); ring mode only.
    pub bucket_size: u64,
    /// All-reduce each bucket as soon as backward has finished it, rather than after the
    /// whole backward pass. The result is bit-for-bit the same either way.
    pub overlap: bool,
}

/// Default [`TrainConfig::bucket_size`]: 1 MiB (see the README's performance notes).
pub const DEFAULT_BUCKET_SIZE: u64 = 1 << 20;

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 2,
            steps: None,
            batch_size: 64,
            optim: OptimConfig::sgd(0.05, 0.9),
            hidden: vec![128, 64],
            seed: 42,
            data: DataSpec::Synthetic,
            check_every: 50,
            log_every: 20,
            connect_timeout: Duration::from_secs(60),
            peer_timeout: Duration::from_secs(10),
            segment: crate::collective::DEFAULT_SEGMENT,
            compress: crate::frame::Wire::F32,
            metrics_out: None,
            timeline: None,
            save: None,
            progress: crate::progress::ProgressMode::Log,
            checkpoint_dir: None,
            checkpoint_every: 100,
            keep_checkpoints: 3,
            resume: false,
            key: None,
            insecure: false,
            elastic: false,
            bucket_size: DEFAULT_BUCKET_SIZE,
            overlap: true,
        }
    }
}

/// Why a rank's run failed. [`TrainError::exit_code`] maps each kind to the process's
/// exit status.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The hosts file is unusable.
    #[error(transparent)]
    Hosts(#[from] HostsError),
    /// The dataset is unusable.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The flags make no sense together.
    #[error("{0}")]
    Config(String),
    /// The cluster key is unusable, or missing where the addresses need one.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The ring could not be formed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A collective failed during training.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A checkpoint could not be written or used.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Elastic mode could not keep a ring going.
    #[error(transparent)]
    Elastic(#[from] crate::elastic::ElasticError),
    /// `--save` could not write the weights.
    #[error(transparent)]
    Save(#[from] crate::export::ExportError),
    /// `--timeline` could not write the trace.
    #[error(transparent)]
    Timeline(#[from] TimelineError),
    /// The summary could not be written.
    #[error("cannot write the summary to {path}: {source}")]
    Metrics {
        /// The --metrics-out path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl TrainError {
    /// The process exit code: 2 for bad input (flags, hosts file, data, cluster key,
    /// configuration or credential that differs between ranks), 3 for a lost or misbehaving
    /// peer, 4 for replicas that diverged, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            TrainError::Hosts(_) | TrainError::Data(_) | TrainError::Config(_) => 2,
            TrainError::Auth(_) => 2,
            TrainError::Transport(TransportError::Untrusted { .. }) => 2,
            TrainError::Checkpoint(CheckpointError::Incompatible { .. }) => 2,
            TrainError::Checkpoint(_) => 1,
            TrainError::Transport(TransportError::Mismatch { .. })
            | TrainError::Transport(TransportError::WrongPeer { .. })
            | TrainError::Transport(TransportError::Bind { .. }) => 2,
            TrainError::Transport(_) => 3,
            TrainError::Comm(CommError::Diverged(_)) => 4,
            TrainError::Comm(_) => 3,
            TrainError::Metrics { .. } => 1,
            TrainError::Save(_) | TrainError::Timeline(_) => 1,
            TrainError::Elastic(e) => e.exit_code(),
        }
    }
}

/// The result of a run, also written as JSON by `--metrics-out`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Number of ranks.
    pub world_size: usize,
    /// `"ring"`, or `"ps"` and `"in-graph"` for the designs it is compared with.
    pub mode: String,
    /// This rank.
    pub rank: usize,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Samples per rank per step.
    pub batch_size: usize,
    /// Cluster-wide training throughput.
    pub samples_per_sec: f64,
    /// Mean training loss over the last logging window, averaged over ranks.
    pub final_loss: f64,
    /// Accuracy on the held-out test split.
    pub test_accuracy: f64,
    /// Median all-reduce time per step.
    pub allreduce_ms_p50: f64,
    /// 99th percentile all-reduce time per step.
    pub allreduce_ms_p99: f64,
    /// Share of the training loop's time spent in the all-reduce.
    pub comm_fraction: f64,
    /// Bytes this rank sent per step on the ring.
    pub bytes_sent_per_step: f64,
    /// Number of parameters.
    pub params: usize,
    /// Wall time of the training loop.
    pub train_secs: f64,
    /// blake3 of the final parameters (little-endian bytes), hex.
    pub param_digest: String,
    /// Parameter-server mode: number of ps tasks. In that mode the all-reduce fields
    /// measure a worker's push and pull, and `rank` is the worker's task index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ps_tasks: Option<usize>,
    /// Parameter-server mode: `"sync"` or `"async"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ps_sync: Option<String>,
    /// Parameter-server mode: the placement strategy, `"round-robin"` or `"greedy"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ps_strategy: Option<String>,
    /// Parameter-server mode: parameters held by each ps task, by task index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ps_shard_params: Option<Vec<usize>>,
    /// Parameter-server mode: bytes this worker received per step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_received_per_step: Option<f64>,
    /// Asynchronous ps mode: median gradient staleness (ps updates between a worker's
    /// pull and its push), over every gradient slice any ps task applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staleness_p50: Option<f64>,
    /// Asynchronous ps mode: 99th percentile gradient staleness.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staleness_p99: Option<f64>,
    /// Asynchronous ps mode: largest gradient staleness.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staleness_max: Option<f64>,
}

/// The digest of a parameter buffer: blake3 over its little-endian bytes.
pub fn param_digest(params: &[f32]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for p in params {
        h.update(&p.to_le_bytes());
    }
    h.finalize()
}

/// What a finished run leaves: the summary and the final parameters.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The summary (also written by `--metrics-out`).
    pub summary: Summary,
    /// The final parameters, laid out as [`Mlp::tensors`] says.
    pub params: Vec<f32>,
}

/// Loads the hosts file, checks `rank`, and runs the rank.
pub fn run_from_hosts(
    cfg: &TrainConfig,
    hosts: &std::path::Path,
    rank: usize,
) -> Result<Trained, TrainError> {
    let hosts = Hosts::load(hosts)?;
    hosts.check_rank(rank)?;
    let addrs = (0..hosts.world_size()).map(|r| hosts.addr(r)).collect();
    run(
        cfg,
        RingPlace {
            rank: Rank(rank),
            addrs,
        },
    )
}

/// Everything that must agree across ranks, by name, for the handshake.
pub fn fingerprint(cfg: &TrainConfig, model: &Mlp, data: &Dataset) -> BTreeMap<String, String> {
    let mut f = run_identity(cfg, model, data);
    f.insert("epochs".into(), cfg.epochs.to_string());
    f.insert("steps".into(), format!("{:?}", cfg.steps));
    // The bucket layout decides how many all-reduces a step makes and their lengths;
    // overlap only decides when they start, so ranks may differ in it.
    f.insert("bucket_size".into(), cfg.bucket_size.to_string());
    f.insert("check_every".into(), cfg.check_every.to_string());
    f.insert("segment".into(), cfg.segment.to_string());
    f.insert("compress".into(), cfg.compress.name().into());
    f
}

/// The settings a checkpoint must share with the run that resumes from it: those that
/// decide the parameters, the optimizer state and the data order. (The world size is in
/// the handshake and is added by the caller where it matters.)
pub fn run_identity(cfg: &TrainConfig, model: &Mlp, data: &Dataset) -> BTreeMap<String, String> {
    let mut f = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        f.insert(k.to_string(), v);
    };
    put("model_layers", format!("{:?}", model.layers()));
    put("param_count", model.param_len().to_string());
    put("batch_size", cfg.batch_size.to_string());
    put("optimizer", format!("{:?}", cfg.optim));
    put(
        "dataset",
        format!(
            "{} ({} train, {} test)",
            data.identity(),
            data.train_len(),
            data.test_len()
        ),
    );
    put("seed", cfg.seed.to_string());
    f
}

/// Runs one rank to completion.
pub fn run(cfg: &TrainConfig, place: RingPlace) -> Result<Trained, TrainError> {
    if cfg.elastic {
        return crate::elastic::run(cfg, place);
    }
    validate(cfg)?;
    let security = Security::resolve(cfg.key.as_deref(), cfg.insecure, &place.addrs)?;
    let rank = place.rank;
    let world = place.addrs.len();
    let data = Dataset::load(&cfg.data, cfg.seed)?;
    let model = Mlp::new(data.features, &cfg.hidden, data.classes);
    let mut params = vec![0f32; model.param_len()];
    model.init(cfg.seed, &mut params);
    let sampler = Sampler::new(data.train_len(), cfg.seed, rank.0, world, cfg.batch_size);
    if sampler.steps_per_epoch() == 0 {
        return Err(TrainError::Config(format!(
            "{} training samples cannot fill one step of {world} ranks x batch {}; \
             lower --batch-size",
            data.train_len(),
            cfg.batch_size
        )));
    }
    info!(rank = rank.0, world, params = params.len(), dataset = %data.name, "replica built");

    let mut identity = run_identity(cfg, &model, &data);
    identity.insert("world_size".into(), world.to_string());
    let resumed = if cfg.resume {
        load_checkpoint(cfg, &identity)?
    } else {
        None
    };
    let mut fingerprint = fingerprint(cfg, &model, &data);
    let from = resumed.as_ref().map_or("the beginning".into(), |ck| {
        format!(
            "checkpoint at step {} (digest {})",
            ck.header.step,
            ck.digest()
        )
    });
    fingerprint.insert("start".into(), from);
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        rank: rank.0,
        world,
        fingerprint,
    };
    let opts = TransportOptions {
        connect_timeout: cfg.connect_timeout,
        peer_timeout: cfg.peer_timeout,
        segment: cfg.segment,
        security,
        wire: cfg.compress,
    };
    let timeline = match cfg.timeline {
        Some(_) => Timeline::enabled(rank.0),
        None => Timeline::disabled(),
    };
    // Learn now, not after training, that an output directory is missing.
    let save = cfg.save.as_ref().filter(|_| rank.0 == 0);
    for path in [save, cfg.timeline.as_ref()].into_iter().flatten() {
        crate::export::check_destination(path)?;
    }
    let mut comm = CommHandle::connect_with_timeline(place, hello, opts, timeline.clone())?;
    info!(rank = rank.0, "ring formed");

    // Every rank built the same initial parameters from the seed; broadcasting rank 0's
    // makes "the same" exact even if some platform computed an init differently.
    let mut optimizer = Optimizer::new(cfg.optim.clone(), params.len());
    let mut start = 0;
    if let Some(ck) = &resumed {
        params.copy_from_slice(ck.params());
        optimizer
            .restore(ck.header.optimizer_steps, &ck.buffers[1..])
            .map_err(|e| TrainError::Config(format!("cannot resume: {e}")))?;
        start = ck.header.step;
        info!(step = start, "resuming from a checkpoint");
    }
    params = comm.broadcast(params)?;
    let mut run = Loop::new(cfg, &model, &data, sampler, rank, world);
    run.identity = identity;
    run.timeline = timeline.clone();
    let result = run.run(&mut comm, params, optimizer, start);
    match result {
        Ok(trained) => {
            comm.finish();
            write_timeline(cfg, rank, &timeline)?;
            if let (Some(path), 0) = (&cfg.save, rank.0) {
                crate::export::save(path, &model, &trained.params)?;
                info!(path = %path.display(), "weights saved");
            }
            write_summary(cfg, &trained.summary)?;
            Ok(trained)
        }
        // Diverged replicas leave the links sound: end them cleanly so every rank gets
        // the same verdict instead of a lost connection.
        Err(e @ TrainError::Comm(CommError::Diverged(_))) => {
            comm.finish();
            keep_timeline(cfg, rank, &timeline);
            Err(e)
        }
        Err(e) => {
            comm.abort(&format!("rank {} stopped: {e}", rank.0));
            keep_timeline(cfg, rank, &timeline);
            Err(e)
        }
    }
}

/// The newest intact checkpoint in the checkpoint directory, checked against this run.
fn load_checkpoint(
    cfg: &TrainConfig,
    identity: &BTreeMap<String, String>,
) -> Result<Option<Checkpoint>, TrainError> {
    let Some(dir) = &cfg.checkpoint_dir else {
        return Err(TrainError::Config(
            "--resume needs --checkpoint-dir DIR".into(),
        ));
    };
    let Some((path, ck)) = checkpoint::newest_valid(dir)? else {
        tracing::warn!(dir = %dir.display(), "no checkpoint to resume from; starting at step 0");
        return Ok(None);
    };
    checkpoint::check_compatible(&path, &ck, identity)?;
    info!(path = %path.display(), step = ck.header.step, "loaded checkpoint");
    Ok(Some(ck))
}

/// Checks the settings every mode needs: batch size, widths, learning rate, length, logging.
pub fn validate(cfg: &TrainConfig) -> Result<(), TrainError> {
    let bad = |m: &str| Err(TrainError::Config(m.to_string()));
    if cfg.batch_size == 0 {
        return bad("--batch-size must be at least 1");
    }
    if cfg.hidden.contains(&0) {
        return bad("--hidden widths must be at least 1, e.g. --hidden 256,128");
    }
    if !(cfg.optim.lr.is_finite() && cfg.optim.lr > 0.0) {
        return bad("--lr must be a positive number");
    }
    if cfg.epochs == 0 && cfg.steps.is_none() {
        return bad("--epochs must be at least 1 (or give --steps)");
    }
    if cfg.log_every == 0 {
        return bad("--log-every must be at least 1");
    }
    if cfg.bucket_size == 0 {
        return bad("--bucket-size must be at least 4 bytes, e.g. --bucket-size 1M");
    }
    Ok(())
}

/// Writes this rank's trace to `--timeline` with `.rankN` inserted, if one was given.
fn write_timeline(cfg: &TrainConfig, rank: Rank, timeline: &Timeline) -> Result<(), TrainError> {
    let Some(path) = &cfg.timeline else {
        return Ok(());
    };
    let path = crate::timeline::rank_path(path, rank.0);
    timeline.write(&path)?;
    info!(path = %path.display(), spans = timeline.len(), "timeline written");
    Ok(())
}

/// After a failure the trace may show why; writing it must not hide the failure.
fn keep_timeline(cfg: &TrainConfig, rank: Rank, timeline: &Timeline) {
    if let Err(e) = write_timeline(cfg, rank, timeline) {
        tracing::warn!("{e}");
    }
}

/// Writes `summary` as JSON to `--metrics-out`, if one was given.
pub fn write_summary(cfg: &TrainConfig, summary: &Summary) -> Result<(), TrainError> {
    let Some(path) = &cfg.metrics_out else {
        return Ok(());
    };
    let json = serde_json::to_string_pretty(summary).expect("the summary always serializes");
    std::fs::write(path, json + "\n").map_err(|source| TrainError::Metrics {
        path: path.clone(),
        source,
    })?;
    info!(path = %path.display(), "summary written");
    Ok(())
}

/// The state of the step loop.
struct Loop<'a> {
    cfg: &'a TrainConfig,
    model: &'a Mlp,
    data: &'a Dataset,
    sampler: Sampler,
    rank: Rank,
    world: usize,
    hist: Histogram<u64>,
    comm_time: Duration,
    /// Written into checkpoints so a resume can check it.
    identity: BTreeMap<String, String>,
    /// Where `--timeline` spans go (disabled without it).
    timeline: Timeline,
}

impl<'a> Loop<'a> {
    fn new(
        cfg: &'a TrainConfig,
        model: &'a Mlp,
        data: &'a Dataset,
        sampler: Sampler,
        rank: Rank,
        world: usize,
    ) -> Self {
        let hist = Histogram::new(3).expect("3 significant figures is a valid histogram");
        Loop {
            cfg,
            model,
            data,
            sampler,
            rank,
            world,
            hist,
            comm_time: Duration::ZERO,
            identity: BTreeMap::new(),
            timeline: Timeline::disabled(),
        }
    }

    fn total_steps(&self) -> u64 {
        let per_epoch = self.sampler.steps_per_epoch() as u64;
        self.cfg.steps.unwrap_or(self.cfg.epochs * per_epoch)
    }

    fn run(
        mut self,
        comm: &mut CommHandle,
        mut params: Vec<f32>,
        mut optimizer: Optimizer,
        first: u64,
    ) -> Result<Trained, TrainError> {
        let (b, features, p) = (self.cfg.batch_size, self.data.features, params.len());
        let mut ws = Workspace::new();
        let (mut x, mut y) = (vec![0f32; b * features], vec![0u32; b]);
        let mut grad = vec![0f32; p];
        let mut exchange = Exchange::new(self.model, self.cfg.bucket_size, self.cfg.compress);
        let overlap = self.cfg.overlap;
        let per_epoch = self.sampler.steps_per_epoch() as u64;
        let total = self.total_steps();
        let scale = 1.0 / self.world as f32;
        let mut window = LossWindow::default();
        let start = Instant::now();
        let mut last_log = (Instant::now(), first, Duration::ZERO);
        let progress = Progress::new(self.cfg.progress, self.rank.0, total, per_epoch);
        progress.step(first);
        let tl = self.timeline.clone();

        for step in first..total {
            let (epoch, in_epoch) = (step / per_epoch, (step % per_epoch) as usize);
            let idx = self.sampler.batch(epoch, in_epoch);
            self.data.gather_train(idx, &mut x, &mut y);
            let t0 = tl.now();
            exchange.begin_step();
            let model = self.model;
            let ready = |layer: std::ops::Range<usize>, grad: &[f32]| {
                if overlap {
                    exchange.send_ready(comm, layer.start, grad);
                }
            };
            let (loss, _) = model.forward_backward_with(&params, &x, &y, &mut ws, &mut grad, ready);
            tl.span(Track::Train, "forward/backward", t0, &[("step", step + 1)]);

            // With overlap this is only the part of the all-reduce backward did not hide.
            let t = Instant::now();
            exchange.send_rest(comm, &grad, loss);
            let loss = exchange.wait_all(&mut grad)? * scale;
            let took = t.elapsed();
            self.comm_time += took;
            let _ = self.hist.record(took.as_micros().max(1) as u64);
            let args = [("step", step + 1)];
            tl.span_between(Track::Train, "all-reduce", t, t + took, &args);

            let t1 = tl.now();
            grad.iter_mut().for_each(|g| *g *= scale);
            optimizer.step(&mut params, &grad);
            tl.span(Track::Train, "optimizer", t1, &[("step", step + 1)]);
            window.push(f64::from(loss));

            let done = step + 1;
            if self.cfg.check_every > 0 && done % self.cfg.check_every == 0 {
                let t2 = tl.now();
                comm.check_bucket_order()?;
                comm.check_same(param_digest(&params).as_bytes())?;
                tl.span(Track::Train, "digest check", t2, &[("step", done)]);
                debug!(rank = self.rank.0, step = done, "parameter digests agree");
            }
            progress.step(done);
            if done % self.cfg.log_every == 0 || done == total {
                self.log_progress(done, epoch, &mut window, &mut last_log, &progress);
            }
            if self.rank.0 == 0 && self.checkpoint_due(done, total) {
                self.save(done, per_epoch, &params, &optimizer)?;
            }
        }
        let train_time = start.elapsed();
        progress.finish();
        comm.check_bucket_order()?;
        comm.check_same(param_digest(&params).as_bytes())?;
        let sent = comm.bytes_sent();
        let ran = total.saturating_sub(first);
        let summary = self.summary(ran, train_time, window.last_mean, &params, sent);
        Ok(Trained { summary, params })
    }

    fn checkpoint_due(&self, done: u64, total: u64) -> bool {
        let every = self.cfg.checkpoint_every;
        self.cfg.checkpoint_dir.is_some() && every > 0 && (done % every == 0 || done == total)
    }

    fn save(
        &self,
        done: u64,
        per_epoch: u64,
        params: &[f32],
        opt: &Optimizer,
    ) -> Result<(), TrainError> {
        let dir = self
            .cfg
            .checkpoint_dir
            .as_ref()
            .expect("checked by checkpoint_due");
        let (optimizer_steps, state) = opt.state();
        let mut buffers = vec![("params".to_string(), params.to_vec())];
        buffers.extend(state.iter().map(|(name, b)| (name.to_string(), b.to_vec())));
        let header = checkpoint::Header {
            step: done,
            epoch: done / per_epoch,
            position: done % per_epoch,
            optimizer_steps,
            fingerprint: self.identity.clone(),
            buffers: buffers.iter().map(|(n, b)| (n.clone(), b.len())).collect(),
        };
        let ck = Checkpoint { header, buffers };
        checkpoint::write(dir, &ck, self.cfg.keep_checkpoints)?;
        Ok(())
    }

    fn log_progress(
        &self,
        done: u64,
        epoch: u64,
        window: &mut LossWindow,
        last: &mut (Instant, u64, Duration),
        progress: &Progress,
    ) {
        let loss = window.close();
        let secs = last.0.elapsed().as_secs_f64().max(1e-9);
        let samples = (done - last.1) as f64 * (self.cfg.batch_size * self.world) as f64;
        let comm_share = (self.comm_time - last.2).as_secs_f64() / secs;
        *last = (Instant::now(), done, self.comm_time);
        progress.window(loss, samples / secs);
        if self.rank.0 == 0 && !progress.is_bar() {
            info!(
                step = done,
                epoch,
                loss = format_args!("{loss:.4}"),
                samples_per_sec = format_args!("{:.0}", samples / secs),
                allreduce = format_args!("{:.0}%", 100.0 * comm_share),
                "progress"
            );
        }
    }

    fn summary(&self, steps: u64, t: Duration, loss: f64, params: &[f32], sent: u64) -> Summary {
        let mut ws = Workspace::new();
        let (_, acc) = self
            .model
            .evaluate(params, &self.data.test_x, &self.data.test_y, &mut ws);
        let secs = t.as_secs_f64().max(1e-9);
        let ms = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        Summary {
            world_size: self.world,
            mode: "ring".into(),
            rank: self.rank.0,
            steps,
            batch_size: self.cfg.batch_size,
            samples_per_sec: (steps as f64) * (self.cfg.batch_size * self.world) as f64 / secs,
            final_loss: loss,
            test_accuracy: f64::from(acc),
            allreduce_ms_p50: ms(0.5),
            allreduce_ms_p99: ms(0.99),
            comm_fraction: self.comm_time.as_secs_f64() / secs,
            bytes_sent_per_step: sent as f64 / steps.max(1) as f64,
            params: params.len(),
            train_secs: secs,
            param_digest: param_digest(params).to_hex().to_string(),
            ps_tasks: None,
            ps_sync: None,
            ps_strategy: None,
            ps_shard_params: None,
            bytes_received_per_step: None,
            staleness_p50: None,
            staleness_p99: None,
            staleness_max: None,
        }
    }
}

/// One step's gradient buckets on their way around the ring (see [`crate::bucket`]).
///
/// The last bucket (the one at offset 0) carries this rank's loss in one extra slot, so the
/// all-reduces also sum the loss; it is sent once backward is done and the loss is known.
/// With `--compress` that slot would be rounded to 16 bits like the gradients, so the loss
/// then goes in an all-reduce of its own in full `f32`, queued right after that bucket.
struct Exchange {
    buckets: Buckets,
    /// Each bucket's buffer, reused from step to step (empty while it is on the ring).
    bufs: Vec<Vec<f32>>,
    /// The all-reduces started this step, by bucket index, in the order they were started.
    pending: Vec<(usize, Pending)>,
    /// Whether the loss travels apart from the gradients (a 16-bit wire).
    loss_apart: bool,
    /// This step's exact all-reduce of the loss, when it travels apart.
    loss: Option<Pending>,
}

impl Exchange {
    fn new(model: &Mlp, bucket_size: u64, wire: crate::frame::Wire) -> Exchange {
        let buckets = Buckets::new(&model.tensor_ranges(), bucket_size);
        debug_assert!(!buckets.is_empty(), "invariant: a model has parameters");
        let bufs = buckets
            .ranges()
            .iter()
            .map(|r| Vec::with_capacity(r.len() + 1));
        debug!(buckets = buckets.len(), bucket_size, "gradient buckets");
        Exchange {
            bufs: bufs.collect(),
            buckets,
            pending: Vec::new(),
            loss_apart: wire != crate::frame::Wire::F32,
            loss: None,
        }
    }

    fn begin_step(&mut self) {
        self.buckets.reset();
        self.pending.clear();
        self.loss = None;
    }

    /// Starts every bucket that is final from `from` on, except the last one.
    fn send_ready(&mut self, comm: &mut CommHandle, from: usize, grad: &[f32]) {
        // The last bucket starts at 0 and every other one later, so `from` 1 or more
        // never releases it.
        for i in self.buckets.ready(from.max(1)) {
            self.send(comm, i, grad, None);
        }
    }

    /// Starts the buckets not started yet, the last one with `loss`.
    fn send_rest(&mut self, comm: &mut CommHandle, grad: &[f32], loss: f32) {
        let last = self.buckets.len() - 1;
        for i in self.buckets.ready(0) {
            let slot = (i == last && !self.loss_apart).then_some(loss);
            self.send(comm, i, grad, slot);
        }
        if self.loss_apart {
            self.loss = Some(comm.allreduce_f32_start(vec![loss]));
        }
    }

    fn send(&mut self, comm: &mut CommHandle, i: usize, grad: &[f32], loss: Option<f32>) {
        let range = self.buckets.ranges()[i].clone();
        let mut buf = std::mem::take(&mut self.bufs[i]);
        buf.clear();
        buf.extend_from_slice(&grad[range.clone()]);
        buf.extend(loss);
        tracing::trace!(bucket = i, len = range.len(), "bucket started");
        self.pending.push((i, comm.allreduce_start(buf, range)));
    }

    /// Waits for every bucket in the order they were started, writes the sums into `grad`
    /// and returns the summed loss. The first failure is returned; later buckets are then
    /// dropped, which leaves nothing behind on the communication thread.
    fn wait_all(&mut self, grad: &mut [f32]) -> Result<f32, CommError> {
        let mut loss = 0.0;
        for (i, pending) in self.pending.drain(..) {
            let buf = pending.wait()?;
            let range = self.buckets.ranges()[i].clone();
            // An all-reduce gives back a buffer as long as the one it was given.
            let (sum, rest) = buf.split_at(range.len());
            grad[range].copy_from_slice(sum);
            if let Some(&l) = rest.first() {
                loss = l;
            }
            self.bufs[i] = buf;
        }
        if let Some(apart) = self.loss.take() {
            loss = apart.wait()?[0];
        }
        Ok(loss)
    }
}

/// Mean loss over the steps since the last log line.
#[derive(Debug, Default)]
struct LossWindow {
    sum: f64,
    count: u64,
    last_mean: f64,
}

impl LossWindow {
    fn push(&mut self, loss: f64) {
        self.sum += loss;
        self.count += 1;
    }

    fn close(&mut self) -> f64 {
        self.last_mean = self.sum / self.count.max(1) as f64;
        (self.sum, self.count) = (0.0, 0);
        self.last_mean
    }
}

/// The optimizer configuration for a kind, learning rate and momentum.
pub fn optim_config(kind: OptimizerKind, lr: Option<f32>, momentum: f32) -> OptimConfig {
    match kind {
        OptimizerKind::Sgd => OptimConfig::sgd(lr.unwrap_or(0.05), momentum),
        OptimizerKind::Adam => OptimConfig::adam(lr.unwrap_or(1e-3)),
    }
}
