//! Drives the ring schedule over a pair of links: all-reduce, broadcast, digest checks.
//!
//! A [`Communicator`] owns the link to the next rank ([`SendLink`]) and the link from the
//! previous rank ([`RecvLink`]); it knows nothing of sockets. [`memory_ring`] gives links
//! over in-process channels so N ranks can run in one test; `transport` gives QUIC links.
//!
//! Within one operation, sending and receiving run concurrently on the same task: a
//! segment is sent as soon as the schedule allows (see [`crate::ring::Plan`]), while
//! earlier segments of later chunks are still arriving, so sending, receiving and reducing
//! overlap.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tracing::trace;

use crate::frame::{self, FrameError, FrameKind, Header, Payload, Pieces, Wire};
use crate::ring::{Phase, Plan, Rank, SegmentOp, WorldSize};
use crate::timeline::{Timeline, Track};

/// Default segment size in `f32` elements (256 KiB per frame).
pub const DEFAULT_SEGMENT: usize = 64 * 1024;

/// Who is at the other end of a link, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's rank.
    pub rank: Rank,
    /// The peer's address, if it has one.
    pub addr: Option<SocketAddr>,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "{} ({addr})", self.rank),
            None => write!(f, "{}", self.rank),
        }
    }
}

/// Why a collective operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The connection to a neighbour is gone.
    #[error("lost {peer}: {reason}")]
    PeerLost {
        /// The neighbour.
        peer: Peer,
        /// What the transport said.
        reason: String,
    },
    /// A neighbour sent bytes that are not a frame.
    #[error("{peer} sent a malformed frame: {source}")]
    BadFrame {
        /// The neighbour.
        peer: Peer,
        /// What was wrong.
        source: FrameError,
    },
    /// A neighbour sent a well-formed frame that the schedule did not expect.
    #[error("{peer} is out of step: expected {expected}, got {got}")]
    OutOfStep {
        /// The neighbour.
        peer: Peer,
        /// The frame the schedule expected.
        expected: String,
        /// The frame that came.
        got: String,
    },
    /// A neighbour sent a frame larger than the agreed bound.
    #[error("{peer} sent a frame of {len} bytes, more than the agreed {max}")]
    TooLarge {
        /// The neighbour.
        peer: Peer,
        /// The announced length.
        len: u64,
        /// The bound agreed in the handshake.
        max: u64,
    },
    /// The ranks' parameters are no longer identical.
    #[error("parameters diverged: {0}; replicas must stay bit-identical, so the run stops")]
    Diverged(String),
    /// The communication thread is gone (it failed earlier or was shut down).
    #[error("the communication thread has stopped")]
    Stopped,
}

/// The sending half of a link to the next rank.
pub trait SendLink {
    /// Sends one whole frame. Dropping the future may leave a partial frame on the link,
    /// after which the link must not be used again.
    fn send(&mut self, frame: Bytes) -> impl Future<Output = Result<(), CommError>>;
    /// Who receives.
    fn peer(&self) -> &Peer;
}

/// The receiving half of a link from the previous rank.
pub trait RecvLink {
    /// Receives one whole frame, in the pieces it arrived in. Dropping the future may lose
    /// a partial frame, after which the link must not be used again.
    fn recv(&mut self) -> impl Future<Output = Result<Pieces, CommError>>;
    /// Who sends.
    fn peer(&self) -> &Peer;
}

/// One rank's end of the ring.
#[derive(Debug)]
pub struct Communicator<S, R> {
    rank: Rank,
    world: WorldSize,
    tx: S,
    rx: R,
    segment: usize,
    wire: Wire,
    seq: u32,
    bytes_sent: u64,
    timeline: Timeline,
}

impl<S: SendLink, R: RecvLink> Communicator<S, R> {
    /// A communicator for `rank` sending to `tx` and receiving from `rx`, cutting chunks
    /// into segments of `segment` elements.
    pub fn new(rank: Rank, world: WorldSize, tx: S, rx: R, segment: usize) -> Self {
        let segment = segment.max(1);
        Communicator {
            rank,
            world,
            tx,
            rx,
            segment,
            wire: Wire::F32,
            seq: 0,
            bytes_sent: 0,
            timeline: Timeline::disabled(),
        }
    }

