//! Tampering on the node, against the real daemon binary: the unpacked release bundle (laid
//! out exactly as the builder writes it: daemon, unit, plan.json, manifests/, SHA256SUMS), the
//! node's plan and the kept tarball with its pin. Every tampered variant (changed byte,
//! swapped files, extra file, symlink, missing file, unsafe SHA256SUMS path, edited tarball, an
//! edited file with SHA256SUMS rewritten to match, the pinned tarball deleted) is
//! refused with exit 2 before any step runs: nothing is written outside /run/kiln (status).
//! The intact control case passes the check and starts the first step, so the refusals are the
//! tamper check's doing. (The in-process engine test covers one changed manifest byte and a
//! plan mismatch; this covers the remaining ways with the shipped binary.)

use kiln_plan::{manifests, paths, Plan, Sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    kiln_testkit::repo()
}

/// The qemu-local golden plan with every URL pointing at a closed loopback port and 1 s
/// deadlines: if a tampered case were wrongly accepted, the first step fails fast and locally.
fn plan_bytes() -> Vec<u8> {
    let text = std::fs::read_to_string(repo().join("tests/golden/builder/qemu-local/plan.json"))
        .unwrap()
        .replace("http://10.0.2.100/", "http://127.0.0.1:9/");
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (_, d) in v["deadlines"].as_object_mut().unwrap().iter_mut() {
        *d = serde_json::json!(1);
    }
    let plan = Plan::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
    plan.to_json()
}

struct Node {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Node {
    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
    fn bundle(&self, name: &str) -> PathBuf {
        self.path(paths::BUNDLE_DIR).join(name)
    }
    fn write(&self, p: &Path, data: &[u8]) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    fn resum(&self) {
        let dir = self.path(paths::BUNDLE_DIR);
        let mut names = Vec::new();
        walk(&dir, "", &mut names);
        let sums: String = names
            .iter()
            .filter(|n| *n != "SHA256SUMS")
            .map(|n| {
                format!(
                    "{}  {n}\n",
                    Sha256::digest(&std::fs::read(dir.join(n)).unwrap())
                )
            })
            .collect();
        std::fs::write(dir.join("SHA256SUMS"), sums).unwrap();
    }
    fn files(&self) -> BTreeSet<String> {
        let mut v = Vec::new();
        walk(&self.root, "", &mut v);
        v.into_iter().collect()
    }
    fn run(&self) -> (Option<i32>, String) {
        let o = Command::new(env!("CARGO_BIN_EXE_kiln-firstboot"))
            .args(["run", "--root"])
            .arg(&self.root)
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code(), text)
    }
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.file_type().unwrap().is_dir() {
            walk(&e.path(), &format!("{name}/"), out);
        } else {
            out.push(name);
        }
    }
}

/// A node as the bootstrap leaves it: plan, pin, tarball, unpacked and verified bundle.
fn node() -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let n = Node {
        root: tmp.path().to_path_buf(),
        _tmp: tmp,
    };
    let plan = plan_bytes();
    n.write(&n.path(paths::PLAN), &plan);
    n.write(&n.path(paths::CLOUD_INSTANCE_ID), b"iid-tamper\n");
    n.write(&n.bundle("plan.json"), &plan);
    n.write(
        &n.bundle("kiln-firstboot"),
        b"\x7fELF stand-in daemon bytes",
    );
    n.write(
        &n.bundle("kiln-firstboot.service"),
        &std::fs::read(repo().join("firstboot/systemd/kiln-firstboot.service")).unwrap(),
    );
    for m in manifests::bundled(&Plan::from_json(&plan).unwrap()) {
        n.write(&n.bundle(&format!("manifests/{}", m.file)), &m.bytes);
    }
    n.resum();
    let tarball = pack(&n.path(paths::BUNDLE_DIR));
    n.write(&n.path(paths::BUNDLE_TARBALL), &tarball);
    n.write(
        &n.path(paths::BUNDLE_PIN),
        format!("{}\n", Sha256::digest(&tarball)).as_bytes(),
    );
    n
}

