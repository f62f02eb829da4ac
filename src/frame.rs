//! The wire format of collective frames: a fixed 24-byte header and a payload.
//!
//! ```text
//! 0      1      2             4             8            12                  20          24
//! | kind | wire | step (u16)  | seq (u32)   | chunk (u32)| offset (u64)      | count (u32) | payload
//! ```
//!
//! All integers are little-endian. `seq` numbers the collective operations of a run, so a
//! frame from another operation is caught. The payload is `count` values in the [`Wire`]
//! encoding (little-endian `f32`, or `f16`/`bf16` halves for `--compress`), or, for
//! [`FrameKind::Digest`], `count` raw bytes. Decoding never allocates from an untrusted
//! length: the payload is a slice of the bytes already received, checked against `count`.

use bytes::{BufMut, Bytes, BytesMut};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

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
}

/// How the values of a frame travel: full `f32`, or halved to 16 bits (`--compress`).
///
/// Halves are rounded to nearest (ties to even) when sent and widened exactly when
/// received; sums are always accumulated in `f32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Wire {
    /// Little-endian IEEE `f32`: exact.
    #[default]
    #[value(name = "none")]
    F32 = 0,
    /// IEEE half precision: 11 significant bits, range up to 65504.
    #[value(name = "fp16")]
    F16 = 1,
    /// bfloat16: 8 significant bits, the whole `f32` range.
    Bf16 = 2,
}

impl Wire {
    fn from_u8(b: u8) -> Option<Wire> {
        match b {
            0 => Some(Wire::F32),
            1 => Some(Wire::F16),
            2 => Some(Wire::Bf16),
            _ => None,
        }
    }

    /// Bytes per value.
    pub fn elem_size(self) -> usize {
        match self {
            Wire::F32 => 4,
            Wire::F16 | Wire::Bf16 => 2,
        }
    }

    /// The name used on the command line and in fingerprints.
    pub fn name(self) -> &'static str {
        match self {
            Wire::F32 => "none",
            Wire::F16 => "fp16",
            Wire::Bf16 => "bf16",
        }
    }

    /// Relative rounding error of one value in this encoding (half an ulp).
    pub fn unit_roundoff(self) -> f64 {
        match self {
            Wire::F32 => f64::from(f32::EPSILON) / 2.0,
            Wire::F16 => 2f64.powi(-11),
            Wire::Bf16 => 2f64.powi(-8),
        }
    }

    /// Replaces each value by the nearest value this encoding can carry, so that what a
    /// rank keeps is exactly what its neighbours receive.
    pub fn round_in_place(self, values: &mut [f32]) {
        let Some((narrow, widen)) = self.halves() else {
            return;
        };
        let mut bits = [0u16; HALF_BLOCK];
        for block in values.chunks_mut(HALF_BLOCK) {
            let bits = &mut bits[..block.len()];
            narrow(block, bits);
            widen(bits, block);
        }
    }

    /// The conversions of a 16-bit encoding to and from `f32`; `None` for `f32` itself.
    fn halves(self) -> Option<(Narrow, Widen)> {
        match self {
            Wire::F32 => None,
            Wire::F16 => Some((narrow_f16, widen_f16)),
            Wire::Bf16 => Some((narrow_bf16, widen_bf16)),
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: FrameKind,
    /// How its values are encoded (always [`Wire::F32`] for digests).
    pub wire: Wire,
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
    /// The encoding byte is not one we know.
    #[error("unknown value encoding {0}")]
    UnknownWire(u8),
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
        let size = match self.kind {
            FrameKind::Digest => 1,
            _ => self.wire.elem_size(),
        };
        u64::from(self.count) * size as u64
    }
}

/// Encodes a frame of `f32`s in the header's [`Wire`] encoding.
pub fn encode_f32(header: Header, values: &[f32]) -> Bytes {
    debug_assert_eq!(
        header.count as usize,
        values.len(),
        "header count must match payload"
    );
    let mut out = BytesMut::with_capacity(HEADER_LEN + header.wire.elem_size() * values.len());
    put_header(&mut out, header);
    match header.wire.halves() {
        None => put_le(&mut out, values, |o, v| o.put_f32_le(v)),
        Some((narrow, _)) => {
            // Block by block through the stack: no buffer per frame.
            let mut bits = [0u16; HALF_BLOCK];
            for block in values.chunks(HALF_BLOCK) {
                let bits = &mut bits[..block.len()];
                narrow(block, bits);
                put_le(&mut out, bits, |o, v| o.put_u16_le(v));
            }
        }
    }
    out.freeze()
}

