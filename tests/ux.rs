//! The habits of people who run distributed jobs elsewhere: ranks from srun / mpirun /
//! torchrun / StatefulSet environments, `--config` files, `--timeline` traces, `--save`
//! safetensors, `--quiet` and `--log-format json`. Real processes on 127.0.0.1.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ringtrain::launch::free_local_addrs;
use ringtrain::launchenv::LAUNCHERS;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ringtrain");

/// Flags that keep a run to a fraction of a second.
const SMALL: [&str; 6] = ["--steps", "4", "--hidden", "8", "--batch-size", "16"];

/// `ringtrain` with `args` and `env`, in `dir`, with no launcher variables inherited.
fn command(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(dir).env("RUST_LOG", "info");
    for vars in LAUNCHERS {
        cmd.env_remove(vars.rank).env_remove(vars.size);
    }
    cmd.env_remove("RINGTRAIN_KEY").envs(env.iter().copied());
    cmd
}

fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    command(dir, args, env).output().expect("run ringtrain")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn expect_code(out: &Output, code: i32, needles: &[&str]) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in:\n{err}");
    }
}

/// A hosts file of `n` free loopback addresses in `dir`.
fn hosts(dir: &Path, n: usize) -> PathBuf {
    let lines: Vec<String> = free_local_addrs(n)
        .unwrap()
        .iter()
        .map(|a| a.to_string())
        .collect();
    let path = dir.join("hosts.txt");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// Starts one process per environment, with `args`, and waits for all of them.
fn run_ranks(dir: &Path, args: &[&str], envs: &[Vec<(&str, &str)>]) -> Vec<Output> {
    let spawned: Vec<_> = envs
        .iter()
        .map(|env| {
            command(dir, args, env)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn ringtrain")
        })
        .collect();
    spawned
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait for ringtrain"))
        .collect()
}

#[test]
fn slurm_variables_give_each_process_its_rank() {
    let dir = tempfile::tempdir().unwrap();
    let h = hosts(dir.path(), 2);
    let mut args = vec!["train", "--hosts", h.to_str().unwrap()];
    args.extend(SMALL);
    let envs: Vec<Vec<(&str, &str)>> = ["0", "1"]
        .iter()
        .map(|r| vec![("SLURM_PROCID", *r), ("SLURM_NTASKS", "2")])
        .collect();
    let outs = run_ranks(dir.path(), &args, &envs);
    for (r, out) in outs.iter().enumerate() {
        let want = format!("rank {r} of 2 from SLURM_PROCID/SLURM_NTASKS");
        expect_code(out, 0, &[&want]);
        assert!(text(&out.stdout).contains(&format!("rank {r} finished")));
    }
}

#[test]
fn launcher_variables_are_checked_before_any_network() {
    let dir = tempfile::tempdir().unwrap();
    let h = hosts(dir.path(), 2);
    let h = h.to_str().unwrap();
    let ompi = [("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "3")];
    let out = run(dir.path(), &["train", "--hosts", h], &ompi);
    expect_code(&out, 2, &["OMPI_COMM_WORLD_SIZE=3", "lists 2 addresses"]);

    let torchrun = [("RANK", "0"), ("WORLD_SIZE", "2")];
    let out = run(
        dir.path(),
        &["train", "--hosts", h, "--rank", "1"],
        &torchrun,
    );
    expect_code(&out, 2, &["--rank says rank 1 but RANK=0"]);

    let pmi = [("PMI_RANK", "one"), ("PMI_SIZE", "2")];
    let out = run(dir.path(), &["train", "--hosts", h], &pmi);
    expect_code(&out, 2, &["PMI_RANK=\"one\""]);

    let out = run(dir.path(), &["train", "--hosts", h], &[]);
    expect_code(
        &out,
        2,
        &["no rank", "SLURM_PROCID", "--rank-from-hostname"],
    );
}

#[test]
fn a_statefulset_ordinal_is_a_rank_when_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let h = hosts(dir.path(), 1);
    let mut args = vec![
        "train",
        "--hosts",
        h.to_str().unwrap(),
        "--rank-from-hostname",
    ];
    args.extend(SMALL);
    let out = run(dir.path(), &args, &[("HOSTNAME", "ring-0")]);
    expect_code(
        &out,
        0,
        &["rank 0 of 1 from the ordinal of host name \"ring-0\""],
    );
    let out = run(dir.path(), &args, &[("HOSTNAME", "ring-4.ring.ns.svc")]);
    expect_code(
        &out,
        2,
        &["rank 4 from the ordinal", "not below the 1 addresses"],
    );
    let out = run(dir.path(), &args, &[("HOSTNAME", "login")]);
    expect_code(&out, 2, &["\"login\" does not end in -N"]);
}

#[test]
fn config_file_sits_between_flags_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("train.toml");
    let body = "epochs = 7\nlr = 0.5\nhidden = [32, 16]\nlog-format = \"json\"\n";
    std::fs::write(&file, body).unwrap();
    let f = file.to_str().unwrap();
    let args = ["train", "--config", f, "--lr", "0.25", "--print-config"];
    let out = run(dir.path(), &args, &[]);
    expect_code(&out, 0, &[]);
    let printed: toml::Table = text(&out.stdout).parse().expect("--print-config is TOML");
    let get = |k: &str| printed.get(k).cloned();
    assert_eq!(
        get("epochs"),
        Some(toml::Value::Integer(7)),
        "file over default"
    );
    assert_eq!(get("lr"), Some(toml::Value::Float(0.25)), "flag over file");
    assert_eq!(get("batch-size"), Some(toml::Value::Integer(64)), "default");
    assert_eq!(get("hidden"), Some(toml::Value::String("32,16".into())));
    assert_eq!(get("log-format"), Some(toml::Value::String("json".into())));
    assert_eq!(get("steps"), None, "unset settings are commented out");

    std::fs::write(&file, "epochs = 2\nbatch_size = 8\n").unwrap();
    let out = run(dir.path(), &["train", "--config", f, "--print-config"], &[]);
    expect_code(
        &out,
        2,
        &["train.toml", "unknown key \"batch_size\"", "\"batch-size\""],
    );
    std::fs::write(&file, "rank = 0\n").unwrap();
    let out = run(dir.path(), &["launch", "--config", f], &[]);
    expect_code(&out, 2, &["train.toml", "\"rank\" cannot be set"]);
}

#[test]
fn launch_reads_the_config_file_for_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("train.toml");
    let body = "steps = 3\nhidden = [8]\nbatch-size = 16\nmetrics-out = \"m.json\"\n\
                hosts = \"ignored under launch\"\n";
    std::fs::write(&file, body).unwrap();
    let out = run(
        dir.path(),
        &["launch", "--np", "2", "--config", "train.toml"],
        &[],
    );
    expect_code(&out, 0, &["unused here: hosts"]);
    let m: Value = serde_json::from_slice(&std::fs::read(dir.path().join("m.json")).unwrap())
        .expect("the summary is JSON");
    assert_eq!(
        (m["steps"].as_u64(), m["world_size"].as_u64()),
        (Some(3), Some(2))
    );
}

