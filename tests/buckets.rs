//! Gradient buckets and overlap, over QUIC on 127.0.0.1: the same numbers with and without
//! overlap, close to the unbucketed run, refused when the layouts differ, and no hang when
//! a bucket's result is dropped or a rank is lost.

use std::process::Child;
use std::time::{Duration, Instant};

use ringtrain::auth::Security;
use ringtrain::launch::free_local_addrs;
use ringtrain::optim::OptimConfig;
use ringtrain::train::TrainConfig;
use ringtrain::transport::TransportOptions;

mod common;
use common::{on_ring, spawn_rank, train_each, wait_within};

/// The synthetic task (64 features, 10 classes) on hidden widths 16 and 9: tensors of
/// 1024, 16, 144, 9, 90 and 10 floats. A 64-byte cap makes four buckets (layer 2, layer 1,
/// the first bias, the first weight), a 600-byte cap two (layers 2 and 1, then layer 0).
fn small(steps: u64, bucket_size: u64, overlap: bool) -> TrainConfig {
    TrainConfig {
        steps: Some(steps),
        batch_size: 8,
        hidden: vec![16, 9],
        optim: OptimConfig::sgd(0.05, 0.9),
        check_every: 3,
        connect_timeout: Duration::from_secs(20),
        bucket_size,
        overlap,
        ..TrainConfig::default()
    }
}

