//! The Kubernetes objects the steps produce, against golden files and the upstream formats they
//! must satisfy: Argo CD v3.4.7 CRD schemas, the Tailscale operator chart/CRDs v1.102.3 and
//! helm-controller v0.16.10's HelmChart fields (copies under tests/upstream/).

mod steps_common;

use kiln_plan::manifests::{self, HelmChart, CLUSTER_SCOPED_KINDS};
use kiln_plan::Secret;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use steps_common::*;

fn upstream(rel: &str) -> String {
    std::fs::read_to_string(repo_dir().join("tests/upstream").join(rel)).unwrap()
}

fn test_plan() -> kiln_plan::Plan {
    let pins: Value =
        serde_json::from_str(&std::fs::read_to_string(standins_dir().join("pins.json")).unwrap())
            .unwrap();
    plan("http://127.0.0.1:1/", &pins)
}

fn docs(bytes: &[u8]) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_slice(bytes)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

#[test]
fn bundled_manifests_match_their_golden_files_and_have_rfc1123_names() {
    let plan = test_plan();
    let files = manifests::bundled(&plan);
    let names: Vec<&str> = files.iter().map(|f| f.file.as_str()).collect();
    assert_eq!(
        names,
        [
            "tailscale-operator.yaml",
            "argocd-ingress.yaml",
            "gitops-root.yaml"
        ]
    );
    for f in &files {
        assert!(manifests::is_rfc1123_label(manifests::addon_name(&f.file)));
        golden(&f.file, &f.bytes);
    }
    golden("plan.json", &plan.to_json());
    // Deterministic: rendering twice gives the same bytes.
    assert_eq!(files, manifests::bundled(&plan));
}