#[test]
fn timeline_has_every_phase_for_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "launch",
        "--np",
        "2",
        "--steps",
        "5",
        "--timeline",
        "trace.json",
    ];
    let mut args = args.to_vec();
    args.extend(&SMALL[2..]);
    let out = run(dir.path(), &args, &[]);
    expect_code(&out, 0, &["timeline merged"]);

    let merged = read_trace(&dir.path().join("trace.json"));
    for rank in 0..2u64 {
        let own = read_trace(&dir.path().join(format!("trace.rank{rank}.json")));
        assert!(own.iter().all(|e| e["pid"] == rank), "rank {rank}'s file");
        let spans: Vec<&Value> = merged
            .iter()
            .filter(|e| e["pid"] == rank && e["ph"] == "X")
            .collect();
        let count = |name: &str| spans.iter().filter(|e| e["name"] == name).count();
        for name in ["forward/backward", "all-reduce", "optimizer"] {
            assert_eq!(count(name), 5, "rank {rank}: {name}");
        }
        assert_eq!(count("reduce-scatter"), 5, "rank {rank}");
        assert_eq!(count("all-gather"), 5, "rank {rank}");
        assert_eq!(count("broadcast"), 1, "rank {rank}");
        assert!(count("wait for neighbour") >= 10, "rank {rank}");
        for e in spans.iter().filter(|e| e["name"] == "reduce-scatter") {
            assert!(e["args"]["bytes_sent"].as_u64().unwrap() > 0, "{e}");
            assert!(e["args"]["bytes_received"].as_u64().unwrap() > 0, "{e}");
        }
        for e in &spans {
            assert!(
                e["ts"].as_f64().is_some() && e["dur"].as_f64().unwrap() >= 0.0,
                "{e}"
            );
            assert!(e["tid"].as_u64().is_some(), "{e}");
        }
    }
}

