//! Gradient buckets (tensor fusion): which ranges of the flat gradient are all-reduced
//! together, and when each one may be sent.
//!
//! Backward produces gradients from the last layer to the first, so the last tensors of the
//! [parameter layout](crate::model) are final first. [`Buckets::new`] walks the tensors in
//! that order and closes a bucket as soon as it holds at least the size cap, so buckets are
//! contiguous ranges of the buffer, each made of whole tensors, listed in backward order:
//! bucket 0 ends at the end of the buffer and the last bucket starts at offset 0. A tensor
//! larger than the cap gets a bucket of its own.
//!
//! This module has no I/O: the step loop tells [`Buckets::ready`] how far the final
//! gradients reach and sends the buckets it names.

use std::ops::Range;

/// The bucket layout of one model's gradient buffer, and which buckets are already sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    /// Bucket ranges in backward order (descending offsets).
    ranges: Vec<Range<usize>>,
    /// How many buckets [`Buckets::ready`] has handed out this step.
    sent: usize,
}

impl Buckets {
    /// Groups `tensors` (ranges in layout order, covering `0..len` without gaps, as
    /// [`crate::model::Mlp::tensor_ranges`] gives them) into buckets of at least
    /// `cap_bytes` bytes of `f32`s, the last one formed (at offset 0) possibly smaller.
    ///
    /// Empty tensors are skipped; a buffer without parameters has no buckets.
    pub fn new(tensors: &[Range<usize>], cap_bytes: u64) -> Buckets {
        let cap = cap_bytes.div_ceil(4).max(1);
        let mut ranges = Vec::new();
        let mut open: Option<Range<usize>> = None;
        for t in tensors.iter().rev().filter(|t| !t.is_empty()) {
            let bucket = match open.take() {
                Some(b) => t.start..b.end,
                None => t.clone(),
            };
            if bucket.len() as u64 >= cap {
                ranges.push(bucket);
            } else {
                open = Some(bucket);
            }
        }
        ranges.extend(open);
        Buckets { ranges, sent: 0 }
    }

    /// The bucket ranges in the order they are sent (backward order).
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether there are no buckets (a model without parameters).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Starts a new step: no bucket has been handed out.
    pub fn reset(&mut self) {
        self.sent = 0;
    }

    /// Given that every gradient from `final_from` to the end of the buffer is final, the
    /// indices of the buckets that became complete since the last call, in send order.
    pub fn ready(&mut self, final_from: usize) -> Range<usize> {
        let first = self.sent;
        while self
            .ranges
            .get(self.sent)
            .is_some_and(|b| b.start >= final_from)
        {
            self.sent += 1;
        }
        first..self.sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Tensor ranges in layout order from their sizes.
    fn layout(sizes: &[usize]) -> Vec<Range<usize>> {
        let mut at = 0;
        sizes
            .iter()
            .map(|&n| {
                at += n;
                at - n..at
            })
            .collect()
    }

    #[test]
    fn small_cap_gives_one_bucket_per_tensor_last_first() {
        let b = Buckets::new(&layout(&[6, 2, 3, 1]), 4);
        assert_eq!(b.ranges(), &[11..12, 8..11, 6..8, 0..6]);
    }

    #[test]
    fn tensors_fuse_until_the_cap_and_the_rest_forms_the_last_bucket() {
        // 12-byte cap = 3 floats: [1] is too small, [3,1] reaches it; [2] then [6,2].
        let b = Buckets::new(&layout(&[6, 2, 3, 1]), 12);
        assert_eq!(b.ranges(), &[8..12, 0..8]);
        let b = Buckets::new(&layout(&[1, 1, 5]), 12);
        assert_eq!(b.ranges(), &[2..7, 0..2]);
    }

    #[test]
    fn a_cap_above_the_model_gives_the_whole_buffer() {
        let b = Buckets::new(&layout(&[6, 2, 3, 1]), 1 << 30);
        assert_eq!(b.ranges().to_vec(), vec![0..12usize]);
        assert!(Buckets::new(&[], 4).is_empty());
    }

    #[test]
    fn ready_hands_out_each_bucket_once_when_its_start_is_final() {
        let mut b = Buckets::new(&layout(&[6, 2, 3, 1]), 4);
        assert_eq!(b.ready(12), 0..0);
        assert_eq!(b.ready(8), 0..2);
        assert_eq!(b.ready(8), 2..2);
        assert_eq!(b.ready(0), 2..4);
        b.reset();
        assert_eq!(b.ready(0), 0..4);
    }

    proptest! {
        #[test]
        fn buckets_cover_the_buffer_once_in_backward_order(
            sizes in prop::collection::vec(0usize..40, 0..12),
            cap in 1u64..200,
        ) {
            let tensors = layout(&sizes);
            let len = tensors.last().map_or(0, |t| t.end);
            let b = Buckets::new(&tensors, cap);
            let mut end = len;
            for (i, r) in b.ranges().iter().enumerate() {
                prop_assert_eq!(r.end, end, "bucket {} does not end where {} starts", i, i);
                prop_assert!(r.start < r.end, "bucket {} is empty or reversed: {:?}", i, r);
                let whole = tensors.iter().any(|t| t.start == r.start);
                prop_assert!(whole, "bucket {} splits a tensor: {:?}", i, r);
                let last = i + 1 == b.len();
                prop_assert!(last || 4 * r.len() as u64 >= cap, "bucket {} under the cap", i);
                end = r.start;
            }
            prop_assert_eq!(end, 0, "buckets leave 0..{} uncovered", end);
        }
    }
}
