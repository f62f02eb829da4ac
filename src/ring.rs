//! The ring all-reduce schedule: pure logic, no I/O, no clock.
//!
//! A buffer of `len` elements is split into `world` chunks ([`chunk_range`]); each chunk is
//! cut into segments of at most `segment` elements ([`segments`]). Rank `r` sends only to
//! rank `r + 1` and receives only from rank `r - 1` (modulo the world size).
//!
//! Reduce-scatter runs `world - 1` ring steps: at step `s` rank `r` sends chunk `r - s` and
//! receives chunk `r - s - 1`, which it adds to its own copy. Afterwards rank `r` holds the
//! full sum of chunk `r + 1`. All-gather runs `world - 1` more steps: at step `s` rank `r`
//! sends chunk `r + 1 - s` and receives chunk `r - s`, which it overwrites. The steps are
//! numbered `0 .. 2 * (world - 1)` across both phases.
//!
//! Summation order: chunk `c` is summed as `((x[c] + x[c+1]) + x[c+2]) + ... + x[c-1]`, where
//! `x[i]` is rank `i`'s contribution; every rank then copies that one result, so all ranks
//! end with bit-identical sums.
//!
//! [`Plan`] lists, for one rank, every segment it sends and receives in wire order, and for
//! each send how many receives must have completed first. Executing a plan needs nothing
//! but FIFO links, which is what the in-process simulation in the tests does.

use std::fmt;
use std::ops::Range;

/// A rank's index in the ring, `0 .. world`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rank(pub usize);

impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {}", self.0)
    }
}

/// The number of ranks in the ring; never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorldSize(usize);

impl WorldSize {
    /// A world of `n` ranks; `None` when `n` is zero.
    pub fn new(n: usize) -> Option<WorldSize> {
        (n > 0).then_some(WorldSize(n))
    }

    /// The number of ranks.
    pub fn get(self) -> usize {
        self.0
    }

    /// The rank that `rank` sends to.
    pub fn next(self, rank: Rank) -> Rank {
        Rank((rank.0 + 1) % self.0)
    }

    /// The rank that `rank` receives from.
    pub fn prev(self, rank: Rank) -> Rank {
        Rank((rank.0 + self.0 - 1) % self.0)
    }

    /// `(a - b) mod world`, for chunk arithmetic; `b` may exceed `a`.
    fn sub(self, a: usize, b: usize) -> usize {
        (a + self.0 - b % self.0) % self.0
    }
}

/// The two phases of a ring all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Each step adds a received chunk into the local one.
    ReduceScatter,
    /// Each step overwrites the local chunk with the received, fully reduced one.
    AllGather,
}

/// The element range of chunk `chunk` when `len` elements are split over `world` ranks.
///
/// Chunks are contiguous, in order, cover `0..len` exactly once, and their sizes differ by at
/// most one (the first `len % world` chunks are one longer). Chunks may be empty when
/// `len < world`.
pub fn chunk_range(len: usize, world: WorldSize, chunk: usize) -> Range<usize> {
    debug_assert!(
        chunk < world.get(),
        "chunk index {chunk} must be < world size"
    );
    let base = len / world.get();
    let extra = len % world.get();
    let start = chunk * base + chunk.min(extra);
    let size = base + usize::from(chunk < extra);
    start..start + size
}

/// Cuts `range` into consecutive segments of at most `segment` elements (at least one
/// element each); an empty range gives no segment.
pub fn segments(range: Range<usize>, segment: usize) -> impl Iterator<Item = Range<usize>> {
    let segment = segment.max(1);
    range
        .clone()
        .step_by(segment)
        .map(move |start| start..(start + segment).min(range.end))
}