fn read_trace(path: &Path) -> Vec<Value> {
    let json: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    json["traceEvents"].as_array().expect("traceEvents").clone()
}

#[test]
fn without_output_flags_no_file_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["launch", "--np", "1"];
    args.extend(SMALL);
    expect_code(&run(dir.path(), &args, &[]), 0, &[]);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The file's tensors, read with nothing but the format's definition.
struct Tensors {
    /// name -> (dtype, shape, begin, end)
    entries: BTreeMap<String, (String, Vec<u64>, u64, u64)>,
    metadata: BTreeMap<String, String>,
    data: Vec<u8>,
}

fn read_safetensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("JSON header");
    let mut entries = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in header.as_object().unwrap() {
        if name == "__metadata__" {
            for (k, s) in v.as_object().unwrap() {
                metadata.insert(k.clone(), s.as_str().unwrap().to_string());
            }
            continue;
        }
        let shape = v["shape"].as_array().unwrap();
        let shape: Vec<u64> = shape.iter().map(|d| d.as_u64().unwrap()).collect();
        let offs = v["data_offsets"].as_array().unwrap();
        let (b, e) = (offs[0].as_u64().unwrap(), offs[1].as_u64().unwrap());
        let dtype = v["dtype"].as_str().unwrap().to_string();
        entries.insert(name.clone(), (dtype, shape, b, e));
    }
    let data = bytes[8 + n..].to_vec();
    Tensors {
        entries,
        metadata,
        data,
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    let words = bytes.chunks_exact(4);
    words
        .map(|w| f32::from_le_bytes(w.try_into().unwrap()))
        .collect()
}

#[test]
fn safetensors_round_trip_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["launch", "--np", "2", "--save", "w.safetensors"];
    args.extend(["--metrics-out", "m.json"]);
    args.extend(SMALL);
    expect_code(&run(dir.path(), &args, &[]), 0, &["weights saved"]);

    let t = read_safetensors(&dir.path().join("w.safetensors"));
    let want: [(&str, Vec<u64>); 4] = [
        ("layers.0.weight", vec![64, 8]),
        ("layers.0.bias", vec![8]),
        ("layers.1.weight", vec![8, 10]),
        ("layers.1.bias", vec![10]),
    ];
    let names: BTreeSet<&str> = t.entries.keys().map(String::as_str).collect();
    assert_eq!(names, want.iter().map(|(n, _)| *n).collect());
    // In layout order the tensors tile the data exactly; together they are the parameters.
    let mut flat = Vec::new();
    let mut at = 0;
    for (name, shape) in &want {
        let (dtype, got_shape, b, e) = &t.entries[*name];
        assert_eq!((dtype.as_str(), got_shape), ("F32", shape), "{name}");
        assert_eq!(
            (*b, *e),
            (at, at + 4 * shape.iter().product::<u64>()),
            "{name}"
        );
        flat.extend_from_slice(&t.data[*b as usize..*e as usize]);
        at = *e;
    }
    assert_eq!(at as usize, t.data.len(), "no bytes after the last tensor");

    // The summary's digest is blake3 over the final parameters' little-endian bytes.
    let m: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("m.json")).unwrap()).unwrap();
    let digest = blake3::hash(&flat).to_hex().to_string();
    assert_eq!(m["param_digest"].as_str(), Some(digest.as_str()));
    assert_eq!(t.metadata["param_digest"], digest);
    assert!(t.metadata["layout"].contains("[in, out]"));
    assert!(f32s(&flat).iter().all(|v| v.is_finite()));
    check_with_numpy(&dir.path().join("w.safetensors"), &t);
}