/// Appends `values` as little-endian bytes: one bulk copy where that is the native order,
/// `one` value at a time elsewhere.
fn put_le<T: bytemuck::Pod>(out: &mut BytesMut, values: &[T], one: fn(&mut BytesMut, T)) {
    if cfg!(target_endian = "little") {
        out.put_slice(bytemuck::cast_slice(values));
    } else {
        for v in values {
            one(out, *v);
        }
    }
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
    out.put_u8(h.wire as u8);
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
    let head: &[u8; HEADER_LEN] = head.try_into().expect("split at HEADER_LEN");
    let header = decode_header(head, payload.len())?;
    Ok((header, payload))
}

/// Parses a header and checks it against the number of payload bytes that follow it.
fn decode_header(head: &[u8; HEADER_LEN], payload_len: usize) -> Result<Header, FrameError> {
    let kind = FrameKind::from_u8(head[0]).ok_or(FrameError::UnknownKind(head[0]))?;
    let wire = Wire::from_u8(head[1]).ok_or(FrameError::UnknownWire(head[1]))?;
    let u16_at = |i: usize| u16::from_le_bytes([head[i], head[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
    let offset = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
    let header = Header {
        kind,
        wire,
        step: u16_at(2),
        seq: u32_at(4),
        chunk: u32_at(8),
        offset,
        count: u32_at(20),
    };
    if header.payload_len() != payload_len as u64 {
        return Err(FrameError::Length {
            count: header.count,
            expected: header.payload_len(),
            actual: payload_len,
        });
    }
    Ok(header)
}

/// A received frame as the link handed it over: pieces of bytes, in order.
///
/// QUIC delivers stream data in the buffers its packets arrived in. Keeping those pieces,
/// rather than copying them into one buffer, saves a copy and the zeroing of its target
/// for every received byte; the reduce kernel then reads each piece once. Piece
/// boundaries fall anywhere, also inside the header or inside an `f32`.
#[derive(Debug, Clone, Default)]
pub struct Pieces {
    parts: Vec<Bytes>,
    len: usize,
}

impl Pieces {
    /// No bytes yet.
    pub fn new() -> Pieces {
        Pieces::default()
    }

    /// Appends the next piece.
    pub fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.len += part.len();
            self.parts.push(part);
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces' bytes from `start` on, piece by piece.
    fn slices_from(&self, start: usize) -> impl Iterator<Item = &[u8]> {
        let mut skip = start;
        self.parts.iter().filter_map(move |p| {
            let cut = skip.min(p.len());
            skip -= cut;
            let rest = &p[cut..];
            (!rest.is_empty()).then_some(rest)
        })
    }
}

impl From<Bytes> for Pieces {
    fn from(bytes: Bytes) -> Pieces {
        let mut pieces = Pieces::new();
        pieces.push(bytes);
        pieces
    }
}

/// The payload of a frame held in [`Pieces`].
#[derive(Debug, Clone, Copy)]
pub struct Payload<'a> {
    pieces: &'a Pieces,
    wire: Wire,
}

impl Payload<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.pieces.len - HEADER_LEN
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds the payload's values into `dst`, element by element, like [`add_into`]
    /// (halves are widened to `f32` first). The caller has checked that the payload holds
    /// `dst.len()` values.
    pub fn add_into(&self, dst: &mut [f32]) {
        match self.wire {
            Wire::F32 => self.apply(dst, 4, add_into),
            Wire::F16 => self.apply(dst, 2, add_f16_into),
            Wire::Bf16 => self.apply(dst, 2, add_bf16_into),
        }
    }

    /// Copies the payload's values into `dst`, like [`copy_into`]. The caller has checked
    /// that the payload holds `dst.len()` values.
    pub fn copy_into(&self, dst: &mut [f32]) {
        match self.wire {
            Wire::F32 => self.apply(dst, 4, copy_into),
            Wire::F16 => self.apply(dst, 2, copy_f16_into),
            Wire::Bf16 => self.apply(dst, 2, copy_bf16_into),
        }
    }

    /// The payload's bytes in one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for s in self.pieces.slices_from(HEADER_LEN) {
            out.extend_from_slice(s);
        }
        out
    }

    /// Runs `kernel` over each piece's whole values of `width` bytes; a value split
    /// between two pieces is put together first and goes through the same kernel.
    fn apply(&self, dst: &mut [f32], width: usize, kernel: fn(&mut [f32], &[u8])) {
        debug_assert_eq!(self.len(), width * dst.len(), "invariant: payload fits dst");
        let (mut at, mut carry, mut have) = (0, [0u8; 4], 0);
        for mut s in self.pieces.slices_from(HEADER_LEN) {
            if have > 0 {
                let take = (width - have).min(s.len());
                carry[have..have + take].copy_from_slice(&s[..take]);
                (have, s) = (have + take, &s[take..]);
                if have < width {
                    continue;
                }
                kernel(&mut dst[at..at + 1], &carry[..width]);
                at += 1;
            }
            let whole = s.len() / width;
            kernel(&mut dst[at..at + whole], &s[..width * whole]);
            at += whole;
            let rest = &s[width * whole..];
            carry[..rest.len()].copy_from_slice(rest);
            have = rest.len();
        }
    }
}