#[test]
fn bundled_manifests_hold_no_secret_and_node_rendered_ones_do() {
    let plan = test_plan();
    for f in manifests::bundled(&plan) {
        let text = String::from_utf8(f.bytes).unwrap();
        assert!(
            !text.contains("clientSecret") && !text.contains("oauth"),
            "{}",
            f.file
        );
        assert!(!text.contains("kind: Secret"), "{}", f.file);
    }
    let s = manifests::tailscale_oauth_secret(&plan, &Secret::new(OAUTH_SECRET));
    let d = &docs(&s)[0];
    assert_eq!(d["metadata"]["name"], "operator-oauth");
    assert_eq!(d["metadata"]["namespace"], "tailscale");
    let keys: Vec<&String> = d["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["client_id", "client_secret"]);
    // No repo Secret without credentials.
    let mut anon = plan.clone();
    anon.gitops.as_mut().unwrap().credentials = None;
    assert!(manifests::gitops_repo_secret(&anon, &Secret::new("x")).is_none());
    let repo = manifests::gitops_repo_secret(&plan, &Secret::new(REPO_PASSWORD)).unwrap();
    let d = &docs(&repo)[0];
    assert_eq!(
        d["metadata"]["labels"]["argocd.argoproj.io/secret-type"],
        "repository"
    );
}

/// Kubernetes prunes fields a structural schema does not name; for a test that must catch a
/// misspelt field, treat every object schema that lists `properties` (and does not preserve
/// unknown fields) as closed.
fn close_objects(v: &mut Value) {
    match v {
        Value::Object(m) => {
            let preserve = m
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if m.contains_key("properties") && !m.contains_key("additionalProperties") && !preserve
            {
                m.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (_, x) in m.iter_mut() {
                close_objects(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(close_objects),
        _ => {}
    }
}

fn crd_validator(rel: &str, version: &str) -> jsonschema::Validator {
    let crd: Value = serde_json::from_str(&upstream(rel)).unwrap();
    let v = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == version)
        .unwrap_or_else(|| panic!("{rel} has no version {version}"));
    let mut schema = v["schema"]["openAPIV3Schema"].clone();
    close_objects(&mut schema);
    jsonschema::validator_for(&schema).unwrap()
}

fn errors(v: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn root_application_validates_against_the_argo_cd_v3_4_7_crd() {
    let plan = test_plan();
    let app = serde_json::to_value(manifests::root_application(&plan)).unwrap();
    let v = crd_validator("argo-cd-v3.4.7/crds/application-crd.json", "v1alpha1");
    assert_eq!(errors(&v, &app), Vec::<String>::new());
    // The check bites: a misspelt field and a wrong type are rejected.
    let mut bad = app.clone();
    bad["spec"]["syncPolicy"]["automated"]["selfheal"] = json!(true);
    assert!(!errors(&v, &bad).is_empty());
    let mut bad = app.clone();
    bad["spec"]["syncPolicy"]["retry"]["limit"] = json!("5");
    assert!(!errors(&v, &bad).is_empty());
    // The reference profile's root Application reads groundwork recursively (docs/profile.md).
    assert_eq!(app["spec"]["source"]["directory"]["recurse"], true);
    assert_eq!(
        app["spec"]["destination"]["server"],
        "https://kubernetes.default.svc"
    );
    assert_eq!(
        app["spec"]["syncPolicy"]["syncOptions"],
        json!(["CreateNamespace=true"])
    );
    assert_eq!(app["spec"]["source"]["path"], "azure/kubernetes");
    assert_eq!(
        app["spec"]["source"]["repoURL"],
        "https://github.com/ameciclo/groundwork.git"
    );
    // kiln ships no AppProject: the root Application uses the `default` project Argo CD
    // creates itself (app-of-apps is an admin tool; see docs/node.md).
    assert_eq!(app["spec"]["project"], "default");
}

/// `| \`field\` | type |` rows of one `### Title` section of the helm-controller notes.
fn notes_fields(section: &str) -> BTreeSet<String> {
    let notes = upstream("helm-controller-v0.16.10/notes.md");
    let start = notes
        .find(&format!("### {section}"))
        .unwrap_or_else(|| panic!("notes.md has no section {section}"));
    let body = &notes[start + 4..];
    let end = body.find("\n### ").unwrap_or(body.len());
    body[..end]
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix("| `")?;
            Some(l.split('`').next()?.to_string())
        })
        .collect()
}

#[test]
fn helmchart_uses_only_fields_helm_controller_v0_16_10_knows() {
    let plan = test_plan();
    let chart = manifests::tailscale_operator_chart(&plan);
    let v = serde_json::to_value(&chart).unwrap();
    let known = notes_fields("HelmChartSpec (`HelmChart.spec`)");
    assert!(
        known.contains("valuesContent") && known.len() > 20,
        "{known:?}"
    );
    for k in v["spec"].as_object().unwrap().keys() {
        assert!(
            known.contains(k),
            "spec.{k} is not a v0.16.10 HelmChart field"
        );
    }
    // Every field the typed struct can ever emit is known too (not only the ones set here).
    let full = json!({
        "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "metadata": {"name": "x"},
        "spec": {"targetNamespace": "a", "createNamespace": true, "chart": "c", "version": "1",
                 "repo": "r", "repoCA": "ca", "valuesContent": "v",
                 "valuesSecrets": [{"name": "s", "keys": ["k"], "ignoreUpdates": true}],
                 "helmVersion": "v3", "bootstrap": false, "chartContent": "b", "jobImage": "i",
                 "backOffLimit": 3, "timeout": "300s", "failurePolicy": "abort"}
    });
    let typed: HelmChart = serde_json::from_value(full.clone()).unwrap();
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(back["spec"], full["spec"]);
    for k in back["spec"].as_object().unwrap().keys() {
        assert!(
            known.contains(k),
            "the HelmChart struct has non-v0.16.10 field {k}"
        );
    }
    for newer in [
        "takeOwnership",
        "serverSide",
        "values",
        "forceConflicts",
        "driver",
    ] {
        assert!(!known.contains(newer));
        let mut x = full.clone();
        x["spec"][newer] = json!(true);
        assert!(
            serde_json::from_value::<HelmChart>(x).is_err(),
            "{newer} accepted"
        );
    }
    assert_eq!(v["metadata"]["namespace"], "kube-system");
    assert_eq!(v["spec"]["chart"], "tailscale-operator");
    assert_eq!(v["spec"]["repo"], "https://pkgs.tailscale.com/helmcharts");
    assert_eq!(v["spec"]["version"], "1.102.3");
    assert_eq!(v["spec"]["targetNamespace"], "tailscale");
}

/// Dotted key paths of every scalar/list leaf in a YAML/JSON tree.
fn leaf_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_paths(x, &p, out);
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

#[test]
fn operator_values_exist_in_the_v1_102_3_chart_and_keep_oauth_out() {
    let plan = test_plan();
    let chart = manifests::tailscale_operator_chart(&plan);
    let values: Value =
        serde_yaml::from_str(chart.spec.values_content.as_deref().unwrap()).unwrap();
    let upstream_values: Value =
        serde_yaml::from_str(&upstream("tailscale-operator-v1.102.3/chart/values.yaml")).unwrap();
    let mut ours = BTreeSet::new();
    leaf_paths(&values, "", &mut ours);
    let mut theirs = BTreeSet::new();
    leaf_paths(&upstream_values, "", &mut theirs);
    for p in &ours {
        assert!(
            theirs.contains(p),
            "values key {p} does not exist in the chart's values.yaml"
        );
    }
    assert!(
        values.get("oauth").is_none(),
        "the OAuth secret must not be in valuesContent"
    );
    // The class the chart creates is the one the Ingress asks for.
    assert_eq!(values["ingressClass"]["enabled"], true);
    assert_eq!(
        values["ingressClass"]["name"],
        upstream_values["ingressClass"]["name"]
    );
    let ing = serde_json::to_value(manifests::argocd_ingress(&plan)).unwrap();
    assert_eq!(
        ing["spec"]["ingressClassName"],
        values["ingressClass"]["name"]
    );
    // kiln creates no ProxyClass, so it must not name one as the default for proxies: the
    // operator would wait for a ProxyClass that never appears.
    assert!(values["proxyConfig"]["defaultProxyClass"].is_null());
    let pc: Value = serde_json::from_str(&upstream(
        "tailscale-operator-v1.102.3/crds/tailscale.com_proxyclasses.json",
    ))
    .unwrap();
    assert_eq!(pc["spec"]["names"]["kind"], "ProxyClass");
    assert_eq!(pc["spec"]["group"], "tailscale.com");
    assert_eq!(pc["spec"]["scope"], "Cluster");
    // The chart version the plan pins is the Tailscale tag without `v`, as the release
    // tooling publishes it (Chart.yaml in git carries a placeholder).
    assert_eq!(chart.spec.version.as_deref(), Some("1.102.3"));
    assert!(upstream("tailscale-operator-v1.102.3/chart/Chart.yaml")
        .contains("name: tailscale-operator"));
}

#[test]
fn ingress_is_what_the_tailscale_operator_expects() {
    let plan = test_plan();
    let ing = serde_json::to_value(manifests::argocd_ingress(&plan)).unwrap();
    // Round trip through the typed k8s-openapi v1.32 Ingress.
    let _: k8s_openapi::api::networking::v1::Ingress = serde_json::from_value(ing.clone()).unwrap();
    assert_eq!(ing["metadata"]["namespace"], "argocd");
    assert_eq!(
        ing["spec"]["defaultBackend"]["service"]["name"],
        "argocd-server"
    );
    // 443 is proxied as https+insecure by the operator, so argocd-server needs no insecure mode.
    assert_eq!(
        ing["spec"]["defaultBackend"]["service"]["port"]["number"],
        443
    );
    // At most one TLS entry with one host: its first label is the tailnet device name.
    assert_eq!(ing["spec"]["tls"], json!([{"hosts": ["argocd"]}]));
    assert!(ing["spec"]["rules"].is_null());
}

#[test]
fn argocd_install_yaml_gets_every_namespaced_object_into_argocd() {
    let src = repo_dir().join("tests/upstream/argo-cd-v3.4.7/install.yaml");
    let mut out = Vec::new();
    kiln_firstboot::argocd::namespace_manifest(
        std::io::BufReader::new(std::fs::File::open(&src).unwrap()),
        &mut out,
        "argocd",
    )
    .unwrap();
    let upstream_docs = docs(&std::fs::read(&src).unwrap());
    let ours = docs(&out);
    assert_eq!(upstream_docs.len(), 59);
    assert_eq!(ours.len(), upstream_docs.len() + 1);
    assert_eq!(ours[0]["kind"], "Namespace");
    assert_eq!(ours[0]["metadata"]["name"], "argocd");
    for (i, (a, b)) in upstream_docs.iter().zip(&ours[1..]).enumerate() {
        let kind = b["kind"].as_str().unwrap();
        if CLUSTER_SCOPED_KINDS.contains(&kind) {
            assert!(b["metadata"]["namespace"].is_null(), "doc {i} {kind}");
        } else {
            assert_eq!(b["metadata"]["namespace"], "argocd", "doc {i} {kind}");
        }
        // Nothing else changed: with the namespace removed again, the documents are equal.
        let mut b2 = b.clone();
        if let Some(m) = b2["metadata"].as_object_mut() {
            if a["metadata"]["namespace"].is_null() {
                m.remove("namespace");
            }
        }
        assert_eq!(a, &b2, "doc {i} {kind} changed beyond its namespace");
    }
    // Deterministic and idempotent as bytes.
    golden(
        "argocd.yaml.sha256",
        format!("{}\n", kiln_plan::Sha256::digest(&out).to_hex()).as_bytes(),
    );
}