/// When python3 has numpy, reads the file a third way and compares every value's bits.
fn check_with_numpy(path: &Path, t: &Tensors) {
    let script = r#"
import json, struct, sys
import numpy as np
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
for name, e in sorted(header.items()):
    if name == "__metadata__":
        continue
    b, end = e["data_offsets"]
    a = np.frombuffer(raw[8 + n + b:8 + n + end], dtype="<f4").reshape(e["shape"])
    shape = "x".join(str(d) for d in a.shape)
    print(name, shape, " ".join("%08x" % w for w in a.view("<u4").ravel()))
"#;
    let probe = Command::new("python3")
        .args(["-c", "import numpy"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("python3 with numpy not found; skipping the numpy check");
        return;
    }
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for line in text(&out.stdout).lines() {
        let mut parts = line.splitn(3, ' ');
        let (name, shape) = (parts.next().unwrap(), parts.next().unwrap());
        let words = parts.next().unwrap_or_default();
        let (_, dims, b, e) = &t.entries[name];
        let dims: Vec<String> = dims.iter().map(u64::to_string).collect();
        assert_eq!(shape, dims.join("x"), "{name}");
        let ours: Vec<String> = f32s(&t.data[*b as usize..*e as usize])
            .iter()
            .map(|v| format!("{:08x}", v.to_bits()))
            .collect();
        assert_eq!(words, ours.join(" "), "{name}");
    }
}

#[test]
fn quiet_leaves_only_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["launch", "--np", "2", "--quiet"];
    args.extend(SMALL);
    let out = run(dir.path(), &args, &[]);
    expect_code(&out, 0, &[]);
    assert_eq!(text(&out.stderr), "", "nothing but errors on stderr");
    assert!(text(&out.stdout).contains("summary: 2 ranks"));
}

#[test]
fn json_log_lines_carry_the_rank_on_every_thread() {
    let dir = tempfile::tempdir().unwrap();
    let h = hosts(dir.path(), 2);
    let mut args = vec![
        "train",
        "--hosts",
        h.to_str().unwrap(),
        "--log-format",
        "json",
    ];
    args.extend(SMALL);
    let envs: Vec<Vec<(&str, &str)>> = ["0", "1"]
        .iter()
        .map(|r| vec![("RANK", *r), ("WORLD_SIZE", "2")])
        .collect();
    let outs = run_ranks(dir.path(), &args, &envs);
    for (r, out) in outs.iter().enumerate() {
        expect_code(out, 0, &[]);
        let mut threads = BTreeSet::new();
        for line in text(&out.stderr).lines() {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(v["span"]["rank"], r as u64, "{line}");
            threads.insert(v["threadName"].as_str().unwrap_or_default().to_string());
        }
        let comm = format!("ringtrain-comm-{r}");
        assert!(threads.contains(&comm), "no line from {comm}: {threads:?}");
        let summary: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        assert_eq!(summary["rank"], r as u64);
    }
}

#[test]
fn the_example_configurations_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let toml = examples.join("train.toml");
    let args = [
        "train",
        "--config",
        toml.to_str().unwrap(),
        "--print-config",
    ];
    expect_code(&run(dir.path(), &args, &[]), 0, &[]);

    // The StatefulSet's ConfigMap carries its own train.toml: the block under its key.
    let yaml = std::fs::read_to_string(examples.join("k8s-statefulset.yaml")).unwrap();
    let block: Vec<&str> = yaml
        .lines()
        .skip_while(|l| l.trim() != "train.toml: |")
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .map(|l| &l[4..])
        .collect();
    assert!(block.len() > 3, "no train.toml block in the manifest");
    let k8s = dir.path().join("k8s.toml");
    std::fs::write(&k8s, block.join("\n")).unwrap();
    let args = ["train", "--config", k8s.to_str().unwrap(), "--print-config"];
    let out = run(dir.path(), &args, &[]);
    expect_code(&out, 0, &[]);
    assert!(text(&out.stdout).contains("rank-from-hostname = true"));
}
