//! A member of the cluster that sends hostile frames: every bad frame is an error that
//! names the peer, and none makes the receiver allocate what the frame announces.
//!
//! The fake neighbour holds the cluster key, so it passes the handshake; what it sends
//! afterwards is the attack. A counting allocator records the largest single allocation
//! of the whole test binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ringtrain::auth::{Credential, SERVER_NAME, Security};
use ringtrain::collective::{CommError, Communicator, SendLink, memory_ring};
use ringtrain::frame::{self, FrameKind, Header};
use ringtrain::launch::free_local_addrs;
use ringtrain::ring::{Plan, Rank, WorldSize};
use ringtrain::transport::{self, CommHandle, Hello, PROTOCOL_VERSION, RingPlace};

/// Passes every request to the system allocator and remembers the largest one.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// Far below what any hostile length in these tests announces (4 GiB), far above what a
/// QUIC connection and a 64-element segment need. The largest honest allocation is quinn's
/// receive buffer: the UDP payload limit (65000 on loopback) times 64 GRO segments times a
/// batch of 32 datagrams, about 133 MB, most of it never touched.
const LARGE: usize = 256 << 20;

fn assert_no_large_allocation() {
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < LARGE, "an allocation of {largest} bytes happened");
}

const LEN: usize = 8;
const SEGMENT: usize = 64;

fn world2() -> WorldSize {
    WorldSize::new(2).expect("two ranks")
}

/// The header rank 0 expects first from rank 1 in its first all-reduce of `LEN` floats.
fn first_expected() -> Header {
    let plan = Plan::allreduce(Rank(0), world2(), LEN, SEGMENT);
    let op = &plan.recvs[0];
    Header {
        kind: FrameKind::ReduceScatter,
        step: op.step as u16,
        seq: 1,
        chunk: op.chunk as u32,
        offset: op.range.start as u64,
        count: op.range.len() as u32,
    }
}

fn values(h: Header) -> Vec<f32> {
    vec![1.0; h.count as usize]
}

/// The hostile things a neighbour sends where rank 0 expects its first segment: the bytes
/// after the length prefix (or the whole prefix, for the oversized case), and what the
/// error must say.
fn attacks() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let good = first_expected();
    let framed = |bytes: Vec<u8>| {
        let mut out = (bytes.len() as u32).to_le_bytes().to_vec();
        out.extend(bytes);
        out
    };
    let with = |h: Header| framed(frame::encode_f32(h, &values(good)).to_vec());
    let mut unknown = frame::encode_f32(good, &values(good)).to_vec();
    unknown[0] = 9;
    let mut huge_count = frame::encode_f32(good, &values(good)).to_vec();
    huge_count[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    vec![
        (
            "oversized length prefix",
            0xffff_fff0u32.to_le_bytes().to_vec(),
            "more than the agreed",
        ),
        (
            "unknown frame kind",
            framed(unknown),
            "unknown frame kind 9",
        ),
        (
            "count larger than the payload",
            framed(huge_count),
            "4294967295 elements",
        ),
        (
            "wrong step",
            with(Header {
                step: good.step + 1,
                ..good
            }),
            "out of step",
        ),
        (
            "wrong chunk",
            with(Header {
                chunk: good.chunk + 1,
                ..good
            }),
            "out of step",
        ),
        (
            "wrong operation",
            with(Header { seq: 7, ..good }),
            "out of step",
        ),
    ]
}

fn hello(rank: usize) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        rank,
        world: 2,
        fingerprint: BTreeMap::new(),
    }
}

fn options(credential: &Arc<Credential>) -> transport::TransportOptions {
    transport::TransportOptions {
        connect_timeout: Duration::from_secs(20),
        peer_timeout: Duration::from_secs(5),
        segment: SEGMENT,
        security: Security::Cluster(credential.clone()),
    }
}

async fn write_hello(send: &mut quinn::SendStream, h: &Hello) {
    let body = serde_json::to_vec(h).unwrap();
    send.write_all(&(body.len() as u32).to_le_bytes())
        .await
        .unwrap();
    send.write_all(&body).await.unwrap();
}

