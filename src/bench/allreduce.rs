//! `ringtrain bench allreduce`: all-reduce bandwidth per message size.
//!
//! With `--np N` the command starts N rank processes of this binary on 127.0.0.1 (or, with
//! `--link`, in an emulated cluster) and prints the table once they are done; each of those
//! processes, like a rank started by hand with `--hosts FILE --rank R` on its own machine,
//! forms the ring and, for each size:
//!
//! 1. runs `--warmup` untimed all-reduces, then `--iters` timed ones; before each, the
//!    buffer is filled with [`pattern`] values whose exact sum is known and the ranks meet
//!    at a one-value all-reduce (a barrier), and after each the result is checked element
//!    by element (none of which is timed);
//! 2. times each call, and measures the CPU time the process spent apart from the calling
//!    thread (which fills and checks, and is blocked during the all-reduce);
//! 3. gathers every rank's times, CPU and bytes with one more all-reduce in which each rank
//!    fills only its own slot (adding zeros is exact), so every rank sees all of them.
//!
//! An iteration's time is the slowest rank's; the reported time is the median of those.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use super::{BenchError, List, Size};
use crate::auth::{Credential, Security};
use crate::collective::DEFAULT_SEGMENT;
use crate::emulate::{Cluster, LinkArgs, LinkSpec};
use crate::frame::Wire;
use crate::hosts::Hosts;
use crate::launch;
use crate::ring::Rank;
use crate::transport::{CommHandle, Hello, PROTOCOL_VERSION, RingPlace, TransportOptions};

/// The UDP port ranks listen on inside an emulated cluster (each has its own address).
const EMULATED_PORT: u16 = 29500;

/// Values of [`pattern`] repeat with this period.
const PERIOD: usize = 251;

/// Flags of `ringtrain bench allreduce`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct AllreduceArgs {
    /// Ranks to start on this machine (ignored with --hosts).
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub np: usize,
    /// Hosts file, to run one rank of a cluster spread over machines (with --rank).
    #[arg(long, value_name = "FILE", requires = "rank", conflicts_with = "link")]
    pub hosts: Option<PathBuf>,
    /// This process's rank in the hosts file.
    #[arg(long, value_name = "R", requires = "hosts")]
    pub rank: Option<usize>,
    /// Message sizes in bytes, comma-separated; K, M, G are binary multiples.
    #[arg(long, default_value = "1M,4M,16M,64M", value_name = "S1,S2,..")]
    pub sizes: List<Size>,
    /// Timed iterations per size.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub iters: u32,
    /// Untimed iterations per size before the timed ones.
    #[arg(long, default_value_t = 5)]
    pub warmup: u32,
    /// Segment size in f32 elements (frames are pipelined per segment).
    #[arg(long, default_value_t = DEFAULT_SEGMENT)]
    pub segment: usize,
    /// Send values as 16-bit fp16 or bf16 (sums still in f32); results are then checked
    /// against the rounding bound instead of exactly.
    #[arg(long, value_enum, default_value = "none", value_name = "WIRE")]
    pub compress: Wire,
    /// Write one JSON record per size to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Seconds to keep trying to reach the neighbours at start-up.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub connect_timeout: f64,
    /// Seconds of silence after which a neighbour counts as lost.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub peer_timeout: f64,
    /// Cluster key from `ringtrain keygen` (a local run makes a fresh one by itself).
    #[arg(long, value_name = "FILE", env = "RINGTRAIN_KEY")]
    pub key: Option<PathBuf>,
    /// Allow a ring without a cluster key on addresses that are not loopback.
    #[arg(long)]
    pub insecure: bool,
    /// The emulated cluster, if any.
    #[command(flatten)]
    pub link: LinkArgs,
    /// Set by the local launcher for rank 0: write the records, print no table.
    #[arg(long, hide = true)]
    pub no_table: bool,
}

