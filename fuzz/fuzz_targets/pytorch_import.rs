//! Fuzzes the PyTorch checkpoint reader (legacy pickles, zip archives, safetensors): any bytes
//! must give a state dict or an error from `eio_interop::torch::check_bytes`, never a panic,
//! a hang or an allocation the input does not justify.
#![no_main]

use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    match eio_interop::torch::check_bytes(data) {
        Ok(_) => Corpus::Keep,
        // Keep malformed inputs too: most of the reader's branches are error paths.
        Err(_) => Corpus::Keep,
    }
});
