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
    /// partition table; the root partition's start for cloud images).
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
    /// Flattens `overlay` (with its backing chain) into `raw` and finds the root filesystem in
    /// it (bare ext4, or the ext4 partition of a GPT cloud image). The VM must be stopped.
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
        let offset = root_offset(raw)?;
        // The copy is ours to change: replay the ext4 journal (and repair) so a guest that died
        // uncleanly (deadline, hard reset) reads as it would after its own next boot.
        let fsck = Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(with_offset(raw, offset))
            .output()
            .context("running e2fsck")?;
        if fsck.status.code().unwrap_or(8) >= 4 {
            bail!(
                "e2fsck {} could not repair the guest filesystem: {}",
                raw.display(),
                String::from_utf8_lossy(&fsck.stdout).trim()
            );
        }
        Ok(GuestDisk {
            raw: raw.to_path_buf(),
            offset,
        })
    }

    fn device(&self) -> String {
        with_offset(&self.raw, self.offset)
    }

    fn debugfs(&self, request: &str) -> Result<(String, String)> {
        let out = Command::new("debugfs")
            // -c: read-only, bitmaps not loaded, so a disk whose guest died uncleanly reads too.
            .arg("-c")
            .arg("-R")
            .arg(request)
            .arg(self.device())
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
            .arg(self.device())
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

/// e2fsprogs opens `file?offset=N` as the filesystem starting N bytes into the file.
fn with_offset(raw: &Path, offset: u64) -> String {
    if offset == 0 {
        raw.display().to_string()
    } else {
        format!("{}?offset={offset}", raw.display())
    }
}

const EXT4_MAGIC_AT: u64 = 1024 + 56;

/// Where the root ext4 filesystem starts: 0 for a bare filesystem (the test image), else the
/// largest GPT partition holding ext4 (Ubuntu cloud images: partition 1).
pub fn root_offset(raw: &Path) -> Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(raw).with_context(|| format!("opening {}", raw.display()))?;
    let mut read_at = |pos: u64, buf: &mut [u8]| -> Result<()> {
        f.seek(SeekFrom::Start(pos))?;
        f.read_exact(buf)
            .with_context(|| format!("reading {} at {pos}", raw.display()))
    };
    let is_ext4 = |read_at: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>, base: u64| -> bool {
        let mut m = [0u8; 2];
        read_at(base + EXT4_MAGIC_AT, &mut m).is_ok() && m == [0x53, 0xEF]
    };
    if is_ext4(&mut read_at, 0) {
        return Ok(0);
    }
    let mut hdr = [0u8; 92];
    read_at(512, &mut hdr)?;
    if &hdr[..8] != b"EFI PART" {
        bail!(
            "{}: neither an ext4 filesystem nor a GPT disk",
            raw.display()
        );
    }
    let le64 = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap());
    let le32 = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().unwrap());
    let (entries_lba, count, size) = (
        le64(&hdr[72..]),
        le32(&hdr[80..]).min(256),
        le32(&hdr[84..]) as u64,
    );
    let mut best: Option<(u64, u64)> = None; // (sectors, first byte)
    for i in 0..count as u64 {
        let mut e = vec![0u8; size.max(48) as usize];
        read_at(entries_lba * 512 + i * size, &mut e)?;
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(&e[32..]), le64(&e[40..]));
        let start = first * 512;
        if last >= first
            && is_ext4(&mut read_at, start)
            && best.is_none_or(|(n, _)| last - first > n)
        {
            best = Some((last - first, start));
        }
    }
    best.map(|(_, start)| start)
        .with_context(|| format!("{}: no ext4 partition in its GPT", raw.display()))
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
        drop(disk);

        // The same filesystem as partition 1 of a GPT disk (the cloud-image layout).
        let fs_bytes = {
            let st = Command::new("mkfs.ext4")
                .args(["-q", "-F", "-d"])
                .arg(&tree)
                .arg(dir.path().join("p.raw"))
                .arg("8M")
                .status()
                .unwrap();
            assert!(st.success());
            std::fs::read(dir.path().join("p.raw")).unwrap()
        };
        let mut gpt = vec![0u8; 1 << 20];
        gpt[512..520].copy_from_slice(b"EFI PART");
        gpt[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        gpt[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        gpt[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let entry = 1024;
        gpt[entry..entry + 16].copy_from_slice(&[0xAF; 16]);
        gpt[entry + 32..entry + 40].copy_from_slice(&2048u64.to_le_bytes());
        gpt[entry + 40..entry + 48]
            .copy_from_slice(&(2048 + fs_bytes.len() as u64 / 512 - 1).to_le_bytes());
        gpt.extend_from_slice(&fs_bytes);
        let disk_path = dir.path().join("gpt.raw");
        std::fs::write(&disk_path, &gpt).unwrap();
        assert_eq!(root_offset(&disk_path).unwrap(), 1 << 20);
        let disk = GuestDisk {
            raw: disk_path,
            offset: 1 << 20,
        };
        assert_eq!(
            disk.read("/etc/kiln/plan.json").unwrap().unwrap(),
            b"{\"a\":1}"
        );
        assert_eq!(
            disk.list("/etc/kiln").unwrap().unwrap(),
            vec!["plan.json", "secrets"]
        );
    }
}