/// The result for one message size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllreduceRecord {
    /// Message size in bytes.
    pub size_bytes: u64,
    /// Message size in f32 elements.
    pub elements: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Timed iterations.
    pub iters: u32,
    /// Untimed warm-up iterations.
    pub warmup: u32,
    /// Segment size in elements.
    pub segment: usize,
    /// Value encoding on the wire: `none` (f32), `fp16` or `bf16`.
    #[serde(default = "no_compression")]
    pub compress: String,
    /// Median over iterations of the slowest rank's time.
    pub time_ms_median: f64,
    /// The fastest iteration (slowest rank's time).
    pub time_ms_min: f64,
    /// Algorithm bandwidth `S / t`, GB/s (1e9 bytes per second).
    pub algbw: f64,
    /// Bus bandwidth `algbw · 2(N−1)/N`, GB/s.
    pub busbw: f64,
    /// 50th percentile of the per-iteration time.
    pub p50_ms: f64,
    /// 99th percentile of the per-iteration time.
    pub p99_ms: f64,
    /// CPU-seconds of all ranks per GiB that all ranks put on the wire.
    pub cpu_secs_per_gib: f64,
    /// Average number of cores the ranks kept busy during the timed all-reduces.
    pub cpu_cores: f64,
    /// Bytes each rank sent per iteration (frames and length prefixes), averaged.
    pub bytes_sent_per_rank: f64,
    /// Whether every rank got exactly the expected sums in every iteration.
    pub correct: bool,
    /// Wrong elements, summed over ranks and iterations (warm-up included).
    pub wrong_elements: u64,
    /// The emulated link, when there was one.
    pub link: Option<String>,
    /// busbw over the link rate, when there was a link.
    pub link_fraction: Option<f64>,
}

/// Runs the benchmark: the local cluster, or one rank of a cluster given by `--hosts`.
pub fn run(args: &AllreduceArgs) -> Result<(), BenchError> {
    check(args)?;
    match (&args.hosts, args.rank) {
        (Some(hosts), Some(rank)) => {
            let Some(records) = run_rank(args, hosts, rank)? else {
                return Ok(());
            };
            if let Some(path) = &args.json {
                write_json(path, &records)?;
            }
            if !args.no_table {
                print!("{}", table(&records, &describe(records.len(), args, None)));
            }
            verdict(&records)
        }
        _ => run_local(args),
    }
}

fn check(args: &AllreduceArgs) -> Result<(), BenchError> {
    let bad = |m: String| Err(BenchError::Config(m));
    if args.hosts.is_none() && args.np == 0 {
        return bad("--np must be at least 1".into());
    }
    if args.segment == 0 {
        return bad("--segment must be at least 1 element".into());
    }
    for (name, v) in [
        ("connect-timeout", args.connect_timeout),
        ("peer-timeout", args.peer_timeout),
    ] {
        if !(v.is_finite() && v > 0.0 && v < 1e9) {
            return bad(format!(
                "--{name} must be a positive number of seconds, got {v}"
            ));
        }
    }
    Ok(())
}

/// Fails when any size gave wrong sums.
fn verdict(records: &[AllreduceRecord]) -> Result<(), BenchError> {
    match records.iter().find(|r| !r.correct) {
        None => Ok(()),
        Some(r) => Err(BenchError::WrongResult {
            size_bytes: r.size_bytes,
            world: r.world_size,
            bad: r.wrong_elements,
        }),
    }
}

