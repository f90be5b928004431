//! What the VM tests of every package share: finding the repo, the built `kiln` binary and the
//! target dir, the switch that turns VM tests on, a kept-or-temporary work dir, the artifact
//! mirror (the K3s stand-in, the real Tailscale tarball), the loopback Headscale tailnet,
//! building a profile, and putting its bundle where url delivery fetches it.
//! Also the stand-ins' and real tools' drivers the tests use: the fake Tailscale SaaS API, the
//! QEMU guest-agent client, the Go tools finder and a loopback Headscale. A dev-dependency only
//! (`publish = false`): no product crate links it.

pub mod fake_tailscale_api;
pub mod gotools;
pub mod headscale;
pub mod qga;

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest;

/// The repository root (this crate lives in `testkit/`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ has a parent")
        .to_path_buf()
}

/// The names `k3s agent` accepts in v1.32: `tests/upstream/k3s-v1.32-agent-flags.txt`, taken
/// from K3s's own CLI (its PROVENANCE file says from where).
pub fn k3s_agent_flags() -> Vec<String> {
    std::fs::read_to_string(repo().join("tests/upstream/k3s-v1.32-agent-flags.txt"))
        .expect("reading tests/upstream/k3s-v1.32-agent-flags.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Compares `actual` with the golden file `tests/golden/<rel>` (repo-relative);
/// `KILN_UPDATE_GOLDEN=1` rewrites it instead. Every package's golden tests go through here.
pub fn golden(rel: &str, actual: &[u8]) {
    let path = repo().join("tests/golden").join(rel);
    if std::env::var_os("KILN_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "missing golden file {} ({e}); run with KILN_UPDATE_GOLDEN=1 and review the diff",
            path.display()
        )
    });
    if expected != actual {
        let a = String::from_utf8_lossy(actual);
        let e = String::from_utf8_lossy(&expected);
        let first = a.lines().zip(e.lines()).position(|(x, y)| x != y);
        panic!(
            "{} differs from the rendered output (first differing line: {:?})\n--- expected\n{}\n--- actual\n{}",
            path.display(),
            first.map(|i| i + 1),
            e,
            a
        );
    }
}

/// `$CARGO_TARGET_DIR`, else the target dir the running test binary was built into
/// (`<target>/<profile>/deps/<test>-<hash>`).
pub fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        let d = PathBuf::from(d);
        return if d.is_absolute() { d } else { repo().join(d) };
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .nth(3)
        .expect("test binary inside a target dir")
        .to_path_buf()
}

/// The `kiln` binary: `$KILN_BIN`, else the one `cargo test --workspace` builds next to the
/// running test's directory (`<target>/<profile>/kiln`). Building it from a test would
/// deadlock on the build-directory lock cargo holds while tests run.
pub fn kiln_bin() -> PathBuf {
    let bin = std::env::var_os("KILN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("current exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("test binary inside a target dir")
                .join("kiln")
        });
    assert!(
        bin.is_file(),
        "no kiln binary at {}: run `cargo build -p kiln` first or set KILN_BIN",
        bin.display()
    );
    bin
}

/// Runs `kiln ARGS` from the repo root; its exit status and its stdout+stderr, which are also
/// echoed (a failing VM test shows what kiln said).
pub fn run_kiln(args: &[&str]) -> (std::process::Output, String) {
    let out = Command::new(kiln_bin())
        .current_dir(repo())
        .args(args)
        .output()
        .expect("running kiln");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("---- kiln {} ----\n{text}", args.join(" "));
    (out, text)
}

/// The static daemon for VM tests when `KILN_VM_TESTS=1`, else `None` after saying why the
/// test is skipped (so a plain `cargo test` stays fast and says what it left out).
pub fn vm_tests(test: &str) -> Option<String> {
    if std::env::var("KILN_VM_TESTS").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED {test}: set KILN_VM_TESTS=1 (and KILN_FIRSTBOOT) to boot VMs (.ci/run does)"
        );
        return None;
    }
    Some(
        std::env::var("KILN_FIRSTBOOT")
            .expect("KILN_FIRSTBOOT must name the static kiln-firstboot binary"),
    )
}

/// A work dir under /var/tmp (VM disks are large): removed when the guard drops, unless
/// `KILN_E2E_KEEP` is set, for looking at a failed run.
pub struct WorkDir {
    _guard: Option<tempfile::TempDir>,
    pub path: PathBuf,
}

