//! What the target cluster serves, and the schemas kiln knows for it.
//!
//! The cluster kiln builds serves: the Kubernetes 1.32 built-in kinds (every
//! `x-kubernetes-group-version-kind` of v1.32.0's `_definitions.json`), K3s's own
//! (`helm.cattle.io/v1` HelmChart and HelmChartConfig from helm-controller v0.16.10,
//! `k3s.cattle.io/v1` Addon), the CRDs kiln installs (Argo CD v3.4.7, Tailscale operator
//! v1.102.3), and the CRDs a GitOps checkout defines itself. The upstream files are the copies
//! under `tests/upstream/` (provenance there).

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

const K8S_SERVED: &str = include_str!("../../../tests/upstream/kubernetes-1.32/served-kinds.json");
const K8S_DEFINITIONS: &str =
    include_str!("../../../tests/upstream/kubernetes-1.32/definitions.json");
const K8S_KINDS: [(&str, &str, &str); 7] = [
    (
        "v1",
        "Namespace",
        include_str!("../../../tests/upstream/kubernetes-1.32/namespace-v1.json"),
    ),
    (
        "v1",
        "Service",
        include_str!("../../../tests/upstream/kubernetes-1.32/service-v1.json"),
    ),
    (
        "v1",
        "ConfigMap",
        include_str!("../../../tests/upstream/kubernetes-1.32/configmap-v1.json"),
    ),
    (
        "v1",
        "Secret",
        include_str!("../../../tests/upstream/kubernetes-1.32/secret-v1.json"),
    ),
    (
        "apps/v1",
        "Deployment",
        include_str!("../../../tests/upstream/kubernetes-1.32/deployment-apps-v1.json"),
    ),
    (
        "networking.k8s.io/v1",
        "Ingress",
        include_str!("../../../tests/upstream/kubernetes-1.32/ingress-networking-v1.json"),
    ),
    (
        "batch/v1",
        "Job",
        include_str!("../../../tests/upstream/kubernetes-1.32/job-batch-v1.json"),
    ),
];
/// CRDs kiln installs, with their schemas.
const CRDS: [&str; 10] = [
    include_str!("../../../tests/upstream/argo-cd-v3.4.7/crds/application-crd.json"),
    include_str!("../../../tests/upstream/argo-cd-v3.4.7/crds/appproject-crd.json"),
    include_str!("../../../tests/upstream/tailscale-operator-v1.102.3/crds/tailscale.com_connectors.json"),
    include_str!("../../../tests/upstream/tailscale-operator-v1.102.3/crds/tailscale.com_dnsconfigs.json"),
    include_str!("../../../tests/upstream/tailscale-operator-v1.102.3/crds/tailscale.com_peerrelays.json"),
    include_str!("../../../tests/upstream/tailscale-operator-v1.102.3/crds/tailscale.com_proxyclasses.json"),
    include_str!("../../../tests/upstream/tailscale-operator-v1.102.3/crds/tailscale.com_proxygrouppolicies.json"),
    include_str!("../../../tests/upstream/tailscale-operator-v1.102.3/crds/tailscale.com_proxygroups.json"),
    include_str!("../../../tests/upstream/tailscale-operator-v1.102.3/crds/tailscale.com_recorders.json"),
    include_str!("../../../tests/upstream/tailscale-operator-v1.102.3/crds/tailscale.com_tailnets.json"),
];
/// Served without a schema here: K3s's kinds (helm-controller ships no CRD file; K3s
/// generates them) and Argo CD's ApplicationSet (its 1.3 MB CRD is not vendored; the name is
/// checked against install.yaml in the tests).
pub const SERVED_WITHOUT_SCHEMA: [(&str, &str, &str); 4] = [
    ("helm.cattle.io", "v1", "HelmChart"),
    ("helm.cattle.io", "v1", "HelmChartConfig"),
    ("k3s.cattle.io", "v1", "Addon"),
    ("argoproj.io", "v1alpha1", "ApplicationSet"),
];

