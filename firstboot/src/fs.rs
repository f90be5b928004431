//! Filesystem access for the daemon: every node path goes through [`Root`], every write
//! through [`write_atomic`].

use anyhow::{Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Maps absolute node paths (`/etc/rancher/k3s/config.yaml`) under an optional root
/// directory, so the daemon can pre-stage a mounted image or run in a test tree.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Root { dir: dir.into() }
    }
    /// The real filesystem root.
    pub fn host() -> Self {
        Root::new("/")
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn path(&self, node_path: impl AsRef<Path>) -> PathBuf {
        let p = node_path.as_ref();
        let rel = p.strip_prefix("/").unwrap_or(p);
        self.dir.join(rel)
    }
}

fn parent_dir(path: &Path) -> &Path {
    // `Path::new("x").parent()` is `Some("")`, which is the current directory.
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `data` to `path` so that a crash at any instant leaves either the old file or the
/// new one, never a mix: temp file in the same directory, fsync, rename, fsync the directory.
/// Parent directories are created (0755).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    replace_atomic(path, mode, |f, tmp| {
        f.write_all(data)
            .with_context(|| format!("writing {}", tmp.display()))
    })
}

/// Copies `src` to `dst` with the same guarantees as [`write_atomic`], streaming (large
/// binaries never sit in memory).
pub fn copy_atomic(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    let mut input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    replace_atomic(dst, mode, |f, tmp| {
        std::io::copy(&mut input, f)
            .map(drop)
            .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))
    })
}

/// The one atomic replace: `fill` writes the content into a temp file beside `path` (mode set
/// exactly, not through the umask), then fsync, rename over `path`, fsync the directory.
fn replace_atomic(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File, &Path) -> Result<()>,
) -> Result<()> {
    let dir = parent_dir(path);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.kiln-tmp", name.to_string_lossy()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", tmp.display()))?;
        fill(&mut f, &tmp)?;
        f.sync_all()
            .with_context(|| format!("fsync {}", tmp.display()))?;
    }
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

/// Flushes the whole filesystem holding `path` (syncfs), for data another program wrote
/// without fsync that must be on disk before we act on it.
#[allow(unsafe_code)] // libc calls; each block says why it is sound
pub fn sync_filesystem(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncfs {}", path.display()));
    }
    Ok(())
}

/// fsync a directory so a rename in it survives power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_maps_absolute_node_paths_under_its_dir() {
        let r = Root::new("/tmp/x");
        assert_eq!(
            r.path("/etc/kiln/plan.json"),
            Path::new("/tmp/x/etc/kiln/plan.json")
        );
        assert_eq!(Root::host().path("/etc/a"), Path::new("/etc/a"));
    }

    #[test]
    fn write_atomic_sets_exact_mode_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/secret");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(d.path().join("sub")).unwrap().count(), 1);
    }
}
