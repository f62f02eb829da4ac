//! Command-line flags (clap) and their translation into a [`TrainConfig`].
//!
//! `ringtrain --hosts FILE --rank N [training flags]` trains (the default command, also
//! `ringtrain train`); `ringtrain launch --np K [training flags]` runs K ranks locally.
//! Parameter-server mode replaces `--rank N` by `--job ps|worker --task N` with a cluster
//! file as `--hosts`; `launch --mode ps|in-graph` runs the contrast designs locally.
//! [`TrainOpts::to_args`] writes the training flags back out so `launch` can hand exactly
//! the same settings to every rank.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::data::DataSpec;
use crate::optim::OptimizerKind;
use crate::progress::{LogFormat, ProgressMode};
use crate::train::{TrainConfig, optim_config};

/// ringtrain: data-parallel training with a ring all-reduce over QUIC.
#[derive(Debug, Parser)]
#[command(name = "ringtrain", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do; training when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Training flags when no subcommand is given.
    #[command(flatten)]
    pub train: TrainArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train as one rank of a cluster (the default command).
    Train(TrainArgs),
    /// Run a whole cluster of ranks on this machine, on 127.0.0.1.
    Launch(LaunchArgs),
    /// Benchmarks: all-reduce bandwidth per size, training throughput per node count.
    Bench(crate::bench::BenchArgs),
    /// Write a new cluster key; copy it to every machine and pass it with --key.
    Keygen(KeygenArgs),
}

/// Flags of one rank.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct TrainArgs {
    /// Hosts file: one HOST:PORT per line; rank N is the N-th address.
    #[arg(long, value_name = "FILE")]
    pub hosts: Option<PathBuf>,
    /// This process's rank, 0 .. number of addresses in the hosts file [default: from the
    /// launcher's environment: OMPI_COMM_WORLD_RANK, PMI_RANK, RANK or SLURM_PROCID].
    #[arg(long, value_name = "N")]
    pub rank: Option<usize>,
    /// Take the rank from the host name's ordinal (`trainer-3` is rank 3), as Kubernetes
    /// names the pods of a StatefulSet.
    #[arg(long, conflicts_with = "rank")]
    pub rank_from_hostname: bool,
    /// Parameter-server mode: this task's job, `ps` or `worker`; --hosts is then a cluster
    /// file of `JOB HOST:PORT` lines (see `ringtrain::cluster`).
    #[arg(long, value_name = "JOB", conflicts_with_all = ["rank", "rank_from_hostname"])]
    pub job: Option<crate::cluster::Job>,
    /// Parameter-server mode: this task's index within its job (0 is the job's first line).
    #[arg(long, value_name = "N", conflicts_with_all = ["rank", "rank_from_hostname"])]
    pub task: Option<usize>,
    /// The configuration file and --print-config.
    #[command(flatten)]
    pub config: crate::config::ConfigArgs,
    /// Training settings.
    #[command(flatten)]
    pub opts: TrainOpts,
}

/// Flags of `ringtrain launch`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct LaunchArgs {
    /// Number of ranks to start (workers with --mode ps, replicas with --mode in-graph).
    #[arg(long, default_value_t = 4, value_name = "K")]
    pub np: usize,
    /// The design to run: `ring` (all-reduce over QUIC), `ps` (parameter servers over QUIC)
    /// or `in-graph` (K replica threads in this process, no network).
    #[arg(long, value_enum, default_value_t = LaunchMode::Ring, value_name = "MODE")]
    pub mode: LaunchMode,
    /// Number of ps tasks with --mode ps [default: 1].
    #[arg(long, value_name = "K")]
    pub ps: Option<usize>,
    /// The configuration file and --print-config.
    #[command(flatten)]
    pub config: crate::config::ConfigArgs,
    /// Training settings, passed to every rank.
    #[command(flatten)]
    pub opts: TrainOpts,
}

/// The designs `ringtrain launch` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LaunchMode {
    /// Ring all-reduce between processes over QUIC.
    Ring,
    /// Parameter-server tasks and worker tasks, processes over QUIC.
    Ps,
    /// In-graph replication: replica threads in this process.
    InGraph,
}

