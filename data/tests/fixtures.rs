//! The committed fixtures are exactly what `common/mod.rs` generates (so every expected value in
//! the other tests follows from its formulas). `EIO_WRITE_FIXTURES=1` rewrites them.

mod common;

use common::*;

#[test]
fn fixtures_are_current() {
    let write = std::env::var_os("EIO_WRITE_FIXTURES").is_some();
    let root = fixtures();
    let mut stale = Vec::new();
    for (rel, bytes, compare) in all_fixtures() {
        let path = root.join(&rel);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
            continue;
        }
        let Ok(committed) = std::fs::read(&path) else {
            stale.push(format!("{rel}: missing"));
            continue;
        };
        let same = match compare {
            Compare::Exact => committed == bytes,
            Compare::Gzip => gunzip(&committed) == gunzip(&bytes),
            Compare::TarGz => untar_gz(&committed) == untar_gz(&bytes),
        };
        if !same {
            stale.push(format!("{rel}: differs from the generator"));
        }
    }
    assert!(
        stale.is_empty(),
        "stale fixtures (EIO_WRITE_FIXTURES=1 regenerates):\n{}",
        stale.join("\n")
    );
}

#[test]
fn fixtures_are_tiny() {
    let total: usize = all_fixtures().iter().map(|(_, b, _)| b.len()).sum();
    assert!(total < 80_000, "fixtures total {total} bytes");
}