    /// Records each all-reduce's phases, each broadcast and each wait for the previous
    /// rank's frames on `timeline` (nothing is recorded when it is disabled, the default).
    pub fn set_timeline(&mut self, timeline: Timeline) {
        self.timeline = timeline;
    }

    /// Sends all-reduce values in `wire` (see [`Wire`]); broadcasts and digests stay exact.
    /// Every rank must use the same encoding: frames in another one are out of step.
    pub fn set_wire(&mut self, wire: Wire) {
        self.wire = wire;
    }

    /// This rank.
    pub fn rank(&self) -> Rank {
        self.rank
    }

    /// The world size.
    pub fn world(&self) -> WorldSize {
        self.world
    }

    /// Bytes this rank has put on its outgoing link so far, headers included.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Gives back the links, e.g. to close them in order.
    pub fn into_links(self) -> (S, R) {
        (self.tx, self.rx)
    }

    /// The largest frame this communicator sends or accepts, in bytes.
    pub fn max_frame(&self) -> usize {
        frame::HEADER_LEN + 4 * self.segment
    }

    /// Replaces `buf` on every rank by the element-wise sum over all ranks.
    ///
    /// Every rank must call this with buffers of the same length. Afterwards all ranks hold
    /// bit-identical values (see [`crate::ring`] for the summation order).
    ///
    /// With a 16-bit [`Wire`], every partial sum is rounded to it when sent and added in
    /// `f32`; the owner of each reduced chunk rounds it in place before the all-gather, so
    /// that every rank ends with the same, rounded, values.
    pub async fn allreduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.allreduce_in(buf, self.wire).await
    }

    /// [`allreduce_sum`](Self::allreduce_sum) with every value sent in full `f32`, whatever
    /// [`set_wire`](Self::set_wire) chose: for counters and measurements.
    pub async fn allreduce_sum_exact(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.allreduce_in(buf, Wire::F32).await
    }

    async fn allreduce_in(&mut self, buf: &mut [f32], wire: Wire) -> Result<(), CommError> {
        let plan = Plan::allreduce(self.rank, self.world, buf.len(), self.segment);
        self.run(&plan, buf, false, wire).await
    }

    /// Replaces `buf` on every rank by rank 0's `buf`.
    pub async fn broadcast(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        let plan = Plan::broadcast(self.rank, self.world, buf.len(), self.segment);
        self.run(&plan, buf, true, Wire::F32).await
    }

    /// Gives every rank every rank's `mine` (each at most one segment long), by rank.
    pub async fn allgather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        let n = self.world.get();
        let seq = self.next_seq();
        let mut known: Vec<Vec<u8>> = vec![Vec::new(); n];
        known[self.rank.0] = mine.to_vec();
        for step in 0..n.saturating_sub(1) {
            let send_idx = (self.rank.0 + n - step) % n;
            let recv_idx = (self.rank.0 + 2 * n - step - 1) % n;
            let header = digest_header(seq, step, send_idx, known[send_idx].len());
            let bytes = frame::encode_bytes(header, &known[send_idx]);
            self.bytes_sent += bytes.len() as u64;
            self.tx.send(bytes).await?;

            let got = self.rx.recv().await?;
            let peer = self.rx.peer();
            let (h, payload) = decode(peer, &got, self.max_frame())?;
            let want = digest_header(seq, step, recv_idx, payload.len());
            expect_header(peer, want, h)?;
            known[recv_idx] = payload.to_vec();
        }
        Ok(known)
    }

    /// Checks that every rank's `digest` is the same; otherwise names the ranks that differ.
    pub async fn check_same(&mut self, digest: &[u8]) -> Result<(), CommError> {
        let all = self.allgather_bytes(digest).await?;
        describe_divergence(&all).map_or(Ok(()), |msg| Err(CommError::Diverged(msg)))
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    async fn run(
        &mut self,
        plan: &Plan,
        buf: &mut [f32],
        bcast: bool,
        wire: Wire,
    ) -> Result<(), CommError> {
        let seq = self.next_seq();
        let max_frame = self.max_frame();
        let buf = RefCell::new(buf);
        let recvs_done = Cell::new(0usize);
        let progress = Notify::new();
        let bytes_sent = Cell::new(0u64);
        let (tx, rx) = (&mut self.tx, &mut self.rx);
        let (tl, started) = (&self.timeline, self.timeline.now());
        let phases = PhaseBytes::default();
        let is_rs = |op: &SegmentOp| op.phase == Phase::ReduceScatter;
        let last_rs = started.and_then(|_| plan.recvs.iter().rposition(is_rs));
        let rs_done = Cell::new(None);

        let sender = async {
            for op in &plan.sends {
                while recvs_done.get() < op.needs_recvs {
                    progress.notified().await;
                }
                let header = op_header(seq, op, bcast, wire);
                // The borrow ends before the await: the receiver may write meanwhile.
                let bytes = {
                    let mut buf = buf.borrow_mut();
                    let values = &mut buf[op.range.clone()];
                    if op.phase == Phase::AllGather {
                        // Keep exactly what the others get (a no-op for forwarded values).
                        wire.round_in_place(values);
                    }
                    frame::encode_f32(header, values)
                };
                bytes_sent.set(bytes_sent.get() + bytes.len() as u64);
                phases.add(op.phase, bytes.len(), 0);
                trace!(
                    step = op.step,
                    chunk = op.chunk,
                    len = op.range.len(),
                    "send"
                );
                tx.send(bytes).await?;
            }
            Ok::<(), CommError>(())
        };
        let receiver = async {
            for (i, op) in plan.recvs.iter().enumerate() {
                let waiting = tl.now();
                let got = rx.recv().await?;
                let peer = rx.peer();
                let args = [
                    ("from_rank", peer.rank.0 as u64),
                    ("bytes", got.len() as u64),
                ];
                tl.span(Track::Wait, "wait for neighbour", waiting, &args);
                phases.add(op.phase, 0, got.len());
                let (h, payload) = decode(peer, &got, max_frame)?;
                expect_header(peer, op_header(seq, op, bcast, wire), h)?;
                // The header matched, so the payload holds exactly `op.range.len()` f32s.
                let dst = &mut buf.borrow_mut()[op.range.clone()];
                match (bcast, op.phase) {
                    (false, Phase::ReduceScatter) => payload.add_into(dst),
                    _ => payload.copy_into(dst),
                }
                trace!(
                    step = op.step,
                    chunk = op.chunk,
                    len = op.range.len(),
                    "received"
                );
                if Some(i) == last_rs {
                    rs_done.set(tl.now());
                }
                recvs_done.set(recvs_done.get() + 1);
                progress.notify_one();
            }
            Ok::<(), CommError>(())
        };
        let result = tokio::try_join!(sender, receiver).map(|_| ());
        self.bytes_sent += bytes_sent.get();
        let moved = !(plan.sends.is_empty() && plan.recvs.is_empty());
        if let Some(start) = started.filter(|_| moved) {
            phases.record(tl, start, rs_done.get(), bcast, seq);
        }
        result
    }
}