/// Starts `--np` ranks of this binary, waits for them and reports rank 0's records.
fn run_local(args: &AllreduceArgs) -> Result<(), BenchError> {
    let np = args.np;
    let spec = args.link.spec();
    let cluster = spec.as_ref().map(|s| Cluster::create(np, s)).transpose()?;
    let dir = tempfile::tempdir().map_err(|source| BenchError::Io {
        what: "create a temporary directory in",
        path: std::env::temp_dir(),
        source,
    })?;
    let addrs = match &cluster {
        Some(c) => c.addrs(EMULATED_PORT),
        None => launch::free_local_addrs(np)?,
    };
    let hosts = dir.path().join("hosts.txt");
    super::write_file(&hosts, &Hosts::from_addrs(addrs).to_file_text())?;
    let result = dir.path().join("rank0.json");
    // A fresh cluster key per run, as `ringtrain launch` does: only our ranks can join.
    let mut args = args.clone();
    if args.key.is_none() && !args.insecure {
        let key = dir.path().join("cluster.key");
        Credential::generate()?.write_new(&key)?;
        args.key = Some(key);
    }
    let args = &args;
    let exe = std::env::current_exe().map_err(|source| BenchError::Io {
        what: "find",
        path: "the ringtrain executable".into(),
        source,
    })?;

    let rank_args = |rank: usize| rank_flags(args, &hosts, rank, &result);
    let wrapped = |rank: usize| match &cluster {
        Some(c) => c.rank_args(rank, &exe, rank_args(rank)),
        None => rank_args(rank),
    };
    let program = cluster.as_ref().map_or(exe.as_path(), |c| c.program());
    let title = describe(np, args, spec.as_ref());
    eprintln!("# {title}: running");
    let report = launch::run_ranks(program, np, &wrapped, &super::quiet_env())?;
    if let Some(rank) = report.first_failed {
        return Err(BenchError::RankFailed {
            rank,
            how: report.exits[rank].describe(),
        });
    }
    if let Some(c) = cluster {
        c.teardown()?;
    }

    let mut records = read_json(&result)?;
    if let Some(spec) = &spec {
        for r in &mut records {
            r.link = Some(spec.to_string());
            r.link_fraction = Some(r.busbw * 1e9 * 8.0 / spec.rate.bits_per_sec() as f64);
        }
    }
    print!("{}", table(&records, &title));
    if let Some(path) = &args.json {
        write_json(path, &records)?;
    }
    verdict(&records)
}

/// The flags of one rank process started by the local launcher.
fn rank_flags(args: &AllreduceArgs, hosts: &Path, rank: usize, result: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["bench".into(), "allreduce".into(), "--hosts".into()];
    a.push(hosts.as_os_str().to_owned());
    let mut flag = |name: &str, value: String| {
        a.push(format!("--{name}").into());
        a.push(value.into());
    };
    flag("rank", rank.to_string());
    flag("sizes", args.sizes.to_string());
    flag("iters", args.iters.to_string());
    flag("warmup", args.warmup.to_string());
    flag("segment", args.segment.to_string());
    flag("compress", args.compress.name().to_string());
    flag("connect-timeout", args.connect_timeout.to_string());
    flag("peer-timeout", args.peer_timeout.to_string());
    if let Some(key) = &args.key {
        a.push("--key".into());
        a.push(key.as_os_str().to_owned());
    }
    if args.insecure {
        a.push("--insecure".into());
    }
    if rank == 0 {
        a.extend(["--no-table".into(), "--json".into()]);
        a.push(result.as_os_str().to_owned());
    }
    a
}

/// One line saying what ran.
fn describe(np: usize, args: &AllreduceArgs, link: Option<&LinkSpec>) -> String {
    let place = match (link, &args.hosts) {
        (Some(spec), _) => format!("emulated cluster, {spec}"),
        (None, Some(h)) => format!("hosts from {}", h.display()),
        (None, None) => "127.0.0.1".into(),
    };
    let wire = match args.compress {
        Wire::F32 => String::new(),
        w => format!("; values sent as {}", w.name()),
    };
    format!(
        "ringtrain all-reduce: {np} ranks on {place}; segment {} elements{wire}; {} \
         iterations after {} warm-up",
        args.segment, args.iters, args.warmup
    )
}

/// Everything that must agree across the benchmark's ranks.
fn fingerprint(args: &AllreduceArgs) -> BTreeMap<String, String> {
    let mut f = BTreeMap::new();
    f.insert("bench".into(), "allreduce".into());
    f.insert("sizes".into(), args.sizes.to_string());
    f.insert("iters".into(), args.iters.to_string());
    f.insert("warmup".into(), args.warmup.to_string());
    f.insert("segment".into(), args.segment.to_string());
    f.insert("compress".into(), args.compress.name().into());
    f
}

