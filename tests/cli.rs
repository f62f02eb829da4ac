//! The `ringtrain` binary end to end: real processes, real files, real QUIC on loopback.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use ringtrain::launch::free_local_addrs;

mod common;
use common::spawn_rank;

const BIN: &str = env!("CARGO_BIN_EXE_ringtrain");

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

/// Runs one rank with `args` and expects a bad-input failure whose message has `needle`.
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
fn bad_hosts_files_are_named_with_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.txt");
    let empty = write(dir.path(), "empty.txt", "# only a comment\n\n");
    let bad = write(dir.path(), "bad.txt", "127.0.0.1:7000\n\n10.0.0.5\n");
    let dup = write(dir.path(), "dup.txt", "127.0.0.1:7000\n127.0.0.1:7000\n");
    let two = write(dir.path(), "two.txt", "127.0.0.1:7000\n127.0.0.1:7001\n");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    expect_bad_input(&["--hosts", &s(&missing), "--rank", "0"], "nope.txt");
    expect_bad_input(&["--hosts", &s(&empty), "--rank", "0"], "no addresses");
    expect_bad_input(&["--hosts", &s(&bad), "--rank", "0"], "line 3");
    expect_bad_input(&["--hosts", &s(&bad), "--rank", "0"], "\"10.0.0.5\"");
    expect_bad_input(&["--hosts", &s(&dup), "--rank", "0"], "line 2");
    expect_bad_input(&["--hosts", &s(&two), "--rank", "2"], "two.txt");
    expect_bad_input(&["--rank", "0"], "--hosts FILE is required");
}

#[test]
fn a_malformed_idx_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = write(dir.path(), "hosts.txt", "127.0.0.1:7000\n");
    let data = dir.path().join("mnist");
    std::fs::create_dir(&data).unwrap();
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
        write(&data, name, "\0\0\x08\x02garbage");
    }
    let spec = format!("mnist:{}", data.display());
    let args = [
        "--hosts",
        hosts.to_str().unwrap(),
        "--rank",
        "0",
        "--data",
        &spec,
    ];
    expect_bad_input(&args, "train-images-idx3-ubyte");
}

/// Starts rank `rank` of the hosts file with extra flags, output captured.
fn hosts_file(dir: &Path, n: usize) -> PathBuf {
    let addrs = free_local_addrs(n).unwrap();
    let body: String = addrs.iter().map(|a| format!("{a}\n")).collect();
    write(dir, "hosts.txt", &body)
}

/// Waits for `child` at most `limit`; kills it (our own child) if it is still running.
fn wait_within(mut child: Child, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    (child.wait_with_output().unwrap(), start.elapsed())
}

#[test]
fn ranks_with_different_flags_stop_with_the_differing_fields() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path(), 2);
    let a = spawn_rank(
        &hosts,
        0,
        &["--batch-size", "32", "--connect-timeout", "20"],
    );
    let b = spawn_rank(
        &hosts,
        1,
        &["--batch-size", "16", "--connect-timeout", "20"],
    );
    for (rank, child, ours, theirs) in [(0, a, 32, 16), (1, b, 16, 32)] {
        let (out, took) = wait_within(child, Duration::from_secs(30));
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(2), "rank {rank}: {err}");
        let want = format!("batch_size: here {ours}, there {theirs}");
        assert!(
            err.contains(&want),
            "rank {rank}: expected {want:?} in\n{err}"
        );
        assert!(took < Duration::from_secs(15), "rank {rank} took {took:?}");
    }
}