/// Bytes sent and received per phase of one collective, for the timeline.
#[derive(Debug, Default)]
struct PhaseBytes {
    /// `[reduce-scatter, all-gather]`, each `(sent, received)`.
    bytes: Cell<[(u64, u64); 2]>,
}

impl PhaseBytes {
    fn add(&self, phase: Phase, sent: usize, received: usize) {
        let mut b = self.bytes.get();
        let i = usize::from(phase == Phase::AllGather);
        b[i] = (b[i].0 + sent as u64, b[i].1 + received as u64);
        self.bytes.set(b);
    }

    /// Records `reduce-scatter` from `start` until its last segment arrived (`rs_done`)
    /// and `all-gather` from then until now; or one `broadcast` span.
    fn record(
        &self,
        tl: &Timeline,
        start: Instant,
        rs_done: Option<Instant>,
        bcast: bool,
        seq: u32,
    ) {
        let end = Instant::now();
        let [rs, ag] = self.bytes.get();
        let args = |(sent, received): (u64, u64)| {
            [
                ("bytes_sent", sent),
                ("bytes_received", received),
                ("op", u64::from(seq)),
            ]
        };
        if bcast {
            let all = (rs.0 + ag.0, rs.1 + ag.1);
            tl.span_between(Track::Ring, "broadcast", start, end, &args(all));
            return;
        }
        let mid = rs_done.unwrap_or(end);
        tl.span_between(Track::Ring, "reduce-scatter", start, mid, &args(rs));
        tl.span_between(Track::Ring, "all-gather", mid, end, &args(ag));
    }
}

