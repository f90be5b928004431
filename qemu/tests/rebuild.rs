//! Issue 8's QEMU e2e "rebuild", with the real Tailscale client (issue 15): a node destroyed and
//! re-created from the identical payload comes back with a fresh journal, rejoins the tailnet
//! under its name and ends in the same state.
//!
//! 1. A real Headscale v0.29.2 on the host's loopback (`testkit::Tailnet`, reached by the guest
//!    at http://10.0.2.102/ through a guestfwd) with a reusable `tag:k8s` pre-auth key: with
//!    Headscale there is no key minting (`tailscale.api` is SaaS-only and refused together with
//!    `tailscale.login-server`), so a rebuild with the same payload must carry a key that
//!    joins twice. `kiln build` once of qemu-local-url.yaml joined to it (url delivery, the
//!    real Tailscale v1.102.3 tarball from the mirror).
//! 2. Boot 1 on a fresh overlay: every step done; Headscale lists the node under the profile's
//!    hostname, online, with the key's tags.
//! 3. The operator frees the name as docs/node.md says: `headscale nodes delete` of the old
//!    node before re-creating (while it is listed, a new node with the same hostname becomes
//!    `HOSTNAME-1`: firstboot/tests/tailscale_real.rs proves that with the real client).
//! 4. The overlay is destroyed; boot 2 on a fresh overlay with the same seed re-made with a new
//!    instance id (`kiln qemu test --instance-id`: byte-identical user-data, like a re-created
//!    Azure VM with the same custom_data and a new VM id).
//! 5. Checks: cloud-init got the same user-data and a different instance id (read from both
//!    guest disks); boot 2's journal is fresh (its instance id, one run); the rebuilt node is a
//!    new Headscale node (new id and machine key: a new disk) with exactly the old name, online
//!    during boot 2, Running with a 100.64/10 address and the MagicDNS name `HOSTNAME.<domain>`
//!    (not `HOSTNAME-1`); the auth key is gone from both disks; both boots downloaded from the
//!    mirror; the final status and journal (step ids, states, result; times ignored) equal boot
//!    1's; no secret in anything the boots left on the host.
//!
//! The SaaS side (deleting the old device through Tailscale's API before minting a key, then
//! joining) is proven on the host against the API stand-in: firstboot/tests/tailscale_api.rs
//! `a_rebuild_with_the_same_plan_frees_the_old_devices_then_mints_then_joins`.
//!
//! Runs only with KILN_VM_TESTS=1, KILN_FIRSTBOOT = the static daemon and .ci/go-tools.sh's
//! binaries. Two url-delivery boots under TCG on 2 cores.

use std::path::Path;
use std::process::Command;

use kiln_qemu::inspect::GuestDisk;
use kiln_testkit::gotools;
use kiln_testkit::headscale::BASE_DOMAIN;
use kiln_testkit::{
    build_profile, files_under, in_tailnet_v4, kiln_bin, make_tailnet_mirror, publish_bundle,
    read_json, repo, vm_tests, work_dir, Tailnet, TAILNET_TAGS,
};
use serde_json::Value;

const NEW_INSTANCE_ID: &str = "kiln-rebuild-2";
/// The device name qemu-local.yaml gives the node (`tailscale.hostname` of ameciclo.yaml).
const TS_HOSTNAME: &str = "ameciclo-k3s";

/// `kiln qemu test` with Headscale forwarded; the run's report.json.
fn boot(seed: &Path, mirror: &Path, out: &Path, fwd: &str, extra: &[&str]) -> Value {
    let output = Command::new(kiln_bin())
        .current_dir(repo())
        .args(["qemu", "test", "--deadline", "900", "--guestfwd", fwd])
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
    drop(disk);
    let _ = std::fs::remove_file(raw);
    (id, user_data)
}