/// Runs one rank; rank 0 gets the records.
fn run_rank(
    args: &AllreduceArgs,
    hosts: &Path,
    rank: usize,
) -> Result<Option<Vec<AllreduceRecord>>, BenchError> {
    let hosts = Hosts::load(hosts)?;
    hosts.check_rank(rank)?;
    let world = hosts.world_size();
    let addrs: Vec<_> = (0..world).map(|r| hosts.addr(r)).collect();
    let security = Security::resolve(args.key.as_deref(), args.insecure, &addrs)?;
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        rank,
        world,
        fingerprint: fingerprint(args),
    };
    let secs = std::time::Duration::from_secs_f64;
    let opts = TransportOptions {
        connect_timeout: secs(args.connect_timeout),
        peer_timeout: secs(args.peer_timeout),
        segment: args.segment,
        security,
        wire: args.compress,
    };
    let place = RingPlace {
        rank: Rank(rank),
        addrs,
    };
    let mut comm = CommHandle::connect(place, hello, opts)?;
    info!(rank, world, "ring formed");

    let mut records = Vec::new();
    for size in &args.sizes.0 {
        match measure(&mut comm, args, *size, rank, world) {
            Ok(r) => records.push(r),
            Err(e) => {
                comm.abort(&format!("rank {rank} stopped: {e}"));
                return Err(e);
            }
        }
    }
    comm.finish();
    Ok((rank == 0).then_some(records))
}

/// What one rank measured for one size.
#[derive(Debug, Default)]
struct RankSample {
    /// Seconds per timed iteration.
    times: Vec<f64>,
    /// CPU-seconds of this process across the timed calls.
    cpu: f64,
    /// Bytes sent during the timed calls.
    bytes: f64,
    /// Wrong elements over all iterations.
    bad: u64,
}

/// Measures one size on this rank and gathers every rank's sample.
fn measure(
    comm: &mut CommHandle,
    args: &AllreduceArgs,
    size: Size,
    rank: usize,
    world: usize,
) -> Result<AllreduceRecord, BenchError> {
    let elements = (size.0 / 4) as usize;
    let expected = expected_row(world);
    let tol = tolerance(args.compress, world);
    let mut buf = vec![0f32; elements];
    let mut mine = RankSample::default();

    for _ in 0..args.warmup {
        fill(&mut buf, rank);
        buf = comm.allreduce_sum(buf)?;
        mine.bad += count_wrong(&buf, &expected, tol, rank, size);
    }
    let cpu0 = CpuSample::now();
    for _ in 0..args.iters {
        fill(&mut buf, rank);
        // Start together: otherwise a rank still checking the last result makes the
        // others' next call wait for it, and that wait is timed (gloo's and nccl-tests'
        // loops synchronise the same way).
        comm.allreduce_sum_f32(vec![0.0])?;
        let sent = comm.bytes_sent();
        let t = Instant::now();
        buf = comm.allreduce_sum(buf)?;
        mine.times.push(t.elapsed().as_secs_f64());
        mine.bytes += (comm.bytes_sent() - sent) as f64;
        mine.bad += count_wrong(&buf, &expected, tol, rank, size);
    }
    // Over the whole loop, so the communication thread's work after a call returns (the
    // last acknowledgements) counts; the barriers' few bytes add a negligible amount.
    mine.cpu = CpuSample::now().comm_secs_since(&cpu0);
    drop(buf);

    let all = gather(comm, &mine, rank, world, args.iters as usize)?;
    Ok(summarize(&all, size, world, args))
}

/// CPU time of the whole process and of this (the calling) thread.
struct CpuSample {
    process: f64,
    caller: f64,
}

impl CpuSample {
    fn now() -> CpuSample {
        CpuSample {
            process: super::process_cpu_secs().unwrap_or(0.0),
            caller: super::thread_cpu_secs().unwrap_or(0.0),
        }
    }

    /// CPU-seconds the other threads (the communication thread) used since `earlier`. The
    /// caller's own time, filling and checking buffers, is left out; while an all-reduce
    /// runs the caller is blocked, so nothing of the all-reduce is lost.
    fn comm_secs_since(&self, earlier: &CpuSample) -> f64 {
        let total = self.process - earlier.process;
        let caller = self.caller - earlier.caller;
        (total - caller).max(0.0)
    }
}