fn op_header(seq: u32, op: &SegmentOp, bcast: bool, wire: Wire) -> Header {
    let kind = match (bcast, op.phase) {
        (true, _) => FrameKind::Broadcast,
        (false, Phase::ReduceScatter) => FrameKind::ReduceScatter,
        (false, Phase::AllGather) => FrameKind::AllGather,
    };
    Header {
        kind,
        wire,
        // Steps are < 2 * world <= u16::MAX, checked when the world is formed.
        step: op.step as u16,
        seq,
        chunk: op.chunk as u32,
        offset: op.range.start as u64,
        count: op.range.len() as u32,
    }
}

fn digest_header(seq: u32, step: usize, owner: usize, len: usize) -> Header {
    Header {
        kind: FrameKind::Digest,
        wire: Wire::F32,
        step: step as u16,
        seq,
        chunk: owner as u32,
        offset: 0,
        count: len as u32,
    }
}

fn decode<'a>(
    peer: &Peer,
    bytes: &'a Pieces,
    max: usize,
) -> Result<(Header, Payload<'a>), CommError> {
    if bytes.len() > max {
        let (len, max) = (bytes.len() as u64, max as u64);
        return Err(CommError::TooLarge {
            peer: peer.clone(),
            len,
            max,
        });
    }
    frame::decode_pieces(bytes).map_err(|source| CommError::BadFrame {
        peer: peer.clone(),
        source,
    })
}

fn expect_header(peer: &Peer, want: Header, got: Header) -> Result<(), CommError> {
    if want == got {
        return Ok(());
    }
    Err(CommError::OutOfStep {
        peer: peer.clone(),
        expected: format!("{want:?}"),
        got: format!("{got:?}"),
    })
}

/// `None` when all entries are equal; otherwise which ranks hold which value.
pub fn describe_divergence(all: &[Vec<u8>]) -> Option<String> {
    if all.windows(2).all(|w| w[0] == w[1]) {
        return None;
    }
    let mut groups: Vec<(&[u8], Vec<usize>)> = Vec::new();
    for (rank, d) in all.iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| *g == d.as_slice()) {
            Some((_, ranks)) => ranks.push(rank),
            None => groups.push((d, vec![rank])),
        }
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(d, ranks)| {
            let hex: String = d.iter().take(8).map(|b| format!("{b:02x}")).collect();
            let list: Vec<String> = ranks.iter().map(usize::to_string).collect();
            let noun = if ranks.len() == 1 { "rank" } else { "ranks" };
            format!("{noun} {} have digest {hex}", list.join(", "))
        })
        .collect();
    Some(parts.join("; "))
}

/// The sending half of an in-process link.
#[derive(Debug)]
pub struct MemSend {
    peer: Peer,
    tx: mpsc::UnboundedSender<Bytes>,
}

/// The receiving half of an in-process link.
#[derive(Debug)]
pub struct MemRecv {
    peer: Peer,
    rx: mpsc::UnboundedReceiver<Bytes>,
}

impl SendLink for MemSend {
    async fn send(&mut self, frame: Bytes) -> Result<(), CommError> {
        self.tx.send(frame).map_err(|_| CommError::PeerLost {
            peer: self.peer.clone(),
            reason: "its end of the in-process link was dropped".into(),
        })
    }

    fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl RecvLink for MemRecv {
    async fn recv(&mut self) -> Result<Pieces, CommError> {
        let frame = self.rx.recv().await.ok_or_else(|| CommError::PeerLost {
            peer: self.peer.clone(),
            reason: "its end of the in-process link was dropped".into(),
        })?;
        Ok(Pieces::from(frame))
    }

    fn peer(&self) -> &Peer {
        &self.peer
    }
}

/// Links for an in-process ring of `world` ranks: element `r` is rank `r`'s link to
/// `r + 1` and link from `r - 1`.
pub fn memory_ring(world: WorldSize) -> Vec<(MemSend, MemRecv)> {
    let n = world.get();
    let (mut txs, mut rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
    // Channel r carries r -> r + 1.
    rxs.rotate_right(1);
    let mut out = Vec::with_capacity(n);
    for (r, (tx, rx)) in txs.drain(..).zip(rxs.drain(..)).enumerate() {
        let rank = Rank(r);
        let next = Peer {
            rank: world.next(rank),
            addr: None,
        };
        let prev = Peer {
            rank: world.prev(rank),
            addr: None,
        };
        out.push((MemSend { peer: next, tx }, MemRecv { peer: prev, rx }));
    }
    out
}

/// Runs `f` for each of `world` in-process ranks concurrently on one current-thread
/// runtime, and returns each rank's result in rank order.
pub fn run_in_memory<T, F, Fut>(world: WorldSize, segment: usize, f: F) -> Vec<T>
where
    F: Fn(Communicator<MemSend, MemRecv>) -> Fut,
    Fut: Future<Output = T>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds without I/O resources failing");
    let futures: Vec<_> = memory_ring(world)
        .into_iter()
        .enumerate()
        .map(|(r, (tx, rx))| f(Communicator::new(Rank(r), world, tx, rx, segment)))
        .collect();
    rt.block_on(join_all(futures))
}

/// Polls all futures to completion on the current task, results in order.
async fn join_all<T, Fut: Future<Output = T>>(futures: Vec<Fut>) -> Vec<T> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, slot) in futures.iter_mut().zip(results.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results
        .into_iter()
        .map(|r| r.expect("every future completed"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn world(n: usize) -> WorldSize {
        WorldSize::new(n).expect("non-empty")
    }

    fn inputs(n: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect()
    }

    /// Runs an in-memory all-reduce and checks bit-identity and the f64 reference.
    fn check_allreduce(n: usize, len: usize, segment: usize, seed: u64) {
        let data = inputs(n, len, seed);
        let reference: Vec<f64> = (0..len)
            .map(|i| data.iter().map(|d| f64::from(d[i])).sum())
            .collect();
        let results = run_in_memory(world(n), segment, |mut comm| {
            let mut buf = data[comm.rank().0].clone();
            async move { comm.allreduce_sum(&mut buf).await.map(|_| buf) }
        });
        let results: Vec<Vec<f32>> = results.into_iter().map(|r| r.unwrap()).collect();
        for (r, res) in results.iter().enumerate() {
            let bits: Vec<u32> = res.iter().map(|v| v.to_bits()).collect();
            let bits0: Vec<u32> = results[0].iter().map(|v| v.to_bits()).collect();
            assert_eq!(bits, bits0, "rank {r} differs from rank 0 (seed {seed})");
        }
        for (i, (got, want)) in results[0].iter().zip(&reference).enumerate() {
            let err = (f64::from(*got) - want).abs();
            // n f32 roundings of values in [-1, 1]: bounded by n * eps * n.
            let tol = 1e-5 * (1.0 + want.abs()) * n as f64;
            assert!(err <= tol, "element {i}: {got} vs {want} (seed {seed})");
        }
    }

    #[test]
    fn allreduce_in_memory_for_one_to_eight_ranks() {
        for n in 1..=8 {
            for len in [0, 1, 5, n - 1, n, 2 * n + 1, 1000, 4099] {
                for segment in [1, 7, 64, DEFAULT_SEGMENT] {
                    check_allreduce(n, len, segment, (n * 1000 + len) as u64);
                }
            }
        }
    }

    #[test]
    fn allreduce_in_halves_is_identical_on_every_rank_and_near_the_f64_sum() {
        for wire in [Wire::F16, Wire::Bf16] {
            for (n, len, segment) in [(1, 9, 4), (2, 33, 5), (3, 1000, 64), (5, 4099, 7)] {
                let data = inputs(n, len, 7 + n as u64);
                let results = run_in_memory(world(n), segment, |mut comm| {
                    comm.set_wire(wire);
                    let mut buf = data[comm.rank().0].clone();
                    async move { comm.allreduce_sum(&mut buf).await.map(|_| buf) }
                });
                let results: Vec<Vec<f32>> = results.into_iter().map(|r| r.unwrap()).collect();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for res in &results {
                    assert_eq!(bits(res), bits(&results[0]), "{wire:?} n={n}");
                }
                // Each of the n - 1 partial sums sent (|s| <= k for inputs in [-1, 1]) and
                // the final sum are rounded once to the wire: at most u * n(n+1)/2.
                let u = wire.unit_roundoff();
                let tol = u * (n * (n + 1)) as f64 / 2.0 + 1e-5 * n as f64;
                for i in 0..len {
                    let want: f64 = data.iter().map(|d| f64::from(d[i])).sum();
                    let err = (f64::from(results[0][i]) - want).abs();
                    assert!(
                        err <= tol,
                        "{wire:?} n={n} [{i}]: {} vs {want}",
                        results[0][i]
                    );
                }
                // A world of one sends nothing, so it rounds nothing.
                let mut rounded = results[0].clone();
                wire.round_in_place(&mut rounded);
                let sent = if n == 1 { &data[0] } else { &rounded };
                assert_eq!(bits(sent), bits(&results[0]), "{wire:?} n={n}");
            }
        }
    }

    #[test]
    fn a_rank_with_another_wire_is_out_of_step_not_silently_wrong() {
        let results = run_in_memory(world(2), 8, |mut comm| {
            if comm.rank().0 == 1 {
                comm.set_wire(Wire::Bf16);
            }
            async move { comm.allreduce_sum(&mut [1.0; 16]).await }
        });
        let err = results[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("out of step") && err.contains("Bf16"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn allreduce_in_memory_any_shape(n in 1usize..=8, len in 0usize..600, seg in 1usize..100, seed in any::<u64>()) {
            check_allreduce(n, len, seg, seed);
        }
    }

    #[test]
    fn broadcast_and_digest_check() {
        let n = 5;
        let results = run_in_memory(world(n), 3, |mut comm| async move {
            let r = comm.rank().0;
            let mut buf: Vec<f32> = (0..11).map(|i| (i * 10 + r) as f32).collect();
            comm.broadcast(&mut buf).await?;
            comm.check_same(b"same").await?;
            let mine = if r == 3 {
                b"odd1".to_vec()
            } else {
                b"same".to_vec()
            };
            let err = comm.check_same(&mine).await.unwrap_err();
            Ok::<_, CommError>((buf, err.to_string()))
        });
        for res in results {
            let (buf, err) = res.unwrap();
            assert_eq!(buf, (0..11).map(|i| (i * 10) as f32).collect::<Vec<_>>());
            assert!(
                err.contains("ranks 0, 1, 2, 4 have digest 73616d65"),
                "{err}"
            );
            assert!(err.contains("rank 3 have digest 6f646431"), "{err}");
        }
    }

    #[test]
    fn dropped_peer_is_an_error_naming_it_not_a_hang() {
        let results = run_in_memory(world(3), 4, |mut comm| async move {
            if comm.rank().0 == 1 {
                return Err(CommError::Stopped); // rank 1 dies before taking part
            }
            let mut buf = vec![1.0f32; 30];
            comm.allreduce_sum(&mut buf).await
        });
        let err = results[2].as_ref().unwrap_err().to_string();
        assert!(err.contains("lost rank 1"), "{err}");
    }

    #[test]
    fn out_of_step_frame_names_the_peer() {
        let mut links = memory_ring(world(2));
        let (tx1, _rx1) = links.pop().unwrap();
        let (tx0, rx0) = links.pop().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut comm = Communicator::new(Rank(0), world(2), tx0, rx0, 8);
        let err = rt.block_on(async {
            // Rank 1 sends an all-gather frame where a reduce-scatter one belongs.
            let h = Header {
                kind: FrameKind::AllGather,
                wire: Wire::F32,
                step: 0,
                seq: 1,
                chunk: 1,
                offset: 2,
                count: 2,
            };
            let mut tx1 = tx1;
            tx1.send(frame::encode_f32(h, &[1.0, 2.0])).await.unwrap();
            comm.allreduce_sum(&mut [0.0; 4]).await.unwrap_err()
        });
        assert!(matches!(err, CommError::OutOfStep { ref peer, .. } if peer.rank == Rank(1)));
    }
}
