//! The designs ring mode is compared with: parameter servers (sync and async) over QUIC on
//! 127.0.0.1, and in-graph replication in one process. Small models, few steps.
//!
//! Tolerances. Sync ps and in-graph sum the workers' gradients in worker order and then
//! scale by 1/N; the ring sums chunk c starting at rank c. Only that rounding differs
//! (about 1e-7 relative per step), so after 10 SGD steps with momentum the parameters agree
//! with ring mode to 1e-6 absolute plus 1e-5 relative (the largest difference is printed;
//! it measured 1.2e-7, one unit in the last place near 1). Sync ps and in-graph use the
//! same order, the same scale and an element-wise optimizer, so they agree with each other
//! to the bit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ringtrain::cluster::{ClusterSpec, Job};
use ringtrain::ingraph;
use ringtrain::launch::free_local_addrs;
use ringtrain::optim::OptimConfig;
use ringtrain::ps::{self, PsError, PsOptions, PsReport, Strategy, SyncMode};
use ringtrain::ring::Rank;
use ringtrain::train::{self, TrainConfig, Trained};
use ringtrain::transport::RingPlace;

mod common;
use common::wait_within;

const BIN: &str = env!("CARGO_BIN_EXE_ringtrain");

fn small(batch_size: usize, steps: u64) -> TrainConfig {
    TrainConfig {
        steps: Some(steps),
        batch_size,
        hidden: vec![16],
        optim: OptimConfig::sgd(0.05, 0.9),
        check_every: 0,
        log_every: 5,
        connect_timeout: Duration::from_secs(20),
        ..TrainConfig::default()
    }
}

/// Runs `n` ring ranks, one thread each.
fn run_ring(n: usize, cfg: &TrainConfig) -> Vec<Trained> {
    let addrs = free_local_addrs(n).expect("free ports");
    let threads: Vec<_> = (0..n)
        .map(|r| {
            let (cfg, addrs) = (cfg.clone(), addrs.clone());
            let rank = Rank(r);
            std::thread::spawn(move || train::run(&cfg, RingPlace { rank, addrs }))
        })
        .collect();
    let joined = threads.into_iter().map(|t| t.join().expect("rank thread"));
    joined
        .enumerate()
        .map(|(r, res)| res.unwrap_or_else(|e| panic!("ring rank {r}: {e}")))
        .collect()
}

fn local_cluster(ps: usize, workers: usize) -> ClusterSpec {
    let addrs = free_local_addrs(ps + workers).expect("free ports");
    ClusterSpec::from_addrs(addrs[..ps].to_vec(), addrs[ps..].to_vec())
}

type PsRun = (
    Vec<Result<PsReport, PsError>>,
    Vec<Result<Trained, PsError>>,
);

/// Runs every task of `cluster` on its own thread and returns what each returned.
fn run_cluster(cfg: &TrainConfig, opts: PsOptions, cluster: &ClusterSpec) -> PsRun {
    let ps: Vec<_> = (0..cluster.ps_count())
        .map(|j| {
            let (cfg, cluster) = (cfg.clone(), cluster.clone());
            std::thread::spawn(move || ps::run_ps_task(&cfg, &opts, &cluster, j))
        })
        .collect();
    let workers: Vec<_> = (0..cluster.worker_count())
        .map(|w| {
            let (cfg, cluster) = (cfg.clone(), cluster.clone());
            std::thread::spawn(move || ps::run_worker(&cfg, &opts, &cluster, w))
        })
        .collect();
    fn join<T>(t: std::thread::JoinHandle<T>) -> T {
        t.join().expect("task thread")
    }
    (
        ps.into_iter().map(join).collect(),
        workers.into_iter().map(join).collect(),
    )
}

/// Runs a ps cluster that must succeed; returns the workers' results.
fn run_ps(cfg: &TrainConfig, opts: PsOptions, ps: usize, workers: usize) -> Vec<Trained> {
    let (ps_results, worker_results) = run_cluster(cfg, opts, &local_cluster(ps, workers));
    for (j, r) in ps_results.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("ps task {j}: {e}"));
    }
    let workers = worker_results.into_iter().enumerate();
    workers
        .map(|(w, r)| r.unwrap_or_else(|e| panic!("worker {w}: {e}")))
        .collect()
}

