//! Micro-benchmarks of the kernels under every step: the reduce kernel against a plain
//! memcpy of the same bytes, the reduce over a frame received in packet-sized pieces,
//! frame encode and decode (f32 and bf16), and one MLP training step.
//!
//! Run with `cargo bench --bench kernels`; each group measures for about a second, so
//! the whole file takes well under a minute.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringtrain::frame::{self, FrameKind, Header, Wire};
use ringtrain::model::{Mlp, Workspace};
use ringtrain::optim::{OptimConfig, Optimizer};

/// Segment sizes in f32 elements: one small frame, and the default 64 Ki segment.
const ELEMENTS: [usize; 2] = [4 * 1024, 64 * 1024];

const PAGE: usize = 4096;

/// A `src.len()`-byte window of `space` at the same offset within a 4 KiB page as `src`.
///
/// On this project's machines glibc's `memcpy` (the `rep movsb` path) runs at about 1 GB/s
/// instead of 15+ when the destination lies 1 to 31 bytes past the source modulo 4 KiB, so
/// a baseline at an unlucky offset would flatter the reduce kernel by 15x.
fn same_page_offset<'a>(space: &'a mut [u8], src: &[u8]) -> &'a mut [u8] {
    let want = src.as_ptr() as usize % PAGE;
    let have = space.as_ptr() as usize % PAGE;
    let shift = (want + PAGE - have) % PAGE;
    &mut space[shift..shift + src.len()]
}

fn header(count: usize) -> Header {
    Header {
        kind: FrameKind::ReduceScatter,
        wire: Wire::F32,
        step: 0,
        seq: 1,
        chunk: 0,
        offset: 0,
        count: count as u32,
    }
}

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 97) as f32 * 0.25).collect()
}

/// The reduce kernel (`add_into`, little-endian bytes into f32s) against `copy_from_slice`
/// of the same number of bytes: how far the kernel is from memory speed.
fn reduce(c: &mut Criterion) {
    let mut g = c.benchmark_group("reduce");
    for n in ELEMENTS {
        let payload: Vec<u8> = values(n).iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut dst = values(n);
        g.throughput(Throughput::Bytes(4 * n as u64));
        g.bench_with_input(BenchmarkId::new("add_into", n), &payload, |b, p| {
            b.iter(|| frame::add_into(black_box(&mut dst), black_box(p)))
        });
        let mut space = vec![0u8; 4 * n + PAGE];
        let dst = same_page_offset(&mut space, &payload);
        g.bench_with_input(BenchmarkId::new("memcpy", n), &payload, |b, p| {
            b.iter(|| black_box(&mut *dst).copy_from_slice(black_box(p)))
        });
    }
    g.finish();
}

/// The reduce as the QUIC link runs it: a frame received in pieces of one 1452-byte
/// packet's stream data (most of them splitting an f32), in f32 and in the 16-bit wires.
fn reduce_pieces(c: &mut Criterion) {
    let mut g = c.benchmark_group("reduce_pieces");
    let n = ELEMENTS[1];
    g.throughput(Throughput::Bytes(4 * n as u64));
    for wire in [Wire::F32, Wire::Bf16, Wire::F16] {
        let h = Header { wire, ..header(n) };
        let encoded = frame::encode_f32(h, &values(n));
        let mut pieces = frame::Pieces::new();
        for part in encoded.chunks(1421) {
            pieces.push(bytes::Bytes::copy_from_slice(part));
        }
        let mut dst = values(n);
        let name = format!("add_into_{}", wire.name());
        g.bench_with_input(BenchmarkId::new(name, n), &pieces, |b, p| {
            b.iter(|| {
                let (_, payload) = frame::decode_pieces(black_box(p)).expect("valid frame");
                payload.add_into(black_box(&mut dst));
            })
        });
    }
    g.finish();
}

/// Frame encoding (header plus f32 payload) and decoding (header checks, payload slice).
fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for n in ELEMENTS {
        let v = values(n);
        g.throughput(Throughput::Bytes(4 * n as u64));
        g.bench_with_input(BenchmarkId::new("encode_f32", n), &v, |b, v| {
            b.iter(|| frame::encode_f32(header(n), black_box(v)))
        });
        let bf16 = Header {
            wire: Wire::Bf16,
            ..header(n)
        };
        g.bench_with_input(BenchmarkId::new("encode_bf16", n), &v, |b, v| {
            b.iter(|| frame::encode_f32(bf16, black_box(v)))
        });
        let encoded = frame::encode_f32(header(n), &v);
        g.bench_with_input(BenchmarkId::new("decode", n), &encoded, |b, f| {
            b.iter(|| frame::decode(black_box(f)).map(|(h, p)| (h.count, p.len())))
        });
    }
    g.finish();
}

/// One training step of a 64→128→64→10 MLP on a batch of 64: forward, backward, SGD.
fn train_step(c: &mut Criterion) {
    let (inputs, batch) = (64, 64);
    let model = Mlp::new(inputs, &[128, 64], 10);
    let mut params = vec![0f32; model.param_len()];
    model.init(7, &mut params);
    let x: Vec<f32> = (0..batch * inputs)
        .map(|i| ((i * 31) % 17) as f32 / 17.0)
        .collect();
    let y: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
    let mut grad = vec![0f32; model.param_len()];
    let mut ws = Workspace::new();
    let mut opt = Optimizer::new(OptimConfig::sgd(0.01, 0.9), model.param_len());

    let mut g = c.benchmark_group("mlp");
    g.throughput(Throughput::Elements(batch as u64));
    g.bench_function("step_64-128-64-10_batch64", |b| {
        b.iter(|| {
            let (loss, _) = model.forward_backward(&params, &x, &y, &mut ws, &mut grad);
            opt.step(&mut params, &grad);
            black_box(loss)
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! {
    name = kernels;
    config = config();
    targets = reduce, reduce_pieces, frames, train_step
}
criterion_main!(kernels);
