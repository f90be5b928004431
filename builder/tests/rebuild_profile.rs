//! Profile → plan for rebuilds: `tailscale.api` (stale-device deletion, minted keys) and the
//! auth key becoming optional when keys are minted.

mod common;

use kiln::pipeline;
use std::path::{Path, PathBuf};

/// base.yaml's text with `edit` applied, written next to a copy of its secrets.
fn variant(dir: &Path, edit: impl Fn(&str) -> String) -> PathBuf {
    let good = common::repo().join("tests/profiles/good");
    let text = std::fs::read_to_string(good.join("base.yaml")).unwrap();
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    for s in ["auth-key", "oauth-secret"] {
        std::fs::copy(good.join("secrets").join(s), dir.join("secrets").join(s)).unwrap();
    }
    let p = dir.join("profile.yaml");
    std::fs::write(&p, edit(&text)).unwrap();
    p
}

const API: &str = "  tags: [tag:k8s]\n  api:\n    delete-stale: true\n    delete-proxy-devices: [argocd]\n    mint-auth-key: true\n";

#[test]
fn api_settings_reach_the_plan_and_a_minted_key_replaces_the_stored_one() {
    let tmp = tempfile::tempdir().unwrap();
    let p = variant(tmp.path(), |t| {
        t.replace("  auth-key: {file: secrets/auth-key}\n", API)
    });
    let r = pipeline::resolve(&p, &common::no_env)
        .map_err(|e| e.to_string())
        .unwrap()
        .1;
    let api = r.plan.tailscale.api.as_ref().expect("api in the plan");
    assert_eq!(api.base_url.as_str(), "https://api.tailscale.com/");
    assert!(api.delete_stale && api.mint_auth_key);
    assert_eq!(api.delete_proxy_devices, ["argocd"]);
    assert_eq!(api.key_expiry_seconds, 3600);
    // The minted key is written where a stored one would be; no stored key travels.
    assert_eq!(
        r.plan.tailscale.auth_key_file.as_deref(),
        Some("/etc/kiln/secrets/tailscale-auth-key")
    );
    assert!(r.secrets.iter().all(|s| s.key != "tailscale.auth-key"));
    // The plan round-trips through the daemon's strict reader.
    let back = kiln_plan::Plan::from_json(&r.plan.to_json()).unwrap();
    assert_eq!(back.tailscale.api, r.plan.tailscale.api);
}

/// A self-chosen API origin and key expiry reach the plan as written (the settings the QEMU
/// rebuild test used to point the guest at the API stand-in, now proven here and in
/// firstboot/tests/tailscale_api.rs).
#[test]
fn a_custom_api_origin_and_key_expiry_reach_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let api = format!("{API}    base-url: http://10.0.2.101\n    key-expiry-seconds: 600\n");
    let p = variant(tmp.path(), |t| {
        t.replace("  auth-key: {file: secrets/auth-key}\n", &api)
    });
    let r = pipeline::resolve(&p, &common::no_env)
        .map_err(|e| e.to_string())
        .unwrap()
        .1;
    let api = r.plan.tailscale.api.as_ref().expect("api in the plan");
    assert_eq!(api.base_url.as_str(), "http://10.0.2.101/");
    assert_eq!(api.key_expiry_seconds, 600);
    assert_eq!(r.plan.tailscale.tags, ["tag:k8s"]);
}

#[test]
fn without_api_settings_the_plan_has_no_api_field() {
    let tmp = tempfile::tempdir().unwrap();
    let p = variant(tmp.path(), |t| t.to_string());
    let r = pipeline::resolve(&p, &common::no_env)
        .map_err(|e| e.to_string())
        .unwrap()
        .1;
    assert!(r.plan.tailscale.api.is_none());
    let json = String::from_utf8(r.plan.to_json()).unwrap();
    assert!(!json.contains("\"api\""), "older plans stay byte-identical");
}

fn error_of(p: &Path) -> String {
    match pipeline::resolve(p, &common::no_env) {
        Ok(_) => panic!("{} should be refused", p.display()),
        Err(e) => format!("{e:?} {e}"),
    }
}

#[test]
fn no_auth_key_and_no_minting_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let p = variant(tmp.path(), |t| {
        t.replace("  auth-key: {file: secrets/auth-key}\n", "")
    });
    let e = error_of(&p);
    assert!(
        e.contains("tailscale.auth-key is required unless tailscale.api.mint-auth-key is true"),
        "{e}"
    );
}

