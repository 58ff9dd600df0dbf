//! The fuzz targets' checkers (`eio_data::fuzz_check`) on seeded inputs, so `cargo test` runs
//! the same invariants as `cargo fuzz`: random bytes, the committed seed corpora, and every
//! single-byte mutation and truncation of valid files.

use eio_data::fuzz_check::{check_cifar, check_idx};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("seed-")
        {
            out.push(std::fs::read(p).unwrap());
        }
    }
    assert!(!out.is_empty(), "no seed corpus in {}", dir.display());
    out
}

fn run(check: fn(&[u8]) -> Result<(), String>, seeds: &[Vec<u8>], seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut inputs: Vec<Vec<u8>> = seeds.to_vec();
    // 10,000 random inputs of length 0..64 (headers) plus a few long ones.
    for i in 0..10_000 {
        let len = if i % 100 == 0 {
            rng.random_range(0..8000)
        } else {
            rng.random_range(0..64)
        };
        let mut v = vec![0u8; len];
        rng.fill_bytes(&mut v);
        inputs.push(v);
    }
    // Mutations of every seed: one random byte changed, truncated at a random point.
    for s in seeds {
        for _ in 0..200 {
            let mut m = s.clone();
            if !m.is_empty() {
                let k = rng.random_range(0..m.len());
                m[k] = rng.random();
                inputs.push(m.clone());
                m.truncate(rng.random_range(0..m.len()));
            }
            inputs.push(m);
        }
    }
    for (i, input) in inputs.iter().enumerate() {
        if let Err(v) = check(input) {
            panic!(
                "input {i} ({} bytes, starts {:?}): {v}",
                input.len(),
                &input[..input.len().min(20)]
            );
        }
    }
}

#[test]
fn idx_checker_on_seeded_inputs() {
    run(check_idx, &corpus("idx_parser"), 1);
}

#[test]
fn cifar_checker_on_seeded_inputs() {
    run(check_cifar, &corpus("cifar_binary"), 2);
}

#[test]
fn the_checkers_accept_valid_files() {
    // A checker that rejected everything would pass the runs above; valid files must parse.
    let mut idx = vec![0u8];
    for w in [0x803u32, 2, 3, 4] {
        idx.extend(w.to_be_bytes());
    }
    idx.extend((0..24).map(|v| v as u8 * 10));
    assert!(eio_data::parse_idx_images(&idx[1..], "x").is_ok());
    check_idx(&idx).unwrap();
    let mut rec = vec![0u8, 7];
    rec.extend((0..3072).map(|v| (v % 256) as u8));
    assert!(eio_data::parse_cifar_records(&rec[1..], "x", 1).is_ok());
    check_cifar(&rec).unwrap();
}
