//! profile → resolve → render → outputs, with errors that keep their profile position.

// ProfileError carries the source text for its snippet; it is built once per failed run, so
// its size on the (cold) error path does not matter.

use crate::diag::ProfileError;
use crate::gzcache::Cache;
use crate::profile::{self, Loaded};
use crate::render::{self, Inputs, Rendered};
use crate::resolve::{self, Env, Resolved};
use crate::source::key_path;
use crate::validate::OverBudget;
use anyhow::{Context, Result};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Profile(Box<ProfileError>),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<ProfileError> for BuildError {
    fn from(e: ProfileError) -> Self {
        BuildError::Profile(Box::new(e))
    }
}

/// Parse + resolve (no daemon, no rendering): `kiln plan` and the first half of everything.
pub fn resolve(path: &Path, env: Env) -> Result<(Loaded, Resolved), ProfileError> {
    let loaded = profile::load(path)?;
    let resolved = resolve::resolve(&loaded, env)?;
    Ok((loaded, resolved))
}

/// Everything `kiln build` does except writing files.
pub fn build(
    path: &Path,
    daemon: &[u8],
    epoch: u64,
    env: Env,
) -> Result<(Resolved, Rendered), BuildError> {
    build_cached(path, daemon, epoch, env, None)
}

/// [`build`], taking compressed bundle members from `cache` (same output bytes).
pub fn build_cached(
    path: &Path,
    daemon: &[u8],
    epoch: u64,
    env: Env,
    cache: Option<&Cache>,
) -> Result<(Resolved, Rendered), BuildError> {
    let (loaded, resolved) = resolve(path, env)?;
    let rendered = render_resolved(path, &loaded, &resolved, daemon, epoch, cache)?;
    Ok((resolved, rendered))
}

/// The second half of [`build_cached`], for a caller that has resolved the profile already.
pub fn render_resolved(
    path: &Path,
    loaded: &Loaded,
    resolved: &Resolved,
    daemon: &[u8],
    epoch: u64,
    cache: Option<&Cache>,
) -> Result<Rendered, BuildError> {
    let inputs = Inputs {
        daemon,
        epoch,
        profile_name: path.display().to_string(),
        cache,
    };
    match render::render(resolved, &inputs) {
        Ok(r) => Ok(r),
        Err(e) => match e.downcast::<OverBudget>() {
            Ok(over) => {
                // Point at the profile key behind the largest contributor when there is one
                // (a secret), else at the delivery setting.
                let culprit = resolved
                    .secrets
                    .iter()
                    .find(|s| over.largest.contains(s.node_path));
                let at = match culprit {
                    Some(s) => s.key.split('.').collect::<Vec<_>>(),
                    None => vec!["artifacts", "delivery"],
                };
                Err(loaded
                .sources
                .error(&key_path(&at), true, over.to_string())
                .with_help("shrink the largest contributors, or deliver more by url (the bundle is never in url-mode custom_data)")
                .into())
            }
            Err(e) => Err(BuildError::Other(e)),
        },
    }
}

/// Writes the outputs into `dir`: everything goes to a temporary directory next to it first,
/// so a failure leaves `dir` untouched, and each file then replaces its old version atomically.
pub fn write_outputs(dir: &Path, rendered: &Rendered) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".kiln-out-")
        .tempdir_in(&parent)
        .with_context(|| {
            format!(
                "cannot create a temporary directory in {}",
                parent.display()
            )
        })?;
    for (name, data) in &rendered.files {
        let p = tmp.path().join(name);
        std::fs::write(&p, data).with_context(|| format!("cannot write {}", p.display()))?;
    }
    if !dir.exists() {
        let tmp_path = tmp.keep();
        std::fs::rename(&tmp_path, dir)
            .with_context(|| format!("cannot move {} to {}", tmp_path.display(), dir.display()))?;
        return Ok(());
    }
    for (name, _) in &rendered.files {
        let to = dir.join(name);
        std::fs::rename(tmp.path().join(name), &to)
            .with_context(|| format!("cannot write {}", to.display()))?;
    }
    Ok(())
}
