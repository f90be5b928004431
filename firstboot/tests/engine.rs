//! The engine in-process, with steps written for these tests (each writes a marker file under
//! the root; its check is "the marker is there"): order, skip-by-check, retries of transient
//! errors only, deadlines, resumable failure, --force, journal per instance id, status, the
//! tamper check, and refusal of bad plans, all before or without touching the node.

mod steps_common;

use anyhow::Result;
use kiln_firstboot::engine::{self, Cx, Outcome, RunOptions, Step};
use kiln_firstboot::fs::{write_atomic, Root};
use kiln_firstboot::journal::{Journal, StepState};
use kiln_firstboot::retry::{Backoff, Transient};
use kiln_firstboot::status::{RunState, Status};
use kiln_plan::{Plan, Sha256, StepId};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

type Log = Rc<RefCell<Vec<String>>>;

/// What the n-th apply does; when the script runs out, apply succeeds.
#[derive(Clone)]
enum Act {
    Transient,
    Permanent,
}

struct TestStep {
    id: StepId,
    log: Log,
    script: RefCell<VecDeque<Act>>,
    fact: Option<(&'static str, &'static str)>,
}

impl TestStep {
    fn marker(&self, cx: &Cx) -> std::path::PathBuf {
        cx.root.path(format!("/var/lib/test/{}", self.id))
    }
}

impl Step for TestStep {
    fn id(&self) -> StepId {
        self.id
    }
    fn check(&self, cx: &mut Cx) -> Result<bool> {
        self.log.borrow_mut().push(format!("check {}", self.id));
        Ok(self.marker(cx).exists())
    }
    fn apply(&self, cx: &mut Cx) -> Result<()> {
        self.log.borrow_mut().push(format!("apply {}", self.id));
        match self.script.borrow_mut().pop_front() {
            Some(Act::Transient) => return Err(Transient("mirror busy".into()).into()),
            Some(Act::Permanent) => anyhow::bail!("{} refused: bad input", self.id),
            None => {}
        }
        // Later steps can see earlier facts.
        if self.id == StepId::Tailscale && !cx.plan.is_agent() {
            assert_eq!(cx.facts.get("k3s.node").map(String::as_str), Some("n1"));
        }
        if let Some((k, v)) = self.fact {
            cx.facts.insert(k.into(), v.into());
        }
        write_atomic(&self.marker(cx), b"ok", 0o644)
    }
    fn verify(&self, cx: &mut Cx) -> Result<()> {
        self.log.borrow_mut().push(format!("verify {}", self.id));
        anyhow::ensure!(self.marker(cx).exists(), "marker missing");
        Ok(())
    }
}

struct World {
    _tmp: tempfile::TempDir,
    root: Root,
    log: Log,
}

fn pins() -> serde_json::Value {
    let sha = "0".repeat(64);
    let p = |path: &str| serde_json::json!({"url-path": path, "sha256": sha});
    serde_json::json!({
        "k3s": p("k3s/k3s"),
        "k3s-checksums": p("k3s/sha256sum-amd64.txt"),
        "tailscale": p("tailscale/t.tgz"),
        "argocd": p("argocd/install.yaml"),
    })
}

fn test_plan() -> Plan {
    let mut p = steps_common::plan("http://127.0.0.1:9/", &pins());
    p.deadlines = StepId::ALL.iter().map(|s| (*s, 5)).collect();
    p
}

fn world(plan: &Plan) -> World {
    let tmp = tempfile::tempdir().unwrap();
    let root = Root::new(tmp.path());
    write_atomic(&root.path("/etc/kiln/plan.json"), &plan.to_json(), 0o644).unwrap();
    write_atomic(
        &root.path("/var/lib/cloud/data/instance-id"),
        b"iid-one\n",
        0o644,
    )
    .unwrap();
    World {
        _tmp: tmp,
        root,
        log: Rc::new(RefCell::new(Vec::new())),
    }
}

impl World {
    fn steps(&self, scripts: &[(StepId, Vec<Act>)]) -> Vec<Box<dyn Step>> {
        [StepId::K3s, StepId::Tailscale, StepId::Verify]
            .into_iter()
            .map(|id| {
                let script = scripts
                    .iter()
                    .find(|(s, _)| *s == id)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                let fact = match id {
                    StepId::K3s => Some(("k3s.node", "n1")),
                    StepId::Tailscale => Some(("tailscale.ip", "100.64.0.7")),
                    _ => None,
                };
                Box::new(TestStep {
                    id,
                    log: self.log.clone(),
                    script: RefCell::new(script.into()),
                    fact,
                }) as Box<dyn Step>
            })
            .collect()
    }