/// `apps/v1` → (`apps`, `v1`); `v1` → (``, `v1`). `None` when malformed.
pub fn split_api_version(api_version: &str) -> Option<(&str, &str)> {
    match api_version.split_once('/') {
        None if !api_version.is_empty() => Some(("", api_version)),
        Some((g, v)) if !g.is_empty() && !v.is_empty() && !v.contains('/') => Some((g, v)),
        _ => None,
    }
}

pub fn api_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

/// Where a served kind comes from (named in findings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Kubernetes,
    K3s,
    Upstream,
    /// A CRD in the checkout: the repo-relative file.
    Checkout(String),
}

#[derive(Debug, Clone, Default)]
pub struct Served {
    /// (group, version, kind) → origin.
    kinds: BTreeMap<(String, String, String), Origin>,
}

impl Served {
    /// The target cluster before the checkout's own CRDs.
    pub fn target_cluster() -> Served {
        let mut s = Served::default();
        let list: Vec<String> =
            serde_json::from_str(K8S_SERVED).expect("vendored served-kinds.json");
        for gvk in list {
            let mut parts = gvk.splitn(3, '/');
            let (g, v, k) = (parts.next(), parts.next(), parts.next());
            if let (Some(g), Some(v), Some(k)) = (g, v, k) {
                s.kinds
                    .insert((g.into(), v.into(), k.into()), Origin::Kubernetes);
            }
        }
        for (g, v, k) in SERVED_WITHOUT_SCHEMA {
            let origin = if g == "argoproj.io" {
                Origin::Upstream
            } else {
                Origin::K3s
            };
            s.kinds.insert((g.into(), v.into(), k.into()), origin);
        }
        for text in CRDS {
            let crd: Value = serde_json::from_str(text).expect("vendored CRD is JSON");
            s.add_crd(&crd, Origin::Upstream);
        }
        s
    }

    /// Adds the served versions of a CustomResourceDefinition (apiextensions.k8s.io/v1).
    pub fn add_crd(&mut self, crd: &Value, origin: Origin) {
        let spec = &crd["spec"];
        let (Some(group), Some(kind)) = (spec["group"].as_str(), spec["names"]["kind"].as_str())
        else {
            return;
        };
        for v in spec["versions"].as_array().into_iter().flatten() {
            if v["served"].as_bool() != Some(false) {
                if let Some(name) = v["name"].as_str() {
                    self.kinds
                        .entry((group.into(), name.into(), kind.into()))
                        .or_insert(origin.clone());
                }
            }
        }
    }

    pub fn serves(&self, group: &str, version: &str, kind: &str) -> bool {
        self.kinds
            .contains_key(&(group.to_string(), version.to_string(), kind.to_string()))
    }

    /// Every apiVersion the cluster serves `kind` under (sorted, core first).
    pub fn api_versions_of(&self, kind: &str) -> Vec<String> {
        let set: BTreeSet<String> = self
            .kinds
            .keys()
            .filter(|(_, _, k)| k == kind)
            .map(|(g, v, _)| api_version(g, v))
            .collect();
        set.into_iter().collect()
    }

    /// Kinds served in `group` (any version).
    pub fn kinds_in_group(&self, group: &str) -> Vec<String> {
        let set: BTreeSet<String> = self
            .kinds
            .keys()
            .filter(|(g, _, _)| g == group)
            .map(|(_, _, k)| k.clone())
            .collect();
        set.into_iter().collect()
    }

    pub fn len(&self) -> usize {
        self.kinds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }
}

/// Kubernetes prunes fields a structural schema does not name, and kubectl (Argo CD's apply)
/// asks the server for strict field validation, which refuses them: every object schema that
/// lists `properties` and does not preserve unknown fields is closed.
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

type Validators = BTreeMap<(String, String), jsonschema::Validator>;

