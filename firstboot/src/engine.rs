//! The step engine: ordered steps with check/apply/verify, a crash-safe journal, retries of
//! transient errors only, and live status.

use crate::download::{DownloadError, Fetcher};
use crate::fs::Root;
use anyhow::{Context, Result};
use kiln_plan::{Plan, Secret, StepId};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Facts a step learns and later steps (or a later run) need, e.g. the node's Tailscale IPs.
/// Persisted in the journal and shown in status; never holds secrets.
pub type Facts = BTreeMap<String, String>;

/// What a step gets to work with.
pub struct Cx<'a> {
    pub plan: &'a Plan,
    pub root: &'a Root,
    pub fetcher: &'a Fetcher,
    /// All facts known so far (from earlier steps and earlier runs). What a step inserts is
    /// recorded as that step's facts in the journal.
    pub facts: &'a mut Facts,
    /// The step's overall deadline; waits inside a step must stop at it.
    pub deadline: Instant,
}

impl Cx<'_> {
    /// Time left until the step's deadline (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Reads a secret file (a node path from the plan, e.g. the Tailscale auth key), trimming
    /// one trailing newline. Errors name the path, never the content.
    pub fn read_secret(&self, node_path: &str) -> Result<Secret> {
        let p = self.root.path(node_path);
        let mut s = std::fs::read_to_string(&p)
            .with_context(|| format!("reading secret file {}", p.display()))?;
        while s.ends_with('\n') || s.ends_with('\r') {
            s.pop();
        }
        Ok(Secret::new(s))
    }

    /// Polls `probe` until it returns `Some`, with a pause between tries, until the step's
    /// deadline; then fails as a [`Transient`] error saying what was awaited.
    pub fn wait_for<T>(
        &self,
        what: &str,
        pause: Duration,
        mut probe: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let mut last_err: Option<anyhow::Error> = None;
        loop {
            match probe() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) if is_transient(&e) => last_err = Some(e),
                Err(e) => return Err(e),
            }
            if Instant::now() + pause >= self.deadline {
                let why = last_err.map(|e| format!(": {e:#}")).unwrap_or_default();
                return Err(Transient(format!("timed out waiting for {what}{why}")).into());
            }
            std::thread::sleep(pause);
        }
    }
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

/// Should the engine retry after `err`? Decided by the outermost cause in the chain that says
/// anything: an explicit [`Transient`], a [`DownloadError`] (5xx, timeouts, cut bodies: yes;
/// 404, checksum mismatch: no), an HTTP client error, or an I/O error of the network kind.
/// Anything else (bad plan, missing file, a program that failed) is permanent.
pub fn is_transient(err: &anyhow::Error) -> bool {
    for cause in err.chain() {
        if cause.is::<Transient>() {
            return true;
        }
        if let Some(d) = cause.downcast_ref::<DownloadError>() {
            return d.is_transient();
        }
        if let Some(r) = cause.downcast_ref::<reqwest::Error>() {
            return crate::download::reqwest_is_transient(r);
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                TimedOut
                    | ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | NotConnected
                    | BrokenPipe
                    | UnexpectedEof
                    | Interrupted
                    | WouldBlock
                    | HostUnreachable
                    | NetworkUnreachable
                    | NetworkDown
            );
        }
    }
    false
}

/// Jittered exponential backoff: `base · 2^n`, capped, each delay drawn from [½d, d].
#[derive(Debug, Clone)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX));
        self.attempt = self.attempt.saturating_add(1);
        let d = exp.min(self.max);
        // Jitter so that many nodes rebuilt together don't hammer a mirror in lockstep.
        d.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}
