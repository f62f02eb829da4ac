//! Benchmarks users come for: all-reduce bandwidth and training throughput against the
//! number of nodes.
//!
//! - [`allreduce`]: `ringtrain bench allreduce`, in the manner of nccl-tests: per message
//!   size, the median over iterations of the slowest rank's time, algorithm and bus
//!   bandwidth, latency percentiles, CPU per byte, and a check of the sums.
//! - [`scaling`]: `ringtrain bench scaling`, a real training cluster per node count and
//!   mode, with efficiency, the compute/communication split and a chart.
//!
//! Both run their ranks as plain processes on 127.0.0.1, or with `--link` in an emulated
//! cluster of network namespaces ([`crate::emulate`]). The statistics below are pure
//! functions so that the formulas are tested on their own.
//!
//! Units: bandwidths are in GB/s of 10^9 bytes, sizes in bytes (`1M` = 2^20), CPU in
//! CPU-seconds per GiB (2^30 bytes) put on the wire by all ranks together.

pub mod allreduce;
mod chart;
pub mod scaling;

use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Subcommand};

use crate::auth::AuthError;
use crate::collective::CommError;
use crate::emulate::EmulateError;
use crate::hosts::HostsError;
use crate::launch::LaunchError;
use crate::transport::TransportError;

/// Flags of `ringtrain bench`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub which: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum BenchCommand {
    /// All-reduce bandwidth per message size, like nccl-tests' all_reduce_perf.
    Allreduce(Box<allreduce::AllreduceArgs>),
    /// Training throughput per node count and mode, with efficiency and a chart.
    Scaling(Box<scaling::ScalingArgs>),
}

/// Runs the benchmark `args` names.
pub fn run(args: &BenchArgs) -> Result<(), BenchError> {
    match &args.which {
        BenchCommand::Allreduce(a) => allreduce::run(a),
        BenchCommand::Scaling(s) => scaling::run(s),
    }
}

/// Why a benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The flags make no sense together.
    #[error("{0}")]
    Config(String),
    /// The hosts file is unusable.
    #[error(transparent)]
    Hosts(#[from] HostsError),
    /// The ring could not be formed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// An all-reduce failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The cluster key could not be made, read or used.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The emulated cluster could not be built.
    #[error(transparent)]
    Emulate(#[from] EmulateError),
    /// The rank processes could not be started or supervised.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// A rank process failed.
    #[error("rank {rank} failed first ({how}); stopped the others. Its output is above")]
    RankFailed {
        /// The first rank that failed.
        rank: usize,
        /// How it ended.
        how: String,
    },
    /// A file could not be read or written.
    #[error("cannot {what} {}: {source}", .path.display())]
    Io {
        /// What was being done, e.g. "write".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A result file did not hold what it should.
    #[error("{} is not a valid result file: {source}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The all-reduce produced wrong sums.
    #[error(
        "the all-reduce of {size_bytes} bytes over {world} ranks gave wrong sums ({bad} wrong \
         elements; the ranks' logs name the first); this is a bug, please report it"
    )]
    WrongResult {
        /// Message size.
        size_bytes: u64,
        /// World size.
        world: usize,
        /// Wrong elements summed over ranks and iterations.
        bad: u64,
    },
    /// One training run of the scaling benchmark failed.
    #[error("{mode} with {nodes} nodes failed ({how}); last lines of its log {}:\n{tail}", .log.display())]
    RunFailed {
        /// The mode.
        mode: String,
        /// The node count.
        nodes: usize,
        /// How it ended.
        how: String,
        /// Its log file.
        log: PathBuf,
        /// The end of the log.
        tail: String,
    },
    /// `ringtrain launch` does not know the mode yet.
    #[error(
        "`ringtrain launch` of this build does not accept --mode {mode}; build one that has \
         the {mode} trainer, or leave {mode} out of --modes"
    )]
    ModeMissing {
        /// The mode.
        mode: String,
    },
    /// The chart could not be drawn.
    #[error("cannot draw the chart {}: {detail}", .path.display())]
    Plot {
        /// The chart file.
        path: PathBuf,
        /// What plotters said.
        detail: String,
    },
}

