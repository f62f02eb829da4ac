//! `ringtrain bench` end to end: real rank processes on loopback, the files each benchmark
//! writes, and (as root with `ip` and `tc`) a short run in an emulated cluster.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ringtrain");

fn ringtrain(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ringtrain")
}

fn text(out: &Output) -> (String, String) {
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (s(&out.stdout), s(&out.stderr))
}

fn expect_success(args: &[&str]) -> String {
    let out = ringtrain(args);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "ringtrain {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

fn read_json(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v.as_array().expect("a JSON array of records").clone()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn allreduce_bench_writes_a_checked_record_per_size() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("ar.json");
    let args = [
        "bench",
        "allreduce",
        "--np",
        "2",
        "--sizes",
        "1K,64K",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
        p(&json),
    ];
    let stdout = expect_success(&args);

    let records = read_json(&json);
    assert_eq!(records.len(), 2);
    for (r, size) in records.iter().zip([1024u64, 65536]) {
        assert_eq!(r["size_bytes"], size);
        assert_eq!(r["world_size"], 2);
        assert_eq!(r["correct"], true);
        for field in [
            "time_ms_median",
            "algbw",
            "busbw",
            "p50_ms",
            "p99_ms",
            "cpu_secs_per_gib",
        ] {
            let v = r[field]
                .as_f64()
                .unwrap_or_else(|| panic!("{field} missing in {r}"));
            assert!(v.is_finite() && v > 0.0, "{field} = {v}");
        }
        // Two ranks: each sends the whole message once, so busbw equals algbw.
        assert_eq!(r["busbw"], r["algbw"]);
        assert!(r["p99_ms"].as_f64() >= r["p50_ms"].as_f64());
    }
    assert!(
        stdout.contains("busbw") && stdout.contains("cpu s/GiB"),
        "{stdout}"
    );
    assert_eq!(stdout.matches(" ok\n").count(), 2, "{stdout}");
}

/// One rank of `bench allreduce` started by hand, as on a machine of its own.
fn bench_rank(hosts: &Path, rank: usize, json: Option<&Path>) -> Output {
    let rank = rank.to_string();
    let mut args = vec![
        "bench",
        "allreduce",
        "--hosts",
        p(hosts),
        "--rank",
        &rank,
        "--sizes",
        "4K,16K",
        "--iters",
        "2",
        "--warmup",
        "0",
    ];
    if let Some(json) = json {
        args.extend(["--json", p(json)]);
    }
    ringtrain(&args)
}

#[test]
fn allreduce_ranks_started_by_hand_from_a_hosts_file_agree() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = ringtrain::launch::free_local_addrs(2).unwrap();
    let hosts = dir.path().join("hosts.txt");
    let lines: String = addrs.iter().map(|a| format!("{a}\n")).collect();
    std::fs::write(&hosts, lines).unwrap();
    let json = dir.path().join("ar.json");

    let hosts_1 = hosts.clone();
    let other = std::thread::spawn(move || bench_rank(&hosts_1, 1, None));
    let chief = bench_rank(&hosts, 0, Some(&json));
    let other = other.join().unwrap();

    let (stdout, stderr) = text(&chief);
    assert!(chief.status.success(), "{stdout}\n{stderr}");
    assert!(other.status.success(), "{:?}", text(&other));
    // Only rank 0 reports: the table on stdout and the records in --json.
    assert_eq!(stdout.matches(" ok\n").count(), 2, "{stdout}");
    assert!(text(&other).0.is_empty(), "{:?}", text(&other));
    assert_eq!(read_json(&json).len(), 2);
}

