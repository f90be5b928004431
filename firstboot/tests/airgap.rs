//! Air-gap (issue 8): a node whose artifacts are all in `artifacts.local-dir` (a baked image,
//! an attached disk) runs every step and downloads nothing; with `artifacts.air-gap` on, a
//! missing artifact fails its step with a clear error instead of reaching for the network.

mod steps_common;

use std::fs;
use steps_common::*;

const LOCAL_DIR: &str = "/opt/kiln-artifacts";

/// Copies the mirror's files into the node's local dir under the names the plan gives them
/// (`skip` names are left out).
fn stage(node: &TestNode, mirror_dir: &std::path::Path, pins: &serde_json::Value, skip: &[&str]) {
    let dir = node.p(LOCAL_DIR);
    fs::create_dir_all(&dir).unwrap();
    for (key, name) in [
        ("k3s", "k3s"),
        ("k3s-checksums", "sha256sum-amd64.txt"),
        ("tailscale", "tailscale_1.102.3_amd64.tgz"),
        ("argocd", "argocd-v3.4.7-install.yaml"),
    ] {
        if skip.contains(&key) {
            continue;
        }
        let src = mirror_dir.join(pins[key]["path"].as_str().unwrap());
        fs::copy(&src, dir.join(name)).unwrap();
    }
}

fn airgap_setup(
    skip: &'static [&'static str],
) -> (TestNode, kiln_qemu::mirror::Mirror, serde_json::Value) {
    let mirror_dir = std::cell::RefCell::new(None);
    let (node, mirror, pins, plan) = setup(|plan, dir| {
        plan.artifacts.air_gap = true;
        plan.artifacts.local_dir = Some(LOCAL_DIR.into());
        *mirror_dir.borrow_mut() = Some(dir.to_path_buf());
    });
    assert!(plan.artifacts.air_gap);
    stage(&node, mirror_dir.borrow().as_ref().unwrap(), &pins, skip);
    (node, mirror, pins)
}

#[test]
fn an_air_gapped_node_with_every_artifact_staged_downloads_nothing() {
    let (node, mirror, pins) = airgap_setup(&[]);
    let out = node.run_daemon();
    assert!(
        out.status.success(),
        "daemon failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let states = step_states(&status(&node.root));
    assert!(
        states
            .iter()
            .all(|s| matches!(s.1.as_str(), "done" | "skipped")),
        "{states:?}"
    );
    for key in ["k3s", "k3s-checksums", "tailscale", "argocd"] {
        let path = pins[key]["path"].as_str().unwrap();
        assert_eq!(mirror.hits(path), 0, "{path} must not be downloaded");
    }
    // The verified copies are in the cache under their sha256.
    for key in ["k3s", "tailscale", "argocd"] {
        let sha = pins[key]["sha256"].as_str().unwrap();
        assert!(node.p(&format!("/var/lib/kiln/cache/{sha}")).is_file());
    }
}

#[test]
fn an_air_gapped_node_missing_an_artifact_fails_clearly_without_the_network() {
    let (node, mirror, pins) = airgap_setup(&["tailscale"]);
    let out = node.run_daemon();
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "must fail:\n{all}");
    let st = status(&node.root).to_string();
    for text in [&all, &st] {
        assert!(
            text.contains("air-gap is on")
                && text.contains("tailscale_1.102.3_amd64.tgz")
                && text.contains("refusing to download"),
            "the error must say what is missing and why: {text}"
        );
    }
    let states = step_states(&status(&node.root));
    assert_eq!(states[0], ("k3s".to_string(), "done".to_string()));
    assert_eq!(states[1].0, "tailscale");
    assert_eq!(states[1].1, "failed", "{states:?}");
    for key in ["k3s", "k3s-checksums", "tailscale", "argocd"] {
        assert_eq!(mirror.hits(pins[key]["path"].as_str().unwrap()), 0);
    }
}
