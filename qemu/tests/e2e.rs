//! The project's end-to-end proof (issues 5 and 15), through the product command `kiln qemu
//! test`: `kiln build` of profiles/qemu-local.yaml joined to a real tailnet → boot the Debian 12
//! test image with the seed → real cloud-init runs the payload → the bootstrap verifies the
//! bundle and starts the real static `kiln-firstboot` → it installs the K3s contract stand-in
//! and the REAL Tailscale v1.102.3 tarball (built from the tailscale.com module by
//! .ci/go-tools.sh, upstream layout) from the loopback mirror through the production download
//! path and runs every step; the real tailscaled joins a real Headscale v0.29.2 on the host's
//! loopback, which the guest reaches at http://10.0.2.102/ through a guestfwd.
//!
//! The test profile is written here (`testkit::Tailnet::profile`): qemu-local.yaml plus
//! `tailscale.login-server`, the mirror's tarball pin, and a single-use `tag:k8s` pre-auth key
//! the test creates with the `headscale` CLI, given as a file secret.
//!
//! Then: the guest disk is read back and checked (the real client's Running state and 100.64/10
//! address in the journal, the key file gone), Headscale lists the node with its hostname and
//! tags online during boot 1, the same disk is booted again (every step skipped, nothing
//! downloaded, the node online again without a key and not re-registered), the timeline is
//! compared with a floor boot (same image, empty payload), and a mirror serving a corrupted K3s
//! binary must make `kiln qemu test` fail with the daemon's checksum error.
//!
//! Runs only with KILN_VM_TESTS=1 (the lead's .ci/run sets it) and needs KILN_FIRSTBOOT = the
//! static daemon and .ci/go-tools.sh's binaries. About 10 minutes under TCG on 2 cores.

use kiln_testkit::gotools;
use kiln_testkit::{
    build_profile, files_under, in_tailnet_v4, make_tailnet_mirror, publish_bundle, read_json,
    repo, run_kiln, vm_tests, work_dir, Tailnet, TAILNET_TAGS,
};
use std::process::{Command, Output};

/// The device name qemu-local.yaml gives the node (`tailscale.hostname` of ameciclo.yaml).
const TS_HOSTNAME: &str = "ameciclo-k3s";

fn run_kiln_qemu_test(args: &[&str]) -> (Output, String) {
    run_kiln(&[&["qemu", "test"], args].concat())
}

