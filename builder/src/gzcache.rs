//! kiln build's content-addressed cache (`gz-members/` and `schema-ok/` under [`cache_root`];
//! `kiln build --no-cache` uses none of it). Mostly compressed bundle members: The bundle is a multi-member gzip of
//! fixed-size chunks of its tar (render::gzip_parallel); compressing the 4 MB static daemon is
//! most of `kiln build`'s time, and the same chunk always compresses to the same bytes, so a
//! member is kept under a key that names its input chunk's content and the compression level.
//! Cached or not, the bundle's bytes are identical. Every entry carries the sha256 of the member
//! itself and is checked on read: a damaged entry is ignored and rewritten, never shipped.
//!
//! The key does not hash the chunk again: the tar's file data is described by the sha256 the
//! bundle's SHA256SUMS already holds for each file (plus the offset and length of the part in
//! the chunk), and only the bytes no digest covers (tar headers, padding, SHA256SUMS itself) are
//! hashed as they are. The same chunk content always gives the same key and different content a
//! different key (up to a sha256 collision), so the daemon is hashed once per build, not twice.

use kiln_plan::Sha256;
use sha2::Digest;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Bumped when the key's encoding changes; entries under an old encoding are simply not found.
const KEY_DOMAIN: &[u8] = b"kiln gz-member key v2\0miniz\0";

/// A file's data inside the tar: `len` bytes at `start`, whose sha256 is `sha256`.
#[derive(Debug, Clone, Copy)]
pub struct FileSpan {
    pub start: usize,
    pub len: usize,
    pub sha256: Sha256,
}

/// The cache key of the member for `data[range]` compressed at `level`: a sha256 over an
/// unambiguous description of the chunk, tagged pieces in order: `L` + length + the bytes
/// for what no span covers, `F` + the file's sha256 + offset in the file + length for the
/// parts of `spans` (sorted by `start`, not overlapping) inside the range.
pub fn member_key(data: &[u8], range: Range<usize>, spans: &[FileSpan], level: u32) -> Sha256 {
    let mut h = sha2::Sha256::new();
    h.update(KEY_DOMAIN);
    h.update(level.to_le_bytes());
    h.update((range.len() as u64).to_le_bytes());
    let literal = |h: &mut sha2::Sha256, r: Range<usize>| {
        if !r.is_empty() {
            h.update(b"L");
            h.update((r.len() as u64).to_le_bytes());
            h.update(&data[r]);
        }
    };
    let mut at = range.start;
    for s in spans {
        let (a, b) = (s.start.max(range.start), (s.start + s.len).min(range.end));
        if a >= b {
            continue;
        }
        literal(&mut h, at..a);
        h.update(b"F");
        h.update(s.sha256.as_bytes());
        h.update(((a - s.start) as u64).to_le_bytes());
        h.update(((b - a) as u64).to_le_bytes());
        at = b;
    }
    literal(&mut h, at..range.end);
    Sha256::from_bytes(h.finalize().into())
}

pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// At [`cache_root`].
    pub fn user_default() -> Option<Cache> {
        cache_root().map(Cache::new)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &Sha256, level: u32) -> PathBuf {
        // The name says the compressor too: another flate2 backend may emit other bytes.
        self.root
            .join("gz-members")
            .join(format!("{key}-l{level}-miniz.gz"))
    }

    /// The member under `key` (from [`member_key`]), if cached and intact.
    pub fn get(&self, key: &Sha256, level: u32) -> Option<Vec<u8>> {
        let mut data = std::fs::read(self.path(key, level)).ok()?;
        if data.len() < 32 {
            return None;
        }
        let member = data.split_off(32);
        (Sha256::digest(&member).as_bytes()[..] == data[..]).then_some(member)
    }

    /// Keeps `member` under `key`. Best effort: a cache that cannot be written only costs time.
    pub fn put(&self, key: &Sha256, level: u32, member: &[u8]) {
        let mut body = Sha256::digest(member).as_bytes().to_vec();
        body.extend_from_slice(member);
        write_atomic(&self.path(key, level), &body);
    }

    fn verdict_path(&self, key: &Sha256) -> PathBuf {
        self.root.join("schema-ok").join(key.to_hex())
    }

    /// Whether a check recorded success for `key` (a digest of everything the check read).
    pub fn passed(&self, key: &Sha256) -> bool {
        std::fs::read(self.verdict_path(key)).is_ok_and(|d| d == key.as_bytes())
    }

    /// Records that the check named by `key` passed (only successes are kept: a failure is
    /// always computed again, so its message is always current).
    pub fn record_pass(&self, key: &Sha256) {
        write_atomic(&self.verdict_path(key), key.as_bytes());
    }
}