#[test]
fn launch_three_ranks_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("summary.json");
    let m = metrics.to_str().unwrap();
    let out = ringtrain(&["launch", "--np", "3", "--steps", "30", "--metrics-out", m]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "launch failed:\n{stdout}\n{stderr}");
    let digests: Vec<&str> = (0..3)
        .map(|r| {
            let prefix = format!("[rank {r}] rank {r} finished: param_digest ");
            let line = stdout.lines().find(|l| l.starts_with(&prefix));
            line.unwrap_or_else(|| panic!("no digest from rank {r} in\n{stdout}"))[prefix.len()..]
                .trim()
        })
        .collect();
    assert!(
        digests.iter().all(|d| d == &digests[0] && d.len() == 64),
        "{digests:?}"
    );
    assert!(
        stdout.contains("[rank 0] summary: 3 ranks, 30 steps"),
        "{stdout}"
    );
    assert!(
        stderr.contains("[rank 0]") && stderr.contains("progress"),
        "{stderr}"
    );

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert_eq!(json["world_size"], 3);
    assert_eq!(json["mode"], "ring");
    assert_eq!(json["steps"], 30);
    assert_eq!(json["param_digest"], digests[0]);
    for key in [
        "samples_per_sec",
        "final_loss",
        "test_accuracy",
        "allreduce_ms_p50",
        "allreduce_ms_p99",
        "bytes_sent_per_step",
        "batch_size",
    ] {
        assert!(json[key].is_number(), "{key} missing in {json}");
    }
}

#[test]
fn launch_stops_everyone_when_a_rank_fails() {
    // --data pointing nowhere makes every rank fail at start; launch must exit non-zero
    // and name the first failure, not hang.
    let out = ringtrain(&["launch", "--np", "2", "--data", "mnist:/nonexistent/dir"]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("failed first"), "{err}");
    assert!(err.contains("/nonexistent/dir"), "{err}");
}

#[test]
fn a_killed_rank_is_named_by_the_survivors_within_the_peer_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path(), 3);
    let flags = [
        "--steps",
        "100000",
        "--peer-timeout",
        "2",
        "--connect-timeout",
        "20",
    ];
    let mut children: Vec<Child> = (0..3).map(|r| spawn_rank(&hosts, r, &flags)).collect();
    // Let the ring form and train a little, then kill rank 1 the hard way.
    std::thread::sleep(Duration::from_secs(3));
    let victim_addr = std::fs::read_to_string(&hosts)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    children[1].kill().unwrap();
    let killed_at = Instant::now();
    let _ = children[1].wait();
    let survivors: Vec<Child> = children
        .into_iter()
        .enumerate()
        .filter(|(r, _)| *r != 1)
        .map(|(_, c)| c)
        .collect();
    for child in survivors {
        let (out, _) = wait_within(child, Duration::from_secs(20));
        let took = killed_at.elapsed();
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(3), "survivor exit code:\n{err}");
        assert!(
            err.contains("rank 1") || err.contains(&victim_addr),
            "{err}"
        );
        assert!(
            took < Duration::from_secs(12),
            "survivor took {took:?} to stop"
        );
    }
}

#[test]
fn training_completes_with_equal_digests_under_one_percent_datagram_loss() {
    // Every endpoint drops 1% of its outgoing datagrams (seeded by its port); QUIC must
    // resend them and the ring must still agree bit for bit.
    let out = Command::new(BIN)
        .args([
            "launch",
            "--np",
            "3",
            "--steps",
            "40",
            "--peer-timeout",
            "10",
        ])
        .env("RINGTRAIN_INJECT_LOSS", "0.01")
        .output()
        .expect("run ringtrain");
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "launch failed under loss:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("dropping outgoing datagrams on purpose"),
        "{stderr}"
    );
    let digests: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once("param_digest ").map(|(_, d)| d.trim()))
        .collect();
    assert_eq!(digests.len(), 3, "{stdout}");
    assert!(digests.iter().all(|d| d == &digests[0]), "{digests:?}");
}

#[test]
fn ranks_may_start_in_any_order() {
    // Rank 1 starts alone and keeps dialling; rank 0 comes two seconds later.
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path(), 2);
    let flags = ["--steps", "10", "--connect-timeout", "30"];
    let late = spawn_rank(&hosts, 1, &flags);
    std::thread::sleep(Duration::from_secs(2));
    let early = spawn_rank(&hosts, 0, &flags);
    let mut digests = Vec::new();
    for (rank, child) in [(1, late), (0, early)] {
        let (out, _) = wait_within(child, Duration::from_secs(40));
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "rank {rank}:\n{stderr}");
        let digest = stdout
            .lines()
            .find_map(|l| l.split_once("param_digest ").map(|(_, d)| d));
        digests.push(
            digest
                .unwrap_or_else(|| panic!("no digest in {stdout}"))
                .to_string(),
        );
    }
    assert_eq!(digests[0], digests[1]);
}