#[test]
fn qemu_local_profile_provisions_the_node_and_reboot_skips_everything() {
    let Some(firstboot) = vm_tests("qemu e2e") else {
        return;
    };
    let tools = gotools::find("qemu e2e").expect("required with KILN_VM_TESTS=1");
    let work = work_dir("kiln-e2e");
    let w = &work.path;

    // The mirror (K3s stand-in, real Tailscale tarball), built by the steps' own tool, and the
    // tailnet: Headscale, its user and a tagged single-use key.
    let mirror = w.join("mirror");
    let pins = make_tailnet_mirror(&mirror, &tools);
    let tailnet = Tailnet::start(&tools);
    let fwd = tailnet.guestfwd();
    let profile = tailnet.profile("profiles/qemu-local.yaml", w, "qemu-local-tailnet", &pins);
    let profile_url = tailnet.profile(
        "qemu/tests/profiles/qemu-local-url.yaml",
        w,
        "qemu-local-url-tailnet",
        &pins,
    );

    // First, as it is the short boot: a mirror serving a corrupted K3s binary. The daemon
    // refuses it and kiln qemu test fails with the daemon's error in its output. This boot uses
    // url delivery (the bundle from the same mirror) so its payload stays small.
    let bad = w.join("mirror-bad");
    std::fs::create_dir_all(&bad).unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", mirror.display()))
        .arg(&bad)
        .status()
        .unwrap();
    assert!(st.success());
    let k3s = bad.join("k3s/v1.32.4+k3s1/k3s");
    let mut bytes = std::fs::read(&k3s).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&k3s, bytes).unwrap();
    let build_url = w.join("build-url");
    build_profile(profile_url.to_str().unwrap(), &firstboot, &build_url);
    let sha = publish_bundle(&build_url, &bad);
    let seed = build_url.join("seed.img");
    let run_bad = w.join("run-bad");
    let (out, text) = run_kiln_qemu_test(&[
        "--seed",
        seed.to_str().unwrap(),
        "--mirror",
        bad.to_str().unwrap(),
        "-o",
        run_bad.to_str().unwrap(),
        "--deadline",
        "900",
    ]);
    assert!(
        !out.status.success(),
        "kiln qemu test passed with a corrupted K3s binary"
    );
    assert!(
        text.contains("step k3s failed"),
        "the failing step is not named"
    );
    assert!(
        // qemu-local pins the K3s stand-in by sha512 (and size: a flipped byte keeps the size).
        text.contains("sha512 mismatch"),
        "the daemon's checksum error is not visible"
    );
    // The bundle itself came through the mirror and verified; the bad binary never got installed.
    let bad_report = read_json(&run_bad.join("report.json"));
    assert_eq!(bad_report["ok"], false);
    let reqs: Vec<String> = bad_report["boots"][0]["mirror_requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert!(
        reqs.iter()
            .any(|r| r.contains(&format!("bundles/bundle-{sha}.tar.gz 200"))),
        "{reqs:?}"
    );
    assert!(
        bad_report["boots"][0]["guest"]["stats"]["/usr/local/bin/k3s"].is_null(),
        "a corrupted k3s was installed"
    );

    // 1-4: floor, first boot, reboot of the same disk.
    // Headscale is watched throughout: the node must be online during each boot.
    let run = w.join("run");
    let ((out, text), sightings) = tailnet.watch_while(TS_HOSTNAME, || {
        run_kiln_qemu_test(&[
            profile.to_str().unwrap(),
            "--firstboot",
            &firstboot,
            "--mirror",
            mirror.to_str().unwrap(),
            "--guestfwd",
            &fwd,
            "-o",
            run.to_str().unwrap(),
            "--boots",
            "2",
            "--floor",
            "--deadline",
            "900",
        ])
    });
    assert!(
        out.status.success(),
        "kiln qemu test failed; see the output above and {}",
        run.display()
    );
    assert!(text.contains("PASS: every step done"));
    let report = read_json(&run.join("report.json"));
    assert_eq!(report["ok"], true);
    let boots = report["boots"].as_array().unwrap();
    assert_eq!(boots.len(), 2);

    // First boot: cloud-init done without errors, per its own persistent records.
    let b1 = &boots[0];
    assert_eq!(b1["outcome"]["result"], "all-done");
    assert_eq!(b1["guest"]["cloud_init_done"], true, "{}", b1["guest"]);
    assert_eq!(b1["guest"]["cloud_init_errors"], serde_json::json!([]));
    // Every step of the plan was done (the daemon's own journal, read from the disk).
    let guest1 = run.join("boot-1/guest");
    let journal = read_json(&guest1.join("var/lib/kiln/journal.json"));
    let journal_steps: Vec<(String, String)> = journal["steps"]
        .as_array()
        .expect("journal steps")
        .iter()
        .map(|st| {
            (
                st["id"].as_str().unwrap_or("").to_string(),
                st["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let ids: Vec<&str> = journal_steps.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "k3s",
            "tailscale",
            "tailscale-operator",
            "argocd",
            "gitops",
            "verify"
        ],
        "{journal}"
    );
    assert!(
        journal_steps
            .iter()
            .all(|(_, state)| state == "done" || state == "skipped"),
        "{journal_steps:?}"
    );
    let milestones: Vec<(String, String)> = b1["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "step-done" || e["kind"] == "step-skipped")
        .map(|e| {
            (
                e["step"].as_str().unwrap().to_string(),
                e["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let done_steps: Vec<&str> = milestones.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        done_steps,
        [
            "k3s",
            "tailscale",
            "tailscale-operator",
            "argocd",
            "gitops",
            "verify"
        ],
        "{milestones:?}"
    );
    // The mirror served the artifacts during boot 1.
    let reqs1: Vec<String> = b1["mirror_requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert!(
        reqs1.iter().any(|r| r.contains("k3s/v1.32.4+k3s1/k3s 200")),
        "{reqs1:?}"
    );
    assert!(
        reqs1
            .iter()
            .any(|r| r.contains("tailscale/tailscale_1.102.3_amd64.tgz 200")),
        "{reqs1:?}"
    );

    // The real client joined: the tailscale step records what `tailscale status --json` said
    // once BackendState was Running (kiln_firstboot::tailscale::wait_running).
    let ts_step = journal["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["id"] == "tailscale")
        .unwrap();
    let ips: Vec<String> = ts_step["facts"]["tailscale.ips"]
        .as_str()
        .unwrap_or("")
        .split(',')
        .map(str::to_string)
        .collect();
    let v4 = ips
        .iter()
        .find(|ip| in_tailnet_v4(ip))
        .unwrap_or_else(|| panic!("no 100.64.0.0/10 address from the real client: {ts_step}"));
    assert_eq!(
        ts_step["facts"]["tailscale.dns-name"],
        format!("{TS_HOSTNAME}.{}", kiln_testkit::headscale::BASE_DOMAIN),
        "{ts_step}"
    );
    let plan = read_json(&guest1.join("etc/kiln/plan.json"));
    assert_eq!(plan["tailscale"]["login-server"], "http://10.0.2.102/");
    assert_eq!(plan["tailscale"]["hostname"], TS_HOSTNAME);
    // Headscale saw the node, with the profile's hostname and tags, online during boot 1 and
    // again during boot 2 (the reboot: no key any more, see the stats below), and never a
    // second registration.
    let boot2_start = boots[1]["started_unix"].as_f64().unwrap();
    let online = |n: &serde_json::Value| {
        n["online"] == true
            && n["tags"] == serde_json::json!(TAILNET_TAGS)
            && n["ip_addresses"]
                .as_array()
                .is_some_and(|a| a.iter().any(|ip| ip == v4.as_str()))
    };
    assert!(
        sightings.iter().any(|(t, n)| *t < boot2_start && online(n)),
        "Headscale never listed {TS_HOSTNAME} online with {TAILNET_TAGS:?} during boot 1: {sightings:?}\n{}",
        tailnet.headscale.log()
    );
    assert!(
        sightings.iter().any(|(t, n)| *t > boot2_start && online(n)),
        "{TS_HOSTNAME} was not online again after the reboot: {sightings:?}"
    );
    let nodes = tailnet.headscale.nodes().unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    // The auth key is gone from the node after boot 1, and boot 2 needed none.
    for b in boots {
        assert!(
            b["guest"]["stats"]["/etc/kiln/secrets/tailscale-auth-key"].is_null(),
            "the auth key file is still on the node: {}",
            b["guest"]["stats"]
        );
    }

    // K3s config disables traefik and servicelb.
    let cfg: serde_yaml::Value =
        serde_yaml::from_slice(&std::fs::read(guest1.join("etc/rancher/k3s/config.yaml")).unwrap())
            .unwrap();
    let disable: Vec<&str> = cfg["disable"]
        .as_sequence()
        .expect("disable list")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        disable.contains(&"traefik") && disable.contains(&"servicelb"),
        "{disable:?}"
    );

    // The root Application points at the profile's repo and path.
    let mut found_app = false;
    for f in files_under(&guest1.join("var/lib/rancher/k3s/server/manifests")) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let Ok(v) = serde_yaml::Value::deserialize_from(doc) else {
                continue;
            };
            if v["kind"] == "Application" && v["metadata"]["name"] == "root" {
                assert_eq!(
                    v["spec"]["source"]["repoURL"],
                    "https://github.com/ameciclo/groundwork.git",
                    "{}",
                    f.display()
                );
                assert_eq!(v["spec"]["source"]["path"], "azure/kubernetes");
                found_app = true;
            }
        }
    }
    assert!(
        found_app,
        "no root Application among the K3s manifests copied from the guest"
    );

    // Secret files are 0600 root (whichever remain: the auth key is removed once Tailscale runs).
    let stats = &b1["guest"]["stats"];
    let secret_files: Vec<(&String, &serde_json::Value)> = stats
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, v)| k.starts_with("/etc/kiln/secrets/") && !v.is_null())
        .collect();
    assert!(
        !secret_files.is_empty(),
        "no secret files on the node: {stats}"
    );
    for (path, st) in secret_files {
        assert_eq!(st["mode"].as_u64().unwrap() & 0o777, 0o600, "{path}: {st}");
        assert_eq!(
            (st["uid"].as_u64(), st["gid"].as_u64()),
            (Some(0), Some(0)),
            "{path}: {st}"
        );
    }

    // No secret value anywhere in what the run produced: serial logs, guest logs, reports.
    let mut secrets: Vec<String> = ["tailscale-auth-key", "tailscale-oauth-client-secret"]
        .iter()
        .map(|n| {
            std::fs::read_to_string(repo().join("profiles/secrets.example").join(n))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    secrets.push(tailnet.key.clone());
    let mut scanned = 0;
    for f in files_under(&run) {
        let name = f.to_string_lossy();
        if name.ends_with(".qcow2")
            || name.ends_with("seed.img")
            || name.ends_with("user-data")
            || name.ends_with("custom_data.gz")
        {
            continue; // the payload carries the secrets to the node by design
        }
        let data = std::fs::read(&f).unwrap();
        for s in &secrets {
            assert!(
                !String::from_utf8_lossy(&data).contains(s.as_str()),
                "secret value found in {}",
                f.display()
            );
        }
        scanned += 1;
    }
    assert!(scanned > 5);

    // Reboot of the same disk: every step skipped, nothing downloaded.
    let b2 = &boots[1];
    assert_eq!(b2["outcome"]["result"], "all-done");
    assert_eq!(
        b2["mirror_requests"],
        serde_json::json!([]),
        "boot 2 downloaded again"
    );
    let kinds2: Vec<(String, String)> = b2["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["step"].is_string() && e["kind"] != "step-started")
        .map(|e| {
            (
                e["step"].as_str().unwrap().to_string(),
                e["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(kinds2.len(), 6, "{kinds2:?}");
    assert!(
        kinds2.iter().all(|(_, k)| k == "step-skipped"),
        "{kinds2:?}"
    );

    // The floor ran and the comparison was printed.
    assert_eq!(report["floor"]["outcome"]["result"], "cloud-init-finished");
    assert!(
        text.contains("floor (same image, empty payload)"),
        "no floor comparison printed"
    );
}

trait DeserializeFrom: Sized {
    fn deserialize_from(d: serde_yaml::Deserializer) -> Result<Self, serde_yaml::Error>;
}
impl DeserializeFrom for serde_yaml::Value {
    fn deserialize_from(d: serde_yaml::Deserializer) -> Result<Self, serde_yaml::Error> {
        serde::Deserialize::deserialize(d)
    }
}