/// Every rank's sample, by rank, through one all-reduce of per-rank slots.
fn gather(
    comm: &mut CommHandle,
    mine: &RankSample,
    rank: usize,
    world: usize,
    iters: usize,
) -> Result<Vec<RankSample>, BenchError> {
    let slot = iters + 3;
    let mut v = vec![0f32; world * slot];
    let out = &mut v[rank * slot..(rank + 1) * slot];
    for (o, t) in out.iter_mut().zip(&mine.times) {
        *o = *t as f32;
    }
    out[iters] = mine.cpu as f32;
    out[iters + 1] = mine.bytes as f32;
    out[iters + 2] = mine.bad as f32;
    // Counts and times must not be rounded to a 16-bit wire.
    let v = comm.allreduce_sum_f32(v)?;
    let samples = v
        .chunks_exact(slot)
        .map(|s| RankSample {
            times: s[..iters].iter().map(|&t| f64::from(t)).collect(),
            cpu: f64::from(s[iters]),
            bytes: f64::from(s[iters + 1]),
            bad: s[iters + 2] as u64,
        })
        .collect();
    Ok(samples)
}

/// The record for one size from every rank's sample.
fn summarize(
    all: &[RankSample],
    size: Size,
    world: usize,
    args: &AllreduceArgs,
) -> AllreduceRecord {
    let times: Vec<Vec<f64>> = all.iter().map(|s| s.times.clone()).collect();
    let per_iter = super::per_iteration_max(&times);
    let t = super::median(&per_iter).unwrap_or(f64::NAN);
    let t_min = per_iter.iter().copied().fold(f64::INFINITY, f64::min);
    let (p50_ms, p99_ms) = super::percentiles_ms(&per_iter);
    let algbw = super::algbw(size.0, t);
    let cpu: f64 = all.iter().map(|s| s.cpu).sum();
    let bytes: f64 = all.iter().map(|s| s.bytes).sum();
    let wall: f64 = per_iter.iter().sum();
    let bad: u64 = all.iter().map(|s| s.bad).sum();
    if bad > 0 {
        error!(size = size.0, bad, "wrong all-reduce results");
    }
    AllreduceRecord {
        size_bytes: size.0,
        elements: (size.0 / 4) as usize,
        world_size: world,
        iters: args.iters,
        warmup: args.warmup,
        segment: args.segment,
        compress: args.compress.name().into(),
        time_ms_median: t * 1e3,
        time_ms_min: t_min * 1e3,
        algbw,
        busbw: super::busbw(algbw, world),
        p50_ms,
        p99_ms,
        cpu_secs_per_gib: super::cpu_secs_per_gib(cpu, bytes),
        cpu_cores: if wall > 0.0 { cpu / wall } else { 0.0 },
        bytes_sent_per_rank: bytes / (world as f64 * f64::from(args.iters)),
        correct: bad == 0,
        wrong_elements: bad,
        link: None,
        link_fraction: None,
    }
}

/// Rank `rank`'s contribution at element `i`: small integers, so every sum over up to
/// [`crate::emulate::MAX_RANKS`] ranks is exact in f32 whatever the summation order. The
/// value depends on both the rank and the position, so a chunk added twice, lost or put
/// in the wrong place shows up.
pub fn pattern(i: usize, rank: usize) -> f32 {
    (((i + 7 * rank) % PERIOD) + rank % 64) as f32
}

/// The exact sum over `world` ranks of [`pattern`] at element `i`.
pub fn expected_sum(i: usize, world: usize) -> f32 {
    (0..world).map(|r| pattern(i, r) as u64).sum::<u64>() as f32
}

fn expected_row(world: usize) -> Vec<f32> {
    (0..PERIOD).map(|i| expected_sum(i, world)).collect()
}