/// The largest difference, after checking every element is within 1e-6 + 1e-5 |b|.
fn assert_close(what: &str, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let err = (x - y).abs();
        worst = worst.max(err);
        assert!(
            err <= 1e-6 + 1e-5 * y.abs(),
            "{what}: param {i}: {x} vs ring {y}"
        );
    }
    println!("{what}: largest difference from ring mode {worst:e}");
    worst
}

fn bits(params: &[f32]) -> Vec<u32> {
    params.iter().map(|p| p.to_bits()).collect()
}

#[test]
fn sync_ps_with_one_and_two_ps_tasks_matches_ring_mode() {
    let (n, steps) = (3, 10);
    let cfg = small(8, steps);
    let ring = run_ring(n, &cfg);
    let init = ingraph::run(&small(8, 0), 1).expect("zero steps");
    let moved = init
        .params
        .iter()
        .zip(&ring[0].params)
        .filter(|(a, b)| a != b);
    assert!(
        moved.count() > ring[0].params.len() / 2,
        "the runs must move the parameters"
    );

    let cases = [
        (1, Strategy::RoundRobin),
        (2, Strategy::RoundRobin),
        (2, Strategy::Greedy),
    ];
    for (ps_tasks, strategy) in cases {
        let opts = PsOptions {
            sync: SyncMode::Sync,
            strategy,
        };
        let workers = run_ps(&cfg, opts, ps_tasks, n);
        let what = format!("sync ps, {ps_tasks} ps tasks, {strategy}");
        for w in &workers {
            assert_eq!(
                bits(&w.params),
                bits(&workers[0].params),
                "{what}: workers differ"
            );
        }
        assert_close(&what, &workers[0].params, &ring[0].params);

        let s = &workers[0].summary;
        assert_eq!((s.mode.as_str(), s.world_size, s.steps), ("ps", n, steps));
        assert_eq!(s.ps_tasks, Some(ps_tasks));
        assert_eq!(s.ps_sync.as_deref(), Some("sync"));
        assert!(
            s.staleness_p50.is_none(),
            "staleness is reported for async only"
        );
        let shards = s.ps_shard_params.clone().expect("shard sizes");
        assert_eq!(shards.iter().sum::<usize>(), s.params);
        // Each step a worker sends its whole gradient once and receives the parameters
        // once: 4 bytes per parameter, plus per ps task a 4-byte length and the header.
        let p = s.params as f64;
        assert_eq!(
            s.bytes_sent_per_step,
            4.0 * p + ps_tasks as f64 * (4.0 + 21.0)
        );
        let received = s.bytes_received_per_step.expect("received bytes");
        assert_eq!(received, 4.0 * p + ps_tasks as f64 * (4.0 + 13.0));
    }
}

#[test]
fn in_graph_with_three_replicas_matches_ring_mode_and_sync_ps_to_the_bit() {
    let cfg = small(8, 10);
    let ring = run_ring(3, &cfg);
    let in_graph = ingraph::run(&cfg, 3).expect("in-graph run");
    assert_close("in-graph, 3 replicas", &in_graph.params, &ring[0].params);
    let s = &in_graph.summary;
    assert_eq!(
        (s.mode.as_str(), s.world_size, s.steps),
        ("in-graph", 3, 10)
    );
    assert_eq!(s.bytes_sent_per_step, 0.0);

    let ps = run_ps(&cfg, PsOptions::default(), 2, 3);
    assert_eq!(
        bits(&in_graph.params),
        bits(&ps[0].params),
        "in-graph and sync ps sum in the same order"
    );
}

#[test]
fn async_ps_trains_to_an_accuracy_comparable_with_ring_mode() {
    // Async ps applies each worker's gradient scaled by 1/N as it arrives, from parameters
    // a few updates old; it needs more steps than sync to settle, and its result depends on
    // timing. After 150 steps it measured 89-94% against the ring's 93.2%; the bounds
    // leave room for a loaded machine, where pushes are staler.
    let cfg = small(32, 150);
    let ring = run_ring(3, &cfg);
    let opts = PsOptions {
        sync: SyncMode::Async,
        strategy: Strategy::RoundRobin,
    };
    let workers = run_ps(&cfg, opts, 2, 3);
    let ring_acc = ring[0].summary.test_accuracy;
    let ps_acc = workers[0].summary.test_accuracy;
    println!("test accuracy: ring {ring_acc:.3}, async ps {ps_acc:.3}");
    assert!(ps_acc > 0.8, "async ps reached only {ps_acc}");
    assert!(
        ps_acc >= ring_acc - 0.1,
        "async ps {ps_acc} vs ring {ring_acc}"
    );

    let s = &workers[0].summary;
    assert_eq!(s.ps_sync.as_deref(), Some("async"));
    let (p50, p99, max) = (s.staleness_p50, s.staleness_p99, s.staleness_max);
    let (p50, p99, max) = (p50.expect("p50"), p99.expect("p99"), max.expect("max"));
    println!("staleness p50 {p50} p99 {p99} max {max}");
    assert!(p50 <= p99 && p99 <= max, "{p50} {p99} {max}");
    // A push is stale by the pushes of others since its pull: never more than all of them.
    assert!(max <= (3 * 150) as f64, "{max}");
    // Every worker ends with the same final parameters: those after everyone was done.
    for w in &workers {
        assert_eq!(w.summary.param_digest, s.param_digest);
    }
}

