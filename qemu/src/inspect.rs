//! Reads a powered-off guest's disk from the host, without mounting anything: the qcow2
//! overlay is flattened to a sparse raw file and e2fsprogs' `debugfs` reads ext4 from it.
//! This is how the harness proves what is on the node (files, modes, owners) without any test
//! hook in the product: the daemon and cloud-init leave their persistent records on disk.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Serialize;

pub struct GuestDisk {
    raw: PathBuf,
    /// Byte offset of the ext4 root inside the disk (0 for the test image, which has no
    /// partition table).
    offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestStat {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub kind: String,
}

impl GuestDisk {
    /// Flattens `overlay` (with its backing chain) into `raw`. The VM must be stopped.
    pub fn from_overlay(overlay: &Path, raw: &Path) -> Result<Self> {
        let out = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(overlay)
            .arg(raw)
            .output()
            .context("running qemu-img convert")?;
        if !out.status.success() {
            bail!(
                "qemu-img convert {}: {}",
                overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(GuestDisk {
            raw: raw.to_path_buf(),
            offset: 0,
        })
    }

    fn debugfs(&self, request: &str) -> Result<(String, String)> {
        if self.offset != 0 {
            bail!("partitioned guest disks are not supported by the reader yet");
        }
        let out = Command::new("debugfs")
            // -c: read-only, bitmaps not loaded, so a disk whose guest died uncleanly reads too.
            .arg("-c")
            .arg("-R")
            .arg(request)
            .arg(&self.raw)
            .output()
            .context("running debugfs (e2fsprogs)")?;
        Ok((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Mode, owner and size of a guest path; None when it does not exist.
    pub fn stat(&self, path: &str) -> Result<Option<GuestStat>> {
        let (out, err) = self.debugfs(&format!("stat \"{path}\""))?;
        if err.contains("File not found") || out.trim().is_empty() {
            return Ok(None);
        }
        parse_stat(&out)
            .with_context(|| format!("parsing debugfs stat of {path}: {out}"))
            .map(Some)
    }

    /// Contents of a guest file; None when it does not exist.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        match self.stat(path)? {
            None => return Ok(None),
            Some(st) if st.kind != "regular" => bail!("guest {path} is a {}, not a file", st.kind),
            Some(_) => {}
        }
        let out = Command::new("debugfs")
            // -c: read-only, bitmaps not loaded, so a disk whose guest died uncleanly reads too.
            .arg("-c")
            .arg("-R")
            .arg(format!("cat \"{path}\""))
            .arg(&self.raw)
            .output()
            .context("running debugfs cat")?;
        Ok(Some(out.stdout))
    }

    /// Names in a guest directory (without `.` and `..`); None when it does not exist.
    pub fn list(&self, dir: &str) -> Result<Option<Vec<String>>> {
        if self.stat(dir)?.is_none() {
            return Ok(None);
        }
        let (out, _) = self.debugfs(&format!("ls -p \"{dir}\""))?;
        // `ls -p` lines: /inode/mode/uid/gid/name/size/
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.split('/').nth(5).map(str::to_string))
            .filter(|n| !n.is_empty() && n != "." && n != "..")
            .collect();
        names.sort();
        names.dedup();
        Ok(Some(names))
    }
}

impl Drop for GuestDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.raw);
    }
}

fn parse_stat(out: &str) -> Result<GuestStat> {
    let field = |name: &str| -> Option<&str> {
        let i = out.find(name)?;
        out[i + name.len()..].split_whitespace().next()
    };
    let mode = u32::from_str_radix(field("Mode:").context("no Mode")?, 8)?;
    let uid = field("User:").context("no User")?.parse()?;
    let gid = field("Group:").context("no Group")?.parse()?;
    let size = field("Size:").context("no Size")?.parse()?;
    let kind = field("Type:").context("no Type")?.to_string();
    Ok(GuestStat {
        mode,
        uid,
        gid,
        size,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a real ext4 image with `mkfs.ext4 -d` (as the image recipe does) and reads it back.
    #[test]
    fn reads_files_modes_and_listings_from_an_ext4_image() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err()
            || Command::new("debugfs").arg("-V").output().is_err()
        {
            eprintln!("skipped: e2fsprogs not installed (.ci/install-deps installs it)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc/kiln/secrets")).unwrap();
        std::fs::write(tree.join("etc/kiln/secrets/token"), b"s3cret").unwrap();
        std::fs::write(tree.join("etc/kiln/plan.json"), b"{\"a\":1}").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            tree.join("etc/kiln/secrets/token"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let img = dir.path().join("fs.raw");
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&img)
            .arg("8M")
            .status()
            .unwrap();
        assert!(st.success());
        let disk = GuestDisk {
            raw: img,
            offset: 0,
        };
        assert_eq!(
            disk.read("/etc/kiln/plan.json").unwrap().unwrap(),
            b"{\"a\":1}"
        );
        let s = disk.stat("/etc/kiln/secrets/token").unwrap().unwrap();
        assert_eq!(
            (s.mode & 0o7777, s.kind.as_str(), s.size),
            (0o600, "regular", 6)
        );
        assert_eq!(
            disk.list("/etc/kiln").unwrap().unwrap(),
            vec!["plan.json", "secrets"]
        );
        assert_eq!(disk.stat("/nope").unwrap(), None);
        assert_eq!(disk.read("/nope").unwrap(), None);
    }
}
