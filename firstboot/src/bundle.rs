//! Tamper check of the unpacked release bundle, before any step runs.
//!
//! The bootstrap verified `bundle.tar.gz` against the pin in the cloud-config and unpacked it
//! to `/var/lib/kiln/bundle/`. Between then and now (a reboot, days later) anything on disk may
//! have changed, so the daemon re-checks: every file `SHA256SUMS` lists must hash to its line,
//! no other file may be in the bundle dir, and the bundle's `plan.json` must be byte-identical
//! to the plan the daemon is about to run. When the tarball and its pin are still there, they
//! must agree too.

use crate::download::sha256_file;
use crate::fs::Root;
use anyhow::{bail, Context, Result};
use kiln_plan::{paths, Sha256};
use std::collections::BTreeMap;
use std::path::{Component, Path};

#[derive(Debug, PartialEq, Eq)]
pub enum BundleCheck {
    /// No `SHA256SUMS`: nothing to check against (a plan written by hand, a `--root` test).
    Absent,
    Verified {
        files: usize,
    },
}

/// Parses `sha256sum` output (`<hex>  <name>` or `<hex> *<name>`).
pub fn parse_sums(text: &str) -> Result<BTreeMap<String, Sha256>> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (hex, rest) = line
            .split_once(' ')
            .with_context(|| format!("SHA256SUMS line {}: not `<sha256>  <file>`", n + 1))?;
        let name = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .with_context(|| format!("SHA256SUMS line {}: not `<sha256>  <file>`", n + 1))?;
        let sha: Sha256 = hex
            .parse()
            .with_context(|| format!("SHA256SUMS line {}", n + 1))?;
        let safe = !name.is_empty()
            && Path::new(name)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !safe {
            bail!("SHA256SUMS line {}: unsafe file name {name:?}", n + 1);
        }
        if out.insert(name.to_string(), sha).is_some() {
            bail!("SHA256SUMS lists {name:?} twice");
        }
    }
    Ok(out)
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        let ft = e.file_type()?;
        if ft.is_dir() {
            walk(&e.path(), &format!("{name}/"), out)?;
        } else {
            out.push(name);
        }
    }
    Ok(())
}

/// Verifies the bundle against its `SHA256SUMS` and `plan_bytes`; an error means: refuse.
pub fn verify(root: &Root, plan_bytes: &[u8]) -> Result<BundleCheck> {
    let dir = root.path(paths::BUNDLE_DIR);
    let sums_path = dir.join("SHA256SUMS");
    if !sums_path.exists() {
        return Ok(BundleCheck::Absent);
    }
    let text = std::fs::read_to_string(&sums_path)
        .with_context(|| format!("reading {}", sums_path.display()))?;
    let sums = parse_sums(&text).with_context(|| format!("in {}", sums_path.display()))?;
    let mut present = Vec::new();
    walk(&dir, "", &mut present)?;
    for name in &present {
        if name != "SHA256SUMS" && !sums.contains_key(name) {
            bail!(
                "bundle tampered: {} is not listed in SHA256SUMS",
                dir.join(name).display()
            );
        }
    }
    for (name, want) in &sums {
        let p = dir.join(name);
        let meta = std::fs::symlink_metadata(&p)
            .with_context(|| format!("bundle tampered: {} is missing", p.display()))?;
        if !meta.is_file() {
            bail!("bundle tampered: {} is not a regular file", p.display());
        }
        let got = sha256_file(&p)?;
        if got != *want {
            bail!(
                "bundle tampered: {} has sha256 {got}, SHA256SUMS says {want}",
                p.display()
            );
        }
    }
    let bundle_plan = dir.join("plan.json");
    if !sums.contains_key("plan.json") {
        bail!("bundle tampered: SHA256SUMS does not list plan.json");
    }
    let bp = std::fs::read(&bundle_plan)
        .with_context(|| format!("reading {}", bundle_plan.display()))?;
    if bp != plan_bytes {
        bail!(
            "plan mismatch: the plan differs from the bundle's verified {} (sha256 {} vs {})",
            bundle_plan.display(),
            Sha256::digest(plan_bytes),
            Sha256::digest(&bp)
        );
    }
    // The pin (written by cloud-init from the payload) is what makes SHA256SUMS trustworthy:
    // whoever can edit a bundle file can rewrite SHA256SUMS too. So with a pin on the node, the
    // pinned tarball must still be there and its own SHA256SUMS must equal the unpacked one.
    let pin_path = root.path(paths::BUNDLE_PIN);
    let tar_path = root.path(paths::BUNDLE_TARBALL);
    if pin_path.exists() && !tar_path.exists() {
        bail!(
            "bundle tampered: {} is missing, so the unpacked bundle cannot be checked against the pin in {}",
            tar_path.display(),
            pin_path.display()
        );
    }
    if pin_path.exists() {
        let pin_text = std::fs::read_to_string(&pin_path)
            .with_context(|| format!("reading {}", pin_path.display()))?;
        let pin: Sha256 = pin_text
            .split_whitespace()
            .next()
            .unwrap_or("")
            .parse()
            .with_context(|| format!("in {}", pin_path.display()))?;
        let got = sha256_file(&tar_path)?;
        if got != pin {
            bail!(
                "bundle tampered: {} has sha256 {got}, the pin in {} is {pin}",
                tar_path.display(),
                pin_path.display()
            );
        }
        let pinned = sums_in_tarball(&tar_path)?;
        if pinned != text.as_bytes() {
            bail!(
                "bundle tampered: {} differs from the SHA256SUMS inside the pinned {}",
                sums_path.display(),
                tar_path.display()
            );
        }
    }
    Ok(BundleCheck::Verified { files: sums.len() })
}

