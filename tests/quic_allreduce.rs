//! All-reduce over real QUIC connections on 127.0.0.1: every rank's result is bit-identical
//! and within 1e-5 relative error of a float64 reference sum.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringtrain::auth::Security;
use ringtrain::launch::free_local_addrs;
use ringtrain::ring::Rank;
use ringtrain::transport::{CommHandle, RingPlace, TransportOptions};

mod common;
use common::{hello, on_ring};

fn opts(segment: usize) -> TransportOptions {
    TransportOptions {
        connect_timeout: Duration::from_secs(20),
        peer_timeout: Duration::from_secs(10),
        segment,
        security: Security::Unauthenticated,
        wire: ringtrain::frame::Wire::F32,
    }
}

#[test]
fn allreduce_over_quic_is_bit_identical_and_matches_f64() {
    let seed: u64 = 0x5eed;
    println!("seed {seed}");
    for n in 1..=4 {
        for (len, segment) in [(1usize, 4usize), (7, 3), (1001, 64), (100_003, 4096)] {
            let inputs: Vec<Vec<f32>> = (0..n)
                .map(|r| {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed + r as u64 + 100 * len as u64);
                    (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
                })
                .collect();
            let reference: Vec<f64> = (0..len)
                .map(|i| inputs.iter().map(|v| f64::from(v[i])).sum())
                .collect();
            let shared = std::sync::Arc::new(inputs);
            let results = on_ring(n, opts(segment), move |r, comm| {
                comm.allreduce_sum(shared[r].clone()).expect("allreduce")
            });
            for (r, res) in results.iter().enumerate() {
                let same = res
                    .iter()
                    .zip(&results[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "n={n} len={len}: rank {r} differs from rank 0");
            }
            for (i, (got, want)) in results[0].iter().zip(&reference).enumerate() {
                let err = (f64::from(*got) - want).abs();
                // Relative to the sum of magnitudes, which bounds cancellation.
                let scale: f64 = shared_abs_sum(&results, i).max(want.abs()).max(1e-30);
                assert!(
                    err <= 1e-5 * scale,
                    "n={n} len={len} [{i}]: {got} vs {want}"
                );
            }
        }
    }
}

fn shared_abs_sum(results: &[Vec<f32>], i: usize) -> f64 {
    // The result itself is the best available magnitude on every rank; a sum of n values in
    // [-1, 1] has magnitude at most n, so use n as the floor for cancellation-prone sums.
    f64::from(results[0][i].abs()).max(results.len() as f64)
}

#[test]
fn broadcast_and_digest_check_over_quic() {
    let out = on_ring(3, opts(5), |r, comm| {
        let mine: Vec<f32> = (0..23).map(|i| (i * 3 + r) as f32).collect();
        let got = comm.broadcast(mine).expect("broadcast");
        comm.check_same(b"equal").expect("equal digests agree");
        got
    });
    let want: Vec<f32> = (0..23).map(|i| (i * 3) as f32).collect();
    assert!(out.iter().all(|b| b == &want));
}

#[test]
fn differing_digests_name_the_odd_rank() {
    let out = on_ring(3, opts(64), |r, comm| {
        let digest: &[u8] = if r == 2 { b"bbbb" } else { b"aaaa" };
        comm.check_same(digest).unwrap_err().to_string()
    });
    for msg in out {
        assert!(msg.contains("ranks 0, 1 have digest 61616161"), "{msg}");
        assert!(msg.contains("rank 2 have digest 62626262"), "{msg}");
    }
}

#[test]
fn config_mismatch_lists_each_field_with_both_values() {
    let addrs = free_local_addrs(2).expect("free ports");
    let threads: Vec<_> = (0..2)
        .map(|r| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let batch = if r == 0 { "32" } else { "64" };
                let h = hello(r, 2, &[("batch_size", batch), ("seed", "1")]);
                let place = RingPlace {
                    rank: Rank(r),
                    addrs,
                };
                CommHandle::connect(place, h, opts(64))
                    .map(|_| ())
                    .unwrap_err()
                    .to_string()
            })
        })
        .collect();
    let msgs: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        msgs[0].contains("batch_size: here 32, there 64"),
        "{}",
        msgs[0]
    );
    assert!(
        msgs[1].contains("batch_size: here 64, there 32"),
        "{}",
        msgs[1]
    );
    assert!(
        !msgs[0].contains("seed"),
        "only differing fields are listed: {}",
        msgs[0]
    );
}

#[test]
fn a_peer_claiming_the_wrong_rank_is_refused() {
    // A process at rank 0's address that calls itself rank 2 (a hosts-file mix-up) dials
    // rank 1: rank 1 refuses it with a reason, and the impostor reports that reason.
    let addrs = free_local_addrs(3).expect("free ports");
    let mut short = opts(64);
    short.connect_timeout = Duration::from_secs(3);
    let impostor = {
        let (addrs, o) = (addrs.clone(), short.clone());
        std::thread::spawn(move || {
            let place = RingPlace {
                rank: Rank(0),
                addrs,
            };
            CommHandle::connect(place, hello(2, 3, &[]), o)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        })
    };
    let place = RingPlace {
        rank: Rank(1),
        addrs,
    };
    let err = CommHandle::connect(place, hello(1, 3, &[]), short)
        .map(|_| ())
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("within 3 s"),
        "rank 1 must time out, not accept: {msg}"
    );
    let other = impostor.join().unwrap();
    assert!(other.contains("refused the connection"), "{other}");
    assert!(
        other.contains("accepts only rank 0 of 3, not rank 2 of 3"),
        "{other}"
    );
}
