//! Crash and reset injection in a real VM, and the VM secret scan (issue 6).
//!
//! Three boots of the Debian 12 test image with the url-delivery profile
//! `qemu/tests/profiles/qemu-local-url-secrets.yaml` (qemu-local plus GitOps repo credentials):
//!
//! 1. **Baseline**: one uninterrupted boot. Its file tree and status are the reference, and it
//!    carries the secret scan: the canary values of every secret the profile delivers must
//!    appear in no serial log, no guest journal file, not in status.json or build.json, in no
//!    world-readable guest file (the whole guest disk is dumped with `debugfs rdump`, which keeps
//!    modes) and in no host output file except the payload, which carries them to the node by
//!    design. Secret files are 0600 root, the auth key file is gone once Tailscale runs, and the
//!    rendered K3s config has `secrets-encryption: true`.
//! 2. **SIGKILL**: one boot; `kiln-firstboot` is killed with SIGKILL (from the host, through the
//!    QEMU guest agent's `guest-exec` of `pkill -KILL -x kiln-firstboot`) at every step boundary
//!    and once inside every step (inside the three download steps: while the loopback mirror is
//!    streaming the artifact slowly), and systemd restarts it each time. After each kill the
//!    daemon's journal is read back through the agent to record where the kill landed.
//! 3. **Resets**: one boot hard-reset through QMP `system_reset` at random moments while the
//!    daemon works (2 in CI; `KILN_CHAOS_RESETS=5` for the documented full variant;
//!    `KILN_CHAOS_SEED` replays a run); each time the guest reboots and the enabled unit resumes.
//!
//! Runs 2 and 3 must converge to the baseline: the same final status (state done, every step in
//! place, same facts), the same managed files (sha256, mode, owner; secrets: presence, mode and
//! owner only), and no partial or temporary file anywhere near a final path.
//! Figures go to `<target>/reliability/vm-chaos.json` and `vm-secrets.json`, which
//! `tests/reliability/summary.sh` turns into table rows.
//!
//! Runs only with KILN_VM_TESTS=1 and KILN_FIRSTBOOT (the static daemon); the image must have
//! qemu-guest-agent (images/debian-12-test/build.sh installs it). About 15 minutes under TCG.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_qemu::accel;
use kiln_qemu::harness::Session;
use kiln_qemu::image;
use kiln_qemu::inspect::GuestDisk;
use kiln_qemu::mirror::{Fault, Mirror};
use kiln_qemu::serial::{Event, Follower, TimedEvent};
use kiln_qemu::vm::Vm;
use kiln_testkit::gotools;
use kiln_testkit::qga::Qga;
use kiln_testkit::{
    build_profile, journal_view, make_tailnet_mirror, publish_bundle, repo, sha256_hex, target_dir,
    work_dir, Tailnet, WorkDir,
};
use serde_json::{json, Value};

const STEPS: [&str; 6] = [
    "k3s",
    "tailscale",
    "tailscale-operator",
    "argocd",
    "gitops",
    "verify",
];
const PROFILE: &str = "qemu/tests/profiles/qemu-local-url-secrets.yaml";
/// Artifacts streamed slowly so a kill lands mid-download (bytes per second).
const SLOW_BPS: u64 = 2_000;

/// Deterministic pseudo-random numbers (splitmix64): a run is replayed from its printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---- one VM with the serial follower, QMP and the guest agent ----------------------------------

struct Guest {
    vm: Vm,
    follower: Follower,
    qga: Qga,
    /// Index into `follower.events` up to which triggers have been consumed.
    seen: usize,
}

impl Guest {
    fn start(
        session: &Session,
        dir: &Path,
        mirror: &Mirror,
        tailnet: &Tailnet,
        reboots: bool,
    ) -> Guest {
        fs::create_dir_all(dir).unwrap();
        let mut cfg = session.vm_config(dir, Some(mirror.port()));
        cfg.extra_guestfwds = vec![tailnet.guestfwd().parse().unwrap()];
        cfg.no_reboot = !reboots;
        let qga_sock = dir.join("qga.sock");
        cfg.qga_socket = Some(qga_sock.clone());
        let vm = Vm::start(cfg).unwrap();
        let follower = Follower::open(&vm.config.serial_log, vm.started, None).unwrap();
        Guest {
            vm,
            follower,
            qga: Qga::new(&qga_sock),
            seen: 0,
        }
    }

    fn at(&self) -> f64 {
        self.vm.started.elapsed().as_secs_f64()
    }

    /// Polls the console; panics on a dead guest or QEMU exit.
    fn poll(&mut self) {
        for e in self.follower.poll().unwrap() {
            if let Event::Fatal { text } = &e.event {
                panic!("the guest died: {text}");
            }
        }
        if let Some(st) = self.vm.try_wait().unwrap() {
            panic!("QEMU exited ({st}): {}", self.vm.qemu_stderr());
        }
    }

