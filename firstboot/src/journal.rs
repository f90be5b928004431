//! The journal: what the daemon has done on this instance, step by step.
//!
//! `/var/lib/kiln/journal.json`, 0600, replaced atomically on every state change, so a crash at
//! any instant leaves the previous or the next state. It is keyed by cloud-init's instance id:
//! a rebuilt VM (new instance id, same disk image or a baked one) starts a fresh journal and
//! the old one is kept as `journal.<old-id>.json`. It never holds secrets: errors are recorded
//! as the engine's messages (which redact them) and facts are non-secret by contract.

use crate::fs::{write_atomic, Root};
use anyhow::{Context, Result};
use kiln_plan::{paths, Sha256, StepId};
use serde::{Deserialize, Serialize};
use std::fs;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

/// Facts a step learns and later steps (or a later run) need, e.g. the node's Tailscale IPs.
/// Persisted in the journal and shown in status; never holds secrets.
pub type Facts = std::collections::BTreeMap<String, String>;

pub const JOURNAL_VERSION: u32 = 1;

/// A step's state: the plan crate's, shared with the harness that reads status and milestones.
pub use kiln_plan::StepState;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StepRecord {
    pub id: StepId,
    pub state: StepState,
    /// Attempts in the current (or last) run of this step, counting retries.
    pub attempts: u32,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub duration_ms: Option<u64>,
    pub last_error: Option<String>,
    /// When `apply` last succeeded on this instance (kept when a later run skips the step).
    pub applied_at: Option<String>,
    /// Facts this step produced.
    pub facts: Facts,
}

impl StepRecord {
    pub fn new(id: StepId) -> StepRecord {
        StepRecord {
            id,
            state: StepState::Pending,
            attempts: 0,
            started_at: None,
            ended_at: None,
            duration_ms: None,
            last_error: None,
            applied_at: None,
            facts: Facts::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Journal {
    pub version: u32,
    pub instance_id: String,
    /// sha256 of the plan file the last run used.
    pub plan_sha256: Sha256,
    pub created_at: String,
    /// How many times the daemon has started on this instance.
    pub runs: u32,
    pub steps: Vec<StepRecord>,
}

/// How [`Journal::open`] found things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    Fresh,
    Resumed,
    /// The instance id changed; the old journal was kept under this path.
    NewInstance {
        old_id: String,
        kept: PathBuf,
    },
    /// The journal could not be read; it was kept under this path and a fresh one started.
    Unreadable {
        kept: PathBuf,
        reason: String,
    },
}

impl Journal {
    pub fn path(root: &Root) -> PathBuf {
        root.path(paths::JOURNAL)
    }

    /// Parses journal bytes strictly (unknown fields are errors).
    pub fn from_json(bytes: &[u8]) -> Result<Journal> {
        let j: Journal = serde_json::from_slice(bytes).context("journal is not valid")?;
        if j.version != JOURNAL_VERSION {
            anyhow::bail!(
                "journal version {} is not supported (expected {JOURNAL_VERSION})",
                j.version
            );
        }
        Ok(j)
    }

    pub fn fresh(instance_id: &str, plan_sha256: Sha256, steps: &[StepId]) -> Journal {
        Journal {
            version: JOURNAL_VERSION,
            instance_id: instance_id.to_string(),
            plan_sha256,
            created_at: crate::time::now(),
            runs: 0,
            steps: steps.iter().map(|&id| StepRecord::new(id)).collect(),
        }
    }

    /// Loads the journal for `instance_id`, or starts one. Records for `steps` are added if
    /// missing and kept in that order.
    pub fn open(
        root: &Root,
        instance_id: &str,
        plan_sha256: Sha256,
        steps: &[StepId],
    ) -> Result<(Journal, Opened)> {
        let path = Journal::path(root);
        let (mut j, how) = match fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                Journal::fresh(instance_id, plan_sha256, steps),
                Opened::Fresh,
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            Ok(bytes) => match Journal::from_json(&bytes) {
                Ok(old) if old.instance_id == instance_id => (old, Opened::Resumed),
                Ok(old) => {
                    let kept = path
                        .with_file_name(format!("journal.{}.json", file_safe(&old.instance_id)));
                    fs::rename(&path, &kept)
                        .with_context(|| format!("keeping old journal as {}", kept.display()))?;
                    (
                        Journal::fresh(instance_id, plan_sha256, steps),
                        Opened::NewInstance {
                            old_id: old.instance_id,
                            kept,
                        },
                    )
                }
                Err(e) => {
                    let kept = path.with_file_name(format!(
                        "journal.unreadable-{}.json",
                        crate::time::now_ms()
                    ));
                    fs::rename(&path, &kept)
                        .with_context(|| format!("keeping bad journal as {}", kept.display()))?;
                    (
                        Journal::fresh(instance_id, plan_sha256, steps),
                        Opened::Unreadable {
                            kept,
                            reason: format!("{e:#}"),
                        },
                    )
                }
            },
        };
        j.plan_sha256 = plan_sha256;
        let mut ordered = Vec::with_capacity(steps.len());
        for &id in steps {
            let rec = j
                .steps
                .iter()
                .find(|r| r.id == id)
                .cloned()
                .unwrap_or_else(|| StepRecord::new(id));
            ordered.push(rec);
        }
        j.steps = ordered;
        Ok((j, how))
    }

    pub fn save(&self, root: &Root) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).context("serializing the journal")?;
        bytes.push(b'\n');
        write_atomic(&Journal::path(root), &bytes, 0o600)
    }

    pub fn step(&self, id: StepId) -> Option<&StepRecord> {
        self.steps.iter().find(|r| r.id == id)
    }

    pub fn step_mut(&mut self, id: StepId) -> &mut StepRecord {
        if let Some(i) = self.steps.iter().position(|r| r.id == id) {
            return &mut self.steps[i];
        }
        self.steps.push(StepRecord::new(id));
        self.steps.last_mut().unwrap()
    }

    /// Every fact, later steps winning.
    pub fn facts(&self) -> Facts {
        let mut all = Facts::new();
        for r in &self.steps {
            all.extend(r.facts.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        all
    }
}

fn file_safe(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "unnamed".into()
    } else {
        s
    }
}