/// One segment moved over a link: which ring step, which chunk, which elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentOp {
    /// The phase this segment belongs to.
    pub phase: Phase,
    /// The ring step, numbered across both phases.
    pub step: usize,
    /// The chunk the segment belongs to.
    pub chunk: usize,
    /// The segment's element range in the whole buffer.
    pub range: Range<usize>,
    /// For a send: how many of this rank's receives must be complete before it may go.
    pub needs_recvs: usize,
}

/// Everything one rank sends and receives during one collective, in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Segments sent to the next rank, in order.
    pub sends: Vec<SegmentOp>,
    /// Segments received from the previous rank, in order.
    pub recvs: Vec<SegmentOp>,
}

impl Plan {
    /// The all-reduce plan of `rank` for a buffer of `len` elements.
    pub fn allreduce(rank: Rank, world: WorldSize, len: usize, segment: usize) -> Plan {
        let n = world.get();
        let mut plan = Plan {
            sends: Vec::new(),
            recvs: Vec::new(),
        };
        if n == 1 {
            return plan;
        }

        // `done_before[i]` = receives completed by the end of step i - 1.
        let mut done_before = Vec::with_capacity(2 * (n - 1));
        for step in 0..2 * (n - 1) {
            done_before.push(plan.recvs.len());
            let (phase, send_chunk, recv_chunk) = if step < n - 1 {
                let s = step;
                (
                    Phase::ReduceScatter,
                    world.sub(rank.0, s),
                    world.sub(rank.0, s + 1),
                )
            } else {
                let s = step - (n - 1);
                (
                    Phase::AllGather,
                    world.sub(rank.0 + 1, s),
                    world.sub(rank.0, s),
                )
            };
            let prior = if step == 0 {
                None
            } else {
                Some(done_before[step - 1])
            };
            let send_range = chunk_range(len, world, send_chunk);
            for (k, range) in segments(send_range, segment).enumerate() {
                // The chunk sent now is the one received in the previous step, segment
                // for segment: segment k may go once that step's k-th receive is done.
                let needs_recvs = prior.map_or(0, |first| first + k + 1);
                let op = SegmentOp {
                    phase,
                    step,
                    chunk: send_chunk,
                    range,
                    needs_recvs,
                };
                plan.sends.push(op);
            }
            let recv_range = chunk_range(len, world, recv_chunk);
            for range in segments(recv_range, segment) {
                let op = SegmentOp {
                    phase,
                    step,
                    chunk: recv_chunk,
                    range,
                    needs_recvs: 0,
                };
                plan.recvs.push(op);
            }
        }
        plan
    }

    /// The plan of `rank` for broadcasting rank 0's buffer along the ring
    /// `0 -> 1 -> ... -> world - 1`; every segment is forwarded as soon as it arrives.
    pub fn broadcast(rank: Rank, world: WorldSize, len: usize, segment: usize) -> Plan {
        let mut plan = Plan {
            sends: Vec::new(),
            recvs: Vec::new(),
        };
        let n = world.get();
        if n == 1 {
            return plan;
        }
        let last = rank.0 == n - 1;
        for (k, range) in segments(0..len, segment).enumerate() {
            let op = |needs_recvs| SegmentOp {
                phase: Phase::AllGather,
                step: 0,
                chunk: 0,
                range: range.clone(),
                needs_recvs,
            };
            if rank.0 == 0 {
                plan.sends.push(op(0));
            } else {
                plan.recvs.push(op(0));
                if !last {
                    plan.sends.push(op(k + 1));
                }
            }
        }
        plan
    }

