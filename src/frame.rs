//! The wire format of collective frames: a fixed 24-byte header and a payload.
//!
//! ```text
//! 0      1      2             4             8            12                  20          24
//! | kind | 0    | step (u16)  | seq (u32)   | chunk (u32)| offset (u64)      | count (u32) | payload
//! ```
//!
//! All integers are little-endian. `seq` numbers the collective operations of a run, so a
//! frame from another operation is caught. The payload is `count` little-endian `f32`s, or,
//! for [`FrameKind::Digest`], `count` raw bytes. Decoding never allocates from an untrusted
//! length: the payload is a slice of the bytes already received, checked against `count`.

use bytes::{BufMut, Bytes, BytesMut};

/// Header length in bytes.
pub const HEADER_LEN: usize = 24;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A reduce-scatter segment: `f32`s to add.
    ReduceScatter = 1,
    /// An all-gather segment: reduced `f32`s to copy.
    AllGather = 2,
    /// A broadcast segment from rank 0.
    Broadcast = 3,
    /// A parameter digest being passed around the ring (bytes).
    Digest = 4,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<FrameKind> {
        match b {
            1 => Some(FrameKind::ReduceScatter),
            2 => Some(FrameKind::AllGather),
            3 => Some(FrameKind::Broadcast),
            4 => Some(FrameKind::Digest),
            _ => None,
        }
    }

    /// Bytes per payload element.
    pub fn elem_size(self) -> usize {
        match self {
            FrameKind::Digest => 1,
            _ => 4,
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Ring step within the operation.
    pub step: u16,
    /// Sequence number of the collective operation.
    pub seq: u32,
    /// Chunk index (or, for digests, whose digest this is).
    pub chunk: u32,
    /// First element of the segment in the whole buffer.
    pub offset: u64,
    /// Number of payload elements.
    pub count: u32,
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than a header.
    #[error("frame of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short(usize),
    /// The kind byte is not one we know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The reserved byte is not zero.
    #[error("reserved header byte is {0}, expected 0")]
    Reserved(u8),
    /// The payload length disagrees with the header's count.
    #[error("frame says {count} elements ({expected} bytes) but carries {actual} payload bytes")]
    Length {
        /// Elements announced.
        count: u32,
        /// Payload bytes that would take.
        expected: u64,
        /// Payload bytes present.
        actual: usize,
    },
}

impl Header {
    /// Payload length in bytes implied by `count`.
    pub fn payload_len(&self) -> u64 {
        u64::from(self.count) * self.kind.elem_size() as u64
    }
}

/// Encodes a frame of `f32`s.
pub fn encode_f32(header: Header, values: &[f32]) -> Bytes {
    debug_assert_eq!(
        header.count as usize,
        values.len(),
        "header count must match payload"
    );
    let mut out = BytesMut::with_capacity(HEADER_LEN + 4 * values.len());
    put_header(&mut out, header);
    for v in values {
        out.put_f32_le(*v);
    }
    out.freeze()
}

/// Encodes a frame of raw bytes (digests).
pub fn encode_bytes(header: Header, payload: &[u8]) -> Bytes {
    debug_assert_eq!(
        header.count as usize,
        payload.len(),
        "header count must match payload"
    );
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    put_header(&mut out, header);
    out.put_slice(payload);
    out.freeze()
}

fn put_header(out: &mut BytesMut, h: Header) {
    out.put_u8(h.kind as u8);
    out.put_u8(0);
    out.put_u16_le(h.step);
    out.put_u32_le(h.seq);
    out.put_u32_le(h.chunk);
    out.put_u64_le(h.offset);
    out.put_u32_le(h.count);
}

/// Decodes a whole frame into its header and payload bytes.
pub fn decode(frame: &[u8]) -> Result<(Header, &[u8]), FrameError> {
    if frame.len() < HEADER_LEN {
        return Err(FrameError::Short(frame.len()));
    }
    let (head, payload) = frame.split_at(HEADER_LEN);
    let kind = FrameKind::from_u8(head[0]).ok_or(FrameError::UnknownKind(head[0]))?;
    if head[1] != 0 {
        return Err(FrameError::Reserved(head[1]));
    }
    let u16_at = |i: usize| u16::from_le_bytes([head[i], head[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
    let offset = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
    let header = Header {
        kind,
        step: u16_at(2),
        seq: u32_at(4),
        chunk: u32_at(8),
        offset,
        count: u32_at(20),
    };
    if header.payload_len() != payload.len() as u64 {
        return Err(FrameError::Length {
            count: header.count,
            expected: header.payload_len(),
            actual: payload.len(),
        });
    }
    Ok((header, payload))
}

/// Adds little-endian `f32`s from `payload` into `dst`, element by element.
///
/// The caller has checked that `payload.len() == 4 * dst.len()`.
pub fn add_into(dst: &mut [f32], payload: &[u8]) {
    for (d, b) in dst.iter_mut().zip(payload.chunks_exact(4)) {
        *d += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Copies little-endian `f32`s from `payload` into `dst`.
///
/// The caller has checked that `payload.len() == 4 * dst.len()`.
pub fn copy_into(dst: &mut [f32], payload: &[u8]) {
    for (d, b) in dst.iter_mut().zip(payload.chunks_exact(4)) {
        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(count: u32) -> Header {
        Header {
            kind: FrameKind::AllGather,
            step: 3,
            seq: 9,
            chunk: 2,
            offset: 1 << 40,
            count,
        }
    }

    #[test]
    fn round_trip_keeps_every_field_and_value() {
        let vals = [1.5f32, -0.0, f32::MAX, f32::MIN_POSITIVE];
        let bytes = encode_f32(header(4), &vals);
        let (h, payload) = decode(&bytes).unwrap();
        assert_eq!(h, header(4));
        let mut out = [0f32; 4];
        copy_into(&mut out, payload);
        assert_eq!(out.map(f32::to_bits), vals.map(f32::to_bits));
        add_into(&mut out, payload);
        assert_eq!(out[0], 3.0);
    }

    #[test]
    fn rejects_short_unknown_reserved_and_wrong_length() {
        assert_eq!(decode(&[0; 5]), Err(FrameError::Short(5)));
        let mut bytes = encode_f32(header(1), &[1.0]).to_vec();
        bytes[0] = 77;
        assert_eq!(decode(&bytes), Err(FrameError::UnknownKind(77)));
        bytes[0] = 2;
        bytes[1] = 1;
        assert_eq!(decode(&bytes), Err(FrameError::Reserved(1)));
        bytes[1] = 0;
        bytes.push(0);
        assert!(matches!(
            decode(&bytes),
            Err(FrameError::Length { count: 1, .. })
        ));
        // A huge count is refused by comparison, never by allocating it.
        let mut big = encode_bytes(header(0), &[]).to_vec();
        big[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&big),
            Err(FrameError::Length {
                count: u32::MAX,
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode(&bytes);
        }
    }
}
