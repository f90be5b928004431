//! What the retry policy is made of: the marker for errors worth retrying and the jittered
//! backoff every retry loop (the engine's step loop, downloads, the Tailscale API) waits with.
//! The engine decides what is transient (`engine::is_transient`); this module has no
//! dependencies inside the crate, so every other module may use it.

use std::time::Duration;

/// Marks an error as worth retrying (the engine retries with jittered backoff until the step's
/// deadline). Everything not marked, and not a transient download error, fails the step at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Transient(pub String);

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
