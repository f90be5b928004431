//! Shared helpers for the builder's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root (tests must not depend on the working directory).
pub fn repo() -> PathBuf {
    kiln_testkit::repo()
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

/// Compares with `tests/golden/builder/REL` (`KILN_UPDATE_GOLDEN=1` rewrites it).
pub fn golden(rel: &str, actual: &[u8]) {
    kiln_testkit::golden(&format!("builder/{rel}"), actual)
}
