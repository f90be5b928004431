//! `kiln-firstboot stage`: fills the verified cache with every pinned artifact of a plan and
//! exits, installing and starting nothing. `kiln bake` runs it inside the image it bakes, so a
//! node booted from that image finds each artifact in `/var/lib/kiln/cache/<sha256>` and its
//! steps download nothing.
//!
//! It goes through the daemon's one download path ([`Fetcher`]): the cache, `local-dir`,
//! air-gap, resume, retries and sha256 verification behave exactly as in a step.

use crate::download::Fetcher;
use crate::fs::Root;
use crate::k3s;
use anyhow::{Context, Result};
use kiln_plan::{Digest, Plan, StepId};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where a staged artifact came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Already in the cache with its pinned sha256.
    Cached,
    /// Fetched now (network or local dir) and verified.
    Fetched,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cached => "cached",
            Source::Fetched => "fetched",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Staged {
    pub step: StepId,
    pub name: String,
    pub digest: Digest,
    pub size: u64,
    pub path: PathBuf,
    pub source: Source,
}

/// The line printed per artifact; `kiln bake` reads these back from the console.
pub fn line(s: &Staged) -> String {
    format!(
        "kiln-stage: staged {} for {} {} {} {} bytes ({})",
        s.name,
        s.step,
        s.digest.algorithm(),
        s.digest.to_hex(),
        s.size,
        s.source.as_str()
    )
}

/// Reads the plan at `plan_path` and stages its artifacts under `root`, printing one line per
/// artifact to `out`. Stops at the first failure, naming the artifact.
pub fn stage_plan(root: &Root, plan_path: &Path, out: &mut dyn Write) -> Result<Vec<Staged>> {
    let bytes =
        std::fs::read(plan_path).with_context(|| format!("reading {}", plan_path.display()))?;
    let plan = Plan::from_json(&bytes).with_context(|| format!("{}", plan_path.display()))?;
    stage(root, &plan, out)
}

/// `artifacts.air-gap` governs `run` on the node; staging is how the artifacts of an
/// air-gapped node get into its image, so it may use the network (the cache and `local-dir`
/// still come first).
pub fn stage(root: &Root, plan: &Plan, out: &mut dyn Write) -> Result<Vec<Staged>> {
    let mut artifacts = plan.artifacts.clone();
    artifacts.air_gap = false;
    let fetcher = Fetcher::new(root, &artifacts);
    let mut staged = Vec::new();
    for (step, artifact) in plan.pinned_artifacts() {
        let started = Instant::now();
        fetcher.set_deadline(Some(started + plan.deadline(step)));
        let (source, also) = if fetcher.cached(artifact)?.is_some() {
            (Source::Cached, None)
        } else if step == StepId::K3s && artifact.name == plan.k3s.binary.name {
            // The same cross-check the k3s step makes before a binary enters the cache.
            (
                Source::Fetched,
                k3s::check_release_pin(&fetcher, &plan.k3s)?,
            )
        } else {
            (Source::Fetched, None)
        };
        let path = fetcher
            .fetch_checked(artifact, also.as_ref())
            .with_context(|| format!("staging {} for step {step}", artifact.name))?;
        let size = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let s = Staged {
            step,
            name: artifact.name.clone(),
            digest: artifact.pin.digest,
            size,
            path,
            source,
        };
        writeln!(out, "{}", line(&s))?;
        staged.push(s);
    }
    out.flush()?;
    Ok(staged)
}
