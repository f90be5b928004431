//! The build's own proof that no secret leaks into what it renders: every secret value it
//! read (env and file references; Key Vault references have none at build time) is searched,
//! as written and base64-encoded, in every output. A value may appear only in its own 0600
//! `write_files` entry of user-data (and so in the seed that carries that user-data, and in
//! custom_data.gz, its gzip); anywhere else (the plan, the bundle, meta-data, build.json, the
//! bootstrap, another key of user-data) fails the build.

use crate::resolve::SecretFile;
use anyhow::{bail, Result};
use base64::Engine;
use std::io::Read;

/// Values shorter than this are not searched: they would match by chance.
const MIN_LEN: usize = 8;

/// What may hold a secret: `user-data` (exactly its secret entries), the `seed` (the same),
/// and the rest (never).
pub struct Outputs<'a> {
    pub user_data: &'a str,
    pub seed: &'a [u8],
    /// The bundle as rendered (gzip): searched decompressed.
    pub bundle_gz: &'a [u8],
    /// Everything else by name: plan.json, meta-data, build.json, the bootstrap.
    pub others: Vec<(&'a str, &'a [u8])>,
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || hay.len() < needle.len() {
        return 0;
    }
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Fails, naming the profile key and the output but never the value, when a secret value
/// appears where it must not.
pub fn check(secrets: &[SecretFile], out: &Outputs) -> Result<()> {
    if secrets.is_empty() {
        return Ok(());
    }
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(out.bundle_gz).read_to_end(&mut tar)?;
    for s in secrets {
        let v = s.value.expose();
        if v.len() < MIN_LEN {
            continue;
        }
        // Its own entries: cloud-init writes `content: "<json string>"`, verbatim unless the
        // value needs escaping.
        let own = secrets
            .iter()
            .filter(|o| o.value.expose() == v)
            .filter(|_| serde_json::to_string(v).is_ok_and(|j| j.contains(v)))
            .count();
        let b64 = base64::engine::general_purpose::STANDARD.encode(v);
        let leak = |what: &str| {
            anyhow::anyhow!(
                "the secret of {} ({}) appears in {what}: a secret may only be in its own 0600 file entry; refusing to write outputs",
                s.key,
                s.source
            )
        };
        for (name, bytes, allowed) in [
            ("user-data", out.user_data.as_bytes(), own),
            ("seed.img", out.seed, own),
            ("the bundle", &tar[..], 0),
        ] {
            if count(bytes, v.as_bytes()) > allowed {
                return Err(leak(name));
            }
            if count(bytes, b64.as_bytes()) > 0 {
                return Err(leak(&format!("{name}, base64-encoded")));
            }
        }
        for (name, bytes) in &out.others {
            if count(bytes, v.as_bytes()) > 0 || count(bytes, b64.as_bytes()) > 0 {
                return Err(leak(name));
            }
        }
    }
    Ok(())
}

/// A Key Vault-only payload: no secret file entry at all in user-data.
pub fn secret_entries(user_data: &str) -> Result<usize> {
    let doc: serde_yaml::Value = serde_yaml::from_str(user_data)?;
    let Some(files) = doc["write_files"].as_sequence() else {
        bail!("user-data has no write_files")
    };
    Ok(files
        .iter()
        .filter(|f| {
            f["path"]
                .as_str()
                .is_some_and(|p| p.starts_with(kiln_plan::paths::SECRETS_DIR))
        })
        .count())
}