async fn read_hello(recv: &mut quinn::RecvStream) {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    recv.read_exact(&mut body).await.unwrap();
}

/// Plays rank 1 of a two-rank ring towards the real rank 0 at `addrs[0]`: answers its
/// dial, dials it, exchanges hellos both ways, then sends `attack` as its first frame.
/// Holds the connections until `done` fires, 10 s at most.
async fn fake_rank1(
    credential: Arc<Credential>,
    addrs: Vec<SocketAddr>,
    attack: Vec<u8>,
    done: tokio::sync::oneshot::Receiver<()>,
) {
    let ep = transport::endpoint(Rank(1), addrs[1], &options(&credential)).unwrap();
    let answer = async {
        let conn = ep.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        read_hello(&mut recv).await;
        write_hello(&mut send, &hello(1)).await;
        (conn, send, recv)
    };
    let dial = async {
        let conn = loop {
            match ep.connect(addrs[0], SERVER_NAME).unwrap().await {
                Ok(conn) => break conn,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        write_hello(&mut send, &hello(1)).await;
        read_hello(&mut recv).await;
        send.write_all(&attack).await.unwrap();
        (conn, send, recv)
    };
    let (_kept_in, _kept_out) = tokio::join!(answer, dial);
    // Should rank 0 wait for the bytes announced instead of failing, this ends the wait.
    let _ = tokio::time::timeout(Duration::from_secs(10), done).await;
    ep.close(0u32.into(), b"done");
}

#[test]
fn a_member_sending_hostile_frames_is_named_and_never_trusted() {
    let credential = Arc::new(Credential::generate().unwrap());
    for (what, attack, needle) in attacks() {
        let addrs = free_local_addrs(2).unwrap();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let fake = {
            let (credential, addrs) = (credential.clone(), addrs.clone());
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(fake_rank1(credential, addrs, attack, done_rx))
            })
        };
        let place = RingPlace {
            rank: Rank(0),
            addrs: addrs.clone(),
        };
        let mut comm = CommHandle::connect(place, hello(0), options(&credential))
            .unwrap_or_else(|e| panic!("{what}: rank 0 could not form the ring: {e}"));
        let err = comm
            .allreduce_sum(vec![1.0; LEN])
            .expect_err("a hostile frame must fail the all-reduce");
        drop(comm);
        let _ = done_tx.send(());
        fake.join().unwrap();

        let msg = err.to_string();
        let peer = format!("rank 1 ({})", addrs[1]);
        assert!(
            msg.contains(&peer),
            "{what}: the error must name {peer}: {msg}"
        );
        assert!(
            msg.contains(needle),
            "{what}: expected {needle:?} in: {msg}"
        );
        assert!(
            matches!(
                err,
                CommError::TooLarge { .. }
                    | CommError::BadFrame { .. }
                    | CommError::OutOfStep { .. }
            ),
            "{what}: {err:?}"
        );
        assert_no_large_allocation();
    }
}

#[test]
fn in_memory_frames_that_lie_about_their_size_are_refused() {
    let good = first_expected();
    let mut huge_count = frame::encode_f32(good, &values(good)).to_vec();
    huge_count[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    let oversized = vec![0u8; frame::HEADER_LEN + 4 * SEGMENT + 1];
    let short = vec![1u8; frame::HEADER_LEN - 1];
    let cases = [
        (huge_count, "4294967295 elements"),
        (oversized, "more than the agreed"),
        (short, "shorter than the 24-byte header"),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for (bytes, needle) in cases {
        let mut links = memory_ring(world2());
        let (mut tx1, _rx1) = links.pop().unwrap();
        let (tx0, rx0) = links.pop().unwrap();
        let mut comm = Communicator::new(Rank(0), world2(), tx0, rx0, SEGMENT);
        let err = rt.block_on(async {
            tx1.send(bytes.into()).await.unwrap();
            comm.allreduce_sum(&mut [0.0; LEN]).await.unwrap_err()
        });
        let msg = err.to_string();
        assert!(msg.starts_with("rank 1") && msg.contains(needle), "{msg}");
    }
    assert_no_large_allocation();
}