/// The `SHA256SUMS` member of the (already pin-verified) bundle tarball.
fn sums_in_tarball(tar_path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f =
        std::fs::File::open(tar_path).with_context(|| format!("opening {}", tar_path.display()))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    for entry in ar
        .entries()
        .with_context(|| format!("reading {}", tar_path.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading {}", tar_path.display()))?;
        let path = entry.path()?.into_owned();
        let name = path.strip_prefix(".").unwrap_or(&path);
        if name == Path::new("SHA256SUMS") {
            let mut buf = Vec::new();
            entry
                .read_to_end(&mut buf)
                .with_context(|| format!("reading SHA256SUMS in {}", tar_path.display()))?;
            return Ok(buf);
        }
    }
    bail!(
        "bundle tampered: the pinned {} has no SHA256SUMS",
        tar_path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::write_atomic;

    fn bundle(root: &Root, files: &[(&str, &[u8])]) {
        let dir = root.path(paths::BUNDLE_DIR);
        let mut sums = String::new();
        for (n, b) in files {
            write_atomic(&dir.join(n), b, 0o644).unwrap();
            sums.push_str(&format!("{}  {n}\n", Sha256::digest(b)));
        }
        write_atomic(&dir.join("SHA256SUMS"), sums.as_bytes(), 0o644).unwrap();
    }

    #[test]
    fn intact_bundle_verifies() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        bundle(
            &root,
            &[("plan.json", b"{}"), ("manifests/a.yaml", b"a: 1")],
        );
        assert_eq!(
            verify(&root, b"{}").unwrap(),
            BundleCheck::Verified { files: 2 }
        );
    }

    #[test]
    fn changed_byte_extra_file_and_other_plan_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        bundle(
            &root,
            &[("plan.json", b"{}"), ("manifests/a.yaml", b"a: 1")],
        );
        let dir = root.path(paths::BUNDLE_DIR);
        let e = verify(&root, b"{ }").unwrap_err();
        assert!(format!("{e:#}").contains("plan mismatch"), "{e:#}");

        std::fs::write(dir.join("manifests/a.yaml"), b"a: 2").unwrap();
        let e = verify(&root, b"{}").unwrap_err();
        assert!(format!("{e:#}").contains("a.yaml has sha256"), "{e:#}");

        std::fs::write(dir.join("manifests/a.yaml"), b"a: 1").unwrap();
        std::fs::write(dir.join("manifests/evil.yaml"), b"x").unwrap();
        let e = verify(&root, b"{}").unwrap_err();
        assert!(
            format!("{e:#}").contains("evil.yaml is not listed"),
            "{e:#}"
        );
    }

    #[test]
    fn no_sums_means_nothing_to_check() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            verify(&Root::new(d.path()), b"{}").unwrap(),
            BundleCheck::Absent
        );
    }

    #[test]
    fn sums_parser_rejects_traversal_and_garbage() {
        assert!(parse_sums(&format!("{}  ../x\n", "a".repeat(64))).is_err());
        assert!(parse_sums("nonsense\n").is_err());
        let ok = parse_sums(&format!("{} *bin\n", "b".repeat(64))).unwrap();
        assert!(ok.contains_key("bin"));
    }
}
