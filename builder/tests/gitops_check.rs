//! `kiln gitops check` against the fixture repositories under tests/gitops/: exactly the
//! planted findings (file:line and class) in `fixture/broken`, nothing in `fixture/clean` (an
//! app-of-apps layout), and the reference profile clean against a checkout laid out like
//! groundwork. `kiln build --gitops-checkout` refuses to build on findings.

mod common;

use serde_json::Value;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    let out = Command::new(common::kiln_bin())
        .args(args)
        .current_dir(common::repo())
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn check_json(profile: &str, checkout: &str) -> (i32, Value) {
    let out = kiln(&[
        "gitops",
        "check",
        profile,
        "--checkout",
        checkout,
        "--format",
        "json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap(), v)
}

fn app<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["applications"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no application {name}: {report:#}"))
}

#[test]
fn the_planted_fixture_reports_exactly_the_planted_findings_with_file_and_line() {
    let (code, report) = check_json("tests/gitops/fixture-broken.yaml", "tests/gitops/fixture");
    assert_eq!(code, 1);
    let got: Vec<String> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{}:{} {}",
                f["file"].as_str().unwrap(),
                f["line"],
                f["class"].as_str().unwrap()
            )
        })
        .collect();
    let want = std::fs::read_to_string(common::repo().join("tests/gitops/fixture-broken.expected"))
        .unwrap();
    let want: Vec<&str> = want.lines().collect();
    assert_eq!(got, want, "{report:#}");
    // Every finding says why and how to fix it.
    for f in report["findings"].as_array().unwrap() {
        assert!(
            !f["reason"].as_str().unwrap().is_empty() && !f["fix"].as_str().unwrap().is_empty(),
            "{f}"
        );
    }
    let fix = |file: &str| {
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["file"] == file)
            .unwrap()["fix"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        fix("broken/infra/helmchart.yaml"),
        "apiVersion: helm.cattle.io/v1"
    );
    assert_eq!(
        fix("broken/infra/tailscale-ingress.yaml"),
        "apiVersion: networking.k8s.io/v1"
    );
    assert!(fix("broken/infra/values.yaml").contains("directory.exclude 'values.yaml'"));
    assert!(fix("broken/infra/chart/Chart.yaml").contains("exclude 'chart/*'"));
    // A CI workflow without manifest words is ignored by Argo CD v3.4.7, and so here.
    assert_eq!(
        report["ignored"],
        serde_json::json!(["broken/infra/ci/workflow.yml"])
    );
    // The child is followed although its repoURL lacks the `.git` suffix.
    assert_eq!(app(&report, "infra")["status"], "checked");
}

#[test]
fn the_clean_app_of_apps_layout_has_no_findings_and_lists_what_is_not_rendered() {
    let (code, report) = check_json("tests/gitops/fixture-clean.yaml", "tests/gitops/fixture");
    assert_eq!(report["findings"], serde_json::json!([]), "{report:#}");
    assert_eq!(code, 0);
    assert_eq!(app(&report, "root")["status"], "checked");
    let platform = app(&report, "platform");
    assert_eq!(platform["status"], "checked");
    // Recursed into sub/, `notes/*` excluded, values.yaml ignored: 9 files, 10 objects.
    assert_eq!(
        (platform["files"].as_u64(), platform["objects"].as_u64()),
        (Some(9), Some(10))
    );
    assert_eq!(app(&report, "monitoring")["status"], "not-rendered-here");
    assert_eq!(app(&report, "monitoring")["source"], "kustomize");
    assert_eq!(app(&report, "web")["status"], "not-rendered-here");
    assert_eq!(app(&report, "cert-manager")["status"], "other-repository");
    assert_eq!(
        report["ignored"],
        serde_json::json!(["clean/platform/values.yaml"])
    );
}

