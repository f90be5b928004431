//! Fixed VHDs (baked images) as page blobs: `kiln publish --vhd PATH`.
//!
//! Azure creates managed disks/images only from *fixed* VHDs in page blobs whose virtual size is
//! a whole number of MiB. The file is streamed in 4 MiB pages-aligned chunks; all-zero chunks are
//! not sent (a new page blob reads as zeros), which makes a mostly empty disk cheap to upload.
//! Like bundles, the blob name carries the sha256 and the result is read back and hashed.

use super::upload::{explain, read_back_sha256, redacted, Outcome, ReadBackMismatch};
use anyhow::{bail, Context as _, Result};
use azure_core::http::RequestContent;
use azure_storage_blob::models::{HttpRange, PageBlobClientCreateOptions};
use azure_storage_blob::BlobContainerClient;
use indicatif::ProgressBar;
use kiln_plan::Sha256;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

pub const PAGE: u64 = 512;
/// Largest Put Page body the service accepts.
pub const CHUNK: usize = 4 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

/// `images/<file stem>-<sha256>.vhd`.
pub fn blob_name(path: &Path, sha: &Sha256) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("images/{stem}-{}.vhd", sha.to_hex())
}

/// Checks the file is a fixed VHD Azure can use; returns its size.
pub fn check_fixed_vhd(path: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if size < PAGE || !size.is_multiple_of(PAGE) {
        bail!(
            "{}: {size} bytes is not a whole number of 512-byte pages; Azure needs a fixed VHD",
            path.display()
        );
    }
    let mut footer = [0u8; 512];
    f.seek(SeekFrom::Start(size - PAGE))
        .and_then(|_| f.read_exact(&mut footer))
        .with_context(|| format!("reading the VHD footer of {}", path.display()))?;
    // VHD footer: cookie "conectix", disk type (big-endian u32 at 60): 2 = fixed.
    if &footer[..8] != b"conectix" {
        bail!(
            "{}: no VHD footer (convert with `qemu-img convert -O vpc -o subformat=fixed,force_size`)",
            path.display()
        );
    }
    let disk_type = u32::from_be_bytes(footer[60..64].try_into().expect("4 bytes"));
    if disk_type != 2 {
        bail!(
            "{}: VHD disk type {disk_type} is not fixed (2); Azure needs a fixed VHD",
            path.display()
        );
    }
    if !(size - PAGE).is_multiple_of(MIB) {
        bail!(
            "{}: virtual size {} is not a whole number of MiB, which Azure requires",
            path.display(),
            size - PAGE
        );
    }
    Ok(size)
}

/// sha256 of a file, streamed.
pub fn hash_file(path: &Path) -> Result<Sha256> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Sha256::from_bytes(h.finalize().into()))
}

/// Uploads the VHD at `path` as page blob `name` unless that blob already serves these bytes.
pub async fn upload_verified(
    container: &BlobContainerClient,
    name: &str,
    path: &Path,
    sha: &Sha256,
    progress: &ProgressBar,
) -> Result<Outcome> {
    let size = check_fixed_vhd(path)?;
    let blob = container.blob_client(name);
    let url = redacted(blob.url());
    let existed = blob
        .exists()
        .await
        .map_err(explain)
        .with_context(|| format!("checking whether {url} exists"))?;
    if existed && read_back_sha256(&blob).await? == *sha {
        return Ok(Outcome::AlreadyPresent);
    }

    let pages = blob.page_blob_client();
    let options = PageBlobClientCreateOptions {
        blob_content_type: Some("application/octet-stream".into()),
        metadata: Some(HashMap::from([(
            super::upload::SHA256_METADATA.to_string(),
            sha.to_hex(),
        )])),
        ..Default::default()
    };
    pages
        .create(size, Some(options))
        .await
        .map_err(explain)
        .with_context(|| format!("creating page blob {url} ({size} bytes)"))?;

    progress.set_length(size);
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = (CHUNK as u64).min(size - off) as usize;
        f.read_exact(&mut buf[..n])
            .with_context(|| format!("reading {} at {off}", path.display()))?;
        if buf[..n].iter().any(|&b| b != 0) {
            pages
                .upload_pages(
                    RequestContent::from_slice(&buf[..n]),
                    n as u64,
                    HttpRange::new(off, n as u64),
                    None,
                )
                .await
                .map_err(explain)
                .with_context(|| format!("uploading {url}: pages at {off}+{n}"))?;
        }
        progress.inc(n as u64);
        off += n as u64;
    }
    progress.finish();

    let actual = read_back_sha256(&blob).await?;
    if actual != *sha {
        return Err(ReadBackMismatch {
            url,
            expected: *sha,
            actual,
        }
        .into());
    }
    Ok(if existed {
        Outcome::Replaced
    } else {
        Outcome::Uploaded
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vhd(dir: &Path, data_mib: u64, disk_type: u32) -> std::path::PathBuf {
        let p = dir.join("disk image.vhd");
        let mut bytes = vec![0u8; (data_mib * MIB) as usize];
        bytes[0] = 1;
        let mut footer = [0u8; 512];
        footer[..8].copy_from_slice(b"conectix");
        footer[60..64].copy_from_slice(&disk_type.to_be_bytes());
        bytes.extend_from_slice(&footer);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn fixed_mib_aligned_vhds_pass_and_others_say_why() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(check_fixed_vhd(&vhd(d.path(), 1, 2)).unwrap(), MIB + 512);
        let dynamic = vhd(d.path(), 1, 3);
        assert!(check_fixed_vhd(&dynamic)
            .unwrap_err()
            .to_string()
            .contains("not fixed"));
        let raw = d.path().join("raw.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert!(check_fixed_vhd(&raw)
            .unwrap_err()
            .to_string()
            .contains("no VHD footer"));
        let odd = d.path().join("odd.vhd");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        assert!(check_fixed_vhd(&odd)
            .unwrap_err()
            .to_string()
            .contains("512-byte pages"));
    }

    #[test]
    fn blob_names_are_content_addressed_and_url_safe() {
        let sha = Sha256::digest(b"x");
        assert_eq!(
            blob_name(Path::new("/tmp/disk image.vhd"), &sha),
            format!("images/disk-image-{sha}.vhd")
        );
    }
}
