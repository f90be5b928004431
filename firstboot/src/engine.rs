//! The step engine: ordered steps with check/apply/verify, a crash-safe journal, retries of
//! transient errors only, and live status.

use crate::download::Fetcher;
use crate::fs::Root;
use anyhow::Result;
use kiln_plan::{Plan, StepId};
use std::collections::BTreeMap;
use std::time::Instant;

/// Facts a step learns and later steps (or a later run) need, e.g. the node's Tailscale IPs.
/// Persisted in the journal; never holds secrets.
pub type Facts = BTreeMap<String, String>;

/// What a step gets to work with.
pub struct Cx<'a> {
    pub plan: &'a Plan,
    pub root: &'a Root,
    pub fetcher: &'a Fetcher,
    pub facts: &'a mut Facts,
    /// The step's overall deadline; waits inside a step must stop at it.
    pub deadline: Instant,
}

/// One idempotent unit of work.
pub trait Step {
    fn id(&self) -> StepId;
    /// Is the desired state already there? `true` skips `apply`.
    fn check(&self, cx: &mut Cx) -> Result<bool>;
    fn apply(&self, cx: &mut Cx) -> Result<()>;
    /// Proves `apply` worked; runs after every apply (and after a passing check on re-verify).
    fn verify(&self, cx: &mut Cx) -> Result<()>;
}

/// Marks an error as worth retrying (the engine retries with jittered backoff until the step's
/// deadline). Everything not marked, and not a transient download error, fails the step at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Transient(pub String);
