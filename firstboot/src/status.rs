//! Live status: `/run/kiln/status.json` (0644, replaced atomically at every state change) and
//! its human rendering for `kiln-firstboot status`. It holds what the journal holds minus
//! nothing secret (the journal never has secrets either), plus the run's own state.

use crate::fs::{write_atomic, Root};
use crate::journal::Facts;
use crate::journal::{StepRecord, StepState};
use anyhow::{Context, Result};
use kiln_plan::{paths, Sha256, StepId};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

pub const STATUS_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Reading and checking the plan and bundle.
    Starting,
    Running,
    /// Every step is done or skipped.
    Done,
    Failed,
    /// Refused to run anything (bad plan, tampered bundle, another daemon running).
    Refused,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Done => "done",
            RunState::Failed => "failed",
            RunState::Refused => "refused",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Status {
    pub version: u32,
    pub state: RunState,
    pub pid: u32,
    pub instance_id: Option<String>,
    pub plan_sha256: Option<Sha256>,
    pub started_at: String,
    pub updated_at: String,
    pub ended_at: Option<String>,
    pub current_step: Option<StepId>,
    pub last_error: Option<String>,
    pub steps: Vec<StepRecord>,
    pub facts: Facts,
    /// The daemon's own use so far (its threads, not the programs it runs).
    #[serde(default)]
    pub resources: Option<Resources>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Resources {
    /// User + system CPU time.
    pub cpu_ms: u64,
    /// Peak resident set size.
    pub max_rss_kib: u64,
}

impl Resources {
    /// getrusage(RUSAGE_SELF): this process only, all threads, no children.
    #[allow(unsafe_code)] // libc calls; each block says why it is sound
    pub fn of_self() -> Resources {
        // SAFETY: getrusage fills a plain struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
        Resources {
            cpu_ms: ms(ru.ru_utime) + ms(ru.ru_stime),
            max_rss_kib: ru.ru_maxrss as u64,
        }
    }
}

impl std::fmt::Display for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "daemon cpu {:.2}s, peak rss {:.1} MiB",
            self.cpu_ms as f64 / 1000.0,
            self.max_rss_kib as f64 / 1024.0
        )
    }
}

impl Status {
    pub fn new() -> Status {
        let now = crate::time::now();
        Status {
            version: STATUS_VERSION,
            state: RunState::Starting,
            pid: std::process::id(),
            instance_id: None,
            plan_sha256: None,
            started_at: now.clone(),
            updated_at: now,
            ended_at: None,
            current_step: None,
            last_error: None,
            steps: Vec::new(),
            facts: Facts::new(),
            resources: None,
        }
    }

    pub fn path(root: &Root) -> std::path::PathBuf {
        root.path(paths::STATUS)
    }

    pub fn write(&mut self, root: &Root) -> Result<()> {
        self.updated_at = crate::time::now();
        self.resources = Some(Resources::of_self());
        let mut bytes = serde_json::to_vec_pretty(self).context("serializing status")?;
        bytes.push(b'\n');
        write_atomic(&Status::path(root), &bytes, 0o644)
    }

    pub fn from_json(bytes: &[u8]) -> Result<Status> {
        let s: Status = serde_json::from_slice(bytes).context("status is not valid")?;
        if s.version != STATUS_VERSION {
            anyhow::bail!("status version {} is not supported", s.version);
        }
        Ok(s)
    }

    pub fn read(root: &Root) -> Result<Status> {
        let p = Status::path(root);
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        Status::from_json(&bytes).with_context(|| format!("in {}", p.display()))
    }

    /// A timeline for people: one line per step, then facts and the last error.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "kiln-firstboot: {} (pid {}, instance {}, started {})",
            self.state.as_str(),
            self.pid,
            self.instance_id.as_deref().unwrap_or("?"),
            self.started_at
        );
        if let Some(s) = self.current_step {
            let _ = writeln!(o, "current step: {s}");
        }
        for r in &self.steps {
            let mark = match r.state {
                StepState::Done => "✔",
                StepState::Skipped => "✔",
                StepState::NotApplicable => "–",
                StepState::Failed => "✘",
                StepState::Running => "…",
                StepState::Pending => " ",
            };
            let dur = r
                .duration_ms
                .map(|ms| format!("{:>7.1}s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "        ".into());
            let at = r.started_at.as_deref().unwrap_or("");
            let tries = if r.attempts > 1 {
                format!("  ({} attempts)", r.attempts)
            } else {
                String::new()
            };
            let _ = writeln!(
                o,
                " {mark} {:<20} {:<8} {dur}  {at}{tries}",
                r.id.as_str(),
                r.state.as_str()
            );
            if let (Some(e), false) = (&r.last_error, r.state.is_satisfied()) {
                let _ = writeln!(o, "     error: {e}");
            }
        }
        if !self.facts.is_empty() {
            let _ = writeln!(o, "facts:");
            for (k, v) in &self.facts {
                let _ = writeln!(o, "  {k}: {v}");
            }
        }
        if let Some(e) = &self.last_error {
            let _ = writeln!(o, "last error: {e}");
        }
        if let Some(r) = &self.resources {
            let _ = writeln!(o, "resources: {r}");
        }
        o
    }
}

impl Default for Status {
    fn default() -> Self {
        Status::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn status_is_world_readable_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        let mut s = Status::new();
        s.steps.push(StepRecord::new(StepId::K3s));
        s.write(&root).unwrap();
        let mode = std::fs::metadata(Status::path(&root))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        assert_eq!(Status::read(&root).unwrap(), s);
        assert!(s.render().contains("k3s"));
    }
}
