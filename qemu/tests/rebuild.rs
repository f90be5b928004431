//! Issue 8's QEMU e2e "rebuild": a node destroyed and re-created from the identical payload
//! comes back with a fresh journal, keeps its tailnet name and ends in the same state.
//!
//! 1. `kiln build qemu/tests/profiles/qemu-rebuild.yaml` once (url delivery, `tailscale.api`
//!    pointing at http://10.0.2.101, which `--guestfwd` joins to the Tailscale API contract
//!    stand-in `kiln_testkit::fake_tailscale_api` on the host's loopback).
//! 2. Boot 1 on a fresh overlay: every step done.
//! 3. The node's device (and the operator's `argocd` proxy) are registered in the stand-in, as
//!    the tailnet would have registered them on join: the stand-in is not a coordination server,
//!    so a node joining with a minted key does not appear in it by itself.
//! 4. The overlay is destroyed; boot 2 on a fresh overlay with the same seed re-made with a new
//!    instance id (`kiln qemu test --instance-id`: byte-identical user-data, like a re-created
//!    Azure VM with the same custom_data and a new VM id).
//! 5. Checks: cloud-init got the same user-data and a different instance id (read from both
//!    guest disks); boot 2's journal is fresh (its instance id, one run); the stand-in deleted
//!    boot 1's device and the proxy before it minted the key, all within the tailscale step and
//!    before the step saw the node joined (API times and the serial timeline, both host clocks);
//!    both boots downloaded from the mirror; the final status and journal (step ids, states,
//!    result; times ignored) equal boot 1's.
//!
//! Runs only with KILN_VM_TESTS=1 and KILN_FIRSTBOOT = the static daemon. Two url-delivery
//! boots: 7-10 minutes under TCG on 2 cores (433-600 s measured).

use std::path::Path;
use std::process::Command;

use kiln_qemu::inspect::GuestDisk;
use kiln_testkit::fake_tailscale_api::{device, ApiRequest, Config, FakeTailscaleApi};
use kiln_testkit::{
    build_profile, kiln_bin, make_mirror, publish_bundle, read_json, repo, vm_tests, work_dir,
};
use serde_json::Value;

const NEW_INSTANCE_ID: &str = "kiln-rebuild-2";
/// Where the profile's `tailscale.api.base-url` points, forwarded to the stand-in.
const GUEST_API: &str = "10.0.2.101:80";

/// `kiln qemu test` with the stand-in forwarded; the run's report.json.
fn boot(seed: &Path, mirror: &Path, out: &Path, api_port: u16, extra: &[&str]) -> Value {
    let fwd = format!("{GUEST_API}={api_port}");
    let output = Command::new(kiln_bin())
        .current_dir(repo())
        .args(["qemu", "test", "--deadline", "900", "--guestfwd", &fwd])
        .arg("--seed")
        .arg(seed)
        .arg("--mirror")
        .arg(mirror)
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("---- kiln qemu test -o {} ----\n{text}", out.display());
    assert!(
        output.status.success(),
        "kiln qemu test failed; see above and {}",
        out.display()
    );
    let report = read_json(&out.join("report.json"));
    assert_eq!(report["ok"], true);
    assert_eq!(report["boots"][0]["outcome"]["result"], "all-done");
    report["boots"][0].clone()
}

/// What cloud-init recorded on the disk: its instance id and the user-data it received.
fn cloud_init_view(overlay: &Path, raw: &Path) -> (String, Vec<u8>) {
    let disk = GuestDisk::from_overlay(overlay, raw).unwrap();
    let id = disk
        .read("/var/lib/cloud/data/instance-id")
        .unwrap()
        .expect("cloud-init's instance-id record");
    let id = String::from_utf8(id).unwrap().trim().to_string();
    let user_data = disk
        .read(&format!("/var/lib/cloud/instances/{id}/user-data.txt"))
        .unwrap()
        .expect("cloud-init's copy of the user-data");
    (id, user_data)
}