#[test]
fn the_reference_profile_passes_against_a_groundwork_layout() {
    let (code, report) = check_json("profiles/ameciclo.yaml", "tests/gitops/groundwork");
    assert_eq!(report["findings"], serde_json::json!([]), "{report:#}");
    assert_eq!(code, 0);
    let root = app(&report, "root");
    assert_eq!(
        (root["files"].as_u64(), root["objects"].as_u64()),
        (Some(5), Some(5)),
        "{report:#}"
    );
    assert_eq!(app(&report, "kong")["status"], "other-repository");
    // The text report says so too.
    let out = kiln(&[
        "gitops",
        "check",
        "profiles/ameciclo.yaml",
        "--checkout",
        "tests/gitops/groundwork",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("kiln gitops check: clean"));
}

#[test]
fn usage_errors_exit_2() {
    let out = kiln(&[
        "gitops",
        "check",
        "profiles/ameciclo.yaml",
        "--checkout",
        "tests/gitops/no-such-dir",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
    let out = kiln(&[
        "gitops",
        "check",
        "tests/profiles/bad/gitops-two-source-types.yaml",
        "--checkout",
        "tests/gitops/groundwork",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = kiln(&["gitops", "check", "profiles/ameciclo.yaml"]);
    assert_eq!(out.status.code(), Some(2), "--checkout is required");
}

#[test]
fn build_refuses_on_findings_and_builds_on_a_clean_checkout() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::fake_daemon(dir.path());
    let out_dir = dir.path().join("out");
    let (d, o) = (daemon.to_str().unwrap(), out_dir.to_str().unwrap());
    let out = kiln(&[
        "build",
        "tests/gitops/fixture-broken.yaml",
        "--gitops-checkout",
        "tests/gitops/fixture",
        "--firstboot",
        d,
        "-o",
        o,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to build") && err.contains("broken/infra/helmchart.yaml:2"),
        "{err}"
    );
    assert!(!out_dir.exists(), "nothing is written");
    let out = kiln(&[
        "build",
        "tests/gitops/fixture-clean.yaml",
        "--gitops-checkout",
        "tests/gitops/fixture",
        "--firstboot",
        d,
        "-o",
        o,
    ]);
    assert!(out.status.success());
    assert!(out_dir.join("user-data").is_file());
}

#[test]
fn argo_cd_kinds_in_the_served_table_are_the_crds_of_install_yaml() {
    let text =
        std::fs::read_to_string(common::repo().join("tests/upstream/argo-cd-v3.4.7/install.yaml"))
            .unwrap();
    let served = kiln::gitops::kinds::Served::target_cluster();
    let mut n = 0;
    for item in kiln::gitops::reader::read_yaml(&text) {
        let kiln::gitops::reader::Item::Value(d) = item else {
            continue;
        };
        if d.value["kind"] != "CustomResourceDefinition" {
            continue;
        }
        let spec = &d.value["spec"];
        for v in spec["versions"].as_array().unwrap() {
            n += 1;
            let (g, k, ver) = (
                spec["group"].as_str().unwrap(),
                spec["names"]["kind"].as_str().unwrap(),
                v["name"].as_str().unwrap(),
            );
            assert!(served.serves(g, ver, k), "{g}/{ver} {k}");
        }
    }
    assert_eq!(n, 3, "Application, ApplicationSet, AppProject");
}

/// Each source option renders into the root Application as Argo CD names it, and the result
/// is valid for the Argo CD v3.4.7 Application CRD (closed objects: a misspelt field fails).
#[test]
fn every_source_option_renders_a_root_application_valid_for_the_v3_4_7_crd() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::repo().join("tests/profiles/good/base.yaml");
    let cases = [
        // No option: Argo CD's default, a directory source that is not recursive.
        (
            "    path: apps\n",
            serde_json::json!({"directory": {"recurse": false}}),
        ),
        (
            "    directory: {recurse: true, include: '{*.yaml,kong/*}', exclude: 'values.yaml'}\n",
            serde_json::json!({"directory": {"recurse": true, "include": "{*.yaml,kong/*}", "exclude": "values.yaml"}}),
        ),
        ("    kustomize: {}\n", serde_json::json!({"kustomize": {}})),
        (
            "    helm: {value-files: [values.yaml, values-prod.yaml]}\n",
            serde_json::json!({"helm": {"valueFiles": ["values.yaml", "values-prod.yaml"]}}),
        ),
    ];
    for (i, (yaml, want)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("p{i}.yaml"));
        std::fs::write(
            &p,
            format!("extends: {}\nargocd:\n  gitops:\n{yaml}", base.display()),
        )
        .unwrap();
        let (_, resolved) = kiln::pipeline::resolve(&p, &common::no_env).unwrap();
        let app =
            serde_json::to_value(kiln_plan::manifests::root_application(&resolved.plan)).unwrap();
        let src = &app["spec"]["source"];
        for k in ["directory", "kustomize", "helm"] {
            assert_eq!(src.get(k), want.get(k), "case {i}: {src}");
        }
        let v =
            kiln::gitops::kinds::validate("argoproj.io/v1alpha1", "Application", &app, 10).unwrap();
        assert_eq!(v, vec![], "case {i}: {app}");
    }
    // The check bites: a field Argo CD does not know.
    let mut bad = serde_json::to_value(kiln_plan::manifests::root_application(
        &kiln::pipeline::resolve(
            &common::repo().join("profiles/ameciclo.yaml"),
            &common::no_env,
        )
        .unwrap()
        .1
        .plan,
    ))
    .unwrap();
    bad["spec"]["source"]["directory"]["recursive"] = serde_json::json!(true);
    assert!(
        !kiln::gitops::kinds::validate("argoproj.io/v1alpha1", "Application", &bad, 10)
            .unwrap()
            .is_empty()
    );
}
