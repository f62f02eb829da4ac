//! Helpers shared by the integration tests: a loopback ring of QUIC ranks in threads (bare
//! communication handles, or whole training runs), and waiting for a child process with a
//! deadline. Each test file includes this module and
//! uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ringtrain::launch::free_local_addrs;
use ringtrain::ring::Rank;
use ringtrain::train::{self, TrainConfig, TrainError, Trained};
use ringtrain::transport::{CommHandle, Hello, PROTOCOL_VERSION, RingPlace, TransportOptions};

/// The greeting of rank `rank` of `world` with these configuration fields.
pub fn hello(rank: usize, world: usize, fields: &[(&str, &str)]) -> Hello {
    let fingerprint: BTreeMap<String, String> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Hello {
        protocol: PROTOCOL_VERSION,
        rank,
        world,
        fingerprint,
    }
}

/// Runs `f` on every rank of a fresh ring of `n` on 127.0.0.1, one thread per rank, and
/// returns what each rank's call returned, in rank order.
pub fn on_ring<T: Send + 'static>(
    n: usize,
    opts: TransportOptions,
    f: impl Fn(usize, &mut CommHandle) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let addrs = free_local_addrs(n).expect("free ports");
    let threads: Vec<_> = (0..n)
        .map(|r| {
            let (addrs, f, opts) = (addrs.clone(), f.clone(), opts.clone());
            std::thread::spawn(move || {
                let place = RingPlace {
                    rank: Rank(r),
                    addrs,
                };
                let mut comm = CommHandle::connect(place, hello(r, n, &[]), opts)
                    .unwrap_or_else(|e| panic!("rank {r} could not join the ring: {e}"));
                let out = f(r, &mut comm);
                comm.finish();
                out
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("rank thread"))
        .collect()
}

/// Trains rank `r` with `cfgs[r]` on the ring `addrs`, one thread per rank, and returns
/// each rank's outcome in rank order.
pub fn train_on(addrs: &[SocketAddr], cfgs: &[TrainConfig]) -> Vec<Result<Trained, TrainError>> {
    let threads: Vec<_> = cfgs
        .iter()
        .enumerate()
        .map(|(r, cfg)| {
            let (cfg, addrs) = (cfg.clone(), addrs.to_vec());
            std::thread::spawn(move || {
                let place = RingPlace {
                    rank: Rank(r),
                    addrs,
                };
                train::run(&cfg, place)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("rank thread"))
        .collect()
}

/// [`train_on`] a fresh ring of free ports on 127.0.0.1, one rank per config.
pub fn train_each(cfgs: &[TrainConfig]) -> Vec<Result<Trained, TrainError>> {
    let addrs = free_local_addrs(cfgs.len()).expect("free ports");
    train_on(&addrs, cfgs)
}

/// Starts `ringtrain --hosts HOSTS --rank RANK EXTRA...` with its output piped.
pub fn spawn_rank(hosts: &Path, rank: usize, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ringtrain"))
        .args([
            "--hosts",
            hosts.to_str().unwrap(),
            "--rank",
            &rank.to_string(),
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringtrain")
}

/// Waits for `child` at most `limit`; kills it (our own child) if it is still running.
pub fn wait_within(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}
