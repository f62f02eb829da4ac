//! `--elastic` end to end: real processes on 127.0.0.1, killed with SIGKILL and restarted.
//!
//! Every child is owned by a [`Cluster`], which kills (by PID, through `Child::kill`) and
//! reaps whatever still runs when it is dropped, so no test leaves a process behind, and
//! every wait is bounded.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringtrain::elastic::STEP_PAUSE_ENV;
use ringtrain::launch::free_local_addrs;
use ringtrain::ring::Rank;
use ringtrain::train::{self, TrainConfig};
use ringtrain::transport::RingPlace;

const BIN: &str = env!("CARGO_BIN_EXE_ringtrain");

/// Flags of every rank: a small model, a short peer timeout, a few hundred steps.
const FLAGS: [&str; 15] = [
    "--elastic",
    "--steps",
    "300",
    "--batch-size",
    "32",
    "--hidden",
    "16",
    "--peer-timeout",
    "2",
    "--connect-timeout",
    "20",
    "--check-every",
    "10",
    "--log-every",
    "10",
];

/// Each rank sleeps this long after each step, so a kill and a restart land mid-run.
const PAUSE_MS: &str = "25";

/// How long any one wait may take before the test fails.
const LIMIT: Duration = Duration::from_secs(90);

/// One rank's process and everything it has written so far.
struct Proc {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    status: Option<ExitStatus>,
}

impl Proc {
    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The exit status, once the process has exited.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    /// The digest from the `rank N finished: param_digest HEX` line, if printed.
    fn digest(&self) -> Option<String> {
        let out = self.stdout();
        let line = out
            .lines()
            .find(|l| l.contains("finished: param_digest "))?;
        Some(line.rsplit(' ').next()?.trim().to_string())
    }
}

/// Every process a test started; kills and reaps the ones still running when dropped.
struct Cluster {
    hosts: PathBuf,
    procs: Vec<Option<Proc>>,
}

impl Cluster {
    fn new(dir: &Path, n: usize) -> Cluster {
        let addrs = free_local_addrs(n).unwrap();
        let body: String = addrs.iter().map(|a| format!("{a}\n")).collect();
        let hosts = dir.join("hosts.txt");
        std::fs::write(&hosts, body).unwrap();
        let mut cluster = Cluster {
            hosts,
            procs: (0..n).map(|_| None).collect(),
        };
        for rank in 0..n {
            cluster.start(rank);
        }
        cluster
    }