fn write_atomic(path: &Path, body: &[u8]) {
    let tmp = path.with_extension(format!("partial.{}", std::process::id()));
    let ok = path
        .parent()
        .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
        && std::fs::write(&tmp, body).is_ok()
        && std::fs::rename(&tmp, path).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn cache_root() -> Option<PathBuf> {
    let var = |n: &str| {
        std::env::var_os(n)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("KILN_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("kiln")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/kiln")))
}

/// One deterministic gzip member of `data` at the best level (the custom data, small files):
/// mtime 0 and no file name, so the same input always gives the same bytes.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    enc.write_all(data).expect("in-memory write");
    enc.finish().expect("in-memory write")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_entry_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::new(tmp.path());
        let key = Sha256::digest(b"chunk");
        assert!(c.get(&key, 6).is_none());
        c.put(&key, 6, b"member bytes");
        assert_eq!(c.get(&key, 6).unwrap(), b"member bytes");
        assert!(c.get(&key, 9).is_none(), "the level is part of the key");
        let p = c.path(&key, 6);
        let mut data = std::fs::read(&p).unwrap();
        let n = data.len() - 1;
        data[n] ^= 1;
        std::fs::write(&p, data).unwrap();
        assert!(c.get(&key, 6).is_none());
        assert!(!c.passed(&key));
        c.record_pass(&key);
        assert!(c.passed(&key));
        std::fs::write(c.verdict_path(&key), b"damaged").unwrap();
        assert!(!c.passed(&key), "a damaged verdict is no verdict");
    }

    /// Two buffers with a "file" at the same place: the key follows the file's digest and the
    /// literal bytes around it, never the buffer alone.
    #[test]
    fn the_member_key_names_the_chunk_content() {
        let file_a = vec![7u8; 1000];
        let mut file_b = file_a.clone();
        file_b[500] = 8;
        let mut data = vec![1u8; 100];
        data.extend_from_slice(&file_a);
        data.extend_from_slice(&[2u8; 100]);
        let span = |f: &[u8]| FileSpan {
            start: 100,
            len: 1000,
            sha256: Sha256::digest(f),
        };
        let key = |d: &[u8], r: Range<usize>, f: &[u8]| member_key(d, r, &[span(f)], 6);
        let whole = key(&data, 0..1200, &file_a);
        assert_eq!(whole, key(&data, 0..1200, &file_a), "deterministic");
        assert_ne!(
            whole,
            key(&data, 0..1200, &file_b),
            "file content is in the key"
        );
        assert_ne!(whole, member_key(&data, 0..1200, &[span(&file_a)], 9));
        let mut other_literal = data.clone();
        other_literal[1150] = 9;
        assert_ne!(whole, key(&other_literal, 0..1200, &file_a));
        // A chunk that starts or ends inside the file names the part it holds.
        assert_ne!(key(&data, 0..600, &file_a), key(&data, 0..601, &file_a));
        assert_ne!(key(&data, 300..700, &file_a), key(&data, 301..701, &file_a));
        // A chunk outside the file does not depend on it.
        assert_eq!(
            key(&data, 1100..1200, &file_a),
            key(&data, 1100..1200, &file_b)
        );
        // Described by its digest or by its bytes, the same content has different keys (the
        // tags differ), which costs at most a miss, never a wrong member.
        assert_ne!(whole, member_key(&data, 0..1200, &[], 6));
    }
}