/// Flags of `ringtrain keygen`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct KeygenArgs {
    /// Where to write the key (mode 0600); an existing file is never overwritten.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Training settings shared by `train` and `launch`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct TrainOpts {
    /// Epochs over the training set (ignored when --steps is given).
    #[arg(long, default_value_t = 2)]
    pub epochs: u64,
    /// Total optimizer steps; overrides --epochs.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Samples per rank per step (the global batch is this times the number of ranks).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Learning rate [default: 0.05 for sgd, 0.001 for adam].
    #[arg(long)]
    pub lr: Option<f32>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    /// Optimizer: sgd (with momentum) or adam.
    #[arg(long, default_value = "sgd")]
    pub optimizer: OptimizerKind,
    /// Hidden layer widths, comma-separated; `none` for softmax regression.
    #[arg(long, default_value = "128,64", value_name = "W1,W2,..")]
    pub hidden: Widths,
    /// Seed for data, initial parameters and shuffling; must match on every rank.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Dataset: `synthetic` (built in) or `mnist:DIR` with MNIST/Fashion-MNIST IDX files.
    #[arg(long, default_value = "synthetic")]
    pub data: DataSpec,
    /// Compare parameter digests across ranks every K steps (0: only at the end).
    #[arg(long, default_value_t = 50, value_name = "K")]
    pub check_every: u64,
    /// Print a progress line every this many steps.
    #[arg(long, default_value_t = 20)]
    pub log_every: u64,
    /// Seconds to keep trying to reach the neighbours at start-up.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub connect_timeout: f64,
    /// Seconds of silence after which a neighbour counts as lost.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub peer_timeout: f64,
    /// All-reduce segment size in f32 elements (frames are pipelined per segment).
    #[arg(long, default_value_t = crate::collective::DEFAULT_SEGMENT)]
    pub segment: usize,
    /// Send gradients as 16-bit values (fp16 or bf16), halving the ring's bytes; sums are
    /// still accumulated in f32. Ring mode only.
    #[arg(long, value_enum, default_value = "none", value_name = "WIRE")]
    pub compress: crate::frame::Wire,
    /// Write the run's summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub metrics_out: Option<PathBuf>,
    /// Only errors and the final summary on the terminal: no progress, no info lines.
    #[arg(long)]
    pub quiet: bool,
    /// Log lines on stderr as human-readable text, or as one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,
    /// Write a Chrome trace of every step (Perfetto, chrome://tracing): each rank writes
    /// FILE with `.rankN` before the extension; `launch` also merges them into FILE.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,
    /// Rank 0 writes the final weights to this safetensors file (weights are [in, out]).
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
    /// Directory where rank 0 writes checkpoints (all ranks read it with --resume).
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every K steps and at the end (0: never).
    #[arg(long, default_value_t = 100, value_name = "K")]
    pub checkpoint_every: u64,
    /// Keep the newest M checkpoints, delete older ones.
    #[arg(long, default_value_t = 3, value_name = "M")]
    pub keep_checkpoints: usize,
    /// Start from the newest intact checkpoint in --checkpoint-dir (from step 0 if none).
    #[arg(long)]
    pub resume: bool,
    /// Cluster key from `ringtrain keygen`: only processes that hold it can join the ring.
    #[arg(long, value_name = "FILE", env = "RINGTRAIN_KEY")]
    pub key: Option<PathBuf>,
    /// Allow a ring without a cluster key on addresses that are not loopback: still
    /// encrypted, but anyone who can reach the ports can join and read or change gradients.
    #[arg(long)]
    pub insecure: bool,
    /// Keep training when ranks are lost (the survivors re-form a smaller ring) and let
    /// restarted ranks rejoin; the global batch follows the ring's size (see the README).
    #[arg(long)]
    pub elastic: bool,
    /// Gradient bucket size: the gradient is all-reduced in buckets of whole tensors of at
    /// least BYTES each (4096, 256K, 1M), last layer first; must match on every rank.
    #[arg(long, value_name = "BYTES",
          default_value_t = crate::bench::Size(crate::train::DEFAULT_BUCKET_SIZE))]
    pub bucket_size: crate::bench::Size,
    /// All-reduce the buckets after the whole backward pass instead of starting each one
    /// as soon as backward has finished it (the results are bit-for-bit the same).
    #[arg(long)]
    pub no_overlap: bool,
    /// Parameter-server mode: how variables are placed on the ps tasks, `round-robin` by
    /// tensor or `greedy` by bytes.
    #[arg(long, default_value = "round-robin", value_name = "STRATEGY")]
    pub ps_strategy: crate::ps::Strategy,
    /// Parameter-server mode: `sync` (apply the average of every worker's gradient once per
    /// step) or `async` (apply each worker's gradient as it arrives).
    #[arg(long, default_value = "sync", value_name = "MODE")]
    pub ps_sync: crate::ps::SyncMode,
}

