//! The step engine: ordered steps with check/apply/verify, a crash-safe journal, retries of
//! transient errors only, and live status.

use crate::download::{DownloadError, FetchPolicy, Fetcher};
use crate::fs::Root;
use crate::journal::{Facts, Journal, Lock, Opened, StepState};
use crate::retry::{Backoff, Transient};
use crate::status::{RunState, Status};
use anyhow::{Context, Result};
use kiln_plan::{Plan, Secret, StepId};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

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

    /// Makes sure the secret file `node_path` is on the node (read from Key Vault the first
    /// time when the plan takes it from there; see [`crate::keyvault::ensure`]).
    pub fn ensure_secret(&self, node_path: &str) -> Result<()> {
        crate::keyvault::ensure(self.plan, self.root, self.fetcher, node_path)
    }

    /// Reads a secret file (a node path from the plan, e.g. the Tailscale auth key; fetched
    /// first when the plan takes it from Key Vault), trimming trailing newlines. Errors name the path, never the content.
    pub fn read_secret(&self, node_path: &str) -> Result<Secret> {
        // A Key Vault reference is read from its vault the first time it is needed.
        self.ensure_secret(node_path)?;
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

// ---- the runner ------------------------------------------------------------------------------

/// How one daemon run behaves. `Default` is what the unit runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Steps to apply even when their check passes.
    pub force: Vec<StepId>,
    /// The plan file (a host path); default `/etc/kiln/plan.json` under the root.
    pub plan_path: Option<PathBuf>,
    /// Pacing of step retries.
    pub backoff: Backoff,
    pub fetch: FetchPolicy,
}

/// How a run ended. Exit codes: done 0, failed 1, refused 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every step is done or skipped.
    Done,
    /// A step failed (permanently, or transiently past its deadline). The journal is
    /// resumable: the next run starts again at that step.
    Failed { step: StepId, error: String },
    /// Nothing ran: bad plan, tampered bundle, a missing step implementation, or another
    /// daemon holding the lock.
    Refused { error: String },
}

impl Outcome {
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Done => 0,
            Outcome::Failed { .. } => 1,
            Outcome::Refused { .. } => 2,
        }
    }
}

