//! Shared helpers for the builder's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root (tests must not depend on the working directory).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// A tiny static x86-64 ELF standing in for the daemon: the tests never need the real
/// static build, and the bundle stays small enough to read in golden files.
pub fn fake_daemon(dir: &Path) -> PathBuf {
    let p = dir.join("kiln-firstboot");
    std::fs::write(&p, kiln::elf::tiny_static_elf()).unwrap();
    p
}

/// No environment variables: profiles under test use `{file: ...}` secrets.
pub fn no_env(_: &str) -> Option<String> {
    None
}

pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

pub fn sha256_hex(data: &[u8]) -> String {
    kiln_plan::Sha256::digest(data).to_hex()
}

/// Compares with a golden file; `KILN_UPDATE_GOLDEN=1` rewrites it instead.
pub fn golden(rel: &str, actual: &[u8]) {
    let path = repo().join("tests/golden/builder").join(rel);
    if std::env::var_os("KILN_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "missing golden file {} ({e}); run with KILN_UPDATE_GOLDEN=1 and review the diff",
            path.display()
        )
    });
    if expected != actual {
        let a = String::from_utf8_lossy(actual);
        let e = String::from_utf8_lossy(&expected);
        let first = a.lines().zip(e.lines()).position(|(x, y)| x != y);
        panic!(
            "{} differs from the rendered output (first differing line: {:?})\n--- expected\n{}\n--- actual\n{}",
            path.display(),
            first.map(|i| i + 1),
            e,
            a
        );
    }
}
