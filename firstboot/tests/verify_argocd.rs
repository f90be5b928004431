//! `verify` against the K3s stand-in when "Argo CD" (the stand-in's Application status, as
//! Argo CD v3.4.7's controller writes it) reports a problem in the repository: the run fails
//! at verify, and `kiln-firstboot status` and the console milestones carry Argo CD's message
//! (the file and the reason) instead of "done". Fixed in the repository, a rerun finishes.

mod steps_common;

use serde_json::{json, Value};
use std::fs;
use std::process::Command;
use steps_common::*;

/// Argo CD v3.4.7's ComparisonError for a Helm values file in a directory source.
const UNMARSHAL: &str = "Failed to load target state: failed to generate manifest for source 1 of 1: rpc error: code = FailedPrecondition desc = Failed to unmarshal \"values.yaml\": failed to unmarshal manifest: error unmarshaling JSON: while decoding JSON: Object 'Kind' is missing in '{\"replicaCount\":1}'";

fn argo_reports(node: &TestNode, status: Value) {
    let p = node.p("/var/lib/kiln-standins/argocd-status/argocd/root.json");
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, serde_json::to_vec(&status).unwrap()).unwrap();
}

fn status_text(node: &TestNode) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-firstboot"))
        .args(["status", "--root"])
        .arg(&node.root)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn argo_cd_errors_in_the_repository_replace_done_with_argo_cds_message() {
    let (node, _mirror, _pins, _plan) = setup(|_, _| {});
    argo_reports(
        &node,
        json!({"sync": {"status": "Unknown"}, "health": {"status": "Healthy"},
               "conditions": [{"type": "ComparisonError", "message": UNMARSHAL}]}),
    );

    // 1. A ComparisonError naming a file: verify fails with it.
    let out = node.run_daemon();
    let console = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{console}");
    assert!(!console.contains("all steps done"), "{console}");
    let failed = console
        .lines()
        .find(|l| l.starts_with("kiln: step verify failed:"))
        .unwrap_or_else(|| panic!("no verify failure milestone:\n{console}"));
    assert!(
        failed.contains("Failed to unmarshal \"values.yaml\"")
            && failed.contains("Object 'Kind' is missing"),
        "{failed}"
    );
    let st = status(&node.root);
    assert_eq!(st["state"], "failed");
    assert_eq!(st["facts"]["argocd.root.sync"], "Unknown");
    let (code, text) = status_text(&node);
    assert_eq!(code, Some(1));
    assert!(
        text.contains("values.yaml") && text.contains("Object 'Kind' is missing"),
        "{text}"
    );
    let states = step_states(&st);
    assert_eq!(
        states[5],
        ("verify".to_string(), "failed".to_string()),
        "{states:?}"
    );

    // 2. The file is fixed, the sync now fails on a kind the cluster does not serve.
    argo_reports(
        &node,
        json!({"sync": {"status": "OutOfSync"}, "health": {"status": "Missing"},
               "operationState": {"phase": "Failed", "message": "one or more synchronization tasks are not valid",
                 "syncResult": {"resources": [{"group": "helm.sh", "version": "v1", "kind": "HelmChart",
                   "namespace": "kube-system", "name": "traefik", "status": "SyncFailed",
                   "message": "The Kubernetes API could not find helm.sh/HelmChart for requested resource kube-system/traefik. Make sure the \"HelmChart\" CRD is installed on the destination cluster."}]}}}),
    );
    let out = node.run_daemon();
    let console = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{console}");
    assert!(console.contains("helm.sh/HelmChart traefik"), "{console}");
    let (_, text) = status_text(&node);
    assert!(
        text.contains("Make sure the \"HelmChart\" CRD is installed"),
        "{text}"
    );

    // 3. Fixed: the resumed run finishes at verify and reports Argo CD's state.
    argo_reports(
        &node,
        json!({"sync": {"status": "Synced"}, "health": {"status": "Healthy"}}),
    );
    let out = node.run_daemon();
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{console}");
    assert!(console.contains("all steps done"), "{console}");
    let st = status(&node.root);
    assert_eq!(st["state"], "done");
    assert_eq!(st["facts"]["argocd.root.sync"], "Synced");
    assert_eq!(st["facts"]["argocd.root.health"], "Healthy");
}