fn run_ranks(n: usize, cfg: &TrainConfig) -> Vec<Vec<f32>> {
    let results = train_each(&vec![cfg.clone(); n]);
    results
        .into_iter()
        .enumerate()
        .map(|(r, res)| res.unwrap_or_else(|e| panic!("rank {r}: {e}")).params)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn overlap_and_no_overlap_give_the_same_bits_on_every_rank() {
    // 64-byte buckets: every tensor but the smallest bias is a bucket of its own, so
    // several all-reduces are in flight while backward runs.
    for bucket_size in [64, 600] {
        let with = run_ranks(3, &small(8, bucket_size, true));
        let without = run_ranks(3, &small(8, bucket_size, false));
        for r in 0..3 {
            let what = format!("bucket size {bucket_size}, rank {r}");
            assert_eq!(bits(&with[r]), bits(&with[0]), "{what}: overlap, vs rank 0");
            assert_eq!(
                bits(&without[r]),
                bits(&with[0]),
                "{what}: no overlap vs overlap"
            );
        }
    }
}

#[test]
fn bucketed_training_matches_the_single_all_reduce_and_the_big_batch() {
    // One bucket larger than the model is the old single all-reduce of the whole buffer.
    let whole = run_ranks(3, &small(10, 1 << 30, false));
    let bucketed = run_ranks(3, &small(10, 64, true));
    let big_batch = run_ranks(
        1,
        &TrainConfig {
            batch_size: 24,
            ..small(10, 1 << 30, false)
        },
    );
    // Tolerance: bucketing changes only which rank starts each element's ring sum (the
    // chunks are cut per bucket), so the sums differ by float rounding, about 1e-7
    // relative per step; after 10 SGD steps 1e-5 absolute plus 1e-4 relative is ample, as
    // in the N-rank versus one-process test of tests/train.rs.
    for (name, other) in [
        ("single all-reduce", &whole[0]),
        ("big batch", &big_batch[0]),
    ] {
        let mut worst = 0f32;
        for (i, (a, b)) in bucketed[0].iter().zip(other).enumerate() {
            let err = (a - b).abs();
            worst = worst.max(err);
            assert!(
                err <= 1e-5 + 1e-4 * b.abs(),
                "param {i}: bucketed {a}, {name} {b}"
            );
        }
        println!("largest difference bucketed vs {name}: {worst:e}");
    }
    // The runs must have moved the parameters, or the comparison proves nothing.
    let init = run_ranks(1, &small(0, 1 << 30, false));
    let moved = init[0]
        .iter()
        .zip(&bucketed[0])
        .filter(|(a, b)| a != b)
        .count();
    assert!(moved > init[0].len() / 2, "only {moved} parameters changed");
}

#[test]
fn two_ranks_bucketed_are_bit_identical_to_one_all_reduce() {
    // With two ranks each element's sum is a + b whoever starts it, and float addition
    // commutes, so how the buffer is cut cannot change a bit.
    let whole = run_ranks(2, &small(6, 1 << 30, true));
    let bucketed = run_ranks(2, &small(6, 64, true));
    assert_eq!(bits(&bucketed[0]), bits(&whole[0]));
}

#[test]
fn ranks_with_different_bucket_sizes_are_refused_naming_the_field() {
    let results = train_each(&[small(4, 1024, true), small(4, 4096, true)]);
    for (r, (ours, theirs)) in [(1024, 4096), (4096, 1024)].into_iter().enumerate() {
        let err = results[r].as_ref().map(|_| ()).unwrap_err();
        assert_eq!(err.exit_code(), 2, "rank {r}: {err}");
        let want = format!("bucket_size: here {ours}, there {theirs}");
        assert!(err.to_string().contains(&want), "rank {r}: {err}");
    }
}

#[test]
fn ranks_may_differ_in_overlap() {
    let results = train_each(&[small(6, 64, true), small(6, 64, false)]);
    let params: Vec<Vec<f32>> = results
        .into_iter()
        .map(|r| r.expect("overlap is not part of the fingerprint").params)
        .collect();
    assert_eq!(bits(&params[0]), bits(&params[1]));
}

fn opts() -> TransportOptions {
    TransportOptions {
        connect_timeout: Duration::from_secs(20),
        peer_timeout: Duration::from_secs(10),
        segment: 64,
        security: Security::Unauthenticated,
        wire: ringtrain::frame::Wire::F32,
    }
}

#[test]
fn queued_buckets_sum_in_order_and_a_dropped_pending_wedges_nothing() {
    let out = on_ring(3, opts(), |r, comm| {
        let v = |len: usize, k: f32| vec![(r as f32 + 1.0) * k; len];
        // Queued without waiting; more than one segment each, of odd lengths.
        let a = comm.allreduce_start(v(301, 1.0), 200..501);
        let b = comm.allreduce_start(v(7, 2.0), 193..200);
        let c = comm.allreduce_start(v(193, 3.0), 0..193);
        drop(b);
        let (a, c) = (a.wait().unwrap(), c.wait().unwrap());
        let after = comm.allreduce_sum(vec![1.0; 5]).unwrap();
        comm.check_bucket_order().unwrap();
        (a, c, after)
    });
    for (a, c, after) in out {
        assert_eq!(a, vec![6.0; 301]);
        assert_eq!(c, vec![18.0; 193]);
        assert_eq!(after, vec![3.0; 5]);
    }
}

#[test]
fn buckets_of_equal_length_in_different_orders_are_caught() {
    let out = on_ring(2, opts(), |r, comm| {
        let ranges = if r == 0 { [0..4, 4..8] } else { [4..8, 0..4] };
        for range in ranges {
            comm.allreduce_start(vec![1.0; 4], range).wait().unwrap();
        }
        comm.check_bucket_order().unwrap_err().to_string()
    });
    for msg in out {
        assert!(
            msg.contains("gradient buckets in different orders"),
            "{msg}"
        );
    }
}

#[test]
fn a_rank_killed_with_buckets_in_flight_is_named_by_the_survivors() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = free_local_addrs(3).unwrap();
    let hosts = dir.path().join("hosts.txt");
    let body: String = addrs.iter().map(|a| format!("{a}\n")).collect();
    std::fs::write(&hosts, body).unwrap();
    let flags = [
        "--steps",
        "100000",
        "--peer-timeout",
        "2",
        "--connect-timeout",
        "20",
        "--hidden",
        "64,64,64",
        "--bucket-size",
        "1K",
        "--log-every",
        "1000",
    ];
    let mut children: Vec<Child> = (0..3).map(|r| spawn_rank(&hosts, r, &flags)).collect();
    std::thread::sleep(Duration::from_secs(3));
    children[1].kill().unwrap();
    let killed_at = Instant::now();
    let _ = children[1].wait();
    for (r, child) in children.into_iter().enumerate().filter(|(r, _)| *r != 1) {
        let out = wait_within(child, Duration::from_secs(20));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "rank {r}:\n{err}");
        let victim = addrs[1].to_string();
        assert!(
            err.contains("rank 1") || err.contains(&victim),
            "rank {r}:\n{err}"
        );
        assert!(!err.contains("panicked"), "rank {r}:\n{err}");
        let took = killed_at.elapsed();
        assert!(
            took < Duration::from_secs(12),
            "rank {r} took {took:?} to stop"
        );
    }
}