    fn run(&self, steps: &[Box<dyn Step>], force: Vec<StepId>) -> (Outcome, String) {
        let opts = RunOptions {
            force,
            backoff: Backoff::new(Duration::from_millis(5), Duration::from_millis(50)),
            ..RunOptions::default()
        };
        let mut out = Vec::new();
        let o = engine::run(&self.root, steps, &opts, &mut out).unwrap();
        (o, String::from_utf8(out).unwrap())
    }

    fn journal(&self) -> Journal {
        Journal::from_json(&std::fs::read(Journal::path(&self.root)).unwrap()).unwrap()
    }

    fn states(&self) -> Vec<StepState> {
        self.journal().steps.iter().map(|r| r.state).collect()
    }

    fn taken(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.borrow_mut())
    }
}

#[test]
fn runs_steps_in_order_then_a_rerun_skips_each_by_check() {
    let plan = test_plan();
    let w = world(&plan);
    let (o, out) = w.run(&w.steps(&[]), vec![]);
    assert_eq!(o, Outcome::Done);
    assert_eq!(
        w.taken(),
        [
            "check k3s",
            "apply k3s",
            "verify k3s",
            "check tailscale",
            "apply tailscale",
            "verify tailscale",
            "check verify",
            "apply verify",
            "verify verify"
        ]
    );
    assert!(out.contains("kiln: step k3s done in "), "{out}");
    assert!(out.contains("kiln: all steps done in "), "{out}");
    assert!(out.contains("kiln: step k3s started\n"), "{out}");
    let last = out.lines().last().unwrap();
    let st: Status = serde_json::from_str(last.strip_prefix("kiln: status ").unwrap()).unwrap();
    assert_eq!(st.state, RunState::Done);
    assert_eq!(w.states(), [StepState::Done; 3]);
    let st = Status::read(&w.root).unwrap();
    assert_eq!(st.state, RunState::Done);
    assert_eq!(st.facts.get("tailscale.ip").unwrap(), "100.64.0.7");
    assert_eq!(st.plan_sha256, Some(Sha256::digest(&plan.to_json())));
    let j = w.journal();
    assert_eq!(j.instance_id, "iid-one");
    assert_eq!(
        j.step(StepId::K3s).unwrap().facts.get("k3s.node").unwrap(),
        "n1"
    );

    // A reboot: same instance, everything re-checked and verified, nothing applied.
    let (o, out) = w.run(&w.steps(&[]), vec![]);
    assert_eq!(o, Outcome::Done);
    assert!(w.taken().iter().all(|c| !c.starts_with("apply")));
    assert!(out.contains("kiln: step k3s skipped"), "{out}");
    assert_eq!(w.states(), [StepState::Skipped; 3]);
    let j = w.journal();
    assert_eq!(j.runs, 2);
    // Facts and the time of the last apply survive a skip.
    assert!(j.step(StepId::K3s).unwrap().applied_at.is_some());
    assert_eq!(j.facts().get("tailscale.ip").unwrap(), "100.64.0.7");
}

#[test]
fn transient_errors_are_retried_until_success() {
    let w = world(&test_plan());
    let steps = w.steps(&[(StepId::Tailscale, vec![Act::Transient, Act::Transient])]);
    let (o, out) = w.run(&steps, vec![]);
    assert_eq!(o, Outcome::Done);
    let rec = w.journal().step(StepId::Tailscale).unwrap().clone();
    assert_eq!(rec.attempts, 3);
    assert_eq!(rec.state, StepState::Done);
    assert_eq!(rec.last_error, None);
    assert!(
        out.contains("kiln: step tailscale attempt 1 failed, retrying in"),
        "{out}"
    );
}