/// Milestones: one line each on `out` (stdout under systemd goes to the journal and the
/// console, so serial logs show them). The format is stable; `kiln qemu` parses it.
struct Milestones<'a>(&'a mut dyn Write);
impl Milestones<'_> {
    fn say(&mut self, line: std::fmt::Arguments) {
        // A closed stdout must not stop the node from being built.
        let _ = writeln!(self.0, "kiln: {line}");
        let _ = self.0.flush();
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Runs every step of the plan under `root`, in the order given, with journal, retries and
/// status. Errors are returned only for failures of the daemon's own state handling (a journal
/// that cannot be written); everything about the node is an [`Outcome`].
pub fn run(
    root: &Root,
    steps: &[Box<dyn Step>],
    opts: &RunOptions,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let mut ms = Milestones(out);
    let mut status = Status::new();
    let _ = status.write(root);
    crate::systemd::notify_status("starting: checking the plan and bundle");
    match run_inner(root, steps, opts, &mut ms, &mut status) {
        Ok(o) => Ok(o),
        Err(e) => {
            // The daemon's own state could not be handled (journal unwritable, disk full):
            // say so everywhere we still can.
            let msg = format!("{e:#}");
            ms.say(format_args!("daemon error: {msg}"));
            status.state = RunState::Failed;
            status.last_error = Some(msg);
            status.ended_at = Some(crate::time::now());
            let _ = status.write(root);
            say_status(&mut ms, &status);
            Err(e)
        }
    }
}

fn run_inner(
    root: &Root,
    steps: &[Box<dyn Step>],
    opts: &RunOptions,
    ms: &mut Milestones,
    status: &mut Status,
) -> Result<Outcome> {
    let refuse = |status: &mut Status, ms: &mut Milestones, error: String| {
        ms.say(format_args!("refusing to run: {error}"));
        crate::systemd::notify_status(&format!("refused: {error}"));
        status.state = RunState::Refused;
        status.last_error = Some(error.clone());
        status.ended_at = Some(crate::time::now());
        if let Err(e) = status.write(root) {
            tracing::warn!("writing status: {e:#}");
        }
        say_status(ms, status);
        Ok(Outcome::Refused { error })
    };

    // 1. The plan, strictly.
    let plan_path = opts
        .plan_path
        .clone()
        .unwrap_or_else(|| root.path(kiln_plan::paths::PLAN));
    let plan_bytes = match std::fs::read(&plan_path) {
        Ok(b) => b,
        Err(e) => {
            return refuse(
                status,
                ms,
                format!("reading plan {}: {e}", plan_path.display()),
            )
        }
    };
    let plan = match Plan::from_json(&plan_bytes) {
        Ok(p) => p,
        Err(e) => return refuse(status, ms, format!("{}: {e}", plan_path.display())),
    };
    let plan_sha = kiln_plan::Sha256::digest(&plan_bytes);
    status.plan_sha256 = Some(plan_sha);

    // 2. The bundle it came in, before anything runs.
    match crate::bundle::verify(root, &plan_bytes) {
        Ok(crate::bundle::BundleCheck::Verified { files }) => {
            tracing::info!(files, "bundle verified against SHA256SUMS")
        }
        Ok(crate::bundle::BundleCheck::Absent) => {
            tracing::info!("no bundle SHA256SUMS under the root; plan taken as given")
        }
        Err(e) => return refuse(status, ms, format!("{e:#}")),
    }

    // 3. The step list must be sane, and runs in the plan's order: an agent joins the
    //    tailnet before K3s starts (its K3s needs the tailnet address).
    let registered: Vec<StepId> = steps.iter().map(|s| s.id()).collect();
    for (i, id) in registered.iter().enumerate() {
        if registered[..i].contains(id) {
            return refuse(status, ms, format!("step {id} is registered twice"));
        }
    }
    let order = plan.step_order();
    let steps: Vec<&dyn Step> = order
        .iter()
        .filter_map(|id| steps.iter().find(|s| s.id() == *id).map(|s| s.as_ref()))
        .chain(
            steps
                .iter()
                .filter(|s| !order.contains(&s.id()))
                .map(|s| s.as_ref()),
        )
        .collect();
    let ids: Vec<StepId> = steps.iter().map(|s| s.id()).collect();
    for f in &opts.force {
        if !ids.contains(f) {
            return refuse(status, ms, format!("--force {f}: no such step in this run"));
        }
    }

    // 4. One daemon at a time, then the journal.
    let _lock = match Lock::acquire(root) {
        Ok(l) => l,
        Err(e) => return refuse(status, ms, format!("{e:#}")),
    };
    let instance = crate::journal::instance_id(root)?;
    status.instance_id = Some(instance.clone());
    let (mut journal, how) = Journal::open(root, &instance, plan_sha, &ids)?;
    match &how {
        Opened::Fresh => {}
        Opened::Resumed => tracing::info!(instance = %instance, "resuming the journal"),
        Opened::NewInstance { old_id, kept } => ms.say(format_args!(
            "new instance {instance} (was {old_id}); old journal kept as {}",
            kept.display()
        )),
        Opened::Unreadable { kept, reason } => ms.say(format_args!(
            "journal unreadable ({reason}); kept as {} and starting fresh",
            kept.display()
        )),
    }
    journal.runs += 1;
    journal.save(root)?;
    ms.say(format_args!(
        "starting run {} on instance {instance}: {} steps, plan sha256 {plan_sha}",
        journal.runs,
        ids.len()
    ));

    let fetcher = Fetcher::with_policy(root, &plan.artifacts, opts.fetch.clone());
    let mut facts = journal.facts();
    status.state = RunState::Running;
    let run_start = Instant::now();

    for step in steps {
        let id = step.id();
        if !plan.applies(id) {
            let r = journal.step_mut(id);
            r.state = StepState::NotApplicable;
            r.attempts = 0;
            r.last_error = None;
            sync(status, &journal, &facts);
            journal.save(root)?;
            status.write(root)?;
            ms.say(format_args!(
                "step {id} not applicable (a server step; this node is a K3s agent)"
            ));
            continue;
        }
        let forced = opts.force.contains(&id);
        let limit = plan.deadline(id);
        let t0 = Instant::now();
        let deadline = t0 + limit;
        fetcher.set_deadline(Some(deadline));
        crate::systemd::notify_extend_timeout(limit + Duration::from_secs(60));
        crate::systemd::notify_status(&format!("step {id}"));
        {
            let r = journal.step_mut(id);
            r.state = StepState::Running;
            r.attempts = 0;
            r.started_at = Some(crate::time::now());
            r.ended_at = None;
            r.duration_ms = None;
            r.last_error = None;
        }
        status.current_step = Some(id);
        sync(status, &journal, &facts);
        journal.save(root)?;
        status.write(root)?;
        ms.say(format_args!(
            "step {id} started{}",
            if forced { " (forced)" } else { "" }
        ));

        let before = facts.clone();
        let mut backoff = opts.backoff.clone();
        let result = loop {
            journal.step_mut(id).attempts += 1;
            let attempt = journal.step(id).map(|r| r.attempts).unwrap_or(1);
            let mut cx = Cx {
                plan: &plan,
                root,
                fetcher: &fetcher,
                facts: &mut facts,
                deadline,
            };
            let r = (|| -> Result<StepState> {
                if !forced && step.check(&mut cx).context("check")? {
                    step.verify(&mut cx).context("verify")?;
                    return Ok(StepState::Skipped);
                }
                step.apply(&mut cx).context("apply")?;
                step.verify(&mut cx).context("verify")?;
                Ok(StepState::Done)
            })();
            match r {
                Ok(s) => break Ok(s),
                Err(e) if is_transient(&e) => {
                    let delay = backoff.next_delay();
                    let msg = format!("{e:#}");
                    if Instant::now() + delay >= deadline {
                        break Err(format!(
                            "{msg} (still failing after {attempt} attempts when its {} deadline passed)",
                            secs(limit)
                        ));
                    }
                    ms.say(format_args!(
                        "step {id} attempt {attempt} failed, retrying in {}: {msg}",
                        secs(delay)
                    ));
                    journal.step_mut(id).last_error = Some(msg);
                    sync(status, &journal, &facts);
                    journal.save(root)?;
                    status.write(root)?;
                    std::thread::sleep(delay);
                }
                Err(e) => break Err(format!("{e:#}")),
            }
        };
        let took = t0.elapsed();
        let r = journal.step_mut(id);
        r.ended_at = Some(crate::time::now());
        r.duration_ms = Some(took.as_millis() as u64);
        match result {
            Ok(state) => {
                r.state = state;
                r.last_error = None;
                if state == StepState::Done {
                    r.applied_at = r.ended_at.clone();
                }
                // Facts this step set or changed are recorded as its own.
                for (k, v) in &facts {
                    if before.get(k) != Some(v) {
                        r.facts.insert(k.clone(), v.clone());
                    }
                }
                r.facts.retain(|k, _| facts.contains_key(k));
                sync(status, &journal, &facts);
                journal.save(root)?;
                status.write(root)?;
                match state {
                    StepState::Skipped => ms.say(format_args!(
                        "step {id} skipped (already in place, verified) in {}",
                        secs(took)
                    )),
                    _ => ms.say(format_args!("step {id} done in {}", secs(took))),
                }
            }
            Err(msg) => {
                r.state = StepState::Failed;
                r.last_error = Some(msg.clone());
                status.state = RunState::Failed;
                status.last_error = Some(format!("step {id}: {msg}"));
                status.ended_at = Some(crate::time::now());
                sync(status, &journal, &facts);
                journal.save(root)?;
                status.write(root)?;
                ms.say(format_args!("step {id} failed: {msg}"));
                say_status(ms, status);
                crate::systemd::notify_status(&format!("step {id} failed"));
                return Ok(Outcome::Failed {
                    step: id,
                    error: msg,
                });
            }
        }
    }

    status.state = RunState::Done;
    status.current_step = None;
    status.ended_at = Some(crate::time::now());
    sync(status, &journal, &facts);
    status.write(root)?;
    ms.say(format_args!(
        "all steps done in {} ({})",
        secs(run_start.elapsed()),
        crate::status::Resources::of_self()
    ));
    say_status(ms, status);
    crate::systemd::notify_status("all steps done");
    Ok(Outcome::Done)
}

/// The final status as one line, so a serial console log carries it (`kiln qemu` reads it).
fn say_status(ms: &mut Milestones, status: &Status) {
    if let Ok(json) = serde_json::to_string(status) {
        ms.say(format_args!("status {json}"));
    }
}

fn sync(status: &mut Status, journal: &Journal, facts: &Facts) {
    status.steps = journal.steps.clone();
    status.facts = facts.clone();
    status.instance_id = Some(journal.instance_id.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16) -> anyhow::Error {
        DownloadError::Http {
            url: "http://m/x".into(),
            status,
        }
        .into()
    }

    #[test]
    fn retry_classification_follows_the_outermost_cause_that_says_anything() {
        assert!(is_transient(&Transient("busy".into()).into()));
        assert!(is_transient(
            &anyhow::Error::new(Transient("busy".into())).context("applying k3s")
        ));
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(is_transient(&http(s)), "{s}");
        }
        for s in [400, 401, 403, 404, 410] {
            assert!(!is_transient(&http(s)), "{s}");
        }
        let mismatch: anyhow::Error = DownloadError::ChecksumMismatch {
            url: "u".into(),
            expected: Box::new(kiln_plan::Sha256::from_bytes([1; 32]).into()),
            actual: Box::new(kiln_plan::Sha256::from_bytes([2; 32]).into()),
        }
        .into();
        assert!(!is_transient(&mismatch.context("downloading k3s")));
        let io = |k| anyhow::Error::new(std::io::Error::from(k)).context("talking to k3s");
        assert!(is_transient(&io(std::io::ErrorKind::ConnectionRefused)));
        assert!(is_transient(&io(std::io::ErrorKind::TimedOut)));
        assert!(!is_transient(&io(std::io::ErrorKind::NotFound)));
        assert!(!is_transient(&io(std::io::ErrorKind::PermissionDenied)));
        assert!(!is_transient(&anyhow::anyhow!("plan is not valid")));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        for (i, x) in d.iter().enumerate() {
            let full = Duration::from_millis(100 * (1u64 << i)).min(Duration::from_secs(1));
            assert!(*x >= full / 2 && *x <= full, "delay {i}: {x:?} vs {full:?}");
        }
    }
}
