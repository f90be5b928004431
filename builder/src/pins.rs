//! Pins in a profile: every downloaded artifact has a digest (`sha256:<hex>` or
//! `sha512:<hex>`) and optionally a `size` in bytes. `kiln build` refuses a missing pin, an
//! all-zero placeholder and a zero size, at the key, so a payload that cannot provision a real
//! node is never written. (`kiln lock` fills pins in from upstream's checksum publications.)

// ProfileError carries the source text for its snippet; it is built once per failed run, so
// its size on the (cold) error path does not matter.

use crate::diag::ProfileError;
use crate::source::{Seg, Sources};
use kiln_plan::{Digest, Pin};

/// Where a pin lives in the profile: the mapping that holds it and its two key names.
#[derive(Debug, Clone)]
pub struct PinKeys {
    pub parent: Vec<Seg>,
    pub digest: &'static str,
    pub size: &'static str,
}

impl PinKeys {
    pub fn new(parent: Vec<Seg>, digest: &'static str, size: &'static str) -> PinKeys {
        PinKeys {
            parent,
            digest,
            size,
        }
    }
    /// `digest` / `size` under the parent mapping (`k3s`, `tailscale`, …).
    pub fn plain(parent: &[&str]) -> PinKeys {
        PinKeys::new(crate::source::key_path(parent), "digest", "size")
    }
    pub fn digest_path(&self) -> Vec<Seg> {
        let mut p = self.parent.clone();
        p.push(Seg::Key(self.digest.into()));
        p
    }
    pub fn size_path(&self) -> Vec<Seg> {
        let mut p = self.parent.clone();
        p.push(Seg::Key(self.size.into()));
        p
    }
}

const HOW: &str = "pin it as `sha256:<hex>` or `sha512:<hex>` from upstream's own checksums, or run `kiln lock PROFILE` to fill it in";

/// The profile's pin at `keys`, refusing what could never verify a real download.
pub fn require(
    s: &Sources,
    keys: &PinKeys,
    digest: Option<Digest>,
    size: Option<u64>,
) -> Result<Pin, ProfileError> {
    let Some(digest) = digest else {
        let name = crate::source::display_path(&keys.digest_path());
        return Err(s
            .error(
                &keys.digest_path(),
                true,
                format!("missing pin `{name}`: kiln downloads nothing unpinned"),
            )
            .with_help(HOW));
    };
    if digest.is_all_zero() {
        return Err(s
            .error(
                &keys.digest_path(),
                false,
                "the all-zero placeholder is not a digest: the node would refuse every download",
            )
            .with_help(HOW));
    }
    if size == Some(0) {
        return Err(s.error(
            &keys.size_path(),
            false,
            "a size of 0 bytes is a placeholder, not a pinned length: give the artifact's exact length or leave `size` out",
        ));
    }
    Ok(Pin { digest, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_digest_and_size_paths() {
        let k = PinKeys::new(
            crate::source::key_path(&["tailscale", "operator"]),
            "chart-digest",
            "chart-size",
        );
        assert_eq!(
            crate::source::display_path(&k.digest_path()),
            "tailscale.operator.chart-digest"
        );
        assert_eq!(
            crate::source::display_path(&PinKeys::plain(&["k3s"]).size_path()),
            "k3s.size"
        );
    }
}
