//! Base images: the Debian 12 test image (built from the recipe in `images/debian-12-test/`,
//! cached per machine under the recipe's hash) and user-supplied cloud images (Ubuntu 22.04).

use std::fs;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The recipe travels inside the binary so `kiln qemu` works from any directory.
pub const DEBIAN_12_TEST_RECIPE: &str = include_str!("../../images/debian-12-test/build.sh");
pub const DEBIAN_12_TEST: &str = "debian-12-test";

/// How the VM starts the image.
#[derive(Debug, Clone)]
pub enum Boot {
    /// QEMU loads kernel and initrd itself (the test image: no bootloader, faster under TCG).
    DirectKernel {
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
    },
    /// The image's own bootloader via SeaBIOS (cloud images).
    Firmware,
}

#[derive(Debug, Clone)]
pub struct BaseImage {
    pub name: String,
    pub disk: PathBuf,
    /// `qcow2` or `raw`, as QEMU calls it.
    pub disk_format: String,
    pub boot: Boot,
}

impl BaseImage {
    /// A Linux kernel for the KVM probe: the image's own for direct boot, else the cached test
    /// image's (cloud images hide theirs inside the disk).
    pub fn probe_kernel(&self) -> Option<PathBuf> {
        match &self.boot {
            Boot::DirectKernel { kernel, .. } => Some(kernel.clone()),
            Boot::Firmware => load_test_image(&test_image_dir(&cache_root()))
                .ok()
                .and_then(|t| match t.boot {
                    Boot::DirectKernel { kernel, .. } => Some(kernel),
                    Boot::Firmware => None,
                }),
        }
    }
}

/// `image.json` written by the recipe.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestImageManifest {
    name: String,
    boot: String,
    disk: String,
    kernel: String,
    initrd: String,
    cmdline: String,
    #[allow(dead_code)]
    kernel_version: String,
    #[allow(dead_code)]
    cloud_init_version: String,
    #[allow(dead_code)]
    rootfs_seconds: u64,
    #[allow(dead_code)]
    image_seconds: u64,
}

/// First 16 hex digits of the recipe's sha256: the cache key.
pub fn recipe_key() -> String {
    hex::encode(Sha256::digest(DEBIAN_12_TEST_RECIPE.as_bytes()))[..16].to_string()
}

/// `$KILN_IMAGE_CACHE`, else `$XDG_CACHE_HOME/kiln/images`, else `~/.cache/kiln/images`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_IMAGE_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("kiln").join("images")
}

/// Where the test image for the current recipe lives (built or not).
pub fn test_image_dir(cache: &Path) -> PathBuf {
    cache.join(format!("{DEBIAN_12_TEST}-{}", recipe_key()))
}

/// Loads the cached test image, building it first when missing. Concurrent callers wait on a
/// lock file instead of building twice.
#[allow(unsafe_code)] // flock(2); the block says why it is sound
pub fn ensure_test_image(cache: &Path) -> Result<BaseImage> {
    let dir = test_image_dir(cache);
    if let Ok(img) = load_test_image(&dir) {
        return Ok(img);
    }
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let lock_path = cache.join(format!(".{DEBIAN_12_TEST}.lock"));
    let lock = fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    // SAFETY: flock on an fd we own; released when `lock` drops.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", lock_path.display()));
    }
    if let Ok(img) = load_test_image(&dir) {
        return Ok(img);
    }
    let recipe = cache.join(format!(".{DEBIAN_12_TEST}-{}.build.sh", recipe_key()));
    let mut f =
        fs::File::create(&recipe).with_context(|| format!("writing {}", recipe.display()))?;
    f.write_all(DEBIAN_12_TEST_RECIPE.as_bytes())?;
    drop(f);
    eprintln!(
        "kiln: building the {DEBIAN_12_TEST} image into {} (takes a few minutes once per machine)",
        dir.display()
    );
    let status = Command::new("bash")
        .arg(&recipe)
        .arg(&dir)
        .status()
        .with_context(|| format!("running {}", recipe.display()))?;
    let _ = fs::remove_file(&recipe);
    if !status.success() {
        bail!(
            "building the {DEBIAN_12_TEST} image failed ({status}); see the recipe's output above"
        );
    }
    load_test_image(&dir)
}

pub fn load_test_image(dir: &Path) -> Result<BaseImage> {
    let manifest_path = dir.join("image.json");
    let text = fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let m: TestImageManifest = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", manifest_path.display()))?;
    if m.boot != "direct-kernel" {
        bail!("{}: unsupported boot {:?}", manifest_path.display(), m.boot);
    }
    let img = BaseImage {
        name: m.name,
        disk: dir.join(&m.disk),
        disk_format: "qcow2".into(),
        boot: Boot::DirectKernel {
            kernel: dir.join(&m.kernel),
            initrd: dir.join(&m.initrd),
            cmdline: m.cmdline,
        },
    };
    for p in [&img.disk] {
        if !p.is_file() {
            bail!("{} is missing", p.display());
        }
    }
    Ok(img)
}

/// A cloud image given by path (e.g. Ubuntu's jammy-server-cloudimg-amd64.img, which is qcow2).
pub fn cloud_image(path: &Path) -> Result<BaseImage> {
    let mut head = [0u8; 4];
    let mut f =
        fs::File::open(path).with_context(|| format!("opening image {}", path.display()))?;
    std::io::Read::read_exact(&mut f, &mut head)
        .with_context(|| format!("reading {}", path.display()))?;
    let disk_format = if &head == b"QFI\xfb" { "qcow2" } else { "raw" };
    Ok(BaseImage {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        disk: path
            .canonicalize()
            .with_context(|| format!("resolving {}", path.display()))?,
        disk_format: disk_format.into(),
        boot: Boot::Firmware,
    })
}

/// `debian-12-test` (built/cached), a directory with an `image.json` (a test image or what
/// `kiln bake` made from one: disk, kernel, initrd), or a path to a cloud image.
pub fn resolve(spec: &str) -> Result<BaseImage> {
    if spec == DEBIAN_12_TEST {
        ensure_test_image(&cache_root())
    } else if Path::new(spec).join("image.json").is_file() {
        load_test_image(Path::new(spec))
    } else {
        cloud_image(Path::new(spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_follows_the_recipe_text() {
        let key = recipe_key();
        assert_eq!(key.len(), 16);
        assert!(test_image_dir(Path::new("/c")).ends_with(format!("debian-12-test-{key}")));
    }

    #[test]
    fn recipe_keeps_the_contracted_settings() {
        // The image must look like the cloud the payload targets in the ways kiln relies on.
        for needle in [
            "datasource_list: [NoCloud, None]",
            "locale: C.UTF-8",
            "mkfs.ext4",
            "cloud-init",
            "apt-daily.timer",
        ] {
            assert!(
                DEBIAN_12_TEST_RECIPE.contains(needle),
                "recipe lost {needle:?}"
            );
        }
    }

    #[test]
    fn cloud_image_format_is_sniffed() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("a.img");
        fs::write(&q, b"QFI\xfb\0\0\0\x03rest").unwrap();
        assert_eq!(cloud_image(&q).unwrap().disk_format, "qcow2");
        let r = dir.path().join("b.raw");
        fs::write(&r, [0u8; 512]).unwrap();
        assert_eq!(cloud_image(&r).unwrap().disk_format, "raw");
        assert!(cloud_image(&dir.path().join("missing")).is_err());
    }
}
