//! `ringtrain bench scaling`: training throughput against the number of nodes.
//!
//! For every mode and node count the benchmark trains a real cluster and reads its
//! summary: without `--link` it runs `ringtrain launch --np N [--mode M] --metrics-out F`
//! (this same executable) as a subprocess; with `--link` it starts the processes itself,
//! each in its own namespace of an emulated cluster: N ring ranks, or N workers and `--ps`
//! parameter servers. In-graph replicas are threads of one process with no network, so
//! they always run through `launch`.
//!
//! From the summaries it derives efficiency, the compute/communication split of a step,
//! and references: the ideal (N times the smallest run's per-node throughput) and each
//! design's bandwidth bound, where a step computes as long as the mode's smallest run did
//! and then moves its bytes over links of rate B. A ring rank sends and receives
//! `2(N−1)/N · S` per step whatever N is; P parameter servers together receive `N · S` and
//! send `N · S`, so their links need `N · S / (P · B)`, which grows with N.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use clap::Args;
use serde::{Deserialize, Serialize};

use super::{BenchError, List, Nodes};
use crate::auth::Credential;
use crate::cli::TrainOpts;
use crate::emulate::{Cluster, LinkArgs, LinkSpec, Rate};
use crate::hosts::Hosts;
use crate::launch;

/// The UDP port ranks listen on inside an emulated cluster (each has its own address).
const EMULATED_PORT: u16 = 29600;

/// Lines of a failed run's log shown in the error.
const TAIL_LINES: usize = 25;

/// A training mode, passed to `ringtrain launch --mode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mode(pub String);

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            m @ ("ring" | "ps" | "in-graph") => Ok(Mode(m.to_string())),
            other => Err(format!(
                "expected modes ring, ps or in-graph, got {other:?}"
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Flags of `ringtrain bench scaling`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct ScalingArgs {
    /// Node counts to run, comma-separated.
    #[arg(long, default_value = "1,2,4", value_name = "N1,N2,..")]
    pub nodes: List<Nodes>,
    /// Training modes to compare: ring, ps, in-graph (passed to `launch --mode`).
    #[arg(long, default_value = "ring", value_name = "M1,M2,..")]
    pub modes: List<Mode>,
    /// Write one JSON record per node count and mode to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the records as CSV to this file.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Write the records as a Markdown table to this file.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Draw throughput against nodes, with the ideal and bandwidth-bound lines (SVG).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Link rate for the bandwidth-bound lines when not emulating (--link sets it otherwise).
    #[arg(long, value_name = "RATE")]
    pub bound_rate: Option<Rate>,
    /// Parameter servers for --modes ps (passed to `launch --ps`).
    #[arg(long, default_value_t = 1, value_name = "P", value_parser = clap::value_parser!(u64).range(1..=64))]
    pub ps: u64,
    /// The emulated cluster, if any.
    #[command(flatten)]
    pub link: LinkArgs,
    /// Training settings for every run.
    #[command(flatten)]
    pub train: TrainOpts,
    /// Extra flags for `ringtrain launch`, after `--` (e.g. -- --ps-tasks 2).
    #[arg(last = true, value_name = "LAUNCH FLAGS")]
    pub launch_flags: Vec<OsString>,
}

/// The parts of a run's summary the benchmark uses; other fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RunSummary {
    /// Cluster-wide samples per second.
    pub samples_per_sec: f64,
    /// Share of the loop's time in communication.
    #[serde(default)]
    pub comm_fraction: f64,
    /// Bytes rank 0 sent per step.
    #[serde(default)]
    pub bytes_sent_per_step: f64,
    /// Wall time of the training loop.
    #[serde(default)]
    pub train_secs: f64,
    /// Steps taken.
    #[serde(default)]
    pub steps: u64,
    /// Parameters of the model.
    #[serde(default)]
    pub params: usize,
    /// Samples per rank per step.
    #[serde(default)]
    pub batch_size: usize,
    /// Median communication time per step.
    #[serde(default)]
    pub allreduce_ms_p50: f64,
}

/// One row of the results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingRecord {
    /// Number of nodes (ranks, or workers).
    pub nodes: usize,
    /// Training mode.
    pub mode: String,
    /// Cluster-wide training throughput.
    pub samples_per_sec: f64,
    /// Throughput per node against the smallest run of the same mode.
    pub efficiency: f64,
    /// Share of a step spent communicating.
    pub comm_fraction: f64,
    /// Mean step time.
    pub step_ms: f64,
    /// Mean compute part of a step.
    pub compute_ms: f64,
    /// Mean communication part of a step.
    pub comm_ms: f64,
    /// Median communication time per step.
    pub comm_ms_p50: f64,
    /// Bytes each rank put on the wire per step.
    pub bytes_per_step_per_rank: f64,
    /// Parameters of the model.
    pub params: usize,
    /// Samples per rank per step.
    pub batch_size: usize,
    /// Steps run.
    pub steps: u64,
    /// N times the smallest run's per-node throughput.
    pub ideal_samples_per_sec: f64,
    /// The mode's bandwidth bound, when a link rate is known (ring and ps only).
    pub bound_samples_per_sec: Option<f64>,
    /// Parameter servers, in ps mode.
    pub ps_tasks: Option<usize>,
    /// The emulated link, when there was one.
    pub link: Option<String>,
}