/// The milestone's time in seconds since QEMU started.
fn milestone(boot: &Value, kind: &str, step: &str) -> f64 {
    let e = boot["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == kind && e["step"] == step)
        .unwrap_or_else(|| panic!("no {kind} {step} milestone: {}", boot["timeline"]));
    e["at"].as_f64().unwrap()
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

/// What the tailscale step recorded once the real client said Running: its 100.64/10 address
/// and its MagicDNS name.
fn joined(journal: &Value) -> (String, String) {
    let ts = journal["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "tailscale")
        .unwrap();
    let v4 = ts["facts"]["tailscale.ips"]
        .as_str()
        .unwrap_or("")
        .split(',')
        .find(|ip| in_tailnet_v4(ip))
        .unwrap_or_else(|| panic!("no 100.64.0.0/10 address from the real client: {ts}"))
        .to_string();
    let dns = ts["facts"]["tailscale.dns-name"]
        .as_str()
        .unwrap_or_else(|| panic!("no MagicDNS name: {ts}"))
        .to_string();
    (v4, dns)
}

fn node_id(n: &Value) -> u64 {
    n["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no node id in {n}"))
}

/// Headscale's only node: listed under the profile's hostname with exactly that given name
/// (its MagicDNS label) and the key's tags.
fn the_node(tailnet: &Tailnet) -> Value {
    let nodes = tailnet.headscale.nodes().unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let n = nodes[0].clone();
    assert_eq!(n["name"], TS_HOSTNAME, "{n}");
    assert_eq!(n["given_name"], TS_HOSTNAME, "{n}");
    assert_eq!(n["tags"], serde_json::json!(TAILNET_TAGS), "{n}");
    n
}

#[test]
fn a_rebuilt_node_starts_a_fresh_journal_rejoins_headscale_under_its_name_and_ends_the_same() {
    let Some(firstboot) = vm_tests("rebuild e2e") else {
        return;
    };
    let tools = gotools::find("rebuild e2e").expect("required with KILN_VM_TESTS=1");
    let work = work_dir("kiln-rebuild");
    let w = &work.path;

    // The mirror (K3s stand-in, real Tailscale tarball) and the tailnet; the payload, built
    // once; the bundle served by the mirror like `kiln publish` would.
    let mirror = w.join("mirror");
    let pins = make_tailnet_mirror(&mirror, &tools);
    let tailnet = Tailnet::start_with(&tools, true);
    let fwd = tailnet.guestfwd();
    let profile = tailnet.profile(
        "qemu/tests/profiles/qemu-local-url.yaml",
        w,
        "qemu-rebuild-tailnet",
        &pins,
    );
    let build = w.join("build");
    build_profile(profile.to_str().unwrap(), &firstboot, &build);
    let sha = publish_bundle(&build, &mirror);
    let base: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("profiles/ameciclo.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(base["tailscale"]["hostname"].as_str(), Some(TS_HOSTNAME));
    let client_id = base["tailscale"]["operator"]["oauth-client-id"]
        .as_str()
        .unwrap();

    // Boot 1: a fresh overlay, the seed as built.
    let seed = build.join("seed.img");
    let run1 = w.join("run-1");
    let (b1, seen1) = tailnet.watch_while(TS_HOSTNAME, || boot(&seed, &mirror, &run1, &fwd, &[]));
    let plan = read_json(&run1.join("boot-1/guest/etc/kiln/plan.json"));
    assert_eq!(plan["tailscale"]["hostname"], TS_HOSTNAME);
    assert_eq!(plan["tailscale"]["operator"]["oauth-client-id"], client_id);
    assert_eq!(plan["tailscale"]["login-server"], "http://10.0.2.102/");
    // The key carries the tags (Headscale refuses advertised ones with a pre-auth key), and
    // there is no Tailscale API section (refused with login-server).
    assert_eq!(plan["tailscale"]["tags"], serde_json::json!([]));
    assert!(plan["tailscale"]["api"].is_null(), "{}", plan["tailscale"]);
    let (id1, user_data1) = cloud_init_view(&run1.join("disk.qcow2"), &w.join("disk-1.raw"));
    let old = the_node(&tailnet);
    assert!(
        seen1.iter().any(|(_, n)| n["online"] == true),
        "{TS_HOSTNAME} was never online during boot 1: {seen1:?}\n{}",
        tailnet.headscale.log()
    );

    // Free the name before re-creating (docs/node.md, "Using kiln with Headscale").
    tailnet.headscale.delete_node(node_id(&old)).unwrap();
    assert_eq!(tailnet.headscale.nodes().unwrap(), Vec::<Value>::new());

    // Destroy the disk.
    std::fs::remove_file(run1.join("disk.qcow2")).unwrap();
    assert!(!run1.join("disk.qcow2").exists());

    // Boot 2: a fresh overlay, the identical payload, a new instance id.
    let run2 = w.join("run-2");
    let (b2, seen2) = tailnet.watch_while(TS_HOSTNAME, || {
        boot(
            &seed,
            &mirror,
            &run2,
            &fwd,
            &["--instance-id", NEW_INSTANCE_ID],
        )
    });
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

    // Both boots' real client reached Running with a tailnet address and the exact MagicDNS
    // name; the rebuilt node is a new Headscale node (the new disk's machine key) under the
    // old name, online during boot 2.
    let exact = format!("{TS_HOSTNAME}.{BASE_DOMAIN}");
    let (v4_1, dns1) = joined(&journal1);
    let (v4_2, dns2) = joined(&journal2);
    assert_eq!(dns1, exact);
    assert_eq!(dns2, exact, "the rebuilt node did not get its name back");
    let new = the_node(&tailnet);
    assert_ne!(node_id(&new), node_id(&old), "{new}");
    assert_ne!(new["machine_key"], old["machine_key"], "{new}");
    let online_as = |n: &Value, v4: &str| {
        n["online"] == true
            && n["ip_addresses"]
                .as_array()
                .is_some_and(|a| a.iter().any(|ip| ip == v4))
    };
    assert!(seen1.iter().any(|(_, n)| online_as(n, &v4_1)), "{seen1:?}");
    let first_online = seen2
        .iter()
        .find(|(_, n)| online_as(n, &v4_2) && node_id(n) == node_id(&new))
        .unwrap_or_else(|| panic!("the rebuilt node was never online: {seen2:?}"))
        .0;
    assert!(
        seen2.iter().all(|(_, n)| node_id(n) == node_id(&new)),
        "{seen2:?}"
    );
    let started2 = b2["started_unix"].as_f64().unwrap();
    eprintln!(
        "boot 2 (seconds since QEMU start): tailscale step started {:.1}, done (Running) {:.1}; \
         Headscale first listed the rebuilt node online at {:.1}",
        milestone(&b2, "step-started", "tailscale"),
        milestone(&b2, "step-done", "tailscale"),
        first_online - started2
    );

    // The auth key is gone from both disks once the node was Running.
    for (n, b) in [(1, &b1), (2, &b2)] {
        assert!(
            b["guest"]["stats"]["/etc/kiln/secrets/tailscale-auth-key"].is_null(),
            "boot {n}: the auth key file is still on the node: {}",
            b["guest"]["stats"]
        );
    }

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
    for f in files_under(&run1).into_iter().chain(files_under(&run2)) {
        let name = f.to_string_lossy();
        if name.ends_with(".qcow2")
            || name.ends_with("seed.img")
            || name.ends_with("user-data")
            || name.ends_with("custom_data.gz")
        {
            continue;
        }
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a secret in {}", f.display());
        }
        scanned += 1;
    }
    assert!(scanned > 10, "{scanned} files scanned");
}