/// Decodes a frame held in pieces into its header and payload.
pub fn decode_pieces(frame: &Pieces) -> Result<(Header, Payload<'_>), FrameError> {
    if frame.len < HEADER_LEN {
        return Err(FrameError::Short(frame.len));
    }
    let mut head = [0u8; HEADER_LEN];
    let mut filled = 0;
    for s in frame.slices_from(0) {
        let take = (HEADER_LEN - filled).min(s.len());
        head[filled..filled + take].copy_from_slice(&s[..take]);
        filled += take;
        if filled == HEADER_LEN {
            break;
        }
    }
    let header = decode_header(&head, frame.len - HEADER_LEN)?;
    let wire = header.wire;
    Ok((
        header,
        Payload {
            pieces: frame,
            wire,
        },
    ))
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

/// Values converted to or from 16 bits per block: small enough for the stack, large enough
/// for the vector units.
const HALF_BLOCK: usize = 256;

/// Rounds `f32`s to the raw bits of a 16-bit encoding (to nearest, ties to even).
type Narrow = fn(&[f32], &mut [u16]);
/// Widens the raw bits of a 16-bit encoding to `f32`s, exactly.
type Widen = fn(&[u16], &mut [f32]);

/// Widens the little-endian 16-bit values of `payload` block by block and hands each
/// block, beside its part of `dst`, to `apply`. `widen` turns one block of raw bits into
/// f32s; half's slice conversion uses the CPU's F16C instructions where it has them.
fn widen_blocks(dst: &mut [f32], payload: &[u8], widen: Widen, apply: fn(&mut [f32], &[f32])) {
    let mut bits = [0u16; HALF_BLOCK];
    let mut wide = [0f32; HALF_BLOCK];
    for (d, p) in dst
        .chunks_mut(HALF_BLOCK)
        .zip(payload.chunks(2 * HALF_BLOCK))
    {
        let n = d.len();
        for (bit, b) in bits[..n].iter_mut().zip(p.chunks_exact(2)) {
            *bit = u16::from_le_bytes([b[0], b[1]]);
        }
        widen(&bits[..n], &mut wide[..n]);
        apply(d, &wide[..n]);
    }
}

fn narrow_f16(values: &[f32], bits: &mut [u16]) {
    bits.reinterpret_cast_mut::<f16>()
        .convert_from_f32_slice(values);
}

fn narrow_bf16(values: &[f32], bits: &mut [u16]) {
    bits.reinterpret_cast_mut::<bf16>()
        .convert_from_f32_slice(values);
}

fn widen_f16(bits: &[u16], out: &mut [f32]) {
    bits.reinterpret_cast::<f16>().convert_to_f32_slice(out);
}

fn widen_bf16(bits: &[u16], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bits) {
        // bf16 is the upper half of an f32.
        *o = f32::from_bits(u32::from(*b) << 16);
    }
}