/// The milestone's host wall-clock time (Unix seconds).
fn milestone(boot: &Value, kind: &str, step: &str) -> f64 {
    let started = boot["started_unix"].as_f64().unwrap();
    let e = boot["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == kind && e["step"] == step)
        .unwrap_or_else(|| panic!("no {kind} {step} milestone: {}", boot["timeline"]));
    started + e["at"].as_f64().unwrap()
}

/// The daemon's final status line from the serial console, and the journal read from the disk,
/// without times or the instance id: run state, error, and per step its id and state.
fn final_state(run: &Path, boot: &Value) -> (Value, Value, Value) {
    let status = boot["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["kind"] == "status")
        .map(|e| e["json"].clone())
        .expect("the daemon's final status line on the console");
    let journal = read_json(&run.join("boot-1/guest/var/lib/kiln/journal.json"));
    let steps = |v: &Value| -> Value {
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| serde_json::json!([s["id"], s["state"]]))
            .collect()
    };
    let status_view = serde_json::json!({"state": status["state"], "steps": steps(&status),
        "last-error": status["last-error"], "current-step": status["current-step"]});
    (status_view, steps(&journal), journal)
}

fn downloads(boot: &Value) -> Vec<String> {
    boot["mirror_requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect()
}

fn calls(log: &[ApiRequest]) -> Vec<String> {
    log.iter()
        .map(|r| format!("{} {} {}", r.method, r.target, r.status))
        .collect()
}

#[test]
fn a_rebuilt_node_starts_a_fresh_journal_frees_its_tailnet_name_first_and_ends_the_same() {
    let Some(firstboot) = vm_tests("rebuild e2e") else {
        return;
    };
    let work = work_dir("kiln-rebuild");
    let w = &work.path;

    // The payload, built once; the bundle served by the mirror like `kiln publish` would.
    let mirror = w.join("mirror");
    make_mirror(&mirror);
    let build = w.join("build");
    build_profile("qemu/tests/profiles/qemu-rebuild.yaml", &firstboot, &build);
    let sha = publish_bundle(&build, &mirror);

    // The profile's names, from the files it extends (checked against the node's plan below).
    let yaml = |p: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&std::fs::read_to_string(repo().join(p)).unwrap()).unwrap()
    };
    let (base, own) = (
        yaml("profiles/ameciclo.yaml"),
        yaml("qemu/tests/profiles/qemu-rebuild.yaml"),
    );
    let hostname = base["tailscale"]["hostname"].as_str().unwrap().to_string();
    let client_id = base["tailscale"]["operator"]["oauth-client-id"]
        .as_str()
        .unwrap();
    let tags: Vec<String> = serde_yaml::from_value(own["tailscale"]["tags"].clone()).unwrap();
    let tag_refs: Vec<&str> = tags.iter().map(String::as_str).collect();

    // The stand-in knows the profile's OAuth client; the tailnet holds a bystander.
    let secret = std::fs::read_to_string(
        repo().join("profiles/secrets.example/tailscale-oauth-client-secret"),
    )
    .unwrap();
    let api = FakeTailscaleApi::start(
        Config::new(client_id, secret.trim(), &tag_refs),
        vec![device("nLAPTOP", "laptop", "laptop", &[])],
    )
    .unwrap();

    // Boot 1: a fresh overlay, the seed as built.
    let seed = build.join("seed.img");
    let run1 = w.join("run-1");
    let b1 = boot(&seed, &mirror, &run1, api.port(), &[]);
    let plan = read_json(&run1.join("boot-1/guest/etc/kiln/plan.json"));
    assert_eq!(plan["tailscale"]["hostname"], hostname.as_str());
    assert_eq!(plan["tailscale"]["operator"]["oauth-client-id"], client_id);
    assert_eq!(plan["tailscale"]["tags"], serde_json::json!(tags));
    assert_eq!(plan["tailscale"]["api"]["base-url"], "http://10.0.2.101/");
    let log1 = api.log();
    assert_eq!(
        calls(&log1),
        [
            "POST /api/v2/oauth/token 200",
            "GET /api/v2/tailnet/-/devices 200",
            "POST /api/v2/tailnet/-/keys 200"
        ],
        "boot 1: nothing stale to delete, one key minted"
    );
    let (id1, user_data1) = cloud_init_view(&run1.join("disk.qcow2"), &w.join("disk-1.raw"));

    // As the tailnet would have after boot 1's join (see the module comment): the node's device
    // and the operator's Argo CD proxy device.
    api.add_device(device("nBOOT1NODE", &hostname, &hostname, &tag_refs));
    api.add_device(device("nBOOT1ARGOCD", "argocd", "argocd", &tag_refs));

    // Destroy the disk.
    std::fs::remove_file(run1.join("disk.qcow2")).unwrap();
    assert!(!run1.join("disk.qcow2").exists());

    // Boot 2: a fresh overlay, the identical payload, a new instance id.
    let run2 = w.join("run-2");
    let b2 = boot(
        &seed,
        &mirror,
        &run2,
        api.port(),
        &["--instance-id", NEW_INSTANCE_ID],
    );
    let (id2, user_data2) = cloud_init_view(&run2.join("disk.qcow2"), &w.join("disk-2.raw"));
    let built_user_data = std::fs::read(build.join("user-data")).unwrap();
    assert!(
        user_data1 == built_user_data && user_data2 == built_user_data,
        "cloud-init must have received the identical user-data on both boots"
    );
    let built_meta = std::fs::read_to_string(build.join("meta-data")).unwrap();
    assert!(
        built_meta.contains(&format!("instance-id: {id1}\n")),
        "{built_meta}"
    );
    assert_eq!(id2, NEW_INSTANCE_ID);
    assert_ne!(id1, id2);

    // A fresh journal, keyed by the new instance id, started once.
    let (status1, steps1, journal1) = final_state(&run1, &b1);
    let (status2, steps2, journal2) = final_state(&run2, &b2);
    assert_eq!(journal1["instance-id"], id1.as_str());
    assert_eq!(journal2["instance-id"], NEW_INSTANCE_ID, "{journal2}");
    assert_eq!(journal2["runs"], 1, "{journal2}");

    // The stale devices went before the key was minted, within the tailscale step, and before
    // the step saw the node joined (its `done` milestone comes after `tailscale up` and Running).
    let started2 = b2["started_unix"].as_f64().unwrap();
    let log2: Vec<ApiRequest> = api
        .log()
        .into_iter()
        .filter(|r| r.time >= started2)
        .collect();
    assert_eq!(
        calls(&log2),
        [
            "POST /api/v2/oauth/token 200",
            "GET /api/v2/tailnet/-/devices 200",
            "DELETE /api/v2/device/nBOOT1NODE 200",
            "DELETE /api/v2/device/nBOOT1ARGOCD 200",
            "POST /api/v2/tailnet/-/keys 200"
        ]
    );
    let ts_started = milestone(&b2, "step-started", "tailscale");
    let ts_done = milestone(&b2, "step-done", "tailscale");
    let first_call = log2.first().unwrap().time;
    let mint = log2.last().unwrap().time;
    let deletes: Vec<f64> = log2
        .iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.time)
        .collect();
    eprintln!(
        "boot 2 (host seconds since QEMU start): tailscale step started {:.1}, API first call {:.1}, deletes {:?}, key minted {:.1}, tailscale step done (joined) {:.1}",
        ts_started - started2,
        first_call - started2,
        deletes
            .iter()
            .map(|t| format!("{:.1}", t - started2))
            .collect::<Vec<_>>(),
        mint - started2,
        ts_done - started2
    );
    assert!(
        ts_started <= first_call,
        "API called before the tailscale step"
    );
    assert!(deletes.iter().all(|d| *d <= mint));
    assert!(
        mint < ts_done,
        "the key must be minted before the node joined"
    );
    // The bystander stayed; the new device is not in the stand-in (no coordination server).
    assert_eq!(api.device_ids(), ["nLAPTOP"]);
    assert_eq!(api.minted_keys().len(), 2);

    // Both boots downloaded their artifacts from the mirror normally.
    for (n, b) in [(1, &b1), (2, &b2)] {
        let reqs = downloads(b);
        for want in [
            format!("bundles/bundle-{sha}.tar.gz 200"),
            "k3s/v1.32.4+k3s1/k3s 200".to_string(),
            "tailscale/tailscale_1.102.3_amd64.tgz 200".to_string(),
        ] {
            assert!(
                reqs.iter().any(|r| r.ends_with(&want)),
                "boot {n} did not download {want}: {reqs:?}"
            );
        }
    }

    // The same end state: every step in the same state, the same result.
    assert_eq!(status1["state"], "done", "{status1}");
    assert_eq!(journal1["runs"], 1, "{journal1}");
    assert_eq!(status2, status1);
    assert_eq!(steps2, steps1);
    assert_eq!(
        steps1.as_array().unwrap().len(),
        6,
        "every step of the plan: {steps1}"
    );

    // No secret in what the boots left on the host (the payload carries them by design).
    let mut secrets = api.minted_keys();
    secrets.extend(api.issued_tokens());
    secrets.push(secret.trim().to_string());
    for run in [&run1, &run2] {
        for name in ["report.json", "boot-1/serial.log", "boot-1/report.json"] {
            let text = std::fs::read_to_string(run.join(name)).unwrap();
            for s in &secrets {
                assert!(!text.contains(s.as_str()), "a secret in {name}");
            }
        }
    }
}