impl TrainOpts {
    /// The configuration these flags describe, or a message naming the bad flag.
    pub fn to_config(&self) -> Result<TrainConfig, String> {
        let secs = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v < 1e9 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(format!(
                    "--{name} must be a positive number of seconds, got {v}"
                ))
            }
        };
        Ok(TrainConfig {
            epochs: self.epochs,
            steps: self.steps,
            batch_size: self.batch_size,
            optim: optim_config(self.optimizer, self.lr, self.momentum),
            hidden: self.hidden.0.clone(),
            seed: self.seed,
            data: self.data.clone(),
            check_every: self.check_every,
            log_every: self.log_every,
            connect_timeout: secs("connect-timeout", self.connect_timeout)?,
            peer_timeout: secs("peer-timeout", self.peer_timeout)?,
            segment: self.segment,
            compress: self.compress,
            metrics_out: self.metrics_out.clone(),
            timeline: self.timeline.clone(),
            save: self.save.clone(),
            // The binary upgrades this to a bar on an interactive terminal.
            progress: ProgressMode::Log,
            checkpoint_dir: self.checkpoint_dir.clone(),
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep_checkpoints,
            resume: self.resume,
            key: self.key.clone(),
            insecure: self.insecure,
            elastic: self.elastic,
            bucket_size: self.bucket_size.0,
            overlap: !self.no_overlap,
        })
    }

    /// These settings as command-line flags that parse back to the same value.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: String| {
            a.push(format!("--{name}").into());
            a.push(value.into());
        };
        flag("epochs", self.epochs.to_string());
        if let Some(s) = self.steps {
            flag("steps", s.to_string());
        }
        flag("batch-size", self.batch_size.to_string());
        if let Some(lr) = self.lr {
            flag("lr", lr.to_string());
        }
        flag("momentum", self.momentum.to_string());
        flag("optimizer", self.optimizer.to_string());
        flag("hidden", self.hidden.to_string());
        flag("seed", self.seed.to_string());
        flag("data", self.data.to_string());
        flag("check-every", self.check_every.to_string());
        flag("log-every", self.log_every.to_string());
        flag("connect-timeout", self.connect_timeout.to_string());
        flag("peer-timeout", self.peer_timeout.to_string());
        flag("segment", self.segment.to_string());
        flag("compress", self.compress.name().to_string());
        flag("checkpoint-every", self.checkpoint_every.to_string());
        flag("keep-checkpoints", self.keep_checkpoints.to_string());
        flag("bucket-size", self.bucket_size.to_string());
        if let Some(dir) = &self.checkpoint_dir {
            a.push("--checkpoint-dir".into());
            a.push(dir.clone().into_os_string());
        }
        if self.resume {
            a.push("--resume".into());
        }
        if let Some(p) = &self.metrics_out {
            a.push("--metrics-out".into());
            a.push(p.clone().into_os_string());
        }
        if self.quiet {
            a.push("--quiet".into());
        }
        a.push(format!("--log-format={}", self.log_format).into());
        for (name, path) in [("--timeline", &self.timeline), ("--save", &self.save)] {
            if let Some(p) = path {
                a.push(name.into());
                a.push(p.clone().into_os_string());
            }
        }
        if let Some(k) = &self.key {
            a.push("--key".into());
            a.push(k.clone().into_os_string());
        }
        if self.insecure {
            a.push("--insecure".into());
        }
        if self.elastic {
            a.push("--elastic".into());
        }
        if self.no_overlap {
            a.push("--no-overlap".into());
        }
        a.push(format!("--ps-strategy={}", self.ps_strategy).into());
        a.push(format!("--ps-sync={}", self.ps_sync).into());
        a
    }

    /// The parameter-server settings of these flags.
    pub fn ps_options(&self) -> crate::ps::PsOptions {
        crate::ps::PsOptions {
            sync: self.ps_sync,
            strategy: self.ps_strategy,
        }
    }
}