pub fn work_dir(prefix: &str) -> WorkDir {
    let t = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .expect("temp dir in /var/tmp");
    let w = if std::env::var_os("KILN_E2E_KEEP").is_some() {
        WorkDir {
            path: t.keep(),
            _guard: None,
        }
    } else {
        WorkDir {
            path: t.path().to_path_buf(),
            _guard: Some(t),
        }
    };
    eprintln!("{prefix} work dir: {}", w.path.display());
    w
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

pub fn read_json(p: &Path) -> serde_json::Value {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every regular file under `dir`, recursively (symlinks are not followed).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(files_under(&p)),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
    out
}

/// `kiln build PROFILE --firstboot DAEMON -o OUT` from the repo root; panics with kiln's
/// output when it fails.
pub fn build_profile(profile: &str, firstboot: &str, out: &Path) {
    let o = Command::new(kiln_bin())
        .current_dir(repo())
        .args(["build", profile, "--firstboot", firstboot, "-o"])
        .arg(out)
        .output()
        .expect("running kiln build");
    assert!(
        o.status.success(),
        "kiln build {profile}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Puts `build/bundle.tar.gz` where the url-delivery test profiles fetch it from the mirror
/// (`bundles/bundle-<sha256>.tar.gz`); returns the sha256.
pub fn publish_bundle(build: &Path, mirror: &Path) -> String {
    let bundle = std::fs::read(build.join("bundle.tar.gz")).expect("build/bundle.tar.gz");
    let sha = sha256_hex(&bundle);
    let dir = mirror.join("bundles");
    std::fs::create_dir_all(&dir).expect("mirror bundles dir");
    std::fs::write(dir.join(format!("bundle-{sha}.tar.gz")), &bundle).expect("writing bundle");
    sha
}

/// The journal's meaning, for comparing runs: per step, its id, whether it is in place (done or
/// skipped) and its facts; times and attempt counts left out.
pub fn journal_view(root: &Path) -> Vec<(String, bool, serde_json::Value)> {
    let j = read_json(&root.join("var/lib/kiln/journal.json"));
    j["steps"]
        .as_array()
        .expect("journal steps")
        .iter()
        .map(|s| {
            let state = s["state"].as_str().unwrap_or("");
            (
                s["id"].as_str().unwrap_or("").to_string(),
                matches!(state, "done" | "skipped" | "not-applicable"),
                s["facts"].clone(),
            )
        })
        .collect()
}

/// The VM tests' artifact mirror: the K3s stand-in and the real Tailscale v1.102.3 tarball
/// (`tools`' binaries, upstream layout), built into `dir` by the steps' own tool; its pins.
pub fn make_tailnet_mirror(dir: &Path, tools: &crate::gotools::GoTools) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(repo().join("tests/standins/make-mirror.py"))
        .arg("--real-tailscale")
        .arg(&tools.tailscale_dir)
        .arg(tools.tailscale_module())
        .arg(dir)
        .output()
        .expect("running python3 tests/standins/make-mirror.py");
    assert!(
        out.status.success(),
        "make-mirror.py --real-tailscale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    read_json(&dir.join("pins.json"))
}

/// Where guests reach the test's Headscale (a guestfwd to its loopback port, like the mirror
/// at 10.0.2.100).
pub const GUEST_HEADSCALE: &str = "10.0.2.102";

/// A real Headscale on loopback for a VM test: user `kiln`, a single-use pre-auth key tagged
/// `tag:k8s` (the tag qemu-local's profile advertises), and what a profile needs to join it.
pub struct Tailnet {
    pub headscale: crate::headscale::Headscale,
    pub user: u64,
    pub key: String,
    /// Headscale's state right after the user and key were made, for [`Tailnet::fresh`].
    template: tempfile::TempDir,
    bin: PathBuf,
}

pub const TAILNET_TAGS: [&str; 1] = ["tag:k8s"];

impl Tailnet {
    /// Headscale with user `kiln` and a single-use key (`reusable`: a key any number of nodes
    /// may join with).
    pub fn start(tools: &crate::gotools::GoTools) -> Tailnet {
        Self::start_with(tools, false)
    }

    pub fn start_with(tools: &crate::gotools::GoTools, reusable: bool) -> Tailnet {
        use crate::headscale::Headscale;
        let url = format!("http://{GUEST_HEADSCALE}");
        let hs = Headscale::start(&tools.headscale, Some(&url), "kiln", &TAILNET_TAGS)
            .expect("starting headscale");
        let user = hs.create_user("kiln").expect("headscale user");
        let key = hs
            .preauth_key(user, &TAILNET_TAGS, reusable)
            .expect("headscale pre-auth key");
        let template = hs.stop();
        let dir = Headscale::copy_dir(template.path()).expect("copying headscale's state");
        let headscale =
            Headscale::start_in(&tools.headscale, dir, Some(&url), "kiln", &TAILNET_TAGS)
                .expect("restarting headscale");
        Tailnet {
            headscale,
            user,
            key,
            template,
            bin: tools.headscale.clone(),
        }
    }

    /// Replaces the server with a fresh one holding the same user and key and no nodes (a
    /// test's independent runs with one payload: same node name, same first address).
    pub fn fresh(&mut self) {
        use crate::headscale::Headscale;
        let dir = Headscale::copy_dir(self.template.path()).expect("copying headscale's state");
        let url = format!("http://{GUEST_HEADSCALE}");
        let new = Headscale::start_in(&self.bin, dir, Some(&url), "kiln", &TAILNET_TAGS)
            .expect("restarting headscale");
        drop(std::mem::replace(&mut self.headscale, new));
    }

    /// `kiln qemu test --guestfwd` value joining the guest's http://10.0.2.102/ to Headscale.
    pub fn guestfwd(&self) -> String {
        format!("{GUEST_HEADSCALE}:80={}", self.headscale.port)
    }

    /// Writes `dir/NAME.yaml`: `base` (repo-relative) plus the tailnet (login server, no
    /// advertised tags, the `tag:k8s` pre-auth key as a file secret beside it) and the mirror's Tailscale tarball pin
    /// (`pins`, from [`make_tailnet_mirror`]); its path.
    pub fn profile(&self, base: &str, dir: &Path, name: &str, pins: &serde_json::Value) -> PathBuf {
        std::fs::create_dir_all(dir).expect("profile dir");
        let key_file = dir.join(format!("{name}-auth-key"));
        std::fs::write(&key_file, format!("{}\n", self.key)).expect("writing the key file");
        let sha = pins["tailscale"]["sha256"]
            .as_str()
            .expect("pins.json has the tailscale tarball");
        let size = pins["tailscale"]["size"]
            .as_u64()
            .expect("pins.json has the tarball's size");
        let text = format!(
            "# Written by the test: {base} joined to the test's Headscale.\n\
             extends: {}\n\
             tailscale:\n  \
               # The real v1.102.3 tarball built from .ci/go-tools.sh's binaries.\n  \
               digest: \"sha256:{sha}\"\n  \
               size: {size}\n  \
               login-server: http://{GUEST_HEADSCALE}\n  \
               # The key carries the tags: Headscale refuses advertised ones with a key.\n  \
               tags: []\n  \
               auth-key: {{file: {}}}\n",
            repo().join(base).display(),
            key_file.file_name().unwrap().to_string_lossy(),
        );
        let p = dir.join(format!("{name}.yaml"));
        std::fs::write(&p, text).expect("writing the tailnet profile");
        p
    }
}

impl Tailnet {
    /// Runs `f` while a second thread polls `headscale nodes list` every 2 s; `f`'s result and
    /// every sighting of the node named `name` (host Unix time, Headscale's JSON for it).
    pub fn watch_while<T>(
        &self,
        name: &str,
        f: impl FnOnce() -> T,
    ) -> (T, Vec<(f64, serde_json::Value)>) {
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let seen = s.spawn(|| {
                let mut seen = Vec::new();
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(nodes) = self.headscale.nodes() {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_secs_f64();
                        seen.extend(
                            nodes
                                .into_iter()
                                .filter(|n| n["name"] == name)
                                .map(|n| (now, n)),
                        );
                    }
                    std::thread::sleep(std::time::Duration::from_secs(2));
                }
                seen
            });
            let out = f();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            (out, seen.join().expect("the Headscale watcher"))
        })
    }
}

