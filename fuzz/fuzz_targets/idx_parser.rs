//! Fuzzes the MNIST/Fashion-MNIST IDX parsers (`eio_data::parse_idx_images`,
//! `eio_data::parse_idx_labels`): for any bytes they must return without panicking or
//! over-allocating, and satisfy every invariant of `eio_data::fuzz_check::check_idx` (byte 0
//! picks images or labels and whether the magic number is patched in).
#![no_main]

use eio_data::fuzz_check::check_idx;
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.is_empty() {
        return Corpus::Reject;
    }
    if let Err(violation) = check_idx(data) {
        panic!("{violation}");
    }
    Corpus::Keep
});