/// Runs every mode at every node count and writes the reports.
pub fn run(args: &ScalingArgs) -> Result<(), BenchError> {
    let spec = args.link.spec();
    check(args, spec.as_ref())?;
    let dir = tempfile::tempdir().map_err(|source| BenchError::Io {
        what: "create a temporary directory in",
        path: std::env::temp_dir(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(|source| BenchError::Io {
        what: "find",
        path: "the ringtrain executable".into(),
        source,
    })?;

    let mut runs = Vec::new();
    for mode in &args.modes.0 {
        for nodes in nodes_sorted(args) {
            let run = Run {
                args,
                mode,
                nodes,
                dir: dir.path(),
                exe: &exe,
            };
            eprintln!("# bench scaling: {mode} with {nodes} nodes");
            let summary = match (&spec, mode.0.as_str()) {
                (Some(spec), "ring" | "ps") => run.emulated(spec)?,
                _ => run.launched()?,
            };
            eprintln!(
                "#   {:.0} samples/s, {:.0}% communication",
                summary.samples_per_sec,
                100.0 * summary.comm_fraction
            );
            runs.push((mode.0.clone(), nodes, summary));
        }
    }

    let rate = spec.as_ref().map(|s| s.rate).or(args.bound_rate);
    let mut records = records(&runs, rate, args.ps as usize);
    if let Some(spec) = &spec {
        // In-graph replicas share one process and never touch the emulated links.
        let networked = records.iter_mut().filter(|r| r.mode != "in-graph");
        networked.for_each(|r| r.link = Some(spec.to_string()));
    }
    let title = title(args, spec.as_ref(), rate);
    report(args, &records, &title, rate)
}

fn check(args: &ScalingArgs, spec: Option<&LinkSpec>) -> Result<(), BenchError> {
    args.train.to_config().map_err(BenchError::Config)?;
    if args.train.metrics_out.is_some() {
        return Err(BenchError::Config(
            "bench scaling sets --metrics-out for each run itself; use --json for the results"
                .into(),
        ));
    }
    if let Some(plot) = &args.plot {
        let svg = plot
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
        if !svg {
            return Err(BenchError::Config(format!(
                "--plot writes SVG, so give a .svg file, not {}; convert it to PNG with \
                 e.g. rsvg-convert if you need one",
                plot.display()
            )));
        }
    }
    if let Some(spec) = spec {
        let largest = args.nodes.0.iter().map(|n| n.0).max().unwrap_or(1);
        let ps = args.modes.0.iter().any(|m| m.0 == "ps");
        let tasks = largest + if ps { args.ps as usize } else { 0 };
        if tasks > crate::emulate::MAX_RANKS {
            return Err(BenchError::Config(format!(
                "{tasks} processes do not fit in one emulated cluster ({} at most)",
                crate::emulate::MAX_RANKS
            )));
        }
        let networked = args.modes.0.iter().any(|m| m.0 != "in-graph");
        if networked && !args.launch_flags.is_empty() {
            return Err(BenchError::Config(format!(
                "with --link ({}) the ring and ps processes are started without `launch`, so \
                 the launch flags after -- would be ignored; put them before --",
                spec.rate
            )));
        }
    }
    Ok(())
}

fn nodes_sorted(args: &ScalingArgs) -> Vec<usize> {
    let mut n: Vec<usize> = args.nodes.0.iter().map(|n| n.0).collect();
    n.sort_unstable();
    n.dedup();
    n
}

/// One training run.
struct Run<'a> {
    args: &'a ScalingArgs,
    mode: &'a Mode,
    nodes: usize,
    dir: &'a Path,
    exe: &'a Path,
}

impl Run<'_> {
    fn file(&self, kind: &str, ext: &str) -> PathBuf {
        self.dir
            .join(format!("{kind}-{}-{}.{ext}", self.mode, self.nodes))
    }

    fn opts(&self, metrics: &Path) -> TrainOpts {
        let mut opts = self.args.train.clone();
        opts.metrics_out = Some(metrics.to_path_buf());
        opts
    }

    /// Runs `ringtrain launch` and reads the summary.
    fn launched(&self) -> Result<RunSummary, BenchError> {
        let (metrics, log) = (self.file("summary", "json"), self.file("log", "txt"));
        let mut cmd = Command::new(self.exe);
        cmd.arg("launch").arg("--np").arg(self.nodes.to_string());
        if self.mode.0 != "ring" {
            cmd.arg("--mode").arg(&self.mode.0);
        }
        if self.mode.0 == "ps" {
            cmd.arg("--ps").arg(self.args.ps.to_string());
        }
        cmd.args(self.opts(&metrics).to_args())
            .args(&self.args.launch_flags);
        cmd.envs(super::quiet_env());
        let out = std::fs::File::create(&log).map_err(|source| BenchError::Io {
            what: "create",
            path: log.clone(),
            source,
        })?;
        let err = out.try_clone().map_err(|source| BenchError::Io {
            what: "open",
            path: log.clone(),
            source,
        })?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let status = cmd.status().map_err(|source| BenchError::Io {
            what: "run",
            path: self.exe.to_path_buf(),
            source,
        })?;
        if !status.success() {
            return Err(self.failure(&log, &format!("launch exited with {status}")));
        }
        read_summary(&metrics)
    }

    /// Runs the ring ranks, or the ps tasks and workers, in an emulated cluster and reads
    /// the summary. Workers come first, so rank 0 (the one that writes the summary) is
    /// always the chief.
    fn emulated(&self, spec: &LinkSpec) -> Result<RunSummary, BenchError> {
        let (metrics, log) = (self.file("summary", "json"), self.file("log", "txt"));
        let ps = if self.mode.0 == "ps" {
            self.args.ps as usize
        } else {
            0
        };
        let processes = self.nodes + ps;
        let cluster = Cluster::create(processes, spec)?;
        let hosts = self.file("hosts", "txt");
        let addrs = cluster.addrs(EMULATED_PORT);
        let text = match ps {
            0 => Hosts::from_addrs(addrs).to_file_text(),
            _ => cluster_file(&addrs[..self.nodes], &addrs[self.nodes..]),
        };
        super::write_file(&hosts, &text)?;
        let mut opts = self.opts(&metrics);
        // The emulated addresses are not loopback: give the ranks a fresh cluster key.
        if opts.key.is_none() && !opts.insecure {
            let key = self.file("cluster", "key");
            Credential::generate()?.write_new(&key)?;
            opts.key = Some(key);
        }
        let args_for = |rank: usize| {
            let mut opts = opts.clone();
            if rank != 0 {
                opts.metrics_out = None;
            }
            let mut a: Vec<OsString> = vec!["train".into(), "--hosts".into()];
            a.push(hosts.clone().into_os_string());
            a.extend(task_flags(rank, self.nodes, ps));
            a.extend(opts.to_args());
            cluster.rank_args(rank, self.exe, a)
        };
        let sink = log_sink(&log)?;
        let report = launch::run_ranks_with_sink(
            cluster.program(),
            processes,
            &args_for,
            &super::quiet_env(),
            sink,
        )?;
        if let Some(rank) = report.first_failed {
            let how = format!("rank {rank} {}", report.exits[rank].describe());
            return Err(self.failure(&log, &how));
        }
        cluster.teardown()?;
        read_summary(&metrics)
    }

    fn failure(&self, log: &Path, how: &str) -> BenchError {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("unexpected argument '--mode'") {
            return BenchError::ModeMissing {
                mode: self.mode.0.clone(),
            };
        }
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
        BenchError::RunFailed {
            mode: self.mode.0.clone(),
            nodes: self.nodes,
            how: how.to_string(),
            log: log.to_path_buf(),
            tail,
        }
    }
}

/// The flags that say which process of the cluster `index` is: `--rank R` in a ring;
/// with `ps` parameter servers, workers `0..workers` and then the ps tasks.
fn task_flags(index: usize, workers: usize, ps: usize) -> Vec<OsString> {
    let (job, task) = match (ps, index < workers) {
        (0, _) => return vec!["--rank".into(), index.to_string().into()],
        (_, true) => ("worker", index),
        (_, false) => ("ps", index - workers),
    };
    let task = task.to_string();
    vec!["--job".into(), job.into(), "--task".into(), task.into()]
}

/// A parameter-server cluster file: one `JOB HOST:PORT` line per task, tasks of each job
/// numbered in order (the format of [`crate::cluster`]).
fn cluster_file(workers: &[std::net::SocketAddr], ps: &[std::net::SocketAddr]) -> String {
    let mut text = String::from("# written by ringtrain bench scaling\n");
    for (job, addrs) in [("ps", ps), ("worker", workers)] {
        for addr in addrs {
            text.push_str(&format!("{job:<6} {addr}\n"));
        }
    }
    text
}

/// A sink for rank output that appends `[rank N] line` to `log`.
fn log_sink(log: &Path) -> Result<launch::LineSink, BenchError> {
    let file = std::fs::File::create(log).map_err(|source| BenchError::Io {
        what: "create",
        path: log.to_path_buf(),
        source,
    })?;
    let file = std::sync::Mutex::new(file);
    let sink: launch::LineSink = Arc::new(move |rank, _stream, line: &str| {
        use std::io::Write;
        let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
        // A full disk loses log lines, not the run.
        let _ = writeln!(f, "[rank {rank}] {line}");
    });
    Ok(sink)
}

fn read_summary(path: &Path) -> Result<RunSummary, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|source| BenchError::Io {
        what: "read the run's summary from",
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| BenchError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The records for `runs` of (mode, nodes, summary), in run order, with `ps` parameter
/// servers in ps mode. Efficiency and the ideal are per mode against that mode's smallest
/// node count; so is the compute time that the bandwidth bound (ring and ps rows, when
/// `rate` is known) adds the wire time to.
pub fn records(
    runs: &[(String, usize, RunSummary)],
    rate: Option<Rate>,
    ps: usize,
) -> Vec<ScalingRecord> {
    let base = |mode: &str| {
        runs.iter()
            .filter(|(m, _, _)| m == mode)
            .min_by_key(|(_, n, _)| *n)
            .expect("every run's mode has a base run")
    };
    runs.iter()
        .map(|(mode, n, s)| {
            let (_, base_n, base_s) = base(mode);
            let step = step_secs(s);
            let tc = step_secs(base_s) * (1.0 - base_s.comm_fraction);
            let link = rate.map(Rate::bytes_per_sec);
            let (batch, bytes) = (s.batch_size, grad_bytes(s));
            let bound = match (mode.as_str(), link) {
                ("ring", Some(b)) => {
                    Some(super::ring_bound_samples_per_sec(*n, batch, tc, bytes, b))
                }
                ("ps", Some(b)) => {
                    Some(super::ps_bound_samples_per_sec(*n, ps, batch, tc, bytes, b))
                }
                _ => None,
            };
            ScalingRecord {
                nodes: *n,
                mode: mode.clone(),
                samples_per_sec: s.samples_per_sec,
                efficiency: super::efficiency(
                    s.samples_per_sec,
                    *n,
                    base_s.samples_per_sec,
                    *base_n,
                ),
                comm_fraction: s.comm_fraction,
                step_ms: step * 1e3,
                compute_ms: step * (1.0 - s.comm_fraction) * 1e3,
                comm_ms: step * s.comm_fraction * 1e3,
                comm_ms_p50: s.allreduce_ms_p50,
                bytes_per_step_per_rank: s.bytes_sent_per_step,
                params: s.params,
                batch_size: s.batch_size,
                steps: s.steps,
                ideal_samples_per_sec: base_s.samples_per_sec / *base_n as f64 * *n as f64,
                bound_samples_per_sec: bound,
                ps_tasks: (mode == "ps").then_some(ps),
                link: None,
            }
        })
        .collect()
}

/// Mean seconds per step: from the loop's wall time, or from the throughput.
fn step_secs(s: &RunSummary) -> f64 {
    if s.steps > 0 && s.train_secs > 0.0 {
        return s.train_secs / s.steps as f64;
    }
    let per_step_samples = s.batch_size as f64;
    per_step_samples / s.samples_per_sec.max(1e-9)
}

/// Bytes in one ring all-reduce: the gradient plus the loss slot, as f32.
fn grad_bytes(s: &RunSummary) -> f64 {
    4.0 * (s.params + 1) as f64
}

fn title(args: &ScalingArgs, spec: Option<&LinkSpec>, rate: Option<Rate>) -> String {
    let place = match spec {
        Some(spec) => format!("emulated cluster, {spec}"),
        None => "processes on 127.0.0.1".into(),
    };
    let bound = match (spec, rate) {
        (None, Some(rate)) => format!("; bound drawn for {rate} links"),
        _ => String::new(),
    };
    format!(
        "ringtrain scaling: {place}; hidden {}, batch {} per rank, {} optimizer{bound}",
        args.train.hidden, args.train.batch_size, args.train.optimizer
    )
}

/// Prints the Markdown table and writes every requested file.
fn report(
    args: &ScalingArgs,
    records: &[ScalingRecord],
    title: &str,
    rate: Option<Rate>,
) -> Result<(), BenchError> {
    let md = markdown(records, title);
    print!("{md}");
    if rate.is_none() {
        println!("\n(no bandwidth bound: give --bound-rate RATE, or run on an emulated --link)");
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(records).expect("records always serialize");
        super::write_file(path, &(json + "\n"))?;
    }
    if let Some(path) = &args.csv {
        super::write_file(path, &csv(records))?;
    }
    if let Some(path) = &args.markdown {
        super::write_file(path, &md)?;
    }
    if let Some(path) = &args.plot {
        let svg = super::chart::svg(records, title, rate).map_err(|detail| BenchError::Plot {
            path: path.clone(),
            detail,
        })?;
        super::write_file(path, &svg)?;
    }
    Ok(())
}

/// The records as CSV with a header line.
pub fn csv(records: &[ScalingRecord]) -> String {
    let mut out = String::from(
        "nodes,mode,samples_per_sec,efficiency,comm_fraction,step_ms,compute_ms,comm_ms,\
         comm_ms_p50,bytes_per_step_per_rank,params,batch_size,steps,ideal_samples_per_sec,\
         bound_samples_per_sec,link\n",
    );
    for r in records {
        let bound = r
            .bound_samples_per_sec
            .map_or(String::new(), |b| format!("{b:.1}"));
        let link = r.link.as_deref().unwrap_or("").replace('"', "'");
        out.push_str(&format!(
            "{},{},{:.1},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.0},{},{},{},{:.1},{},\"{}\"\n",
            r.nodes,
            r.mode,
            r.samples_per_sec,
            r.efficiency,
            r.comm_fraction,
            r.step_ms,
            r.compute_ms,
            r.comm_ms,
            r.comm_ms_p50,
            r.bytes_per_step_per_rank,
            r.params,
            r.batch_size,
            r.steps,
            r.ideal_samples_per_sec,
            bound,
            link
        ));
    }
    out
}

/// The records as a Markdown table under a title line.
pub fn markdown(records: &[ScalingRecord], title: &str) -> String {
    let mut out = format!("{title}\n\n");
    out.push_str(
        "| nodes | mode | samples/s | efficiency | step ms | compute ms | comm ms | comm % \
         | bytes/step/rank | ideal samples/s | bw-bound samples/s |\n",
    );
    out.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in records {
        let bound = r
            .bound_samples_per_sec
            .map_or("–".into(), |b| format!("{b:.0}"));
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {:.3} | {:.3} | {:.3} | {:.0}% | {:.0} | {:.0} | {} |\n",
            r.nodes,
            r.mode,
            r.samples_per_sec,
            r.efficiency,
            r.step_ms,
            r.compute_ms,
            r.comm_ms,
            100.0 * r.comm_fraction,
            r.bytes_per_step_per_rank,
            r.ideal_samples_per_sec,
            bound
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(sps: f64, comm: f64) -> RunSummary {
        RunSummary {
            samples_per_sec: sps,
            comm_fraction: comm,
            bytes_sent_per_step: 1000.0,
            train_secs: 1.0,
            steps: 100,
            params: 249_999,
            batch_size: 64,
            allreduce_ms_p50: 1.0,
        }
    }

    #[test]
    fn records_compute_efficiency_per_mode_and_the_ring_bound() {
        let runs = vec![
            ("ring".to_string(), 1, summary(1000.0, 0.0)),
            ("ring".to_string(), 4, summary(3000.0, 0.5)),
            ("ps".to_string(), 2, summary(500.0, 0.2)),
            ("ps".to_string(), 4, summary(600.0, 0.6)),
        ];
        let rate = Some("1gbit".parse().unwrap());
        let r = records(&runs, rate, 1);
        assert_eq!(r[0].efficiency, 1.0);
        assert_eq!(r[1].efficiency, 0.75);
        assert_eq!(r[1].ideal_samples_per_sec, 4000.0);
        // ps's base is its own smallest run, 2 nodes.
        assert_eq!(r[3].efficiency, 0.6);
        assert_eq!(r[3].ideal_samples_per_sec, 1000.0);
        assert!((r[1].step_ms - 10.0).abs() < 1e-9);
        assert!((r[1].comm_ms - 5.0).abs() < 1e-9);
        // Bound at 4 nodes: 10 ms compute plus 1.5 * 1 MB at 125 MB/s = 12 ms.
        let b = r[1].bound_samples_per_sec.unwrap();
        assert!((b - 4.0 * 64.0 / 0.022).abs() < 1e-6, "{b}");
        // One ps task: ps's own base computes 8 ms, plus 2 workers x 1 MB at 125 MB/s.
        let b = r[2].bound_samples_per_sec.unwrap();
        assert!((b - 2.0 * 64.0 / 0.024).abs() < 1e-6, "{b}");
        assert_eq!(r[2].ps_tasks, Some(1));
        assert_eq!(r[0].ps_tasks, None);
        assert!(
            records(&runs, None, 1)
                .iter()
                .all(|r| r.bound_samples_per_sec.is_none())
        );
    }

    #[test]
    fn csv_and_markdown_have_a_row_per_record() {
        let runs = vec![
            ("ring".to_string(), 1, summary(1000.0, 0.0)),
            ("ring".to_string(), 2, summary(1900.0, 0.1)),
        ];
        let r = records(&runs, None, 1);
        let csv = csv(&r);
        assert_eq!(csv.lines().count(), 3);
        assert!(csv.starts_with("nodes,mode,samples_per_sec,efficiency,comm_fraction"));
        assert!(
            csv.lines()
                .nth(2)
                .unwrap()
                .starts_with("2,ring,1900.0,0.9500,0.1000")
        );
        let md = markdown(&r, "t");
        assert_eq!(
            md.lines().filter(|l| l.starts_with("| 2 | ring")).count(),
            1
        );
        assert!(md.contains("| 1900 | 0.95 |"), "{md}");
    }

    #[test]
    fn emulated_tasks_put_workers_first_then_the_parameter_servers() {
        let flags = |i, w, p| -> Vec<String> {
            task_flags(i, w, p)
                .iter()
                .map(|f| f.to_string_lossy().into())
                .collect()
        };
        assert_eq!(flags(2, 4, 0), ["--rank", "2"]);
        assert_eq!(flags(0, 2, 1), ["--job", "worker", "--task", "0"]);
        assert_eq!(flags(3, 2, 2), ["--job", "ps", "--task", "1"]);
        let a = |i: u8| std::net::SocketAddr::from(([10, 77, 0, i], 29600));
        let text = cluster_file(&[a(1), a(2)], &[a(3)]);
        let jobs: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            jobs,
            [
                "ps     10.77.0.3:29600",
                "worker 10.77.0.1:29600",
                "worker 10.77.0.2:29600"
            ]
        );
    }

    #[test]
    fn modes_are_checked_by_name() {
        assert_eq!("in-graph".parse::<Mode>().unwrap().0, "in-graph");
        assert!("allgather".parse::<Mode>().is_err());
    }
}
