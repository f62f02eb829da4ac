//! The frame decoder on arbitrary bytes: it never panics, a frame it accepts carries
//! exactly the payload its header announces, and encoding it again gives the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringtrain::frame::{self, FrameKind, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok((header, payload)) = frame::decode(data) else {
        return;
    };
    assert_eq!(header.payload_len(), payload.len() as u64);
    assert_eq!(HEADER_LEN + payload.len(), data.len());
    let again = match header.kind {
        FrameKind::Digest => frame::encode_bytes(header, payload),
        _ => {
            let mut values = vec![0f32; payload.len() / 4];
            frame::copy_into(&mut values, payload);
            frame::encode_f32(header, &values)
        }
    };
    assert_eq!(
        &again[..],
        data,
        "decode then encode must give the same bytes"
    );
});