    /// Starts (or restarts) `rank`.
    fn start(&mut self, rank: usize) {
        let mut child = Command::new(BIN)
            .args(["--hosts", self.hosts.to_str().unwrap()])
            .args(["--rank", &rank.to_string()])
            .args(FLAGS)
            .env("RUST_LOG", "info")
            .env(STEP_PAUSE_ENV, PAUSE_MS)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringtrain");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        self.procs[rank] = Some(Proc {
            child,
            stdout,
            stderr,
            status: None,
        });
    }

    fn proc(&mut self, rank: usize) -> &mut Proc {
        self.procs[rank].as_mut().expect("rank was started")
    }

    /// Kills `rank` with SIGKILL and reaps it.
    fn kill(&mut self, rank: usize) {
        let p = self.proc(rank);
        p.child.kill().unwrap();
        p.status = Some(p.child.wait().unwrap());
    }

    /// Waits until `cond` holds for `rank`'s stderr; fails the test after [`LIMIT`].
    fn wait_for_log(&mut self, rank: usize, what: &str, cond: impl Fn(&str) -> bool) {
        let start = Instant::now();
        while !cond(&self.proc(rank).stderr()) {
            if let Some(status) = self.proc(rank).poll() {
                let err = self.proc(rank).stderr();
                panic!("rank {rank} exited ({status}) before {what}:\n{err}");
            }
            assert!(
                start.elapsed() < LIMIT,
                "rank {rank}: no {what} within {LIMIT:?}:\n{}",
                self.proc(rank).stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `ranks` to exit and returns their digests; fails on a non-zero exit.
    fn finish(&mut self, ranks: &[usize]) -> Vec<String> {
        let start = Instant::now();
        for &r in ranks {
            while self.proc(r).poll().is_none() {
                assert!(
                    start.elapsed() < LIMIT,
                    "rank {r} still runs after {LIMIT:?}:\n{}",
                    self.proc(r).stderr()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Give the reader threads a moment to drain the pipes of exited processes.
        std::thread::sleep(Duration::from_millis(200));
        ranks
            .iter()
            .map(|&r| {
                let p = self.proc(r);
                let status = p.poll().unwrap();
                assert!(status.success(), "rank {r}: {status}\n{}", p.stderr());
                p.digest()
                    .unwrap_or_else(|| panic!("rank {r} printed no digest:\n{}", p.stdout()))
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().flatten() {
            if p.poll().is_none() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }
}

/// Reads a pipe to its end on a thread, appending to the returned buffer.
fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let out = buf.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut b = out.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    });
    buf
}

fn assert_all_equal(digests: &[String]) {
    assert!(
        digests.iter().all(|d| d == &digests[0] && d.len() == 64),
        "digests differ: {digests:?}"
    );
}

/// Trains until the first progress line, then kills rank 3.
fn start_four_and_kill_rank_3(dir: &Path) -> Cluster {
    let mut cluster = Cluster::new(dir, 4);
    cluster.wait_for_log(0, "training progress", |e| e.contains("progress"));
    cluster.kill(3);
    cluster.wait_for_log(0, "a ring of ranks 0, 1, 2", |e| {
        e.contains("ring formed") && e.contains("members=[0, 1, 2]")
    });
    cluster
}

#[test]
fn four_ranks_lose_one_and_the_other_three_finish_with_equal_digests() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start_four_and_kill_rank_3(dir.path());
    let digests = cluster.finish(&[0, 1, 2]);
    assert_all_equal(&digests);
    let out = cluster.proc(0).stdout();
    assert!(out.contains("summary: 3 ranks, 300 steps"), "{out}");
}

#[test]
fn a_restarted_rank_rejoins_and_finishes_with_the_same_digest() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start_four_and_kill_rank_3(dir.path());
    cluster.start(3);
    cluster.wait_for_log(3, "receiving the state", |e| e.contains("state agreed"));
    let digests = cluster.finish(&[0, 1, 2, 3]);
    assert_all_equal(&digests);
    let out = cluster.proc(0).stdout();
    assert!(out.contains("summary: 4 ranks, 300 steps"), "{out}");
    let err = cluster.proc(0).stderr();
    assert!(err.contains("members=[0, 1, 2, 3]"), "{err}");
}

#[test]
fn without_a_membership_change_elastic_equals_the_plain_ring() {
    // With two ranks every sum is one addition, so the summation order cannot differ
    // either: the digests must be equal bit for bit.
    let base = TrainConfig {
        steps: Some(40),
        batch_size: 16,
        hidden: vec![16],
        check_every: 10,
        connect_timeout: Duration::from_secs(20),
        peer_timeout: Duration::from_secs(2),
        ..TrainConfig::default()
    };
    let run = |elastic: bool| {
        let cfg = TrainConfig {
            elastic,
            ..base.clone()
        };
        let addrs = free_local_addrs(2).unwrap();
        let threads: Vec<_> = (0..2)
            .map(|r| {
                let (cfg, addrs) = (cfg.clone(), addrs.clone());
                std::thread::spawn(move || {
                    let place = RingPlace {
                        rank: Rank(r),
                        addrs,
                    };
                    train::run(&cfg, place).map(|t| t.summary.param_digest)
                })
            })
            .collect();
        let digests: Vec<String> = threads
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        assert_all_equal(&digests);
        digests[0].clone()
    };
    assert_eq!(run(true), run(false));
}