fn add_slices(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

fn copy_slices(dst: &mut [f32], src: &[f32]) {
    dst.copy_from_slice(src);
}

fn add_f16_into(dst: &mut [f32], payload: &[u8]) {
    widen_blocks(dst, payload, widen_f16, add_slices);
}

fn copy_f16_into(dst: &mut [f32], payload: &[u8]) {
    widen_blocks(dst, payload, widen_f16, copy_slices);
}

fn add_bf16_into(dst: &mut [f32], payload: &[u8]) {
    widen_blocks(dst, payload, widen_bf16, add_slices);
}

fn copy_bf16_into(dst: &mut [f32], payload: &[u8]) {
    widen_blocks(dst, payload, widen_bf16, copy_slices);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(count: u32) -> Header {
        Header {
            kind: FrameKind::AllGather,
            wire: Wire::F32,
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
        bytes[1] = 7;
        assert_eq!(decode(&bytes), Err(FrameError::UnknownWire(7)));
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

    /// `bytes` cut at the given offsets (sorted, deduplicated, within bounds).
    fn cut(bytes: &[u8], mut at: Vec<usize>) -> Pieces {
        at.retain(|&a| a < bytes.len());
        at.sort_unstable();
        at.dedup();
        let mut pieces = Pieces::new();
        let mut from = 0;
        for a in at.into_iter().chain([bytes.len()]) {
            pieces.push(Bytes::copy_from_slice(&bytes[from..a]));
            from = a;
        }
        pieces
    }

    #[test]
    fn pieces_cut_inside_the_header_and_inside_an_f32_decode_like_one_buffer() {
        let vals = [1.25f32, -2.5, 3.0e-3, 7.0, f32::MIN_POSITIVE];
        let bytes = encode_f32(header(5), &vals);
        let pieces = cut(&bytes, vec![3, 23, 26, 27, 31, 40]);
        let (h, payload) = decode_pieces(&pieces).unwrap();
        assert_eq!(h, header(5));
        assert_eq!(payload.len(), 20);
        let mut out = [0f32; 5];
        payload.copy_into(&mut out);
        assert_eq!(out.map(f32::to_bits), vals.map(f32::to_bits));
        payload.add_into(&mut out);
        assert_eq!(out, vals.map(|v| v + v));
        assert_eq!(payload.to_vec(), bytes[HEADER_LEN..].to_vec());
        let (_, whole) = decode(&bytes).unwrap();
        assert_eq!(payload.to_vec(), whole.to_vec());
    }

    #[test]
    fn pieces_reject_what_one_buffer_rejects() {
        assert_eq!(
            decode_pieces(&cut(&[0; 5], vec![2])).unwrap_err(),
            FrameError::Short(5)
        );
        let mut bytes = encode_f32(header(2), &[1.0, 2.0]).to_vec();
        bytes.pop();
        let err = decode_pieces(&cut(&bytes, vec![10, 25])).unwrap_err();
        assert_eq!(Err(err), decode(&bytes).map(|_| ()));
    }

    #[test]
    fn halves_round_to_nearest_and_the_sender_keeps_what_it_sent() {
        for wire in [Wire::F16, Wire::Bf16] {
            let vals = [1.0f32, -3.0e-3, 1.0 + 1.0 / 1024.0, 300.7, 0.0];
            let h = Header { wire, ..header(5) };
            let bytes = encode_f32(h, &vals);
            assert_eq!(bytes.len(), HEADER_LEN + 10);
            let pieces = cut(&bytes, vec![HEADER_LEN + 1, HEADER_LEN + 5]);
            let (got, payload) = decode_pieces(&pieces).unwrap();
            assert_eq!(got, h);
            let mut out = [0f32; 5];
            payload.copy_into(&mut out);
            let mut kept = vals;
            wire.round_in_place(&mut kept);
            assert_eq!(out.map(f32::to_bits), kept.map(f32::to_bits), "{wire:?}");
            for (o, v) in out.iter().zip(vals) {
                let err = f64::from((o - v).abs());
                assert!(
                    err <= wire.unit_roundoff() * f64::from(v.abs()),
                    "{wire:?} {v}"
                );
            }
            // Sending rounded values again is exact.
            let again = encode_f32(h, &kept);
            assert_eq!(again, encode_f32(h, &out));
            let mut sum = [1.0f32; 5];
            payload.add_into(&mut sum);
            assert_eq!(sum, kept.map(|k| 1.0 + k));
        }
    }

    #[test]
    fn widening_in_blocks_matches_one_value_at_a_time_for_every_bit_pattern() {
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        type One = fn(u16) -> f32;
        let conversions: [(Wire, One); 2] = [
            (Wire::F16, |b| f16::from_bits(b).to_f32()),
            (Wire::Bf16, |b| bf16::from_bits(b).to_f32()),
        ];
        // Every pattern; then a length that is no multiple of the block.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        for bits in [&all[..], &all[1000..1000 + HALF_BLOCK + 77]] {
            let payload: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            for (wire, one) in conversions {
                type Kernel = fn(&mut [f32], &[u8]);
                let (add, copy): (Kernel, Kernel) = match wire {
                    Wire::F16 => (add_f16_into, copy_f16_into),
                    _ => (add_bf16_into, copy_bf16_into),
                };
                let mut copied = vec![7.0f32; bits.len()];
                copy(&mut copied, &payload);
                let mut added = vec![1.5f32; bits.len()];
                add(&mut added, &payload);
                for (i, &b) in bits.iter().enumerate() {
                    assert!(same(copied[i], one(b)), "{wire:?} copy of {b:#06x}");
                    assert!(same(added[i], 1.5 + one(b)), "{wire:?} add of {b:#06x}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn narrowing_in_blocks_matches_one_value_at_a_time(
            vals in proptest::collection::vec(any::<f32>(), 0..3 * HALF_BLOCK),
        ) {
            type One = fn(f32) -> (u16, f32);
            let conversions: [(Wire, One); 2] = [
                (Wire::F16, |v| (f16::from_f32(v).to_bits(), f16::from_f32(v).to_f32())),
                (Wire::Bf16, |v| (bf16::from_f32(v).to_bits(), bf16::from_f32(v).to_f32())),
            ];
            for (wire, one) in conversions {
                let bytes = encode_f32(Header { wire, ..header(vals.len() as u32) }, &vals);
                let mut rounded = vals.clone();
                wire.round_in_place(&mut rounded);
                for (i, &v) in vals.iter().enumerate() {
                    let (bits, back) = one(v);
                    let at = HEADER_LEN + 2 * i;
                    let sent = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
                    prop_assert!(sent == bits || (v.is_nan() && back.is_nan()), "{wire:?} {v}");
                    let r = rounded[i];
                    prop_assert!(r.to_bits() == back.to_bits() || (r.is_nan() && back.is_nan()));
                }
            }
        }

        #[test]
        fn any_cut_of_a_frame_reduces_bit_for_bit_like_one_buffer(
            vals in proptest::collection::vec(any::<f32>(), 0..64),
            base in proptest::collection::vec(-1e3f32..1e3, 64),
            at in proptest::collection::vec(0usize..300, 0..12),
        ) {
            let n = vals.len();
            let bytes = encode_f32(header(n as u32), &vals);
            let half = encode_f32(Header { wire: Wire::Bf16, ..header(n as u32) }, &vals);
            let half_pieces = cut(&half, at.clone());
            let (_, half_payload) = decode_pieces(&half_pieces).unwrap();
            let mut rounded = vals.clone();
            Wire::Bf16.round_in_place(&mut rounded);
            let mut widened = vec![0f32; n];
            half_payload.copy_into(&mut widened);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            // NaN payloads may be quietened; compare the numbers only.
            let finite = |v: &[f32]| v.iter().map(|x| if x.is_nan() { 0 } else { x.to_bits() }).collect::<Vec<_>>();
            prop_assert_eq!(finite(&widened), finite(&rounded));
            let (_, whole) = decode(&bytes).unwrap();
            let pieces = cut(&bytes, at);
            let (_, payload) = decode_pieces(&pieces).unwrap();
            let (mut a, mut b) = (base[..n].to_vec(), base[..n].to_vec());
            add_into(&mut a, whole);
            payload.add_into(&mut b);
            prop_assert_eq!(bits(&a), bits(&b));
            copy_into(&mut a, whole);
            payload.copy_into(&mut b);
            prop_assert_eq!(bits(&a), bits(&b));
        }

        #[test]
        fn decode_pieces_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..100),
            at in proptest::collection::vec(0usize..100, 0..6),
        ) {
            let pieces = cut(&bytes, at);
            prop_assert_eq!(decode_pieces(&pieces).map(|(h, _)| h), decode(&bytes).map(|(h, _)| h));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode(&bytes);
        }
    }
}