#[test]
fn bad_api_settings_name_their_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            format!("{API}    base-url: ftp://api.example/\n"),
            "tailscale.api.base-url: expected an http(s) URL",
        ),
        (
            format!("{API}    key-expiry-seconds: 5\n"),
            "key-expiry-seconds must be between",
        ),
        (API.replace("[argocd]", "[Not_A_Name]"), "invalid name"),
        (format!("{API}    unknown-thing: 1\n"), "unknown-thing"),
    ];
    for (i, (api, want)) in cases.iter().enumerate() {
        let dir = tmp.path().join(i.to_string());
        let p = variant(&dir, |t| {
            t.replace("  auth-key: {file: secrets/auth-key}\n", api)
        });
        let e = error_of(&p);
        assert!(e.contains(want), "{api:?}: {e}");
    }
    // Minting needs tags (a key owned by the tailnet must carry them).
    let p = variant(&tmp.path().join("tags"), |t| {
        t.replace(
            "  auth-key: {file: secrets/auth-key}\n",
            &API.replace("  tags: [tag:k8s]\n", ""),
        )
    });
    assert!(error_of(&p).contains("must carry tags"));
}

const OFFLINE: &str = "k3s:\n  digest: \"sha256:1111111111111111111111111111111111111111111111111111111111111111\"\n  images:\n    - url: https://images.example/airgap/k3s-airgap-images-amd64.tar.zst\n      digest: \"sha256:3333333333333333333333333333333333333333333333333333333333333333\"\n";

#[test]
fn a_pinned_chart_and_image_archives_reach_the_plan_and_the_helmchart_uses_the_served_chart() {
    let tmp = tempfile::tempdir().unwrap();
    let p = variant(tmp.path(), |t| {
        t.replace(
            "k3s:\n  digest: \"sha256:1111111111111111111111111111111111111111111111111111111111111111\"\n",
            OFFLINE,
        )
        .replace(
            "    oauth-client-id: kTESTCLIENT1CNTRL\n",
            "    oauth-client-id: kTESTCLIENT1CNTRL\n    chart-digest: \"sha256:4444444444444444444444444444444444444444444444444444444444444444\"\n",
        )
    });
    let r = pipeline::resolve(&p, &common::no_env)
        .map_err(|e| e.to_string())
        .unwrap()
        .1;
    let chart = r.plan.operator().unwrap().chart_archive.as_ref().unwrap();
    assert_eq!(chart.name, "tailscale-operator-1.102.3.tgz");
    assert_eq!(
        chart.url.as_str(),
        "https://pkgs.tailscale.com/helmcharts/tailscale-operator-1.102.3.tgz"
    );
    assert_eq!(r.plan.k3s.images.len(), 1);
    assert_eq!(r.plan.k3s.images[0].name, "k3s-airgap-images-amd64.tar.zst");
    // Both are staged by `kiln bake` (every pinned artifact of the plan).
    let pinned: Vec<&str> = r
        .plan
        .pinned_artifacts()
        .iter()
        .map(|(_, a)| a.name.as_str())
        .collect();
    assert!(
        pinned.contains(&"tailscale-operator-1.102.3.tgz"),
        "{pinned:?}"
    );
    assert!(
        pinned.contains(&"k3s-airgap-images-amd64.tar.zst"),
        "{pinned:?}"
    );
    let hc = kiln_plan::manifests::tailscale_operator_chart(&r.plan);
    assert_eq!(
        hc.spec.chart.as_deref(),
        Some("https://%{KUBERNETES_API}%/static/charts/tailscale-operator-1.102.3.tgz")
    );
    assert!(hc.spec.repo.is_none() && hc.spec.version.is_none());
    let back = kiln_plan::Plan::from_json(&r.plan.to_json()).unwrap();
    assert_eq!(back.k3s.images, r.plan.k3s.images);
    assert_eq!(
        back.operator().unwrap().chart_archive,
        r.plan.operator().unwrap().chart_archive
    );
}

#[test]
fn an_image_url_that_is_no_image_archive_is_an_error_at_its_position() {
    let tmp = tempfile::tempdir().unwrap();
    let p = variant(tmp.path(), |t| {
        t.replace(
            "k3s:\n  digest: \"sha256:1111111111111111111111111111111111111111111111111111111111111111\"\n",
            &OFFLINE.replace("k3s-airgap-images-amd64.tar.zst", "images.zip"),
        )
    });
    let err = pipeline::resolve(&p, &common::no_env)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("k3s.images[0].url") && err.contains("image archive"),
        "{err}"
    );
}