/// Hidden layer widths as written on the command line: `256,128`, or `none`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Widths(pub Vec<usize>);

impl std::str::FromStr for Widths {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() || s == "none" {
            return Ok(Widths(Vec::new()));
        }
        let parse = |w: &str| match w.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "expected positive layer widths like 256,128 (or none), got {w:?}"
            )),
        };
        s.split(',')
            .map(parse)
            .collect::<Result<_, _>>()
            .map(Widths)
    }
}

impl std::fmt::Display for Widths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self.0.iter().map(usize::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ringtrain").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn training_is_the_default_command() {
        let cli = parse(&["--hosts", "h.txt", "--rank", "2", "--hidden", "3,4"]);
        assert!(cli.command.is_none());
        assert_eq!(cli.train.rank, Some(2));
        assert_eq!(cli.train.opts.hidden, Widths(vec![3, 4]));
        let cli = parse(&["train", "--hosts", "h.txt", "--rank", "1"]);
        assert!(matches!(cli.command, Some(Command::Train(ref t)) if t.rank == Some(1)));
    }

    #[test]
    fn to_args_round_trips_through_the_parser() {
        let cli = parse(&[
            "launch",
            "--np",
            "3",
            "--steps",
            "7",
            "--lr",
            "0.125",
            "--optimizer",
            "adam",
            "--hidden",
            "none",
            "--data",
            "mnist:/tmp/x y",
            "--metrics-out",
            "/tmp/m.json",
            "--key",
            "/tmp/c 1.key",
            "--insecure",
            "--quiet",
            "--log-format",
            "json",
            "--timeline",
            "/tmp/t.json",
            "--save",
            "/tmp/w.safetensors",
            "--peer-timeout",
            "2.5",
            "--seed",
            "9",
            "--elastic",
            "--ps-strategy",
            "greedy",
            "--ps-sync",
            "async",
        ]);
        let Some(Command::Launch(launch)) = cli.command else {
            panic!("launch expected")
        };
        assert_eq!(launch.opts.hidden, Widths(vec![]));
        let mut args: Vec<OsString> = vec!["ringtrain".into(), "train".into()];
        args.extend(launch.opts.to_args());
        let again = Cli::try_parse_from(args).unwrap();
        let Some(Command::Train(train)) = again.command else {
            panic!("train expected")
        };
        assert_eq!(train.opts, launch.opts);
        let defaults = parse(&["launch"]);
        let Some(Command::Launch(d)) = defaults.command else {
            panic!("launch expected")
        };
        let mut args: Vec<OsString> = vec!["ringtrain".into(), "launch".into()];
        args.extend(d.opts.to_args());
        let Some(Command::Launch(d2)) = Cli::try_parse_from(args).unwrap().command else {
            panic!("launch expected")
        };
        assert_eq!(d2.opts, d.opts);
    }

    #[test]
    fn bad_flags_are_named() {
        let cli = parse(&["--hosts", "h", "--rank", "0", "--peer-timeout", "0"]);
        let err = cli.train.opts.to_config().unwrap_err();
        assert!(err.contains("--peer-timeout"), "{err}");
        let err = Cli::try_parse_from(["ringtrain", "--optimizer", "rmsprop"]).unwrap_err();
        assert!(err.to_string().contains("rmsprop"), "{err}");
        let err = Cli::try_parse_from(["ringtrain", "--hidden", "8,0"]).unwrap_err();
        assert!(err.to_string().contains("\"0\""), "{err}");
    }
}
