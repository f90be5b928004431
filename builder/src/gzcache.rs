//! A content-addressed cache of compressed bundle members. The bundle is a multi-member gzip of
//! fixed-size chunks of its tar (render::gzip_parallel); compressing the 4 MB static daemon is
//! most of `kiln build`'s time, and the same chunk always compresses to the same bytes, so a
//! member is kept under the sha256 of its input chunk and compression level. Cached or not, the
//! bundle's bytes are identical. Every entry carries the sha256 of the member itself and is
//! checked on read: a damaged entry is ignored and rewritten, never shipped.

use kiln_plan::Sha256;
use std::path::{Path, PathBuf};

pub struct MemberCache {
    dir: PathBuf,
}

impl MemberCache {
    pub fn new(dir: impl Into<PathBuf>) -> MemberCache {
        MemberCache { dir: dir.into() }
    }

    /// `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`; `gz-members/` in it.
    pub fn user_default() -> Option<MemberCache> {
        let var = |n: &str| {
            std::env::var_os(n)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let root = var("KILN_CACHE_DIR")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("kiln")))
            .or_else(|| var("HOME").map(|d| d.join(".cache/kiln")))?;
        Some(MemberCache::new(root.join("gz-members")))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, chunk: &[u8], level: u32) -> PathBuf {
        // The key names the compressor too: another flate2 backend may emit other bytes.
        let key = Sha256::digest(chunk);
        self.dir.join(format!("{key}-l{level}-miniz.gz"))
    }

    /// The member for `chunk`, if cached and intact.
    pub fn get(&self, chunk: &[u8], level: u32) -> Option<Vec<u8>> {
        let data = std::fs::read(self.path(chunk, level)).ok()?;
        let (sum, member) = data.split_at_checked(32)?;
        (Sha256::digest(member).as_bytes() == sum).then(|| member.to_vec())
    }

    /// Keeps `member` for `chunk`. Best effort: a cache that cannot be written only costs time.
    pub fn put(&self, chunk: &[u8], level: u32, member: &[u8]) {
        let path = self.path(chunk, level);
        let tmp = path.with_extension(format!("partial.{}", std::process::id()));
        let mut body = Sha256::digest(member).as_bytes().to_vec();
        body.extend_from_slice(member);
        let ok = std::fs::create_dir_all(&self.dir).is_ok()
            && std::fs::write(&tmp, &body).is_ok()
            && std::fs::rename(&tmp, &path).is_ok();
        if !ok {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_entry_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let c = MemberCache::new(tmp.path());
        assert!(c.get(b"chunk", 6).is_none());
        c.put(b"chunk", 6, b"member bytes");
        assert_eq!(c.get(b"chunk", 6).unwrap(), b"member bytes");
        assert!(c.get(b"chunk", 9).is_none(), "the level is part of the key");
        let p = c.path(b"chunk", 6);
        let mut data = std::fs::read(&p).unwrap();
        let n = data.len() - 1;
        data[n] ^= 1;
        std::fs::write(&p, data).unwrap();
        assert!(c.get(b"chunk", 6).is_none());
    }
}
