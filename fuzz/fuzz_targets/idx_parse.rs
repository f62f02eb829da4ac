//! The IDX readers on arbitrary bytes: they never panic and never allocate what a header
//! announces; accepted images hold exactly `count * rows * cols` pixels and accepted labels
//! name real classes.
//!
//! Input: byte 0 picks the reader (even: images, odd: labels); the rest is the file.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ringtrain::data::{IDX_CLASSES, parse_idx_images, parse_idx_labels};

fuzz_target!(|data: &[u8]| {
    let [pick, file @ ..] = data else {
        return;
    };
    let path = Path::new("fuzz.idx");
    if pick % 2 == 0 {
        if let Ok(images) = parse_idx_images(path, file) {
            let pixels = images.count * images.rows * images.cols;
            assert_eq!(images.pixels.len(), pixels);
            assert!(pixels > 0);
        }
    } else if let Ok(labels) = parse_idx_labels(path, file) {
        assert!(labels.iter().all(|&l| (l as usize) < IDX_CLASSES));
    }
});