/// The unpacked bundle packed back into a tar.gz, the way the bootstrap found it.
fn pack(dir: &Path) -> Vec<u8> {
    let mut names = Vec::new();
    walk(dir, "", &mut names);
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for n in names {
        tar.append_path_with_name(dir.join(&n), &n).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

fn manifest_names(n: &Node) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(n.bundle("manifests"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn flip_byte(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x20;
    std::fs::write(p, b).unwrap();
}

/// Each case: (name, tamper, expected words in the refusal).
type Case = (&'static str, fn(&Node), &'static str);

fn cases() -> Vec<Case> {
    vec![
        (
            "changed byte in the bundle's daemon",
            |n| flip_byte(&n.bundle("kiln-firstboot")),
            "bundle tampered",
        ),
        (
            "changed byte in the bundle's unit",
            |n| flip_byte(&n.bundle("kiln-firstboot.service")),
            "bundle tampered",
        ),
        (
            "changed byte in the bundle's plan.json",
            |n| flip_byte(&n.bundle("plan.json")),
            "bundle tampered",
        ),
        (
            "changed byte in the node's plan.json",
            |n| flip_byte(&n.path(paths::PLAN)),
            "plan",
        ),
        (
            "two manifests swapped",
            |n| {
                let names = manifest_names(n);
                assert!(names.len() >= 2, "{names:?}");
                let (a, b) = (
                    n.bundle(&format!("manifests/{}", names[0])),
                    n.bundle(&format!("manifests/{}", names[1])),
                );
                let (da, db) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
                std::fs::write(&a, db).unwrap();
                std::fs::write(&b, da).unwrap();
            },
            "bundle tampered",
        ),
        (
            "daemon swapped for the unit file",
            |n| {
                std::fs::copy(
                    n.bundle("kiln-firstboot.service"),
                    n.bundle("kiln-firstboot"),
                )
                .unwrap();
            },
            "bundle tampered",
        ),
        (
            "extra manifest not in SHA256SUMS",
            |n| {
                n.write(
                    &n.bundle("manifests/zz-extra.yaml"),
                    b"kind: ClusterRoleBinding\n",
                );
            },
            "not listed in SHA256SUMS",
        ),
        (
            "manifest replaced by a symlink",
            |n| {
                let name = &manifest_names(n)[0];
                let p = n.bundle(&format!("manifests/{name}"));
                let target = n.path("/tmp-elsewhere.yaml");
                std::fs::copy(&p, &target).unwrap();
                std::fs::remove_file(&p).unwrap();
                std::os::unix::fs::symlink(&target, &p).unwrap();
            },
            "not a regular file",
        ),
        (
            "manifest deleted",
            |n| {
                std::fs::remove_file(n.bundle(&format!("manifests/{}", manifest_names(n)[0])))
                    .unwrap();
            },
            "is missing",
        ),
        (
            "SHA256SUMS lists a path outside the bundle",
            |n| {
                let p = n.bundle("SHA256SUMS");
                let mut s = std::fs::read_to_string(&p).unwrap();
                s.push_str(&format!("{}  ../../../etc/shadow\n", Sha256::digest(b"")));
                std::fs::write(p, s).unwrap();
            },
            "unsafe file name",
        ),
        (
            "kept tarball changed",
            |n| flip_byte(&n.path(paths::BUNDLE_TARBALL)),
            "pin",
        ),
        (
            "daemon edited and SHA256SUMS rewritten to match",
            |n| {
                flip_byte(&n.bundle("kiln-firstboot"));
                n.resum();
            },
            "differs from the SHA256SUMS inside the pinned",
        ),
        (
            "manifest edited, SHA256SUMS rewritten, tarball deleted",
            |n| {
                let name = &manifest_names(n)[0];
                flip_byte(&n.bundle(&format!("manifests/{name}")));
                n.resum();
                std::fs::remove_file(n.path(paths::BUNDLE_TARBALL)).unwrap();
            },
            "is missing, so the unpacked bundle cannot be checked",
        ),
    ]
}

#[test]
fn intact_bundle_passes_the_tamper_check_and_the_first_step_starts() {
    let n = node();
    let (code, out) = n.run();
    assert!(!out.contains("refusing to run"), "{out}");
    assert!(out.contains("step k3s started"), "{out}");
    // The first step fails against the closed port (1 s deadline); that is not a refusal.
    assert_ne!(code, Some(2), "{out}");
}

#[test]
fn every_tampered_bundle_or_plan_is_refused_before_any_step_runs() {
    let mut refused = 0;
    let all = cases();
    for (name, tamper, words) in &all {
        let n = node();
        tamper(&n);
        let before = n.files();
        let (code, out) = n.run();
        assert_eq!(code, Some(2), "{name}: exit {code:?}\n{out}");
        assert!(out.contains("refusing to run"), "{name}: {out}");
        assert!(
            out.contains(words),
            "{name}: refusal lacks {words:?}: {out}"
        );
        assert!(
            !out.contains("step k3s started"),
            "{name}: a step ran: {out}"
        );
        let written: Vec<String> = n
            .files()
            .difference(&before)
            .filter(|f| !f.starts_with("run/kiln/") && *f != "var/lib/kiln/.lock")
            .cloned()
            .collect();
        assert!(written.is_empty(), "{name}: wrote {written:?}");
        let status: serde_json::Value =
            serde_json::from_slice(&std::fs::read(n.path(paths::STATUS)).unwrap()).unwrap();
        assert_eq!(status["state"], "refused", "{name}: {status}");
        refused += 1;
    }
    eprintln!(
        "tampered node cases: {refused} refused / {} tried",
        all.len()
    );
    kiln_testkit::record_reliability(
        "tamper",
        &serde_json::json!({"tried": all.len(), "refused": refused}),
    );
}