    /// Waits for the first new console event matching `pred` (or `other` returning true);
    /// returns it. Events before it are consumed.
    fn wait_event(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
        mut other: impl FnMut(&mut Self) -> bool,
    ) -> Option<TimedEvent> {
        let until = Instant::now() + timeout;
        loop {
            self.poll();
            while self.seen < self.follower.events.len() {
                let e = self.follower.events[self.seen].clone();
                self.seen += 1;
                if let Event::StepFailed { step, error } = &e.event {
                    panic!("step {step} failed in the guest: {error}");
                }
                if let Event::DaemonFailed { error } = &e.event {
                    panic!("the daemon failed in the guest: {error}");
                }
                if pred(&e.event) {
                    return Some(e);
                }
            }
            if other(self) {
                return None;
            }
            assert!(
                Instant::now() < until,
                "{what}: not seen within {}s (last console event: {:?})",
                timeout.as_secs(),
                self.follower.events.last().map(|e| e.event.label())
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the daemon in the guest; true when a process was killed.
    fn kill_daemon(&mut self) -> bool {
        let r = self
            .qga
            .exec(
                "/usr/bin/pkill",
                &["-KILL", "-x", "kiln-firstboot"],
                Duration::from_secs(60),
            )
            .expect("guest-exec pkill");
        r.exit_code == Some(0)
    }

    /// The daemon's journal as the guest has it now: step id → state.
    fn journal_states(&mut self) -> BTreeMap<String, String> {
        let data = self
            .qga
            .read_file(kiln_plan::paths::JOURNAL, Duration::from_secs(60))
            .expect("reading the journal through the guest agent");
        let j: Value = serde_json::from_slice(&data).expect("journal JSON");
        j["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap().to_string(),
                    s["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Waits for `kiln: all steps done` and cloud-init's end, then reads status.json.
    fn finish(&mut self, timeout: Duration, outdir: &Path) -> Value {
        self.wait_event(
            "all steps done",
            timeout,
            |e| matches!(e, Event::AllDone),
            |_| false,
        );
        let status = self
            .qga
            .read_file(kiln_plan::paths::STATUS, Duration::from_secs(60))
            .expect("reading status.json through the guest agent");
        fs::write(outdir.join("status.json"), &status).unwrap();
        serde_json::from_slice(&status).expect("status.json")
    }

    /// Clean power-off, so the disk is consistent for the reader.
    fn shutdown(mut self) {
        self.vm.shutdown(Duration::from_secs(180)).unwrap();
        let _ = self.follower.poll();
    }
}

// ---- what a converged node is ------------------------------------------------------------------

/// Dumps the whole guest filesystem into `dest` (debugfs keeps modes and owners when run as
/// root; special files are skipped). The VM must be off.
fn dump_guest(session: &Session, raw: &Path, dest: &Path) {
    let disk = GuestDisk::from_overlay(&session.overlay, raw).unwrap();
    let _ = fs::remove_dir_all(dest);
    fs::create_dir_all(dest).unwrap();
    let out = Command::new("debugfs")
        .arg("-c")
        .arg("-R")
        .arg(format!("rdump / {}", dest.display()))
        .arg(raw)
        .output()
        .expect("running debugfs rdump");
    assert!(
        out.status.success(),
        "debugfs rdump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(disk);
    // `rdump /` puts the root's entries straight into dest.
    assert!(
        dest.join("etc/kiln/plan.json").is_file(),
        "rdump produced no /etc/kiln/plan.json"
    );
}

/// Node paths the plan manages (relative to /), compared between runs.
const MANAGED: &[&str] = &[
    "etc/kiln",
    "etc/rancher/k3s/config.yaml",
    "etc/default/tailscaled",
    "etc/systemd/system/kiln-firstboot.service",
    "etc/systemd/system/k3s.service",
    "etc/systemd/system/k3s.service.env",
    "etc/systemd/system/multi-user.target.wants",
    "usr/local/bin",
    "usr/local/sbin",
    "usr/bin/tailscale",
    "usr/sbin/tailscaled",
    "usr/lib/systemd/system/tailscaled.service",
    "var/lib/kiln",
    "var/lib/rancher/k3s/server/manifests",
    "var/lib/rancher/k3s/server/node-token",
];

fn walk(p: &Path, out: &mut Vec<PathBuf>) {
    let Ok(md) = fs::symlink_metadata(p) else {
        return;
    };
    out.push(p.to_path_buf());
    if md.is_dir() {
        let mut names: Vec<_> = fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        names.sort();
        for n in names {
            walk(&n, out);
        }
    }
}

/// path → "kind mode uid:gid sha256" for the managed paths, plus the partial/temp files found.
fn fingerprint(tree: &Path) -> (BTreeMap<String, String>, Vec<String>) {
    let mut fp = BTreeMap::new();
    let mut partials = Vec::new();
    for m in MANAGED {
        let mut paths = Vec::new();
        walk(&tree.join(m), &mut paths);
        for p in paths {
            let rel = p.strip_prefix(tree).unwrap().to_string_lossy().into_owned();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".partial")
                || name.ends_with(".kiln-tmp")
                || name.ends_with(".tmp")
                || name.starts_with(".bundle.")
            {
                partials.push(rel.clone());
            }
            // The daemon's own bookkeeping is compared by meaning (journal_view), not bytes.
            if rel == "var/lib/kiln/journal.json" || rel == "var/lib/kiln/daemon.lock" {
                continue;
            }
            let md = fs::symlink_metadata(&p).unwrap();
            let owner = format!("{:o} {}:{}", md.mode() & 0o7777, md.uid(), md.gid());
            let what = if md.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&p).unwrap().display())
            } else if md.is_dir() {
                format!("dir {owner}")
            } else if rel.starts_with("etc/kiln/secrets/")
                || rel == "var/lib/rancher/k3s/server/node-token"
            {
                // Secrets: presence, mode and owner only (node-token is random per node).
                format!("secret {owner}")
            } else {
                format!("file {owner} {}", sha256_hex(&fs::read(&p).unwrap()))
            };
            fp.insert(rel, what);
        }
    }
    (fp, partials)
}

/// status.json's meaning: the run state and, per step, in place or not.
fn status_view(st: &Value) -> (String, Vec<(String, bool)>) {
    (
        st["state"].as_str().unwrap_or("").to_string(),
        st["steps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        let state = s["state"].as_str().unwrap_or("");
                        (
                            s["id"].as_str().unwrap_or("").to_string(),
                            state == "done" || state == "skipped",
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    )
}

struct Converged {
    fingerprint: BTreeMap<String, String>,
    journal: Vec<(String, bool, Value)>,
    status: (String, Vec<(String, bool)>),
}

/// Reads a finished run back; panics with the reason when it is not a converged node.
fn read_back(session: &Session, dir: &Path, status: &Value) -> (Converged, PathBuf) {
    let tree = dir.join("tree");
    dump_guest(session, &dir.join("disk.raw"), &tree);
    let (fingerprint, partials) = fingerprint(&tree);
    assert!(
        partials.is_empty(),
        "{}: partial or temporary files left near final paths: {partials:?}",
        dir.display()
    );
    let c = Converged {
        fingerprint,
        journal: journal_view(&tree),
        status: status_view(status),
    };
    assert_eq!(
        c.status.0,
        "done",
        "{}: status.json {status}",
        dir.display()
    );
    assert_eq!(
        c.status
            .1
            .iter()
            .map(|(s, _)| s.as_str())
            .collect::<Vec<_>>(),
        STEPS,
        "{status}"
    );
    assert!(c.status.1.iter().all(|(_, ok)| *ok), "{status}");
    (c, tree)
}

/// Where two runs differ (empty: they converged to the same node).
fn differences(a: &Converged, b: &Converged) -> Vec<String> {
    let mut d = Vec::new();
    for k in a.fingerprint.keys().chain(b.fingerprint.keys()) {
        let (x, y) = (a.fingerprint.get(k), b.fingerprint.get(k));
        if x != y && !d.iter().any(|s: &String| s.starts_with(&format!("{k}:"))) {
            d.push(format!("{k}: {x:?} vs {y:?}"));
        }
    }
    if a.journal != b.journal {
        d.push(format!("journal: {:?} vs {:?}", a.journal, b.journal));
    }
    if a.status != b.status {
        d.push(format!("status: {:?} vs {:?}", a.status, b.status));
    }
    d
}

// ---- secret scan ------------------------------------------------------------------------------

struct Canaries(Vec<(String, Vec<String>)>);

impl Canaries {
    /// The profile's file secrets, and the tailnet's pre-auth key (the test profile's
    /// `tailscale.auth-key`, in place of profiles/secrets.example's).
    fn load(auth_key: &str) -> Canaries {
        let files = [
            (
                "tailscale-oauth-client-secret",
                "profiles/secrets.example/tailscale-oauth-client-secret",
            ),
            (
                "gitops-repo-password",
                "qemu/tests/profiles/secrets/gitops-repo-password",
            ),
        ];
        Canaries(
            files
                .iter()
                .map(|(name, f)| {
                    let v = fs::read_to_string(repo().join(f))
                        .unwrap()
                        .trim()
                        .to_string();
                    assert!(v.len() >= 16, "{f}: canary too short to be unique");
                    // As written, and as a Kubernetes Secret's `data` carries it.
                    let b64 = base64_encode(v.as_bytes());
                    (name.to_string(), vec![v, b64])
                })
                .chain([(
                    "tailscale-auth-key".to_string(),
                    vec![auth_key.to_string(), base64_encode(auth_key.as_bytes())],
                )])
                .collect(),
        )
    }

    fn name_of(&self, matched: &str) -> String {
        self.0
            .iter()
            .find(|(_, forms)| forms.iter().any(|f| f == matched))
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| "?".into())
    }

    /// `grep -aoF` for every canary form (fast over a whole disk, and no pattern file that
    /// would itself hold the secrets).
    fn grep(&self) -> Command {
        let mut cmd = Command::new("grep");
        cmd.arg("-aoF");
        for (_, forms) in &self.0 {
            for f in forms {
                cmd.arg("-e").arg(f);
            }
        }
        cmd
    }

    /// Canaries found in `data`.
    fn hits(&self, data: &[u8]) -> Vec<String> {
        use std::io::Write;
        let mut child = self
            .grep()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("running grep");
        let mut stdin = child.stdin.take().unwrap();
        let data = data.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|m| self.name_of(m))
            .collect();
        names.dedup();
        names
    }

    /// (file, canary) for every hit in `files`.
    fn hits_in_files(&self, files: &[PathBuf]) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for chunk in files.chunks(500) {
            let out = self
                .grep()
                .arg("-H")
                .arg("--")
                .args(chunk)
                .output()
                .expect("running grep");
            // Exit 1: no match; 2: trouble (an unreadable file is a scan that did not happen).
            assert!(
                out.status.code() != Some(2),
                "grep failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                for (name, forms) in &self.0 {
                    for f in forms {
                        if let Some(file) = line
                            .strip_suffix(f.as_str())
                            .and_then(|l| l.strip_suffix(':'))
                        {
                            found.push((file.to_string(), name.clone()));
                        }
                    }
                }
            }
        }
        found.sort();
        found.dedup();
        found
    }
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[derive(Default)]
struct Scan {
    files: usize,
    guest_world_readable: usize,
    guest_journal_files: usize,
    host_files: usize,
    hits: Vec<String>,
}

fn gunzip(p: &Path) -> Option<Vec<u8>> {
    let out = Command::new("gzip").arg("-dc").arg(p).output().ok()?;
    out.status.success().then_some(out.stdout)
}

fn secret_scan(c: &Canaries, tree: &Path, host_dirs: &[&Path], skip: &[&Path]) -> Scan {
    let mut scan = Scan::default();
    // Every world-readable regular file in the guest.
    let mut all = Vec::new();
    walk(tree, &mut all);
    let world: Vec<PathBuf> = all
        .into_iter()
        .filter(|p| {
            fs::symlink_metadata(p)
                .map(|m| m.is_file() && m.mode() & 0o004 != 0)
                .unwrap_or(false)
        })
        .collect();
    scan.guest_world_readable = world.len();
    for (f, name) in c.hits_in_files(&world) {
        let rel = Path::new(&f)
            .strip_prefix(tree)
            .map(|p| p.display().to_string())
            .unwrap_or(f);
        scan.hits
            .push(format!("{name} in guest /{rel} (world-readable)"));
    }
    // The guest's journal (journald files are 0640; scanned whatever their mode): raw bytes,
    // and decoded by the host's journalctl when there is one (journald compresses big fields).
    let mut journal = Vec::new();
    walk(&tree.join("var/log/journal"), &mut journal);
    let journal: Vec<PathBuf> = journal.into_iter().filter(|p| p.is_file()).collect();
    scan.guest_journal_files = journal.len();
    for (f, name) in c.hits_in_files(&journal) {
        scan.hits.push(format!("{name} in guest journal {f}"));
    }
    for p in &journal {
        if let Ok(out) = Command::new("journalctl")
            .arg(format!("--file={}", p.display()))
            .args(["-o", "export", "--no-pager"])
            .output()
        {
            if out.status.success() {
                for name in c.hits(&out.stdout) {
                    scan.hits
                        .push(format!("{name} in journalctl --file {}", p.display()));
                }
            }
        }
    }
    // Every file the run left on the host (serial logs, status.json, build.json, bundle, ...).
    let mut host = Vec::new();
    for d in host_dirs {
        let mut files = Vec::new();
        walk(d, &mut files);
        for p in files {
            if skip.iter().any(|s| p.starts_with(s)) || !p.is_file() {
                continue;
            }
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            // The payload carries the secrets to the node by design (write_files, 0600 there);
            // disks are the guest itself, scanned above file by file.
            if matches!(name.as_str(), "user-data" | "seed.img" | "custom_data.gz")
                || name.ends_with(".qcow2")
                || name.ends_with(".raw")
            {
                continue;
            }
            if name.ends_with(".gz") {
                if let Some(data) = gunzip(&p) {
                    for n in c.hits(&data) {
                        scan.hits
                            .push(format!("{n} in host {} (gunzipped)", p.display()));
                    }
                }
            }
            host.push(p);
        }
    }
    scan.host_files = host.len();
    for (f, name) in c.hits_in_files(&host) {
        scan.hits.push(format!("{name} in host {f}"));
    }
    scan.files = scan.guest_world_readable + scan.guest_journal_files + scan.host_files;
    scan
}

struct Prepared {
    /// Removes the work dir when dropped (unless KILN_E2E_KEEP).
    work: WorkDir,
    w: PathBuf,
    mirror_dir: PathBuf,
    seed_img: PathBuf,
    pins: Value,
    img: image::BaseImage,
    choice: accel::AccelChoice,
    /// The real Headscale the guests' real tailscaled joins (a reusable key: every run is a
    /// fresh node).
    tailnet: Tailnet,
}

/// A work dir, the mirror (K3s stand-in, real Tailscale tarball) with the bundle of
/// [`PROFILE`] joined to a real Headscale in it (url delivery keeps boots short), its seed, the
/// test image and the accelerator.
fn prepare(prefix: &str, firstboot: &str) -> Prepared {
    let tools = gotools::find("vm chaos").expect("required with KILN_VM_TESTS=1");
    let work = work_dir(prefix);
    let w = work.path.clone();
    let mirror_dir = w.join("mirror");
    let pins = make_tailnet_mirror(&mirror_dir, &tools);
    let tailnet = Tailnet::start_with(&tools, true);
    let profile = tailnet.profile(PROFILE, &w, "chaos-tailnet", &pins);
    let build = w.join("build");
    build_profile(profile.to_str().unwrap(), firstboot, &build);
    publish_bundle(&build, &mirror_dir);
    let img = image::ensure_test_image(&image::cache_root()).unwrap();
    let choice = accel::choose(
        Path::new("qemu-system-x86_64"),
        &w,
        img.probe_kernel().as_deref(),
    )
    .unwrap();
    eprintln!("chaos: accelerator {} ({})", choice.accel, choice.reason);
    Prepared {
        work,
        w,
        mirror_dir,
        seed_img: build.join("seed.img"),
        pins,
        img,
        choice,
        tailnet,
    }
}

/// A reset inside cloud-init's final stage while the bootstrap runs, after it verified the
/// bundle and before it enabled the unit. cloud-init writes its per-instance semaphores before
/// running `runcmd` and its files without fsync, so the reset leaves `runcmd` and
/// `bootstrap.sh` zero-length while cloud-init remembers having run them: the payload's
/// `bootcmd` must notice (no "bootstrap done" marker for this instance) and have this boot
/// write the files and run the bootstrap again. Before that fix the node never provisioned.
#[test]
fn a_hard_reset_while_the_bootstrap_runs_still_ends_in_a_provisioned_node() {
    if std::env::var("KILN_VM_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set KILN_VM_TESTS=1 (and KILN_FIRSTBOOT) to boot VMs (.ci/run does)");
        return;
    }
    let firstboot = std::env::var("KILN_FIRSTBOOT")
        .expect("KILN_FIRSTBOOT must name the static kiln-firstboot binary");
    let p = prepare("kiln-chaos-bootstrap", &firstboot);
    let dir = p.w.join("bootstrap-reset");
    let session = Session::new(p.img, p.choice, &dir, Some(p.seed_img), None).unwrap();
    let mirror = Mirror::start(&p.mirror_dir).unwrap();
    let mut g = Guest::start(&session, &dir.join("boot-1"), &mirror, &p.tailnet, true);
    let serial = g.vm.config.serial_log.clone();
    let until = Instant::now() + Duration::from_secs(1200);
    loop {
        g.poll();
        let text = fs::read(&serial).unwrap();
        if String::from_utf8_lossy(&text).contains("kiln-bootstrap: bundle verified") {
            break;
        }
        assert!(
            Instant::now() < until,
            "the bootstrap never verified the bundle"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let at = g.at();
    g.vm.qmp().unwrap().system_reset().unwrap();
    g.seen = g.follower.events.len();
    eprintln!("chaos: reset at {at:.1}s, right after the bootstrap verified the bundle");
    let status = g.finish(Duration::from_secs(900), &dir);
    g.shutdown();
    assert_eq!(status["state"], "done", "{status}");
    drop(p.work);
}

/// The Tailscale-state reset window (docs/reliability.md), against the real tailscaled joined to
/// a real Headscale: a hard reset the moment the tailscale step is done, i.e. right after it
/// removed the auth key. The node's login state must already be on disk (the step flushes
/// tailscaled's state dir before removing the key): after the reset the node comes back
/// Running with no key, the daemon finishes, and Headscale still has that one node (a lost state
/// would mean NeedsLogin with the key gone, and a failed step).
#[test]
fn a_hard_reset_right_after_tailscale_joined_keeps_the_node_on_the_tailnet() {
    if std::env::var("KILN_VM_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set KILN_VM_TESTS=1 (and KILN_FIRSTBOOT) to boot VMs (.ci/run does)");
        return;
    }
    let firstboot = std::env::var("KILN_FIRSTBOOT")
        .expect("KILN_FIRSTBOOT must name the static kiln-firstboot binary");
    let t0 = Instant::now();
    let p = prepare("kiln-chaos-tailscale", &firstboot);
    let dir = p.w.join("tailscale-reset");
    let session = Session::new(p.img, p.choice, &dir, Some(p.seed_img), None).unwrap();
    let mirror = Mirror::start(&p.mirror_dir).unwrap();
    let mut g = Guest::start(&session, &dir.join("boot-1"), &mirror, &p.tailnet, true);
    g.wait_event(
        "step tailscale done",
        Duration::from_secs(1200),
        |e| matches!(e, Event::StepDone { step, .. } if step.as_str() == "tailscale"),
        |_| false,
    );
    let at = g.at();
    g.vm.qmp().unwrap().system_reset().unwrap();
    eprintln!("chaos: reset at {at:.1}s, as the tailscale step reported done");
    let status = g.finish(Duration::from_secs(900), &dir);
    let journal = g.journal_states();
    // Online on the control server after the reset, before the VM goes down.
    let node = p
        .tailnet
        .headscale
        .wait_node("ameciclo-k3s", |n| n["online"] == true)
        .unwrap_or_else(|e| panic!("{e:#}"));
    g.shutdown();
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(node["tags"], json!(["tag:k8s"]), "{node}");
    assert!(
        matches!(
            journal.get("tailscale").map(String::as_str),
            Some("done" | "skipped")
        ),
        "{journal:?}"
    );
    let nodes = p.tailnet.headscale.nodes().unwrap();
    assert_eq!(
        nodes.len(),
        1,
        "the node registered again after the reset: {nodes:?}"
    );
    eprintln!(
        "chaos: tailscale reset window converged, {:.0}s for the whole test",
        t0.elapsed().as_secs_f64()
    );
    drop(p.work);
}

// ---- the test ---------------------------------------------------------------------------------

#[test]
fn sigkill_and_hard_resets_in_a_vm_converge_and_no_secret_leaks() {
    if std::env::var("KILN_VM_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set KILN_VM_TESTS=1 (and KILN_FIRSTBOOT) to boot VMs (.ci/run does)");
        return;
    }
    let firstboot = std::env::var("KILN_FIRSTBOOT")
        .expect("KILN_FIRSTBOOT must name the static kiln-firstboot binary");
    let resets: u32 = std::env::var("KILN_CHAOS_RESETS")
        .ok()
        .map(|v| v.parse().expect("KILN_CHAOS_RESETS: a number"))
        .unwrap_or(2);
    let seed: u64 = std::env::var("KILN_CHAOS_SEED")
        .ok()
        .map(|v| v.parse().expect("KILN_CHAOS_SEED: a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        });
    eprintln!("chaos: {resets} resets, seed {seed} (replay with KILN_CHAOS_SEED={seed})");
    let results = target_dir().join("reliability");
    fs::create_dir_all(&results).unwrap();
    let chaos_json = results.join("vm-chaos.json");
    let secrets_json = results.join("vm-secrets.json");
    let _ = fs::remove_file(&chaos_json);
    let _ = fs::remove_file(&secrets_json);

    let Prepared {
        work: _work,
        w,
        mirror_dir,
        seed_img,
        pins,
        img,
        choice,
        mut tailnet,
    } = prepare("kiln-chaos", &firstboot);
    let artifact = |k: &str| pins[k]["path"].as_str().unwrap().to_string();
    let deadline = Duration::from_secs(1200);
    let canaries = Canaries::load(&tailnet.key);

    // 1. Baseline: uninterrupted.
    let base_dir = w.join("baseline");
    let base_session = Session::new(
        img.clone(),
        choice.clone(),
        &base_dir,
        Some(seed_img.clone()),
        None,
    )
    .unwrap();
    let mirror = Mirror::start(&mirror_dir).unwrap();
    let mut g = Guest::start(
        &base_session,
        &base_dir.join("boot-1"),
        &mirror,
        &tailnet,
        false,
    );
    let started_at = g
        .wait_event(
            "daemon start",
            deadline,
            |e| matches!(e, Event::Daemon { text } if text.starts_with("starting run")),
            |_| false,
        )
        .unwrap()
        .at;
    let base_status = g.finish(deadline, &base_dir);
    let done_at = g.at();
    let daemon_secs = done_at - started_at;
    eprintln!("chaos: baseline daemon ran {daemon_secs:.1}s (started at {started_at:.1}s)");
    g.shutdown();
    drop(mirror);
    let (baseline, base_tree) = read_back(&base_session, &base_dir, &base_status);

    // Secret hygiene on the baseline node.
    let secrets_dir = base_tree.join("etc/kiln/secrets");
    for name in ["tailscale-oauth-client-secret", "gitops-repo-password"] {
        let md = fs::metadata(secrets_dir.join(name))
            .unwrap_or_else(|e| panic!("/etc/kiln/secrets/{name}: {e}"));
        assert_eq!(md.mode() & 0o777, 0o600, "/etc/kiln/secrets/{name}");
        assert_eq!((md.uid(), md.gid()), (0, 0), "/etc/kiln/secrets/{name}");
    }
    assert!(
        !secrets_dir.join("tailscale-auth-key").exists(),
        "the Tailscale auth key file is still on the node after Tailscale is Running"
    );
    let k3s_cfg: serde_yaml::Value =
        serde_yaml::from_slice(&fs::read(base_tree.join("etc/rancher/k3s/config.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        k3s_cfg["secrets-encryption"],
        serde_yaml::Value::Bool(true),
        "K3s config: {k3s_cfg:?}"
    );
    let scan = secret_scan(
        &canaries,
        &base_tree,
        &[&w],
        // The auth key file the test's profile names is that profile's secret input (as
        // profiles/secrets.example/ is for the plain profile), not something kiln wrote.
        &[
            &w.join("mirror"),
            &base_tree,
            &w.join("chaos-tailnet-auth-key"),
        ],
    );
    eprintln!(
        "vm secret scan: {} files scanned ({} world-readable guest files, {} guest journal files, {} host files), {} hits",
        scan.files,
        scan.guest_world_readable,
        scan.guest_journal_files,
        scan.host_files,
        scan.hits.len()
    );
    fs::write(
        &secrets_json,
        serde_json::to_vec_pretty(&json!({
            "files_scanned": scan.files,
            "guest_world_readable_files": scan.guest_world_readable,
            "guest_journal_files": scan.guest_journal_files,
            "host_files": scan.host_files,
            "hits": scan.hits,
            "canaries": canaries.0.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            "secret_files_0600_root": true,
            "auth_key_removed": true,
            "k3s_secrets_encryption": true,
        }))
        .unwrap(),
    )
    .unwrap();
    assert!(
        scan.hits.is_empty(),
        "secret canaries found: {:?}",
        scan.hits
    );
    assert!(
        scan.guest_world_readable > 1000,
        "the guest dump looks empty"
    );
    // The dump holds the node's secrets: it does not outlive the scan.
    fs::remove_dir_all(&base_tree).unwrap();

    // 2. SIGKILL at every boundary and inside every step, in one boot.
    let kill_dir = w.join("sigkill");
    let kill_session = Session::new(
        img.clone(),
        choice.clone(),
        &kill_dir,
        Some(seed_img.clone()),
        None,
    )
    .unwrap();
    let mirror = Mirror::start(&mirror_dir).unwrap();
    let downloads = [
        (
            "k3s",
            artifact("k3s"),
            // qemu-local pins the K3s stand-in by sha512: its cache name is that hex.
            pins["k3s"]["sha512"].as_str().unwrap().to_string(),
        ),
        (
            "tailscale",
            artifact("tailscale"),
            pins["tailscale"]["sha256"].as_str().unwrap().to_string(),
        ),
        (
            "argocd",
            artifact("argocd"),
            pins["argocd"]["sha256"].as_str().unwrap().to_string(),
        ),
    ];
    for (_, path, _) in &downloads {
        // About 12 s per body. Twice: the run killed at the boundary before may already have
        // begun the download, and the kill must still find one streaming.
        let size = fs::metadata(mirror_dir.join(path)).unwrap().len();
        let bps = (size / 12).max(SLOW_BPS);
        mirror.fault(path, [Fault::Slow(bps), Fault::Slow(bps)]);
    }
    // Each run is a new node of its own: a fresh Headscale (same user and key, no nodes)
    // gives it the baseline's name and address.
    tailnet.fresh();
    let mut g = Guest::start(
        &kill_session,
        &kill_dir.join("boot-1"),
        &mirror,
        &tailnet,
        false,
    );
    let mut points: Vec<Value> = Vec::new();
    let mut killed = 0u32;
    let mut inside_as_intended = 0u32;
    // (label, the step the kill targets, boundary after it?)
    let mut plan: Vec<(String, usize, bool)> = vec![("before k3s (daemon start)".into(), 0, false)];
    for (i, s) in STEPS.iter().enumerate() {
        plan.push((format!("inside {s}"), i, false));
        if i + 1 < STEPS.len() {
            plan.push((format!("boundary {s} -> {}", STEPS[i + 1]), i, true));
        }
    }
    let is_start =
        |e: &Event| matches!(e, Event::Daemon { text } if text.starts_with("starting run"));
    for (n, (label, i, boundary)) in plan.iter().enumerate() {
        let step = STEPS[*i];
        let inside = !*boundary && n != 0;
        let download = downloads.iter().find(|(s, _, _)| inside && *s == step);
        // Every point is in a new run (systemd's restart of the one killed before): lines the
        // killed run printed, and a request it sent just before it died (the guestfwd relay
        // still delivers it), must not trigger anything. Restarts come 5 s after a kill.
        g.wait_event(
            &format!("{label}: a daemon run"),
            deadline,
            is_start,
            |_| false,
        );
        let before = download.map(|(_, p, _)| mirror.hits(p)).unwrap_or(0);
        let trigger_at = if n == 0 {
            g.at()
        } else if *boundary {
            g.wait_event(
                label,
                Duration::from_secs(600),
                |e| matches!(e, Event::StepDone { step: s, .. } | Event::StepSkipped { step: s } if s == step),
                |_| false,
            )
            .unwrap()
            .at
        } else if let Some((_, path, _)) = download {
            // Mid-download: the mirror has started streaming the artifact (slowly).
            g.wait_event(
                label,
                Duration::from_secs(600),
                |e| matches!(e, Event::StepDone { step: s, .. } | Event::StepSkipped { step: s } if s == step),
                |_| mirror.hits(path) > before,
            );
            assert!(
                mirror.hits(path) > before,
                "{label}: step {step} ended without downloading {path}"
            );
            std::thread::sleep(Duration::from_secs(2));
            g.at()
        } else {
            g.wait_event(
                label,
                Duration::from_secs(600),
                |e| matches!(e, Event::StepStarted { step: s } if s == step),
                |_| false,
            )
            .unwrap()
            .at
        };
        let hit = g.kill_daemon();
        let journal = g.journal_states();
        let landed = match journal.iter().find(|(_, st)| st.as_str() == "running") {
            Some((s, _)) => format!("inside {s}"),
            None => "between steps".into(),
        };
        // A download kill must leave the interrupted download as a .partial in the cache.
        let partial = download.map(|(_, _, sha)| {
            g.qga
                .exec(
                    "/usr/bin/test",
                    &[
                        "-s",
                        &format!("{}/{sha}.partial", kiln_plan::paths::CACHE_DIR),
                    ],
                    Duration::from_secs(60),
                )
                .map(|r| r.exit_code == Some(0))
                .unwrap_or(false)
        });
        let intended = if *boundary || n == 0 {
            // At a boundary the next step has at most started.
            journal.get(step).map(|s| s != "running").unwrap_or(true)
        } else {
            journal.get(step).map(String::as_str) == Some("running") && partial.unwrap_or(true)
        };
        if !*boundary && n != 0 && intended {
            inside_as_intended += 1;
        }
        eprintln!(
            "chaos: kill {}/{}: {label} at {trigger_at:.1}s: {} (journal: {landed}{})",
            n + 1,
            plan.len(),
            if hit { "killed" } else { "NO DAEMON RUNNING" },
            match partial {
                Some(true) => ", download .partial in the cache",
                Some(false) => ", NO .partial in the cache",
                None => "",
            }
        );
        assert!(hit, "{label}: no kiln-firstboot process to kill");
        killed += 1;
        g.poll();
        g.seen = g.follower.events.len();
        points.push(json!({"point": label, "at": trigger_at, "journal": journal, "landed": landed, "partial_in_cache": partial, "as_intended": intended}));
    }
    let kill_status = g.finish(deadline, &kill_dir);
    g.shutdown();
    // Every slowed download was interrupted and then resumed or restarted.
    let reqs = mirror.requests();
    for (s, path, _) in &downloads {
        let n = reqs.iter().filter(|r| &r.path == path).count();
        assert!(
            n >= 2,
            "{s}: the mid-download kill did not cause a second request ({n})"
        );
    }
    drop(mirror);
    let (killrun, kill_tree) = read_back(&kill_session, &kill_dir, &kill_status);
    fs::remove_dir_all(&kill_tree).unwrap();
    let kill_diff = differences(&baseline, &killrun);
    eprintln!(
        "chaos: sigkill run: {killed} kills, {inside_as_intended} of {} inside-step kills landed inside their step, {} differences from the baseline",
        STEPS.len(),
        kill_diff.len()
    );

    // 3. Hard resets at random moments while the daemon works.
    let reset_dir = w.join("resets");
    let reset_session = Session::new(img, choice, &reset_dir, Some(seed_img), None).unwrap();
    let mirror = Mirror::start(&mirror_dir).unwrap();
    tailnet.fresh();
    let mut g = Guest::start(
        &reset_session,
        &reset_dir.join("boot-1"),
        &mirror,
        &tailnet,
        true,
    );
    let mut rng = Rng(seed);
    let mut reset_log: Vec<Value> = Vec::new();
    for r in 1..=resets {
        // Each boot: a random step and a random offset (0-5 s) after that step starts in this
        // boot's daemon run. Steps already in place are skipped within a second or two, so the
        // reset then lands in a later one; if the daemon finishes first, the reset comes right
        // after (a finished node must survive a reset too).
        let target = STEPS[rng.below(STEPS.len() as u64) as usize];
        let delay = Duration::from_millis(rng.below(5000));
        let e = g
            .wait_event(
                &format!("reset {r}: step {target} started"),
                deadline,
                |e| {
                    matches!(e, Event::AllDone)
                        || matches!(e, Event::StepStarted { step } if step.as_str() == target)
                },
                |_| false,
            )
            .unwrap();
        let mut done_first = matches!(e.event, Event::AllDone);
        let until = Instant::now() + delay;
        while !done_first && Instant::now() < until {
            g.poll();
            if g.follower.events[g.seen..]
                .iter()
                .any(|e| matches!(e.event, Event::AllDone))
            {
                done_first = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let last = g
            .follower
            .events
            .iter()
            .rev()
            .find(|e| {
                matches!(
                    e.event,
                    Event::StepStarted { .. }
                        | Event::StepDone { .. }
                        | Event::StepSkipped { .. }
                        | Event::Daemon { .. }
                )
            })
            .map(|e| e.event.label())
            .unwrap_or_default();
        let at = g.at();
        g.vm.qmp().unwrap().system_reset().unwrap();
        g.seen = g.follower.events.len();
        eprintln!(
            "chaos: reset {r}/{resets} at {at:.1}s, {:.1}s after step {target} started (last milestone: {last}){}",
            delay.as_secs_f64(),
            if done_first { "; the daemon had already finished" } else { "" }
        );
        reset_log.push(json!({"reset": r, "at": at, "step": target, "after_step_start": delay.as_secs_f64(), "last_milestone": last, "daemon_had_finished": done_first}));
    }
    let reset_status = g.finish(deadline, &reset_dir);
    g.shutdown();
    drop(mirror);
    let (resetrun, reset_tree) = read_back(&reset_session, &reset_dir, &reset_status);
    fs::remove_dir_all(&reset_tree).unwrap();
    let reset_diff = differences(&baseline, &resetrun);
    eprintln!(
        "chaos: reset run: {resets} resets, {} differences from the baseline",
        reset_diff.len()
    );

    let kill_converged = if kill_diff.is_empty() { killed } else { 0 };
    let reset_converged = if reset_diff.is_empty() { resets } else { 0 };
    fs::write(
        &chaos_json,
        serde_json::to_vec_pretty(&json!({
            "seed": seed,
            "sigkill_points_tried": killed,
            "sigkill_points_converged": kill_converged,
            "sigkill_inside_step_as_intended": inside_as_intended,
            "sigkill_points": points,
            "sigkill_differences": kill_diff,
            "resets_tried": resets,
            "resets_converged": reset_converged,
            "resets": reset_log,
            "reset_differences": reset_diff,
            "managed_paths_compared": baseline.fingerprint.len(),
        }))
        .unwrap(),
    )
    .unwrap();
    eprintln!(
        "vm crash injection: {} points tried, {} converged (SIGKILL {killed}/{kill_converged}, resets {resets}/{reset_converged})",
        killed + resets,
        kill_converged + reset_converged
    );
    assert!(
        kill_diff.is_empty(),
        "the SIGKILL run differs from the baseline: {kill_diff:#?}"
    );
    assert!(
        reset_diff.is_empty(),
        "the reset run differs from the baseline: {reset_diff:#?}"
    );
    assert_eq!(inside_as_intended as usize, STEPS.len(), "{points:#?}");
}
