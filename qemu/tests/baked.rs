//! QEMU e2e "baked" (issue 8): `kiln bake` the Debian 12 test image with the url-delivery test
//! profile (the bake VM stages the daemon, its unit, the bundle and every pinned artifact, then
//! cleans cloud-init and powers off); boot the baked qcow2 with that profile's seed and a mirror
//! serving an empty directory (any request would be logged and answered 404) and reach daemon
//! done with zero requests; boot the plain test image with the same payload and the full mirror
//! ("payload-only"); print both timelines' time to done (baked is meant to be faster; timing is
//! reported, not asserted). Also checks the outputs: a standalone qcow2 and a fixed VHD whose
//! size is a whole number of MiB plus the 512-byte footer, both with their sha256 in build.json.
//!
//! The baked disk is instance-neutral (empty machine-id, no SSH host keys, no dbus machine-id, no
//! cloud-init instance); a second VM booted from the same baked image and payload
//! ends with a different machine-id and different SSH host keys than the first, and neither boot
//! was a systemd "first boot" (no preset-all).
//!
//! Runs only with KILN_VM_TESTS=1 and needs KILN_FIRSTBOOT = the static daemon. Four TCG boots:
//! about 10-15 minutes on 2 cores.

use std::path::Path;
use std::process::{Command, Output};

use kiln_testkit::gotools;
use kiln_testkit::{self as testkit, read_json, Tailnet};

fn kiln(args: &[&str]) -> (Output, String) {
    testkit::run_kiln(args)
}