/// Fills `buf` with this rank's [`pattern`].
fn fill(buf: &mut [f32], rank: usize) {
    let row: Vec<f32> = (0..PERIOD).map(|i| pattern(i, rank)).collect();
    for chunk in buf.chunks_mut(PERIOD) {
        chunk.copy_from_slice(&row[..chunk.len()]);
    }
}

fn no_compression() -> String {
    Wire::F32.name().into()
}

/// How far a sum of [`pattern`] values may be from the exact one: 0 in `f32` (every
/// partial sum is an exact small integer); with a 16-bit wire, each of the `world - 1`
/// partial sums sent (at most k times the largest value after k ranks) and the final sum
/// are rounded once, each by at most the wire's unit roundoff.
fn tolerance(wire: Wire, world: usize) -> f32 {
    if wire == Wire::F32 {
        return 0.0;
    }
    let largest = (PERIOD - 1 + 63) as f64;
    let sums = (world * (world + 1) / 2) as f64;
    (wire.unit_roundoff() * largest * sums) as f32
}

/// Counts elements further than `tol` from the expected sums, logging the first.
fn count_wrong(buf: &[f32], expected: &[f32], tol: f32, rank: usize, size: Size) -> u64 {
    let mut bad = 0u64;
    for (c, chunk) in buf.chunks(PERIOD).enumerate() {
        for (j, (got, want)) in chunk.iter().zip(expected).enumerate() {
            let off = (got - want).abs();
            if off > tol || off.is_nan() {
                if bad == 0 {
                    let index = c * PERIOD + j;
                    error!(
                        rank,
                        size = size.0,
                        index,
                        got,
                        want,
                        "wrong all-reduce sum"
                    );
                }
                bad += 1;
            }
        }
    }
    bad
}

/// The human table, nccl-tests style, with CPU next to the bandwidth.
pub fn table(records: &[AllreduceRecord], title: &str) -> String {
    let link = records.iter().any(|r| r.link_fraction.is_some());
    let mut out = format!("# {title}\n");
    out.push_str(&format!(
        "#{:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10} {:>6}{} {:>5}\n",
        "size",
        "time(ms)",
        "algbw",
        "busbw",
        "p50(ms)",
        "p99(ms)",
        "cpu s/GiB",
        "cores",
        if link { "  busbw/link" } else { "" },
        "check"
    ));
    out.push_str(&format!(
        "#{:>10} {:>10} {:>10} {:>10}\n",
        "(bytes)", "(median)", "(GB/s)", "(GB/s)"
    ));
    for r in records {
        let frac = match r.link_fraction {
            Some(f) => format!("  {f:>10.3}"),
            None => String::new(),
        };
        out.push_str(&format!(
            " {:>10} {:>10.3} {:>10.3} {:>10.3} {:>9.3} {:>9.3} {:>10.2} {:>6.2}{} {:>5}\n",
            Size(r.size_bytes).to_string(),
            r.time_ms_median,
            r.algbw,
            r.busbw,
            r.p50_ms,
            r.p99_ms,
            r.cpu_secs_per_gib,
            r.cpu_cores,
            frac,
            if r.correct { "ok" } else { "WRONG" }
        ));
    }
    out
}

fn write_json(path: &Path, records: &[AllreduceRecord]) -> Result<(), BenchError> {
    let json = serde_json::to_string_pretty(records).expect("records always serialize");
    super::write_file(path, &(json + "\n"))
}