#[test]
fn an_unreachable_ps_task_is_named_without_a_hang() {
    let cluster = local_cluster(2, 1);
    let mut cfg = small(8, 5);
    cfg.connect_timeout = Duration::from_secs(1);
    let start = Instant::now();
    let err = ps::run_worker(&cfg, &PsOptions::default(), &cluster, 0).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("could not reach ps task"), "{msg}");
    assert!(
        msg.contains(&cluster.tasks(Job::Ps)[0].port().to_string()) || msg.contains("ps task 1")
    );
    assert_eq!(err.exit_code(), 3);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_ps_task_names_the_workers_that_never_came() {
    let cluster = local_cluster(1, 2);
    let mut cfg = small(8, 5);
    cfg.connect_timeout = Duration::from_secs(1);
    let err = ps::run_ps_task(&cfg, &PsOptions::default(), &cluster, 0).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("worker task 0") && msg.contains("worker task 1"),
        "{msg}"
    );
    assert!(msg.contains("did not connect within 1 s"), "{msg}");
}

#[test]
fn tasks_with_different_flags_stop_with_the_differing_fields() {
    let cluster = local_cluster(1, 1);
    let (a, b) = (small(8, 5), small(16, 5));
    let opts = PsOptions::default();
    let ps = {
        let cluster = cluster.clone();
        std::thread::spawn(move || ps::run_ps_task(&a, &opts, &cluster, 0))
    };
    let worker = ps::run_worker(&b, &opts, &cluster, 0).unwrap_err();
    let ps = ps.join().unwrap().unwrap_err();
    let w = worker.to_string();
    assert!(w.contains("batch_size: here 16, there 8"), "{w}");
    let p = ps.to_string();
    assert!(p.contains("batch_size: here 8, there 16"), "{p}");
    assert_eq!((worker.exit_code(), ps.exit_code()), (2, 2));
}

#[test]
fn a_ps_task_refuses_a_sync_worker_of_an_async_cluster() {
    let cluster = local_cluster(1, 1);
    let cfg = small(8, 5);
    let sync = PsOptions::default();
    let async_ = PsOptions {
        sync: SyncMode::Async,
        ..sync
    };
    let ps = {
        let (cfg, cluster) = (cfg.clone(), cluster.clone());
        std::thread::spawn(move || ps::run_ps_task(&cfg, &async_, &cluster, 0))
    };
    let err = ps::run_worker(&cfg, &sync, &cluster, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ps_sync: here sync, there async"), "{err}");
    assert!(ps.join().unwrap().is_err());
}

// --- the binary -------------------------------------------------------------------

fn ringtrain(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run ringtrain")
}

fn text(out: &Output) -> (String, String) {
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (s(&out.stdout), s(&out.stderr))
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path
}

fn expect_bad_input(args: &[&str], needle: &str) {
    let out = ringtrain(args);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "args {args:?}: {err}");
    assert!(
        err.contains(needle),
        "args {args:?}: expected {needle:?} in:\n{err}"
    );
}

