//! All six steps run by the real `kiln-firstboot run --root` against the contract stand-ins,
//! installed from a loopback artifact mirror through the production download path; then a
//! second run finds every step in place and changes nothing.

mod steps_common;

use kiln_plan::manifests;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use steps_common::*;

struct Node {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bin: PathBuf,
}

impl Node {
    fn systemctl(&self, args: &[&str]) -> Output {
        Command::new(standins_dir().join("systemctl"))
            .args(args)
            .env("KILN_STANDIN_ROOT", &self.root)
            .output()
            .unwrap()
    }

    fn run_daemon(&self) -> Output {
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new(env!("CARGO_BIN_EXE_kiln-firstboot"))
            .args(["run", "--root"])
            .arg(&self.root)
            .env("PATH", path)
            .env("KILN_STANDIN_ROOT", &self.root)
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap()
    }

    fn log(&self) -> Vec<Value> {
        fs::read_to_string(self.root.join("var/log/kiln-standins.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn p(&self, node_path: &str) -> PathBuf {
        self.root.join(node_path.trim_start_matches('/'))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The stand-in servers run detached; stop them so no test leaves processes behind.
        let _ = self.systemctl(&["stop", "k3s.service", "tailscaled.service"]);
    }
}

fn argv_of(log: &[Value], prog: &str) -> Vec<Vec<String>> {
    log.iter()
        .filter(|e| e["prog"] == prog)
        .map(|e| {
            e["argv"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

fn write_secret(root: &Path, node_path: &str, value: &str) {
    let p = root.join(node_path.trim_start_matches('/'));
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, format!("{value}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
}

/// Everything under the root that is node state kiln manages (not logs, runtime state of the
/// stand-ins, the journal or status): path → (mtime ns, size, mode, content hash).
fn snapshot(root: &Path) -> BTreeMap<String, (i64, u64, u32, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, (i64, u64, u32, String)>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let volatile = rel.starts_with("run/")
                || rel.starts_with("var/log/")
                || rel.starts_with("var/lib/tailscale/")
                || rel.starts_with("var/lib/rancher/k3s/server/standin")
                || rel == "var/lib/kiln/journal.json"
                || rel.starts_with("var/lib/kiln/journal")
                || rel == "var/lib/kiln/.lock";
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                walk(&p, root, out);
            } else if !volatile {
                let hash = if m.file_type().is_symlink() {
                    fs::read_link(&p).unwrap().to_string_lossy().into_owned()
                } else {
                    kiln_plan::Sha256::digest(&fs::read(&p).unwrap()).to_hex()
                };
                out.insert(
                    rel,
                    (
                        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                        m.size(),
                        m.mode(),
                        hash,
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn status(root: &Path) -> Value {
    serde_json::from_slice(&fs::read(root.join("run/kiln/status.json")).unwrap()).unwrap()
}

fn step_states(st: &Value) -> Vec<(String, String)> {
    let steps = &st["steps"];
    let list: Vec<Value> = match steps {
        Value::Array(a) => a.clone(),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                v["id"] = Value::String(k.clone());
                v
            })
            .collect(),
        _ => panic!("status has no steps: {st}"),
    };
    list.iter()
        .map(|s| {
            let id = s
                .get("id")
                .or_else(|| s.get("step"))
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_string();
            (id, s["state"].as_str().unwrap_or("?").to_string())
        })
        .collect()
}

#[test]
fn six_steps_against_the_standins_then_a_rerun_changes_nothing() {
    let tmp = tempfile::Builder::new()
        .prefix("kst")
        .tempdir_in("/tmp")
        .unwrap();
    let mirror_dir = tmp.path().join("mirror");
    let pins = make_mirror(&mirror_dir);
    let mirror = kiln_qemu::mirror::Mirror::start(&mirror_dir).unwrap();
    let plan = plan(&mirror.url(), &pins);

    let root = tmp.path().join("root");
    let bin = tmp.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(standins_dir().join("systemctl"), bin.join("systemctl")).unwrap();
    let node = Node {
        root: root.clone(),
        bin,
        _tmp: tmp,
    };
    // What cloud-init and the bootstrap leave behind: plan, secrets, unpacked bundle manifests.
    fs::create_dir_all(node.p("/etc/kiln")).unwrap();
    fs::write(node.p("/etc/kiln/plan.json"), plan.to_json()).unwrap();
    write_secret(&root, AUTH_KEY_FILE, AUTH_KEY);
    write_secret(&root, OAUTH_FILE, OAUTH_SECRET);
    write_secret(&root, REPO_FILE, REPO_PASSWORD);
    for m in manifests::bundled(&plan) {
        let p = node.p(&format!("/var/lib/kiln/bundle/manifests/{}", m.file));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, &m.bytes).unwrap();
    }

    // ---- first run: everything is applied -----------------------------------------------
    let out = node.run_daemon();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "first run failed ({}):\n{stdout}\n{stderr}\n--- k3s log:\n{}",
        out.status,
        fs::read_to_string(node.p("/var/log/standin-systemd/k3s.service.log")).unwrap_or_default()
    );
    let st = status(&root);
    let states = step_states(&st);
    assert_eq!(
        states.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        [
            "k3s",
            "tailscale",
            "tailscale-operator",
            "argocd",
            "gitops",
            "verify"
        ],
        "{st}"
    );
    // The first five had to apply; verify only reads the cluster back, so its check may
    // already pass (the stand-in applies manifests at once) and it is then "skipped".
    assert!(states[..5].iter().all(|s| s.1 == "done"), "{states:?}");
    assert!(
        matches!(states[5].1.as_str(), "done" | "skipped"),
        "{states:?}"
    );

    // Downloads went through the mirror (the production path), each artifact once.
    for key in ["k3s", "k3s-checksums", "tailscale", "argocd"] {
        let path = pins[key]["path"].as_str().unwrap();
        assert_eq!(
            mirror.hits(path),
            1,
            "{path} should be fetched exactly once"
        );
    }

    // K3s: binary from the pin, 0755; config, unit, env file as install.sh writes them.
    let k3s = fs::metadata(node.p("/usr/local/bin/k3s")).unwrap();
    assert_eq!(k3s.mode() & 0o7777, 0o755);
    assert_eq!(
        kiln_plan::Sha256::digest(&fs::read(node.p("/usr/local/bin/k3s")).unwrap()),
        plan.k3s.binary.sha256
    );
    let config = fs::read(node.p("/etc/rancher/k3s/config.yaml")).unwrap();
    golden("config.yaml", &config);
    assert_eq!(
        fs::read_to_string(node.p("/etc/systemd/system/k3s.service")).unwrap(),
        kiln_firstboot::k3s::unit_text()
    );
    let env = fs::metadata(node.p("/etc/systemd/system/k3s.service.env")).unwrap();
    assert_eq!(env.mode() & 0o777, 0o600);
    for l in ["kubectl", "crictl", "ctr"] {
        assert_eq!(
            fs::read_link(node.p(&format!("/usr/local/bin/{l}"))).unwrap(),
            Path::new("k3s")
        );
    }
    assert!(node
        .p("/etc/systemd/system/multi-user.target.wants/k3s.service")
        .is_symlink());
    assert!(node
        .p("/etc/systemd/system/multi-user.target.wants/tailscaled.service")
        .is_symlink());

    // Tailscale: the package layout, joined with exactly the planned arguments, key removed.
    for (p, mode) in [
        ("/usr/bin/tailscale", 0o755),
        ("/usr/sbin/tailscaled", 0o755),
        ("/lib/systemd/system/tailscaled.service", 0o644),
        ("/etc/default/tailscaled", 0o644),
    ] {
        assert_eq!(
            fs::metadata(node.p(p)).unwrap().mode() & 0o7777,
            mode,
            "{p}"
        );
    }
    let log = node.log();
    let ups: Vec<_> = argv_of(&log, "tailscale")
        .into_iter()
        .filter(|a| a.first().map(String::as_str) == Some("up"))
        .collect();
    assert_eq!(
        ups,
        [vec![
            "up",
            "--auth-key",
            "file:/etc/kiln/secrets/tailscale-auth-key",
            "--hostname",
            "ameciclo",
            "--advertise-tags",
            "tag:k8s"
        ]]
    );
    assert!(
        !node.p(AUTH_KEY_FILE).exists(),
        "the auth key must be removed once Running"
    );
    // K3s started once, then restarted once when the tailnet name joined tls-san.
    let servers = argv_of(&log, "k3s")
        .into_iter()
        .filter(|a| a[0] == "server")
        .count();
    assert_eq!(
        servers, 2,
        "k3s server starts: first start + tls-san restart"
    );
    let config_text = String::from_utf8_lossy(&config);
    assert!(
        config_text.contains("ameciclo.tail0000.ts.net"),
        "{config_text}"
    );
    let facts = st.to_string();
    assert!(
        facts.contains("ameciclo.tail0000.ts.net"),
        "facts should name the node: {st}"
    );

    // Manifests: bundled ones byte-identical to the bundle, node-rendered ones golden, 0600.
    let mdir = node.p("/var/lib/rancher/k3s/server/manifests");
    for m in manifests::bundled(&plan) {
        assert_eq!(fs::read(mdir.join(&m.file)).unwrap(), m.bytes, "{}", m.file);
    }
    for f in [manifests::TAILSCALE_OAUTH_FILE, manifests::GITOPS_REPO_FILE] {
        let meta = fs::metadata(mdir.join(f)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "{f}");
        golden(f, &fs::read(mdir.join(f)).unwrap());
    }
    let argocd = fs::read(mdir.join(manifests::ARGOCD_INSTALL_FILE)).unwrap();
    golden(
        "argocd.yaml.sha256",
        format!("{}\n", kiln_plan::Sha256::digest(&argocd).to_hex()).as_bytes(),
    );
    // No temp files left where K3s looks.
    let mut names: Vec<String> = fs::read_dir(&mdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "argocd-ingress.yaml",
            "argocd.yaml",
            "gitops-repo.yaml",
            "gitops-root.yaml",
            "tailscale-operator-oauth.yaml",
            "tailscale-operator.yaml"
        ]
    );

    // Secret values appear nowhere but in the 0600 files that must hold them.
    let canaries = [AUTH_KEY, OAUTH_SECRET, REPO_PASSWORD];
    for text in [stdout.as_ref(), stderr.as_ref()] {
        for c in canaries {
            assert!(!text.contains(c), "secret leaked to daemon output");
        }
    }
    for (rel, (_, _, mode, _)) in snapshot(&root) {
        let p = root.join(&rel);
        if fs::symlink_metadata(&p).unwrap().is_symlink() || mode & 0o004 == 0 {
            continue;
        }
        let data = fs::read(&p).unwrap();
        let text = String::from_utf8_lossy(&data);
        for c in canaries {
            assert!(!text.contains(c), "{rel} (world-readable) holds a secret");
        }
    }
    for rel in ["var/log/kiln-standins.log", "run/kiln/status.json"] {
        let text = fs::read_to_string(root.join(rel)).unwrap_or_default();
        for c in canaries {
            assert!(!text.contains(c), "{rel} holds a secret");
        }
    }

    // Argo CD's view of the root Application is recorded as information.
    assert!(facts.contains("argocd.root.sync"), "{st}");

    // ---- second run: every step skipped by check, nothing rewritten -----------------------
    let before = snapshot(&root);
    let log_len = node.log().len();
    let out = node.run_daemon();
    assert!(
        out.status.success(),
        "second run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let states = step_states(&status(&root));
    assert!(
        states.iter().all(|s| s.1 == "skipped"),
        "every step should be skipped by its check: {states:?}"
    );
    let after = snapshot(&root);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (k, v) in &before {
        assert_eq!(v, &after[k], "{k} was rewritten by the second run");
    }
    let new = node.log()[log_len..].to_vec();
    for e in &new {
        let argv: Vec<&str> = e["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let prog = e["prog"].as_str().unwrap();
        let changes = match prog {
            "systemctl" => !matches!(argv.first(), Some(&"is-active") | Some(&"is-enabled")),
            "tailscale" => argv.first() != Some(&"status"),
            "k3s" => argv.first() != Some(&"kubectl"),
            _ => true,
        };
        assert!(!changes, "second run changed state: {prog} {argv:?}");
    }
    for key in ["k3s", "tailscale", "argocd"] {
        let path = pins[key]["path"].as_str().unwrap();
        assert_eq!(mirror.hits(path), 1, "{path} was downloaded again");
    }
}