fn read_json(path: &Path) -> Result<Vec<AllreduceRecord>, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|source| BenchError::Io {
        what: "read rank 0's results from",
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| BenchError::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_sums_are_exact_for_every_world_size() {
        for world in [1, 2, 3, 5, 8, 64, 250] {
            for i in [0, 1, 250, 251, 1000, 123_456] {
                let mut order: Vec<usize> = (0..world).collect();
                let forward: f32 = order.iter().map(|&r| pattern(i, r)).sum();
                order.reverse();
                let backward: f32 = order.iter().map(|&r| pattern(i, r)).sum();
                assert_eq!(forward, expected_sum(i, world), "world {world} i {i}");
                assert_eq!(backward, expected_sum(i, world), "world {world} i {i}");
            }
        }
    }

    #[test]
    fn fill_and_check_agree_and_catch_a_misplaced_element() {
        let world = 3;
        let mut sum = vec![0f32; 1000];
        for rank in 0..world {
            let mut buf = vec![0f32; 1000];
            fill(&mut buf, rank);
            sum.iter_mut().zip(&buf).for_each(|(s, b)| *s += b);
        }
        let expected = expected_row(world);
        assert_eq!(count_wrong(&sum, &expected, 0.0, 0, Size(4000)), 0);
        sum.swap(3, 4);
        assert_eq!(count_wrong(&sum, &expected, 0.0, 0, Size(4000)), 2);
    }

    #[test]
    fn a_16_bit_wire_is_checked_against_its_rounding_bound() {
        let world = 4;
        assert_eq!(tolerance(Wire::F32, world), 0.0);
        let tol = tolerance(Wire::Bf16, world);
        // bf16 keeps 8 significant bits: sums near 1000 are off by up to 2 each rounding.
        assert!(tol > 4.0 && tol < 20.0, "{tol}");
        assert!(tolerance(Wire::F16, world) < tol / 4.0);
        let expected = expected_row(world);
        let mut got = expected.clone();
        Wire::Bf16.round_in_place(&mut got);
        assert_eq!(count_wrong(&got, &expected, tol, 0, Size(1004)), 0);
        got[5] += 2.0 * tol;
        got[6] = f32::NAN;
        assert_eq!(count_wrong(&got, &expected, tol, 0, Size(1004)), 2);
    }

    fn args() -> AllreduceArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            a: AllreduceArgs,
        }
        Wrap::parse_from(["x", "--sizes", "1K,1M", "--iters", "2", "--warmup", "0"]).a
    }

    #[test]
    fn summarize_takes_the_median_of_per_iteration_maxima() {
        let s = |times: Vec<f64>| RankSample {
            times,
            cpu: 0.5,
            bytes: 1e6,
            bad: 0,
        };
        let all = [s(vec![0.001, 0.004]), s(vec![0.002, 0.001])];
        let r = summarize(&all, Size(1 << 20), 2, &args());
        // Maxima 2 ms and 4 ms; their median is 3 ms.
        assert!((r.time_ms_median - 3.0).abs() < 1e-9);
        assert!((r.time_ms_min - 2.0).abs() < 1e-9);
        assert!((r.algbw - (1u64 << 20) as f64 / 0.003 / 1e9).abs() < 1e-9);
        assert_eq!(r.busbw, r.algbw);
        assert!((r.cpu_cores - 1.0 / 0.006).abs() < 1e-9);
        assert_eq!(r.bytes_sent_per_rank, 5e5);
        assert!(r.correct);
    }

    #[test]
    fn local_launcher_hands_every_setting_to_the_ranks() {
        let a = args();
        let flags = rank_flags(&a, Path::new("/h"), 0, Path::new("/r.json"));
        let flags: Vec<String> = flags.iter().map(|f| f.to_string_lossy().into()).collect();
        let text = flags.join(" ");
        assert!(text.starts_with("bench allreduce --hosts /h --rank 0 --sizes 1K,1M"));
        assert!(text.ends_with("--no-table --json /r.json"), "{text}");
        let other = rank_flags(&a, Path::new("/h"), 1, Path::new("/r.json"));
        assert!(!other.iter().any(|f| f == "--json"));
    }

    #[test]
    fn the_table_shows_cpu_and_the_link_share() {
        let mut r = summarize(
            &[RankSample {
                times: vec![0.01],
                cpu: 0.01,
                bytes: 1e6,
                bad: 0,
            }],
            Size(1 << 20),
            1,
            &args(),
        );
        r.link_fraction = Some(0.9);
        let t = table(&[r], "title");
        assert!(t.starts_with("# title\n"));
        assert!(t.contains("cpu s/GiB") && t.contains("busbw/link"), "{t}");
        assert!(
            t.contains("1M") && t.contains("0.900") && t.contains(" ok"),
            "{t}"
        );
    }
}