/// cloud-init's instance id (`/var/lib/cloud/data/instance-id`), or `none` when absent.
pub fn instance_id(root: &Root) -> Result<String> {
    let p = root.path(paths::CLOUD_INSTANCE_ID);
    match fs::read_to_string(&p) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) => Ok("none".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok("none".into()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// An exclusive lock on the state dir, held for the daemon's lifetime: a second daemon (a
/// manual run while systemd's is active) refuses instead of racing on the journal.
pub struct Lock {
    _file: fs::File,
}

impl Lock {
    #[allow(unsafe_code)] // libc calls; each block says why it is sound
    pub fn acquire(root: &Root) -> Result<Lock> {
        let dir = root.path(paths::STATE_DIR);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let p = dir.join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        // SAFETY: flock on an fd we own.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            anyhow::bail!(
                "another kiln-firstboot is running (it holds {}); not starting a second one",
                p.display()
            );
        }
        Ok(Lock { _file: f })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sha(b: u8) -> Sha256 {
        Sha256::from_bytes([b; 32])
    }

    #[test]
    fn journal_round_trips_and_is_private() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        let (mut j, how) = Journal::open(&root, "i-1", sha(1), &StepId::ALL).unwrap();
        assert_eq!(how, Opened::Fresh);
        j.step_mut(StepId::K3s).state = StepState::Done;
        j.step_mut(StepId::K3s)
            .facts
            .insert("node".into(), "n1".into());
        j.save(&root).unwrap();
        let mode = fs::metadata(Journal::path(&root))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (back, how) = Journal::open(&root, "i-1", sha(1), &StepId::ALL).unwrap();
        assert_eq!(how, Opened::Resumed);
        assert_eq!(back, j);
        assert_eq!(back.facts().get("node").map(String::as_str), Some("n1"));
    }

    #[test]
    fn new_instance_id_starts_fresh_and_keeps_the_old_journal() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        let (mut j, _) = Journal::open(&root, "i-old/1", sha(1), &StepId::ALL).unwrap();
        j.step_mut(StepId::K3s).state = StepState::Done;
        j.save(&root).unwrap();
        let (fresh, how) = Journal::open(&root, "i-new", sha(1), &StepId::ALL).unwrap();
        match how {
            Opened::NewInstance { old_id, kept } => {
                assert_eq!(old_id, "i-old/1");
                assert!(kept.ends_with("journal.i-old_1.json"), "{kept:?}");
                assert!(kept.exists());
            }
            other => panic!("{other:?}"),
        }
        assert!(fresh.steps.iter().all(|r| r.state == StepState::Pending));
        assert_eq!(fresh.instance_id, "i-new");
    }

    #[test]
    fn unreadable_journal_is_kept_aside_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        write_atomic(
            &Journal::path(&root),
            b"{\"version\":1,\"bogus\":true}",
            0o600,
        )
        .unwrap();
        let (j, how) = Journal::open(&root, "i", sha(2), &StepId::ALL).unwrap();
        assert!(matches!(how, Opened::Unreadable { .. }), "{how:?}");
        assert_eq!(j.steps.len(), 6);
    }

    #[test]
    fn unknown_fields_in_a_journal_are_rejected() {
        let j = Journal::fresh("i", sha(3), &[StepId::K3s]);
        let mut v = serde_json::to_value(&j).unwrap();
        v["steps"][0]["extra"] = serde_json::json!(1);
        assert!(Journal::from_json(&serde_json::to_vec(&v).unwrap()).is_err());
    }

    #[test]
    fn missing_instance_id_reads_as_none() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        assert_eq!(instance_id(&root).unwrap(), "none");
        write_atomic(&root.path(paths::CLOUD_INSTANCE_ID), b"iid-abc\n", 0o644).unwrap();
        assert_eq!(instance_id(&root).unwrap(), "iid-abc");
    }

    #[test]
    fn second_lock_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        let _a = Lock::acquire(&root).unwrap();
        let e = Lock::acquire(&root).err().unwrap();
        assert!(format!("{e:#}").contains("another kiln-firstboot"));
    }
}