#[test]
fn scaling_bench_writes_json_csv_markdown_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let f = |name: &str| dir.path().join(name);
    let (json, csv, md, svg) = (f("s.json"), f("s.csv"), f("s.md"), f("s.svg"));
    let args = [
        "bench",
        "scaling",
        "--nodes",
        "1,2",
        "--modes",
        "ring,ps",
        "--steps",
        "10",
        "--bound-rate",
        "1gbit",
        "--json",
        p(&json),
        "--csv",
        p(&csv),
        "--markdown",
        p(&md),
        "--plot",
        p(&svg),
    ];
    expect_success(&args);

    let records = read_json(&json);
    assert_eq!(records.len(), 4);
    let want = [(1, "ring"), (2, "ring"), (1, "ps"), (2, "ps")];
    for (r, (nodes, mode)) in records.iter().zip(want) {
        assert_eq!(r["nodes"], nodes);
        assert_eq!(r["mode"], mode);
        assert!(r["samples_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["efficiency"].as_f64().unwrap() > 0.0, "{r}");
        let comm = r["comm_fraction"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&comm), "{r}");
        assert!(r["bound_samples_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(records[0]["efficiency"], 1.0);
    assert_eq!(records[2]["efficiency"], 1.0);
    assert_eq!(records[2]["ps_tasks"], 1);

    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(csv.starts_with("nodes,mode,samples_per_sec,efficiency,comm_fraction"));
    let md = std::fs::read_to_string(&md).unwrap();
    assert!(md.contains("| 2 | ring |"), "{md}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("ring bandwidth bound"));
    assert!(svg.contains("ps (measured)") && svg.contains("ps bandwidth bound"));
}

#[test]
fn scaling_bench_refuses_a_chart_format_it_cannot_write() {
    let out = ringtrain(&["bench", "scaling", "--nodes", "1", "--plot", "chart.png"]);
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(err.contains(".svg") && err.contains("chart.png"), "{err}");
}

/// Namespaces, tc and cgroups need root and iproute2; elsewhere this test says it skipped.
fn emulation_available() -> bool {
    let ok = ringtrain::emulate::available();
    if !ok {
        eprintln!("skipped: the emulated-cluster test needs root, `ip` and `tc`");
    }
    ok
}

/// Names of network namespaces that process `pid` made and left behind.
fn leftover_namespaces(pid: u32) -> Vec<String> {
    let prefix = format!("ringtrain-{pid}-");
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    dir.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

fn run_tracked(args: &[&str]) -> (Output, u32) {
    let child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ringtrain");
    let pid = child.id();
    (child.wait_with_output().expect("wait for ringtrain"), pid)
}

#[test]
fn emulated_cluster_runs_shaped_and_leaves_nothing_behind() {
    if !emulation_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("ar.json");
    // Large against the shaper's 125 KB burst, which an idle link lets through at once
    // (the ranks meet at a barrier before each timed call, so every call starts idle): at
    // 4 MiB the burst is worth 3% at most.
    let mut args = vec!["bench", "allreduce", "--np", "2", "--sizes", "4M"];
    args.extend([
        "--iters",
        "2",
        "--warmup",
        "1",
        "--link",
        "1gbit",
        "--json",
        p(&json),
    ]);
    // Loss needs nftables, which not every machine has; the rest of the test runs anyway.
    let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"];
    let nft = nft.iter().any(|p| Path::new(p).exists());
    if nft {
        args.extend(["--loss", "0.1%"]);
    } else {
        eprintln!("note: no nft, so --loss is not exercised");
    }
    let (out, pid) = run_tracked(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(leftover_namespaces(pid), Vec::<String>::new());

    let r = &read_json(&json)[0];
    assert_eq!(r["correct"], true);
    let link = r["link"].as_str().unwrap();
    assert!(link.starts_with("1gbit links, MTU 1500"), "{link}");
    assert_eq!(link.contains("0.100% loss"), nft, "{link}");
    // busbw cannot beat the shaped link (1 Gbit/s = 0.125 GB/s), whatever the CPU does.
    let fraction = r["link_fraction"].as_f64().unwrap();
    assert!(fraction > 0.0 && fraction < 1.05, "busbw/link {fraction}");
}

#[test]
fn emulated_delay_without_netem_is_refused_and_cleaned_up() {
    if !emulation_available() {
        return;
    }
    let args = [
        "bench",
        "allreduce",
        "--np",
        "2",
        "--sizes",
        "4K",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--link",
        "1gbit",
        "--delay",
        "1ms",
    ];
    let (out, pid) = run_tracked(&args);
    let (stdout, stderr) = text(&out);
    // Kernels with netem run it; kernels without must say why instead of ignoring --delay.
    if !out.status.success() {
        assert!(
            stderr.contains("netem") && stderr.contains("--delay"),
            "{stderr}"
        );
    } else {
        assert!(stdout.contains(" ok\n"), "{stdout}");
    }
    assert_eq!(leftover_namespaces(pid), Vec::<String>::new());
}

#[test]
fn emulated_scaling_runs_ring_ranks_and_parameter_servers_in_namespaces() {
    if !emulation_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("s.json");
    let args = [
        "bench",
        "scaling",
        "--nodes",
        "2",
        "--modes",
        "ring,ps",
        "--steps",
        "5",
        "--link",
        "1gbit",
        "--cpu",
        "0.5",
        "--json",
        p(&json),
    ];
    let (out, pid) = run_tracked(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(leftover_namespaces(pid), Vec::<String>::new());
    let records = read_json(&json);
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(
            r["link"].as_str().unwrap(),
            "1gbit links, MTU 1500, 0.5 cores per rank"
        );
        assert!(r["samples_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["bound_samples_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn sigterm_removes_the_emulated_cluster_and_its_ranks() {
    if !emulation_available() {
        return;
    }
    let mut args = vec!["bench", "allreduce", "--np", "2", "--sizes", "16M"];
    args.extend([
        "--iters", "1000", "--warmup", "0", "--link", "200mbit", "--cpu", "0.5",
    ]);
    let child = Command::new(BIN)
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ringtrain");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(15);
    while leftover_namespaces(pid).len() < 3 {
        assert!(Instant::now() < deadline, "no emulated cluster appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the ranks start inside their namespaces, then stop the launcher alone.
    std::thread::sleep(Duration::from_millis(500));
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert!(killed.unwrap().success());

    let out = child.wait_with_output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("removed the emulated cluster"), "{stderr}");
    assert_eq!(leftover_namespaces(pid), Vec::<String>::new());
    let prefix = format!("ringtrain-{pid}-");
    let cgroups = std::fs::read_dir("/sys/fs/cgroup/cpu").unwrap();
    let left: Vec<String> = cgroups
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}