/// coreutils' sha256sum: an implementation independent of the one that wrote build.json's
/// sha2 fallback, and fast on gigabytes.
fn sha256sum(p: &Path) -> String {
    let out = Command::new("sha256sum").arg("-b").arg(p).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn qemu_img_info(p: &Path, format: &str) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output", "json", "-f", format])
        .arg(p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img info {}: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Host seconds from QEMU start to `kiln: all steps done` in a `kiln qemu test` report.
fn done_at(report: &serde_json::Value) -> f64 {
    report["boots"][0]["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "all-done")
        .and_then(|e| e["at"].as_f64())
        .expect("no all-done event")
}

fn cloud_init_finished_at(report: &serde_json::Value) -> Option<f64> {
    report["boots"][0]["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "cloud-init-finished")
        .and_then(|e| e["at"].as_f64())
}

fn requests(report: &serde_json::Value) -> Vec<String> {
    report["boots"][0]["mirror_requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect()
}

fn journal_states(run: &Path) -> Vec<(String, String)> {
    let journal = read_json(&run.join("boot-1/guest/var/lib/kiln/journal.json"));
    journal["steps"]
        .as_array()
        .expect("journal steps")
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap_or("").to_string(),
                s["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Who a booted VM turned out to be: read from its powered-off disk (the run's overlay).
struct Identity {
    machine_id: String,
    /// `ssh_host_*_key.pub` names and contents.
    host_keys: Vec<(String, String)>,
    /// What systemd said early in the boot: the serial console and the guest's journal.
    boot_log: String,
}

fn identity_of(run: &Path, raw: &Path) -> Identity {
    let disk = kiln_qemu::inspect::GuestDisk::from_overlay(&run.join("disk.qcow2"), raw).unwrap();
    let machine_id = String::from_utf8(disk.read("/etc/machine-id").unwrap().expect("machine-id"))
        .unwrap()
        .trim()
        .to_string();
    let mut host_keys = Vec::new();
    for name in disk.list("/etc/ssh").unwrap().expect("/etc/ssh") {
        if name.starts_with("ssh_host_") && name.ends_with(".pub") {
            let key = disk.read(&format!("/etc/ssh/{name}")).unwrap().unwrap();
            host_keys.push((name, String::from_utf8_lossy(&key).trim().to_string()));
        }
    }
    let mut boot_log =
        String::from_utf8_lossy(&std::fs::read(run.join("boot-1/serial.log")).unwrap())
            .into_owned();
    // journald imports the kernel log, so PID 1's earliest lines are in the journal too.
    let journal = format!("/var/log/journal/{machine_id}/system.journal");
    if let Some(bytes) = disk.read(&journal).unwrap() {
        let copy = raw.with_extension("journal");
        std::fs::write(&copy, bytes).unwrap();
        let out = Command::new("journalctl")
            .arg(format!("--file={}", copy.display()))
            .args(["-o", "cat", "--no-pager"])
            .output()
            .unwrap();
        boot_log.push_str(&String::from_utf8_lossy(&out.stdout));
        let _ = std::fs::remove_file(&copy);
    }
    Identity {
        machine_id,
        host_keys,
        boot_log,
    }
}

/// The disk `kiln bake` wrote is instance-neutral: an empty (not missing) machine-id, no dbus
/// machine-id, no SSH host key, no cloud-init instance, no systemd credential secret.
fn assert_instance_neutral(disk: &kiln_qemu::inspect::GuestDisk) {
    let mid = disk
        .stat("/etc/machine-id")
        .unwrap()
        .expect("/etc/machine-id must exist, empty (a missing one means first-boot presets)");
    assert_eq!(
        (mid.kind.as_str(), mid.size),
        ("regular", 0),
        "/etc/machine-id must be an empty file: {mid:?}"
    );
    assert!(
        disk.stat("/var/lib/dbus/machine-id").unwrap().is_none(),
        "/var/lib/dbus/machine-id left in the image"
    );
    let ssh = disk.list("/etc/ssh").unwrap().expect("/etc/ssh");
    assert!(ssh.iter().any(|n| n == "sshd_config"), "{ssh:?}");
    let keys: Vec<&String> = ssh.iter().filter(|n| n.starts_with("ssh_host_")).collect();
    assert!(keys.is_empty(), "SSH host keys left in the image: {keys:?}");
    let instances = disk
        .list("/var/lib/cloud/instances")
        .unwrap()
        .unwrap_or_default();
    assert!(
        instances.is_empty(),
        "cloud-init instances left: {instances:?}"
    );
    for gone in ["/var/lib/systemd/credential.secret", "/var/lib/waagent"] {
        assert!(
            disk.stat(gone).unwrap().is_none(),
            "{gone} left in the image"
        );
    }
}

#[test]
fn baked_image_reaches_done_with_the_mirror_off_and_is_compared_with_payload_only() {
    let Some(firstboot) = testkit::vm_tests("baked") else {
        return;
    };
    let work = testkit::work_dir("kiln-baked");
    let w = work.path.clone();
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // The mirror serves the K3s stand-in and the real Tailscale tarball; both boots' real
    // tailscaled join a real Headscale (a reusable key, a fresh server per boot).
    let tools = gotools::find("baked").expect("required with KILN_VM_TESTS=1");
    let mirror = w.join("mirror");
    let pins = testkit::make_tailnet_mirror(&mirror, &tools);
    let mut tailnet = Tailnet::start_with(&tools, true);
    let profile = tailnet.profile(
        "qemu/tests/profiles/qemu-local-url.yaml",
        &w,
        "baked-tailnet",
        &pins,
    );

    // 1. Bake.
    let bake = w.join("bake");
    let (out, text) = kiln(&[
        "bake",
        &s(&profile),
        "--image",
        "debian-12-test",
        "--mirror",
        &s(&mirror),
        "--firstboot",
        &firstboot,
        "-o",
        &s(&bake),
        "--deadline",
        "1500",
    ]);
    assert!(out.status.success(), "kiln bake failed");
    for stage in [
        "[1/6] build",
        "[3/6] boot",
        "[5/6] write",
        "[6/6] checksums",
    ] {
        assert!(text.contains(stage), "no progress line {stage:?}");
    }
    let build = read_json(&bake.join("build.json"));
    let bake_seconds = build["bake-boot"]["seconds"].as_f64().unwrap();

    // Every pinned artifact was staged, with the pins' sha256, fetched through the mirror.
    let staged: Vec<(String, String)> = build["staged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_string(),
                // `sha512:<hex>` / `sha256:<hex>`: the cache file is named by the hex.
                a["digest"]
                    .as_str()
                    .unwrap()
                    .split(':')
                    .nth(1)
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(staged.len(), 3, "{staged:?}");
    for key in ["k3s", "tailscale", "argocd"] {
        let sha = pins[key][pin_algorithm(key)].as_str().unwrap();
        assert!(
            staged.iter().any(|(_, s)| s == sha),
            "{key} not staged: {staged:?}"
        );
    }
    let bake_reqs: Vec<&str> = build["bake-boot"]["mirror-requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        bake_reqs.contains(&"GET /k3s/v1.32.4+k3s1/k3s 200"),
        "{bake_reqs:?}"
    );

    // The outputs: standalone qcow2, fixed 1 MiB-aligned VHD, sha256 as recorded.
    let qcow2 = bake.join(build["outputs"]["qcow2"]["file"].as_str().unwrap());
    let vhd = bake.join(build["outputs"]["vhd"]["file"].as_str().unwrap());
    for (kind, p) in [("qcow2", &qcow2), ("vhd", &vhd)] {
        let o = &build["outputs"][kind];
        assert_eq!(o["sha256"].as_str().unwrap(), sha256sum(p), "{kind}");
        assert_eq!(
            o["size"].as_u64().unwrap(),
            std::fs::metadata(p).unwrap().len(),
            "{kind}"
        );
    }
    let qi = qemu_img_info(&qcow2, "qcow2");
    assert_eq!(qi["format"], "qcow2");
    assert!(
        qi["backing-filename"].is_null(),
        "the qcow2 must stand alone: {qi}"
    );
    let vlen = std::fs::metadata(&vhd).unwrap().len();
    assert_eq!(vlen % (1 << 20), 512, "VHD size {vlen}");
    let vi = qemu_img_info(&vhd, "vpc");
    assert_eq!(vi["format"], "vpc");
    assert_eq!(vi["virtual-size"].as_u64().unwrap(), vlen - 512);
    assert_eq!(vi["virtual-size"], qi["virtual-size"]);
    let footer = {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&vhd).unwrap();
        f.seek(SeekFrom::End(-512)).unwrap();
        let mut b = vec![0u8; 512];
        f.read_exact(&mut b).unwrap();
        b
    };
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(
        u32::from_be_bytes(footer[60..64].try_into().unwrap()),
        2,
        "disk type must be fixed"
    );

    // What the image holds: staged cache, bundle, daemon and unit (not enabled), no
    // cloud-init instance state or logs from the bake boot.
    let disk = kiln_qemu::inspect::GuestDisk::from_overlay(&qcow2, &w.join("baked.raw")).unwrap();
    for key in ["k3s", "tailscale", "argocd"] {
        let sha = pins[key][pin_algorithm(key)].as_str().unwrap();
        let st = disk
            .stat(&format!("/var/lib/kiln/cache/{sha}"))
            .unwrap()
            .unwrap_or_else(|| panic!("{key} is not in the baked cache"));
        assert_eq!(st.mode & 0o777, 0o600);
    }
    let bundle_sha = build["bundle"]["sha256"].as_str().unwrap();
    assert!(disk.stat("/var/lib/kiln/bundle.tar.gz").unwrap().is_some());
    assert!(disk
        .stat("/usr/local/sbin/kiln-firstboot")
        .unwrap()
        .is_some());
    assert!(disk
        .stat("/etc/systemd/system/kiln-firstboot.service")
        .unwrap()
        .is_some());
    assert!(
        disk.stat("/etc/systemd/system/multi-user.target.wants/kiln-firstboot.service")
            .unwrap()
            .is_none(),
        "the bake must not enable the unit"
    );
    for gone in [
        "/var/lib/cloud/instance",
        "/var/lib/cloud/data/instance-id",
        "/var/log/cloud-init.log",
        "/var/log/cloud-init-output.log",
        "/etc/kiln/plan.json",
        "/var/lib/kiln/journal.json",
    ] {
        assert!(
            disk.stat(gone).unwrap().is_none(),
            "{gone} left in the image"
        );
    }
    assert_instance_neutral(&disk);
    drop(disk);
    let _ = std::fs::remove_file(w.join("baked.raw"));

    // The payload: the bake's own build of the profile (same bundle pin).
    let seed = bake.join("build/seed.img");
    assert_eq!(
        testkit::publish_bundle(&bake.join("build"), &mirror),
        bundle_sha
    );

    // 2. The baked image, mirror off: an empty directory, so any request is logged and 404s.
    let empty = w.join("mirror-empty");
    std::fs::create_dir_all(&empty).unwrap();
    let run_baked = w.join("run-baked");
    let (out, text) = kiln(&[
        "qemu",
        "test",
        "--seed",
        &s(&seed),
        "--image",
        &s(&bake),
        "--mirror",
        &s(&empty),
        "--guestfwd",
        &tailnet.guestfwd(),
        "-o",
        &s(&run_baked),
        "--deadline",
        "900",
    ]);
    assert!(out.status.success(), "the baked boot failed");
    assert!(text.contains("PASS: every step done"));
    let baked = read_json(&run_baked.join("report.json"));
    assert_eq!(baked["boots"][0]["outcome"]["result"], "all-done");
    assert_eq!(
        requests(&baked),
        Vec::<String>::new(),
        "the baked node downloaded"
    );
    let states = journal_states(&run_baked);
    assert_eq!(states.len(), 6, "{states:?}");
    assert!(
        states.iter().all(|(_, st)| st == "done" || st == "skipped"),
        "{states:?}"
    );
    let ci_log =
        std::fs::read_to_string(run_baked.join("boot-1/guest/var/log/cloud-init-output.log"))
            .unwrap_or_default();
    assert!(
        ci_log.contains("bundle already present and verified"),
        "the bootstrap did not use the baked bundle:\n{ci_log}"
    );

    // 2b. A second VM from the same baked image and payload: each VM makes its own identity.
    // Its own fresh Headscale too: without the guestfwd its `tailscale up` has no control
    // server to reach and waits out the deadline.
    let run_baked2 = w.join("run-baked-2");
    tailnet.fresh();
    let (out, _) = kiln(&[
        "qemu",
        "test",
        "--seed",
        &s(&seed),
        "--image",
        &s(&bake),
        "--mirror",
        &s(&empty),
        "--guestfwd",
        &tailnet.guestfwd(),
        "-o",
        &s(&run_baked2),
        "--deadline",
        "900",
    ]);
    assert!(out.status.success(), "the second baked boot failed");
    let (a, b) = (
        identity_of(&run_baked, &w.join("id-a.raw")),
        identity_of(&run_baked2, &w.join("id-b.raw")),
    );
    for (which, id) in [("first", &a), ("second", &b)] {
        assert!(
            id.machine_id.len() == 32 && id.machine_id.bytes().all(|c| c.is_ascii_hexdigit()),
            "{which} VM: machine-id {:?}",
            id.machine_id
        );
        assert!(
            id.host_keys
                .iter()
                .any(|(n, _)| n == "ssh_host_ed25519_key.pub"),
            "{which} VM made no ed25519 host key: {:?}",
            id.host_keys
        );
        // systemd generated the id (the empty file), and did not take the boot for a first boot:
        // no preset-all, so nothing the image did not enable gets enabled.
        assert!(
            id.boot_log.contains("Initializing machine ID from"),
            "{which} VM: systemd did not report generating a machine-id"
        );
        for line in [
            "Detected first boot",
            "Populated /etc with preset unit settings",
        ] {
            assert!(!id.boot_log.contains(line), "{which} VM: {line:?}");
        }
    }
    assert_ne!(a.machine_id, b.machine_id, "two VMs share one machine-id");
    for (name, key) in &a.host_keys {
        assert!(
            !b.host_keys.iter().any(|(_, k)| k == key),
            "two VMs share the host key {name}"
        );
    }
    eprintln!(
        "two VMs from one baked image: machine-ids {} / {}, {} / {} host keys, all distinct",
        a.machine_id,
        b.machine_id,
        a.host_keys.len(),
        b.host_keys.len()
    );

    // 3. Payload-only: the plain test image, the same seed, the full mirror.
    let run_payload = w.join("run-payload");
    tailnet.fresh();
    let (out, _) = kiln(&[
        "qemu",
        "test",
        "--seed",
        &s(&seed),
        "--mirror",
        &s(&mirror),
        "--guestfwd",
        &tailnet.guestfwd(),
        "-o",
        &s(&run_payload),
        "--deadline",
        "900",
    ]);
    assert!(out.status.success(), "the payload-only boot failed");
    let payload = read_json(&run_payload.join("report.json"));
    let preqs = requests(&payload);
    for want in [
        format!("GET /bundles/bundle-{bundle_sha}.tar.gz 200"),
        "GET /k3s/v1.32.4+k3s1/k3s 200".to_string(),
        "GET /tailscale/tailscale_1.102.3_amd64.tgz 200".to_string(),
        "GET /argocd/v3.4.7/install.yaml 200".to_string(),
    ] {
        assert!(preqs.contains(&want), "{want} not in {preqs:?}");
    }

    // The comparison (reported, not asserted: timing under TCG on shared cores is noise). The
    // early boot (kernel to cloud-init) swings with host load; cloud-init finished -> daemon done
    // is where the staged artifacts save time.
    let (b_done, p_done) = (done_at(&baked), done_at(&payload));
    let (b_ci, p_ci) = (
        cloud_init_finished_at(&baked),
        cloud_init_finished_at(&payload),
    );
    let fmt = |v: Option<f64>| v.map(|x| format!("{x:.1}s")).unwrap_or("-".into());
    let phase = |ci: Option<f64>, done: f64| fmt(ci.map(|c| done - c));
    eprintln!(
        "baked vs payload-only (host seconds from QEMU start):\n  \
         bake boot (once, powered off):  {bake_seconds:.1}s\n  \
         baked image:   cloud-init finished {}, daemon done {b_done:.1}s (cloud-init -> done {}), {} mirror requests\n  \
         payload-only:  cloud-init finished {}, daemon done {p_done:.1}s (cloud-init -> done {}), {} mirror requests\n  \
         baked - payload-only = {:+.1}s to done",
        fmt(b_ci),
        phase(b_ci, b_done),
        requests(&baked).len(),
        fmt(p_ci),
        phase(p_ci, p_done),
        preqs.len(),
        b_done - p_done
    );
}

/// profiles/qemu-local.yaml pins the K3s stand-in by sha512 (as the reference profile pins the
/// real binary), the others by sha256; the cache names files by that digest's hex.
fn pin_algorithm(key: &str) -> &'static str {
    if key == "k3s" {
        "sha512"
    } else {
        "sha256"
    }
}
