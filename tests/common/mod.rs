//! Helpers shared by the integration tests: a loopback ring of QUIC ranks in threads, and
//! waiting for a child process with a deadline. Each test file includes this module and
//! uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use ringtrain::launch::free_local_addrs;
use ringtrain::ring::Rank;
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

/// Waits for `child` at most `limit`; kills it (our own child) if it is still running.
pub fn wait_within(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}