    /// Elements this rank puts on the wire.
    pub fn elements_sent(&self) -> usize {
        self.sends.iter().map(|op| op.range.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn world(n: usize) -> WorldSize {
        WorldSize::new(n).expect("test worlds are non-empty")
    }

    /// Runs plans for all ranks over FIFO links, in any order that respects the plans.
    /// `combine(phase, local, incoming)` is applied for each received segment.
    /// Returns an error if the plans deadlock or a received op disagrees with the send.
    fn simulate(
        plans: &[Plan],
        bufs: &mut [Vec<f64>],
        combine: impl Fn(Phase, f64, f64) -> f64,
    ) -> Result<(), String> {
        let n = plans.len();
        let mut links: Vec<VecDeque<(SegmentOp, Vec<f64>)>> = vec![VecDeque::new(); n];
        let (mut sent, mut recvd) = (vec![0; n], vec![0; n]);
        loop {
            let mut progressed = false;
            for r in 0..n {
                // Send as much as allowed; link r carries r -> r + 1.
                while let Some(op) = plans[r].sends.get(sent[r]) {
                    if recvd[r] < op.needs_recvs {
                        break;
                    }
                    let data = bufs[r][op.range.clone()].to_vec();
                    links[r].push_back((op.clone(), data));
                    sent[r] += 1;
                    progressed = true;
                }
                let from = (r + n - 1) % n;
                while let Some(op) = plans[r].recvs.get(recvd[r]) {
                    let Some((wire, data)) = links[from].pop_front() else {
                        break;
                    };
                    if (wire.step, wire.chunk, &wire.range) != (op.step, op.chunk, &op.range) {
                        return Err(format!("rank {r} expected {op:?}, got {wire:?}"));
                    }
                    for (dst, src) in bufs[r][op.range.clone()].iter_mut().zip(data) {
                        *dst = combine(op.phase, *dst, src);
                    }
                    recvd[r] += 1;
                    progressed = true;
                }
            }
            let done =
                (0..n).all(|r| sent[r] == plans[r].sends.len() && recvd[r] == plans[r].recvs.len());
            if done {
                return if links.iter().all(VecDeque::is_empty) {
                    Ok(())
                } else {
                    Err("frames left on a link".into())
                };
            }
            if !progressed {
                return Err(format!("deadlock: sent {sent:?}, received {recvd:?}"));
            }
        }
    }

    fn add_or_copy(phase: Phase, local: f64, incoming: f64) -> f64 {
        match phase {
            Phase::ReduceScatter => local + incoming,
            Phase::AllGather => incoming,
        }
    }

    proptest! {
        #[test]
        fn chunks_cover_the_buffer_exactly_once(len in 0usize..5000, n in 1usize..=16) {
            let w = world(n);
            let mut next = 0;
            let sizes: Vec<usize> = (0..n).map(|c| chunk_range(len, w, c).len()).collect();
            for c in 0..n {
                let r = chunk_range(len, w, c);
                prop_assert_eq!(r.start, next, "chunk {} starts at {} not {}", c, r.start, next);
                prop_assert!(r.start <= r.end, "reversed range {:?}", r);
                next = r.end;
            }
            prop_assert_eq!(next, len);
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            prop_assert!(hi - lo <= 1, "sizes {:?}", sizes);
        }

        #[test]
        fn segments_tile_their_range(start in 0usize..100, len in 0usize..300, seg in 1usize..50) {
            let mut next = start;
            for s in segments(start..start + len, seg) {
                prop_assert_eq!(s.start, next);
                prop_assert!(!s.is_empty() && s.len() <= seg);
                next = s.end;
            }
            prop_assert_eq!(next, start + len);
        }

        #[test]
        fn simulated_allreduce_sums_on_every_rank(
            len in 0usize..300, n in 1usize..=8, seg in 1usize..40, seed in any::<u64>()
        ) {
            let w = world(n);
            let plans: Vec<Plan> = (0..n).map(|r| Plan::allreduce(Rank(r), w, len, seg)).collect();
            // Small integers keep f64 sums exact, so the check is equality.
            let mut bufs: Vec<Vec<f64>> = (0..n)
                .map(|r| (0..len).map(|i| ((seed as usize ^ (i * 31 + r * 7)) % 97) as f64).collect())
                .collect();
            let expected: Vec<f64> = (0..len).map(|i| bufs.iter().map(|b| b[i]).sum()).collect();
            simulate(&plans, &mut bufs, add_or_copy).map_err(TestCaseError::fail)?;
            for (r, b) in bufs.iter().enumerate() {
                prop_assert_eq!(b, &expected, "rank {}", r);
            }
        }

        #[test]
        fn simulated_broadcast_copies_rank_zero(len in 0usize..300, n in 1usize..=8, seg in 1usize..40) {
            let w = world(n);
            let plans: Vec<Plan> = (0..n).map(|r| Plan::broadcast(Rank(r), w, len, seg)).collect();
            let mut bufs: Vec<Vec<f64>> =
                (0..n).map(|r| (0..len).map(|i| (i * n + r) as f64).collect()).collect();
            let root = bufs[0].clone();
            simulate(&plans, &mut bufs, |_, _, incoming| incoming).map_err(TestCaseError::fail)?;
            for b in &bufs {
                prop_assert_eq!(b, &root);
            }
        }
    }

    #[test]
    fn length_five_over_four_ranks_has_no_range_past_the_end() {
        // The burn-collective bug: 5 elements over 4 peers gave a range past the end and a
        // reversed range.
        let w = world(4);
        let ranges: Vec<_> = (0..4).map(|c| chunk_range(5, w, c)).collect();
        assert_eq!(ranges, vec![0..2, 2..3, 3..4, 4..5]);
    }

    #[test]
    fn shorter_than_world_gives_empty_chunks_and_still_sums() {
        let w = world(5);
        let ranges: Vec<_> = (0..5).map(|c| chunk_range(2, w, c)).collect();
        assert_eq!(ranges, vec![0..1, 1..2, 2..2, 2..2, 2..2]);
        let plans: Vec<Plan> = (0..5).map(|r| Plan::allreduce(Rank(r), w, 2, 1)).collect();
        let mut bufs: Vec<Vec<f64>> = (0..5).map(|r| vec![r as f64, 1.0]).collect();
        simulate(&plans, &mut bufs, add_or_copy).unwrap();
        assert!(bufs.iter().all(|b| b == &vec![10.0, 5.0]), "{bufs:?}");
    }

    #[test]
    fn each_rank_sends_two_chunks_worth_per_step() {
        // The bandwidth-optimal property: 2 (N - 1) / N of the buffer leaves each rank.
        let (n, len) = (4, 1000);
        let plan = Plan::allreduce(Rank(1), world(n), len, 64);
        assert_eq!(plan.elements_sent(), 2 * (n - 1) * len / n);
        assert_eq!(
            plan.sends.iter().map(|o| o.step).max(),
            Some(2 * (n - 1) - 1)
        );
    }

    #[test]
    fn world_of_one_moves_nothing() {
        let plan = Plan::allreduce(Rank(0), world(1), 10, 3);
        assert!(plan.sends.is_empty() && plan.recvs.is_empty());
        assert_eq!(WorldSize::new(0), None);
    }

    #[test]
    fn summation_order_starts_at_the_chunk_owner() {
        // With non-associative floats, chunk c must be ((x_c + x_c+1) + x_c+2) + x_c+3.
        let n = 4;
        let w = world(n);
        let vals = [1e16, 1.0, -1e16, 1.0];
        let plans: Vec<Plan> = (0..n).map(|r| Plan::allreduce(Rank(r), w, n, 1)).collect();
        let mut bufs: Vec<Vec<f64>> = (0..n).map(|r| vec![vals[r]; n]).collect();
        simulate(&plans, &mut bufs, add_or_copy).unwrap();
        for c in 0..n {
            let want = (0..n).fold(None, |acc: Option<f64>, k| {
                let x = vals[(c + k) % n];
                Some(acc.map_or(x, |a| a + x))
            });
            assert_eq!(bufs[0][c].to_bits(), want.unwrap().to_bits(), "chunk {c}");
        }
        assert!(bufs.iter().all(|b| b == &bufs[0]));
    }
}