#[test]
fn bad_cluster_files_and_tasks_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let no_ps = write(
        dir.path(),
        "no_ps.txt",
        "# workers only\nworker 127.0.0.1:7000\n",
    );
    let no_worker = write(dir.path(), "no_worker.txt", "ps 127.0.0.1:7100\n");
    let bad_job = write(
        dir.path(),
        "bad_job.txt",
        "ps 127.0.0.1:7100\n\nchief 127.0.0.1:7000\n",
    );
    let good = write(
        dir.path(),
        "cluster.txt",
        "ps 127.0.0.1:7100\nworker 127.0.0.1:7000\nworker 127.0.0.1:7001\n",
    );
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = |file: &Path, job: &str, task: &str| {
        vec![
            "--hosts".to_string(),
            s(file),
            "--job".into(),
            job.into(),
            "--task".into(),
            task.into(),
        ]
    };
    let check = |args: Vec<String>, needle: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_bad_input(&args, needle);
    };
    check(run(&no_ps, "worker", "0"), "no ps lines");
    check(run(&no_worker, "ps", "0"), "no worker lines");
    check(
        run(&bad_job, "ps", "0"),
        "bad_job.txt line 3: unknown job \"chief\"",
    );
    check(run(&good, "worker", "2"), "there is no worker task 2");
    check(run(&good, "ps", "1"), "there is no ps task 1");
    check(run(&good, "chief", "0"), "chief");
    let as_ring = vec!["--hosts".to_string(), s(&good), "--rank".into(), "0".into()];
    check(as_ring, "cluster file of parameter-server mode; pass --job");
    let mut no_task = run(&good, "worker", "0");
    no_task.truncate(4);
    check(no_task, "--task N is required");
}

#[test]
fn a_killed_worker_stops_the_others_within_the_peer_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = local_cluster(1, 2);
    let file = write(dir.path(), "cluster.txt", &cluster.to_file_text());
    let spawn = |job: &str, task: usize| {
        Command::new(BIN)
            .args(["--hosts", file.to_str().unwrap(), "--job", job])
            .args(["--task", &task.to_string()])
            .args([
                "--steps",
                "1000000",
                "--hidden",
                "16",
                "--peer-timeout",
                "2",
            ])
            // Nobody reads the pipes until the process ends: a progress line every 20
            // steps filled the 64 KiB pipe within two seconds, and the blocked chief then
            // never got to notice the lost worker.
            .args(["--connect-timeout", "20", "--log-every", "1000000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringtrain")
    };
    let ps = spawn("ps", 0);
    let chief = spawn("worker", 0);
    let mut victim = spawn("worker", 1);
    std::thread::sleep(Duration::from_secs(3));
    victim.kill().unwrap();
    let killed_at = Instant::now();
    let _ = victim.wait();
    for (who, child) in [("ps task 0", ps), ("worker 0", chief)] {
        let out = wait_within(child, Duration::from_secs(20));
        let took = killed_at.elapsed();
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(3), "{who}:\n{err}");
        assert!(err.contains("worker task 1"), "{who}:\n{err}");
        assert!(
            took < Duration::from_secs(12),
            "{who} took {took:?} to stop"
        );
    }
}

#[test]
fn launch_ps_mode_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("summary.json");
    let m = metrics.to_str().unwrap();
    let args = [
        "launch", "--mode", "ps", "--ps", "2", "--np", "3", "--steps", "20",
    ];
    let out = ringtrain(&[&args[..], &["--hidden", "16", "--metrics-out", m]].concat());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "launch failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("summary: 3 workers, 2 ps tasks (sync), 20 steps"),
        "{stdout}"
    );
    for w in 0..3 {
        assert!(
            stdout.contains(&format!("worker {w} finished: param_digest ")),
            "{stdout}"
        );
    }
    for j in 0..2 {
        assert!(
            stdout.contains(&format!("ps task {j} finished: 20 updates")),
            "{stdout}"
        );
    }

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert_eq!(json["mode"], "ps");
    assert_eq!(json["world_size"], 3);
    assert_eq!(json["ps_tasks"], 2);
    assert_eq!(json["steps"], 20);
    for key in [
        "test_accuracy",
        "bytes_sent_per_step",
        "bytes_received_per_step",
    ] {
        assert!(json[key].is_number(), "{key} missing in {json}");
    }
    assert!(json.get("staleness_p50").is_none(), "{json}");
}

#[test]
fn launch_in_graph_mode_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("summary.json");
    let m = metrics.to_str().unwrap();
    let out = ringtrain(&[
        "launch",
        "--mode",
        "in-graph",
        "--np",
        "3",
        "--steps",
        "20",
        "--hidden",
        "16",
        "--metrics-out",
        m,
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "launch failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("summary: 3 replicas (in-graph), 20 steps"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert_eq!(json["mode"], "in-graph");
    assert!(json.get("ps_tasks").is_none(), "{json}");
    let bad = ringtrain(&["launch", "--mode", "in-graph", "--np", "2", "--ps", "2"]);
    let (_, err) = text(&bad);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("--ps"), "{err}");
}