/// Whether `ip` is in the tailnet's IPv4 range, 100.64.0.0/10.
pub fn in_tailnet_v4(ip: &str) -> bool {
    ip.parse::<std::net::Ipv4Addr>()
        .is_ok_and(|a| a.octets()[0] == 100 && (a.octets()[1] & 0xc0) == 64)
}

/// Records a test's counts as `<target>/reliability/<name>.json` (written atomically), the one
/// source `tests/reliability/summary.sh` builds its table from: the summary never reruns a test.
pub fn record_reliability(name: &str, doc: &serde_json::Value) {
    let path = target_dir()
        .join("reliability")
        .join(format!("{name}.json"));
    let dir = path.parent().expect("a reliability record has a directory");
    std::fs::create_dir_all(dir).expect("creating <target>/reliability");
    let tmp = path.with_extension("json.partial");
    let mut body = serde_json::to_vec_pretty(doc).expect("json");
    body.push(b'\n');
    std::fs::write(&tmp, body).expect("writing a reliability record");
    std::fs::rename(&tmp, &path).expect("renaming a reliability record");
}

/// One passed case of a group of tests (e.g. the mirror fault cases): created at the start of a
/// test, it records `<target>/reliability/<group>/<case>.json` when dropped unless the test is
/// panicking, so the summary counts the cases that really passed in this run.
pub struct PassedCase {
    group: &'static str,
    case: &'static str,
}

impl PassedCase {
    pub fn new(group: &'static str, case: &'static str) -> PassedCase {
        PassedCase { group, case }
    }
}

impl Drop for PassedCase {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            record_reliability(
                &format!("{}/{}", self.group, self.case),
                &serde_json::json!({"group": self.group, "case": self.case, "passed": true}),
            );
        }
    }
}
