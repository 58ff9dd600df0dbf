//! Fuzzes the CIFAR-10/100 binary record parser (`eio_data::parse_cifar_records`): for any
//! bytes it must return without panicking and satisfy every invariant of
//! `eio_data::fuzz_check::check_cifar` (byte 0 picks 1 or 2 label bytes per record).
#![no_main]

use eio_data::fuzz_check::check_cifar;
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.is_empty() {
        return Corpus::Reject;
    }
    if let Err(violation) = check_cifar(data) {
        panic!("{violation}");
    }
    Corpus::Keep
});
