//! Fuzzes the Algorithm 1 path sampler: any n, K, depth, p, policy and seed the bytes encode
//! must satisfy every invariant of `eio_spec::sampler_check::check`.
#![no_main]

use eio_spec::sampler_check::{check, SamplerCase};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    let Some(case) = SamplerCase::from_bytes(data) else {
        return Corpus::Reject;
    };
    if let Err(violation) = check(&case) {
        panic!("{violation}");
    }
    Corpus::Keep
});