#[test]
fn permanent_error_fails_at_once_and_the_next_run_resumes_there() {
    let w = world(&test_plan());
    let steps = w.steps(&[(StepId::Tailscale, vec![Act::Permanent])]);
    let (o, out) = w.run(&steps, vec![]);
    match &o {
        Outcome::Failed { step, error } => {
            assert_eq!(*step, StepId::Tailscale);
            assert!(error.contains("tailscale refused: bad input"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(o.exit_code(), 1);
    assert!(
        out.contains("kiln: step tailscale failed: apply: tailscale refused"),
        "{out}"
    );
    assert!(!out.contains("all steps done"));
    assert_eq!(
        w.states(),
        [StepState::Done, StepState::Failed, StepState::Pending]
    );
    let j = w.journal();
    assert_eq!(
        j.step(StepId::Tailscale).unwrap().attempts,
        1,
        "not retried"
    );
    let st = Status::read(&w.root).unwrap();
    assert_eq!(st.state, RunState::Failed);
    assert!(st.last_error.unwrap().starts_with("step tailscale: "));
    w.taken();

    // Same steps object, script now exhausted: the next run resumes and finishes.
    let (o, _) = w.run(&steps, vec![]);
    assert_eq!(o, Outcome::Done);
    let log = w.taken();
    assert!(!log.contains(&"apply k3s".to_string()), "{log:?}");
    assert!(log.contains(&"apply tailscale".to_string()), "{log:?}");
    assert_eq!(
        w.states(),
        [StepState::Skipped, StepState::Done, StepState::Done]
    );
}

#[test]
fn transient_errors_stop_at_the_step_deadline() {
    let mut plan = test_plan();
    plan.deadlines.insert(StepId::K3s, 1);
    let w = world(&plan);
    let steps = w.steps(&[(StepId::K3s, vec![Act::Transient; 10_000])]);
    let t0 = std::time::Instant::now();
    let (o, _) = w.run(&steps, vec![]);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    match o {
        Outcome::Failed { step, error } => {
            assert_eq!(step, StepId::K3s);
            assert!(error.contains("deadline passed"), "{error}");
            assert!(error.contains("mirror busy"), "{error}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn force_applies_a_step_whose_check_passes() {
    let w = world(&test_plan());
    w.run(&w.steps(&[]), vec![]);
    w.taken();
    let (o, _) = w.run(&w.steps(&[]), vec![StepId::Tailscale]);
    assert_eq!(o, Outcome::Done);
    let log = w.taken();
    assert!(log.contains(&"apply tailscale".to_string()));
    assert!(!log.contains(&"apply k3s".to_string()));
    assert!(!log.contains(&"check tailscale".to_string()));
    assert_eq!(
        w.states(),
        [StepState::Skipped, StepState::Done, StepState::Skipped]
    );
}

#[test]
fn a_new_instance_id_starts_a_fresh_journal_and_keeps_the_old_one() {
    let w = world(&test_plan());
    w.run(&w.steps(&[]), vec![]);
    write_atomic(
        &w.root.path("/var/lib/cloud/data/instance-id"),
        b"iid-two\n",
        0o644,
    )
    .unwrap();
    let (o, out) = w.run(&w.steps(&[]), vec![]);
    assert_eq!(o, Outcome::Done);
    assert!(out.contains("new instance iid-two (was iid-one)"), "{out}");
    let j = w.journal();
    assert_eq!(j.instance_id, "iid-two");
    assert_eq!(j.runs, 1);
    let old = w.root.path("/var/lib/kiln/journal.iid-one.json");
    let old = Journal::from_json(&std::fs::read(old).unwrap()).unwrap();
    assert_eq!(old.instance_id, "iid-one");
}

#[test]
fn tampered_bundle_is_refused_before_any_step_runs() {
    let plan = test_plan();
    let w = world(&plan);
    let dir = w.root.path("/var/lib/kiln/bundle");
    let files: [(&str, Vec<u8>); 2] = [
        ("plan.json", plan.to_json()),
        ("manifests/x.yaml", b"kind: X\n".to_vec()),
    ];
    let mut sums = String::new();
    for (n, b) in &files {
        write_atomic(&dir.join(n), b, 0o644).unwrap();
        sums.push_str(&format!("{}  {n}\n", Sha256::digest(b)));
    }
    write_atomic(&dir.join("SHA256SUMS"), sums.as_bytes(), 0o644).unwrap();

    // Intact: runs.
    assert_eq!(w.run(&w.steps(&[]), vec![]).0, Outcome::Done);
    w.taken();

    // One changed byte in a manifest.
    std::fs::write(dir.join("manifests/x.yaml"), b"kind: Y\n").unwrap();
    let (o, out) = w.run(&w.steps(&[]), vec![]);
    assert!(
        matches!(&o, Outcome::Refused { error } if error.contains("bundle tampered")),
        "{o:?}"
    );
    assert_eq!(o.exit_code(), 2);
    assert!(
        out.contains("kiln: refusing to run: bundle tampered"),
        "{out}"
    );
    assert!(w.taken().is_empty(), "no step may run");
    assert_eq!(Status::read(&w.root).unwrap().state, RunState::Refused);

    // Manifest restored, but the plan on the node differs from the bundle's.
    std::fs::write(dir.join("manifests/x.yaml"), b"kind: X\n").unwrap();
    let mut other = plan.clone();
    other.gitops.as_mut().unwrap().path = "somewhere/else".into();
    write_atomic(&w.root.path("/etc/kiln/plan.json"), &other.to_json(), 0o644).unwrap();
    let (o, _) = w.run(&w.steps(&[]), vec![]);
    assert!(
        matches!(&o, Outcome::Refused { error } if error.contains("plan mismatch")),
        "{o:?}"
    );
    assert!(w.taken().is_empty());
}

#[test]
fn a_plan_with_unknown_fields_is_refused_naming_the_field() {
    let w = world(&test_plan());
    let mut v: serde_json::Value = serde_json::from_slice(&test_plan().to_json()).unwrap();
    v["node"]["surprise"] = serde_json::json!(1);
    write_atomic(
        &w.root.path("/etc/kiln/plan.json"),
        &serde_json::to_vec(&v).unwrap(),
        0o644,
    )
    .unwrap();
    let (o, out) = w.run(&w.steps(&[]), vec![]);
    assert!(
        matches!(&o, Outcome::Refused { error } if error.contains("surprise")),
        "{o:?}"
    );
    assert!(out.contains("plan.json"), "{out}");
    assert!(w.taken().is_empty());
    assert!(
        !Journal::path(&w.root).exists(),
        "nothing written for a bad plan"
    );
}

#[test]
fn status_and_journal_have_the_documented_modes() {
    use std::os::unix::fs::PermissionsExt;
    let w = world(&test_plan());
    w.run(&w.steps(&[]), vec![]);
    let mode = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(Journal::path(&w.root)), 0o600);
    assert_eq!(mode(Status::path(&w.root)), 0o644);
}

#[test]
fn an_agent_joins_the_tailnet_before_k3s_and_records_server_steps_as_not_applicable() {
    let mut plan = steps_common::agent_plan("http://127.0.0.1:9/", &pins(), "https://srv:6443");
    plan.deadlines = StepId::ALL.iter().map(|s| (*s, 5)).collect();
    let w = world(&plan);
    let all: Vec<Box<dyn Step>> = StepId::ALL
        .into_iter()
        .map(|id| {
            Box::new(TestStep {
                id,
                log: w.log.clone(),
                script: RefCell::new(VecDeque::new()),
                fact: None,
            }) as Box<dyn Step>
        })
        .collect();
    let (o, out) = w.run(&all, vec![]);
    assert_eq!(o, Outcome::Done, "{out}");
    // Server steps are neither checked nor applied: nothing of theirs exists on an agent.
    assert_eq!(
        w.taken(),
        [
            "check tailscale",
            "apply tailscale",
            "verify tailscale",
            "check k3s",
            "apply k3s",
            "verify k3s",
            "check verify",
            "apply verify",
            "verify verify"
        ]
    );
    for s in ["tailscale-operator", "argocd", "gitops"] {
        assert!(
            out.contains(&format!(
                "kiln: step {s} not applicable (a server step; this node is a K3s agent)"
            )),
            "{out}"
        );
    }
    let j = w.journal();
    let states: Vec<(StepId, StepState)> = j.steps.iter().map(|r| (r.id, r.state)).collect();
    assert_eq!(
        states,
        [
            (StepId::Tailscale, StepState::Done),
            (StepId::K3s, StepState::Done),
            (StepId::TailscaleOperator, StepState::NotApplicable),
            (StepId::Argocd, StepState::NotApplicable),
            (StepId::Gitops, StepState::NotApplicable),
            (StepId::Verify, StepState::Done),
        ]
    );
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Status::path(&w.root)).unwrap()).unwrap();
    assert_eq!(st["state"], "done");
    assert_eq!(st["steps"][2]["state"], "not-applicable");
    assert!(Status::read(&w.root)
        .unwrap()
        .render()
        .contains("not-applicable"));
    // A reboot: the same three steps are checked again, the server steps stay not applicable.
    let (o, _) = w.run(&all, vec![]);
    assert_eq!(o, Outcome::Done);
    assert!(w.taken().iter().all(|c| !c.starts_with("apply")));
    assert_eq!(w.journal().steps[3].state, StepState::NotApplicable);
}