/// A message size in bytes: `4096`, `64K`, `1M`, `2G` (binary multiples).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
        let t = t.strip_suffix(['i']).unwrap_or(t);
        let (num, shift) = match t.chars().last() {
            Some('K' | 'k') => (&t[..t.len() - 1], 10),
            Some('M' | 'm') => (&t[..t.len() - 1], 20),
            Some('G' | 'g') => (&t[..t.len() - 1], 30),
            _ => (t, 0),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("expected a size like 4096, 64K, 1M or 2G, got {s:?}"))?;
        let bytes = n
            .checked_mul(1 << shift)
            .filter(|&b| (4..=(16u64 << 30)).contains(&b))
            .ok_or_else(|| format!("size must be from 4 bytes to 16G, got {s:?}"))?;
        Ok(Size(bytes))
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
            if self.0 >= 1 << shift && self.0 % (1 << shift) == 0 {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A comma-separated list: `1M,4M,16M` or `1,2,4,8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

impl<T: FromStr<Err = String>> FromStr for List<T> {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let items: Vec<T> = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.trim().parse())
            .collect::<Result<_, _>>()?;
        if items.is_empty() {
            return Err(format!("expected a comma-separated list, got {s:?}"));
        }
        Ok(List(items))
    }
}

impl<T: std::fmt::Display> std::fmt::Display for List<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(T::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

/// A node count of the scaling benchmark, at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Nodes(pub usize);

impl FromStr for Nodes {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<usize>() {
            Ok(n) if (1..=crate::emulate::MAX_RANKS).contains(&n) => Ok(Nodes(n)),
            _ => Err(format!(
                "expected node counts from 1 to {}, got {s:?}",
                crate::emulate::MAX_RANKS
            )),
        }
    }
}

impl std::fmt::Display for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The median of `xs` (the mean of the two middle values for an even count); `None` when
/// empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// For each iteration, the slowest rank's time: `per_rank[r][i]` is rank `r`'s time of
/// iteration `i`. An iteration ends for the cluster only when its last rank is done.
pub fn per_iteration_max(per_rank: &[Vec<f64>]) -> Vec<f64> {
    let iters = per_rank.iter().map(Vec::len).min().unwrap_or(0);
    (0..iters)
        .map(|i| per_rank.iter().map(|r| r[i]).fold(f64::MIN, f64::max))
        .collect()
}

/// Algorithm bandwidth in GB/s: the message size over the time, `S / t`.
pub fn algbw(size_bytes: u64, secs: f64) -> f64 {
    size_bytes as f64 / secs / 1e9
}

/// Bus bandwidth in GB/s: `algbw · 2(N−1)/N`, the rate each rank's link carried, which
/// is comparable across world sizes and with the link rate.
pub fn busbw(algbw: f64, world: usize) -> f64 {
    algbw * bus_factor(world)
}

/// `2(N−1)/N`: the share of the message each rank sends in a ring all-reduce.
pub fn bus_factor(world: usize) -> f64 {
    if world == 0 {
        return 0.0;
    }
    2.0 * (world - 1) as f64 / world as f64
}

/// Scaling efficiency: throughput per node at `n` nodes over throughput per node at the
/// base count (normally 1), so `sps / (n · sps(1))`.
pub fn efficiency(sps: f64, n: usize, base_sps: f64, base_n: usize) -> f64 {
    (sps / n as f64) / (base_sps / base_n as f64)
}

/// The most samples per second `n` ring ranks can train when each step computes for
/// `compute_secs` and then all-reduces `grad_bytes` over links of `link_bytes_per_sec`:
/// the all-reduce takes at least `2(N−1)/N · S / B`.
pub fn ring_bound_samples_per_sec(
    n: usize,
    batch: usize,
    compute_secs: f64,
    grad_bytes: f64,
    link_bytes_per_sec: f64,
) -> f64 {
    let comm = bus_factor(n) * grad_bytes / link_bytes_per_sec;
    (n * batch) as f64 / (compute_secs + comm)
}

/// The most samples per second `n` workers can train against `ps` parameter servers when
/// each step computes for `compute_secs`: the servers' links together carry every
/// worker's gradient in and its parameters out, `n · S` each way, so a step needs at
/// least `n · S / (ps · B)` on the wire; unlike the ring's, that grows with `n`.
pub fn ps_bound_samples_per_sec(
    n: usize,
    ps: usize,
    batch: usize,
    compute_secs: f64,
    grad_bytes: f64,
    link_bytes_per_sec: f64,
) -> f64 {
    let comm = n as f64 * grad_bytes / (ps.max(1) as f64 * link_bytes_per_sec);
    (n * batch) as f64 / (compute_secs + comm)
}

/// CPU-seconds spent per GiB put on the wire.
pub fn cpu_secs_per_gib(cpu_secs: f64, bytes: f64) -> f64 {
    if bytes <= 0.0 {
        return 0.0;
    }
    cpu_secs / (bytes / (1u64 << 30) as f64)
}

/// The 50th and 99th percentiles of `secs`, in milliseconds, from an HDR histogram with
/// three significant figures.
pub fn percentiles_ms(secs: &[f64]) -> (f64, f64) {
    let mut h =
        hdrhistogram::Histogram::<u64>::new(3).expect("3 significant figures is a valid histogram");
    for s in secs {
        // Auto-resizing histograms accept any value; nanoseconds keep sub-microsecond times.
        let _ = h.record((s * 1e9).round().max(1.0) as u64);
    }
    let ms = |q| h.value_at_quantile(q) as f64 / 1e6;
    (ms(0.5), ms(0.99))
}

/// On-CPU seconds of this whole process so far: the sum over its threads of
/// `/proc/self/task/*/schedstat` (nanoseconds), or `/proc/self/stat`'s utime + stime at
/// 100 ticks per second where schedstat is missing. `None` off Linux.
pub fn process_cpu_secs() -> Option<f64> {
    schedstat_secs().or_else(stat_secs)
}

/// On-CPU seconds of the calling thread (`/proc/thread-self/schedstat`); `None` where
/// that file is missing.
pub fn thread_cpu_secs() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 * 1e-9)
}

fn schedstat_secs() -> Option<f64> {
    let mut total: u64 = 0;
    let mut any = false;
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            total += ns;
            any = true;
        }
    }
    any.then_some(total as f64 * 1e-9)
}

fn stat_secs() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    stat_ticks(&text).map(|t| t as f64 / 100.0)
}

/// utime + stime in clock ticks from the text of `/proc/PID/stat`.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// RUST_LOG for rank processes: quiet unless the user chose a level.
fn quiet_env() -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    match std::env::var_os("RUST_LOG") {
        Some(_) => Vec::new(),
        None => vec![("RUST_LOG".into(), "warn".into())],
    }
}

/// Writes `text` to `path`, naming the file on failure.
fn write_file(path: &std::path::Path, text: &str) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(|source| BenchError::Io {
        what: "write",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_multiples() {
        let sizes: List<Size> = "1K,64K,1M,256M,1G,4096,2MiB".parse().unwrap();
        let bytes: Vec<u64> = sizes.0.iter().map(|s| s.0).collect();
        assert_eq!(
            bytes,
            [1024, 65536, 1 << 20, 256 << 20, 1 << 30, 4096, 2 << 20]
        );
        assert_eq!(sizes.to_string(), "1K,64K,1M,256M,1G,4K,2M");
        assert_eq!(Size(1000).to_string(), "1000");
        for bad in ["", "1T", "x", "2", "32G", "-1M"] {
            assert!(bad.parse::<Size>().is_err(), "{bad:?} parsed");
        }
        assert!("".parse::<List<Size>>().is_err());
    }

    #[test]
    fn node_lists_parse_and_refuse_zero() {
        let n: List<Nodes> = "1, 2,4,8".parse().unwrap();
        assert_eq!(n.0, [Nodes(1), Nodes(2), Nodes(4), Nodes(8)]);
        assert!("0,2".parse::<List<Nodes>>().is_err());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn an_iteration_takes_as_long_as_its_slowest_rank() {
        let per_rank = vec![vec![1.0, 5.0, 2.0], vec![3.0, 1.0, 2.5]];
        assert_eq!(per_iteration_max(&per_rank), [3.0, 5.0, 2.5]);
        // The reported time is the median of those maxima, not the max of medians.
        assert_eq!(median(&per_iteration_max(&per_rank)), Some(3.0));
    }

    #[test]
    fn bandwidth_formulas_follow_nccl_tests() {
        // 1 GB in 1 s is 1 GB/s of algorithm bandwidth.
        assert_eq!(algbw(1_000_000_000, 1.0), 1.0);
        assert_eq!(busbw(1.0, 1), 0.0);
        assert_eq!(busbw(1.0, 2), 1.0);
        assert_eq!(busbw(1.0, 4), 1.5);
        assert!((busbw(1.0, 8) - 1.75).abs() < 1e-12);
        assert_eq!(bus_factor(0), 0.0);
    }

    #[test]
    fn efficiency_is_per_node_throughput_against_the_base() {
        assert_eq!(efficiency(400.0, 4, 100.0, 1), 1.0);
        assert_eq!(efficiency(300.0, 4, 100.0, 1), 0.75);
        // With 2 as the base count, 4 nodes at 2x the throughput are perfectly efficient.
        assert_eq!(efficiency(200.0, 4, 100.0, 2), 1.0);
    }

    #[test]
    fn the_ring_bound_adds_the_wire_time_to_compute() {
        // 1 ms compute, 1 MB gradient over 1 GB/s: N=2 adds 1 ms, N=4 adds 1.5 ms.
        let b = |n| ring_bound_samples_per_sec(n, 10, 1e-3, 1e6, 1e9);
        assert!((b(1) - 10_000.0).abs() < 1e-6);
        assert!((b(2) - 2.0 * 10.0 / 2e-3).abs() < 1e-6);
        assert!((b(4) - 4.0 * 10.0 / 2.5e-3).abs() < 1e-6);
    }

    #[test]
    fn the_ps_bound_grows_with_workers_and_shrinks_with_servers() {
        // 1 ms compute, 1 MB over 1 GB/s: one server needs N ms of wire time per step.
        let b = |n, ps| ps_bound_samples_per_sec(n, ps, 10, 1e-3, 1e6, 1e9);
        assert!((b(1, 1) - 10.0 / 2e-3).abs() < 1e-6);
        assert!((b(4, 1) - 40.0 / 5e-3).abs() < 1e-6);
        assert!((b(4, 4) - 40.0 / 2e-3).abs() < 1e-6);
    }

    #[test]
    fn cpu_per_gib_and_percentiles() {
        assert_eq!(cpu_secs_per_gib(2.0, (1u64 << 30) as f64), 2.0);
        assert_eq!(cpu_secs_per_gib(2.0, 0.0), 0.0);
        let secs: Vec<f64> = (1..=100).map(|i| i as f64 * 1e-3).collect();
        let (p50, p99) = percentiles_ms(&secs);
        assert!((p50 - 50.0).abs() < 0.1, "{p50}");
        assert!((p99 - 99.0).abs() < 0.1, "{p99}");
    }

    #[test]
    fn stat_ticks_skip_a_command_name_with_spaces() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0";
        assert_eq!(stat_ticks(stat), Some(10));
        assert!(process_cpu_secs().is_some_and(|s| s >= 0.0));
        let (mine, all) = (thread_cpu_secs().unwrap(), process_cpu_secs().unwrap());
        assert!(mine <= all + 1e-6, "thread {mine} s, process {all} s");
    }
}