fn validators() -> &'static Validators {
    static V: OnceLock<Validators> = OnceLock::new();
    V.get_or_init(|| {
        let mut out = Validators::new();
        let defs: Value = serde_json::from_str(K8S_DEFINITIONS).expect("vendored definitions");
        for (api_version, kind, text) in K8S_KINDS {
            let text = text.replace("/api/_definitions.json#/$defs/", "#/$defs/");
            let mut schema: Value = serde_json::from_str(&text).expect("vendored kind schema");
            schema["$defs"] = defs["$defs"].clone();
            if let Ok(v) = jsonschema::validator_for(&schema) {
                out.insert((api_version.into(), kind.into()), v);
            }
        }
        for text in CRDS {
            let crd: Value = serde_json::from_str(text).expect("vendored CRD is JSON");
            let spec = &crd["spec"];
            let (Some(group), Some(kind)) =
                (spec["group"].as_str(), spec["names"]["kind"].as_str())
            else {
                continue;
            };
            for ver in spec["versions"].as_array().into_iter().flatten() {
                let (Some(name), Some(schema)) =
                    (ver["name"].as_str(), ver["schema"].get("openAPIV3Schema"))
                else {
                    continue;
                };
                let mut schema = schema.clone();
                close_objects(&mut schema);
                if let Ok(v) = jsonschema::validator_for(&schema) {
                    out.insert((api_version(group, name), kind.into()), v);
                }
            }
        }
        out
    })
}

/// One schema violation: where (a JSON pointer into the object) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub pointer: String,
    pub message: String,
}

/// `None` when kiln has no schema for the kind; otherwise its violations (at most `limit`).
pub fn validate(
    api_version: &str,
    kind: &str,
    obj: &Value,
    limit: usize,
) -> Option<Vec<Violation>> {
    let v = validators().get(&(api_version.to_string(), kind.to_string()))?;
    let mut out = Vec::new();
    for e in v.iter_errors(obj).take(limit) {
        let mut pointer = e.instance_path().as_str().to_string();
        if let jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } =
            e.kind()
        {
            if let Some(first) = unexpected.first() {
                pointer = format!("{pointer}/{}", super::reader::escape(first));
            }
        }
        let mut message = e.to_string();
        if message.len() > 300 {
            message = format!("{}…", message.chars().take(300).collect::<String>());
        }
        out.push(Violation { pointer, message });
    }
    Some(out)
}

/// Kinds with a schema here, for the docs and tests: `apiVersion kind`.
pub fn schema_kinds() -> Vec<String> {
    validators()
        .keys()
        .map(|(a, k)| format!("{a} {k}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_target_cluster_serves_built_ins_k3s_and_the_installed_crds() {
        let s = Served::target_cluster();
        assert!(s.serves("", "v1", "ConfigMap"));
        assert!(s.serves("networking.k8s.io", "v1", "Ingress"));
        assert!(
            !s.serves("networking.k8s.io", "v1beta1", "Ingress"),
            "removed in 1.22"
        );
        assert!(s.serves("helm.cattle.io", "v1", "HelmChart"));
        assert!(!s.serves("helm.sh", "v1", "HelmChart"));
        assert!(s.serves("argoproj.io", "v1alpha1", "Application"));
        assert!(s.serves("tailscale.com", "v1alpha1", "ProxyClass"));
        assert!(!s.serves("tailscale.com", "v1alpha1", "Ingress"));
        assert_eq!(s.api_versions_of("HelmChart"), ["helm.cattle.io/v1"]);
    }

    #[test]
    fn schemas_exist_for_the_issue_kinds_and_bite() {
        let kinds = schema_kinds();
        for k in [
            "v1 Namespace",
            "v1 Service",
            "apps/v1 Deployment",
            "networking.k8s.io/v1 Ingress",
            "v1 ConfigMap",
            "v1 Secret",
            "batch/v1 Job",
            "argoproj.io/v1alpha1 Application",
            "argoproj.io/v1alpha1 AppProject",
            "tailscale.com/v1alpha1 ProxyClass",
        ] {
            assert!(kinds.contains(&k.to_string()), "{k}: {kinds:?}");
        }
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}});
        assert_eq!(validate("v1", "ConfigMap", &cm, 5), Some(vec![]));
        let bad = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": true}, "spec": {}});
        let v = validate("v1", "ConfigMap", &bad, 5).unwrap();
        let ptrs: Vec<&str> = v.iter().map(|x| x.pointer.as_str()).collect();
        assert!(
            ptrs.contains(&"/data/k") && ptrs.contains(&"/spec"),
            "{v:?}"
        );
        assert_eq!(validate("example.com/v1", "Thing", &cm, 5), None);
    }
}
