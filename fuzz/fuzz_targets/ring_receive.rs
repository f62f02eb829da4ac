//! Rank 0 of a small in-memory ring receives arbitrary frames from its neighbour during an
//! all-reduce or a digest check: whatever arrives, the operation ends, with an error that
//! names the neighbour or with a result, and never panics or waits forever.
//!
//! Input: byte 0 picks the world size (2 to 4) and the operation, byte 1 the buffer length
//! and byte 2 the segment size; the rest is a sequence of frames, each a little-endian
//! `u16` length and that many bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringtrain::collective::{Communicator, SendLink, memory_ring};
use ringtrain::ring::{Rank, WorldSize};

fuzz_target!(|data: &[u8]| {
    let [pick, len, segment, rest @ ..] = data else {
        return;
    };
    let world = WorldSize::new(2 + usize::from(pick % 3)).expect("2 to 4 ranks");
    let (len, segment) = (usize::from(*len), 1 + usize::from(*segment % 64));
    let mut links = memory_ring(world);
    // Rank 0 receives what the last rank sends; that rank is played by the input.
    let (mut hostile, _last_rx) = links.pop().expect("a ring has a last rank");
    let (tx0, rx0) = links.swap_remove(0);
    let mut comm = Communicator::new(Rank(0), world, tx0, rx0, segment);

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    rt.block_on(async {
        let mut rest = rest;
        while let [a, b, tail @ ..] = rest {
            let n = usize::from(u16::from_le_bytes([*a, *b])).min(tail.len());
            let (frame, tail) = tail.split_at(n);
            hostile
                .send(frame.to_vec().into())
                .await
                .expect("rank 0 holds its end");
            rest = tail;
        }
        // No more frames: rank 0 must then see its neighbour gone, not wait. The other
        // links stay open, so that sending never ends the operation before receiving does.
        drop(hostile);
        let _ = match pick / 3 % 2 {
            0 => comm.allreduce_sum(&mut vec![1.0; len]).await.map(|_| ()),
            _ => comm.check_same(&[*pick; 32]).await,
        };
    });
    drop(links);
});
