//! Kubernetes objects the node gets, built from typed structs and rendered once.
//!
//! Two kinds of files end up in the K3s auto-deploy directory
//! (`/var/lib/rancher/k3s/server/manifests/`):
//! - **bundled** manifests ([`bundled`]): rendered by the builder from the plan alone, secret-free,
//!   shipped in the bundle and pinned by sha256 in `plan.manifests`;
//! - **node-rendered** manifests: Secrets ([`tailscale_oauth_secret`], [`gitops_repo_secret`])
//!   whose values only exist on the node (0600 files under `/etc/kiln/secrets/`), and the
//!   namespaced Argo CD install manifest the daemon derives from the pinned upstream file.
//!
//! K3s names each file's `Addon` after the file name up to the first `.`, so every name here is
//! an RFC 1123 label plus `.yaml`.

use crate::{Plan, StepId};
use k8s_openapi::api::core::v1::{Namespace, Secret as K8sSecret};
use k8s_openapi::api::networking::v1::{
    Ingress, IngressBackend, IngressServiceBackend, IngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bundled: Namespace `tailscale` + the operator's HelmChart.
pub const TAILSCALE_OPERATOR_FILE: &str = "tailscale-operator.yaml";
/// Node-rendered: Secret `operator-oauth` (0600).
pub const TAILSCALE_OAUTH_FILE: &str = "tailscale-operator-oauth.yaml";
/// Node-rendered from the pinned upstream `install.yaml`, every namespaced object placed.
pub const ARGOCD_INSTALL_FILE: &str = "argocd.yaml";
/// Bundled: the Tailscale Ingress for `argocd-server`.
pub const ARGOCD_INGRESS_FILE: &str = "argocd-ingress.yaml";
/// Bundled: the root Application (app-of-apps).
pub const GITOPS_ROOT_FILE: &str = "gitops-root.yaml";
/// Node-rendered, only when the profile gives repo credentials: the repository Secret (0600).
pub const GITOPS_REPO_FILE: &str = "gitops-repo.yaml";

/// Where HelmChart objects live (secrets they reference must be in the same namespace).
pub const HELMCHART_NAMESPACE: &str = "kube-system";
/// The operator chart's name in its repository.
pub const TAILSCALE_OPERATOR_CHART: &str = "tailscale-operator";
/// The Secret the operator reads when `oauth.*` values are unset (`<fullname>-oauth`).
pub const TAILSCALE_OAUTH_SECRET: &str = "operator-oauth";
/// The Service `install.yaml` creates for the UI/API; port 443 is proxied as `https+insecure`.
pub const ARGOCD_SERVER_SERVICE: &str = "argocd-server";
pub const ARGOCD_SERVER_PORT: i32 = 443;
/// In-cluster destination as Argo CD names it.
pub const IN_CLUSTER_SERVER: &str = "https://kubernetes.default.svc";

/// A rendered manifest file shipped in the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    pub step: StepId,
    /// RFC 1123 file name (`tailscale-operator.yaml`); K3s names the Addon after it.
    pub file: String,
    pub bytes: Vec<u8>,
}

/// The K3s Addon name for a manifest file: the base name up to the first `.`.
pub fn addon_name(file: &str) -> &str {
    file.split('.').next().unwrap_or(file)
}

/// RFC 1123 label: lowercase alphanumerics and `-`, starting and ending alphanumeric, ≤ 63.
pub fn is_rfc1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The secret-free manifests the builder renders into the bundle. The plan's own `manifests`
/// list is ignored here (it holds the hashes of this function's output).
pub fn bundled(plan: &Plan) -> Vec<ManifestFile> {
    // An agent installs nothing into a manifests dir: it has none (no server steps).
    if plan.is_agent() {
        return Vec::new();
    }
    let file = |step, name: &str, bytes| ManifestFile {
        step,
        file: name.to_string(),
        bytes,
    };
    vec![
        file(
            StepId::TailscaleOperator,
            TAILSCALE_OPERATOR_FILE,
            yaml_docs(&[
                to_yaml(&namespace(&operator(plan).namespace)),
                to_yaml(&tailscale_operator_chart(plan)),
            ]),
        ),
        file(
            StepId::Argocd,
            ARGOCD_INGRESS_FILE,
            yaml_docs(&[to_yaml(&argocd_ingress(plan))]),
        ),
        file(
            StepId::Gitops,
            GITOPS_ROOT_FILE,
            yaml_docs(&[to_yaml(&root_application(plan))]),
        ),
    ]
}

// The renderers below are a server's: `Plan::from_json` refuses a server plan without these
// sections, `bundled` renders nothing for an agent, and the daemon calls them only from the
// server-only steps, which an agent records as not applicable. Reaching one with an agent's
// plan is a bug in kiln, not a property of the input.
fn operator(plan: &Plan) -> &crate::TailscaleOperator {
    plan.operator()
        .expect("a server plan (the operator section)")
}
fn argocd(plan: &Plan) -> &crate::ArgoCd {
    plan.argocd().expect("a server plan (the argocd section)")
}
fn gitops(plan: &Plan) -> &crate::GitOps {
    plan.gitops().expect("a server plan (the gitops section)")
}

fn to_yaml<T: Serialize>(value: &T) -> String {
    serde_yaml::to_string(value).expect("typed manifests serialize")
}

/// Joins YAML documents with `---` separators.
pub fn yaml_docs(docs: &[String]) -> Vec<u8> {
    let mut out = String::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(d);
    }
    out.into_bytes()
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/managed-by".to_string(),
            "kiln".to_string(),
        )])),
        ..ObjectMeta::default()
    }
}

pub fn namespace(name: &str) -> Namespace {
    Namespace {
        metadata: meta(name, None),
        ..Namespace::default()
    }
}

// ---------------------------------------------------------------------------------------------
// HelmChart, helm.cattle.io/v1 as helm-controller v0.16.10 (K3s v1.32.4+k3s1) knows it.
// Only fields from that version's types.go exist here, so a newer field (`takeOwnership`,
// `serverSide`, `values`, …) cannot be emitted by accident.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HelmChart {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: HelmChartSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HelmChartSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create_namespace: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(rename = "repoCA", skip_serializing_if = "Option::is_none")]
    pub repo_ca: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values_secrets: Option<Vec<HelmValuesSecret>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub helm_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub back_off_limit: Option<i32>,
    /// A Go duration string, e.g. `300s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// `reinstall` (default) or `abort`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_policy: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HelmValuesSecret {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_updates: bool,
}

/// The operator chart values kiln sets (keys as in the chart's `values.yaml` at v1.102.3).
/// `oauth` is deliberately absent: the OAuth secret lives in the pre-created Secret
/// `operator-oauth`, never in `valuesContent` (which is stored readable in kube-system).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TailscaleOperatorValues {
    pub ingress_class: IngressClassValues,
    pub operator_config: OperatorConfigValues,
    /// The node's `tailscale.login-server` (the chart's `OPERATOR_LOGIN_SERVER`), so the
    /// operator and its proxies join the same control server as the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_server: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngressClassValues {
    pub enabled: bool,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OperatorConfigValues {
    pub hostname: String,
}

pub fn tailscale_operator_values(plan: &Plan) -> TailscaleOperatorValues {
    let op = operator(plan);
    TailscaleOperatorValues {
        ingress_class: IngressClassValues {
            enabled: true,
            name: op.ingress_class.clone(),
        },
        operator_config: OperatorConfigValues {
            hostname: op.hostname.clone(),
        },
        login_server: plan
            .tailscale
            .login_server
            .as_ref()
            .map(|u| u.as_str().trim_end_matches('/').to_string()),
    }
}

/// The HelmChart's name, and so the install Job's name (`helm-install-<name>`).
pub fn tailscale_operator_chart_name() -> &'static str {
    TAILSCALE_OPERATOR_CHART
}

pub fn tailscale_operator_chart(plan: &Plan) -> HelmChart {
    let op = operator(plan);
    HelmChart {
        api_version: "helm.cattle.io/v1".into(),
        kind: "HelmChart".into(),
        metadata: meta(TAILSCALE_OPERATOR_CHART, Some(HELMCHART_NAMESPACE)),
        spec: HelmChartSpec {
            // A pinned archive is served by K3s itself (the placeholder is expanded by the
            // helm-controller), so installing the chart needs no network.
            chart: Some(match &op.chart_archive {
                Some(a) => format!("https://%{{KUBERNETES_API}}%/static/charts/{}", a.name),
                None => TAILSCALE_OPERATOR_CHART.into(),
            }),
            repo: op
                .chart_archive
                .is_none()
                .then(|| op.chart_repo.to_string()),
            version: op.chart_archive.is_none().then(|| op.chart_version.clone()),
            target_namespace: Some(op.namespace.clone()),
            values_content: Some(to_yaml(&tailscale_operator_values(plan))),
            ..HelmChartSpec::default()
        },
    }
}

/// Secret `operator-oauth` in the operator's namespace, rendered on the node (0600 file).
pub fn tailscale_oauth_secret(plan: &Plan, client_secret: &crate::Secret) -> Vec<u8> {
    let op = operator(plan);
    let secret = K8sSecret {
        metadata: meta(TAILSCALE_OAUTH_SECRET, Some(&op.namespace)),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                "client_id".to_string(),
                ByteString(op.oauth_client_id.clone().into_bytes()),
            ),
            (
                "client_secret".to_string(),
                ByteString(client_secret.expose().trim().as_bytes().to_vec()),
            ),
        ])),
        ..K8sSecret::default()
    };
    yaml_docs(&[to_yaml(&secret)])
}

// ---------------------------------------------------------------------------------------------
// Argo CD

pub fn argocd_ingress(plan: &Plan) -> Ingress {
    let a = argocd(plan);
    Ingress {
        metadata: meta("argocd", Some(&a.namespace)),
        spec: Some(IngressSpec {
            ingress_class_name: Some(a.ingress_class.clone()),
            default_backend: Some(IngressBackend {
                service: Some(IngressServiceBackend {
                    name: ARGOCD_SERVER_SERVICE.into(),
                    port: Some(ServiceBackendPort {
                        number: Some(ARGOCD_SERVER_PORT),
                        name: None,
                    }),
                }),
                resource: None,
            }),
            tls: Some(vec![IngressTLS {
                hosts: Some(vec![a.ingress_host.clone()]),
                secret_name: None,
            }]),
            rules: None,
        }),
        status: None,
    }
}

/// Application, argoproj.io/v1alpha1 (only the fields kiln sets; checked against the v3.4.7
/// CRD schema in the tests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Application {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ApplicationSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplicationSpec {
    pub project: String,
    pub source: ApplicationSource,
    pub destination: ApplicationDestination,
    pub sync_policy: SyncPolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplicationSource {
    #[serde(rename = "repoURL")]
    pub repo_url: String,
    pub target_revision: String,
    pub path: String,
    /// Exactly one of `directory`, `kustomize`, `helm` is set: an explicit source type, so
    /// Argo CD never guesses one from the files it finds at the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<DirectorySource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kustomize: Option<KustomizeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helm: Option<HelmSource>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DirectorySource {
    pub recurse: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude: Option<String>,
}

/// `kustomize: {}`: build the path with Argo CD's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KustomizeSource {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HelmSource {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub value_files: Vec<String>,
}

/// The root Application's source options from the plan.
fn source_options(
    s: &crate::GitOpsSource,
) -> (
    Option<DirectorySource>,
    Option<KustomizeSource>,
    Option<HelmSource>,
) {
    match s {
        crate::GitOpsSource::Directory(d) => (
            Some(DirectorySource {
                recurse: d.recurse,
                include: d.include.clone(),
                exclude: d.exclude.clone(),
            }),
            None,
            None,
        ),
        crate::GitOpsSource::Kustomize {} => (None, Some(KustomizeSource {}), None),
        crate::GitOpsSource::Helm(h) => (
            None,
            None,
            Some(HelmSource {
                value_files: h.value_files.clone(),
            }),
        ),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplicationDestination {
    pub server: String,
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SyncPolicy {
    pub automated: AutomatedSync,
    pub sync_options: Vec<String>,
    pub retry: RetryStrategy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AutomatedSync {
    pub prune: bool,
    pub self_heal: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryStrategy {
    pub limit: i64,
    pub backoff: Backoff,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backoff {
    pub duration: String,
    /// The CRD types `factor` as an integer (int64).
    pub factor: i64,
    pub max_duration: String,
}

pub fn root_application(plan: &Plan) -> Application {
    let g = gitops(plan);
    let mut metadata = meta(&g.app_name, Some(&argocd(plan).namespace));
    // Deleting the root Application cascades to what it deployed.
    metadata.finalizers = Some(vec!["resources-finalizer.argocd.argoproj.io".into()]);
    let (directory, kustomize, helm) = source_options(&g.source);
    Application {
        api_version: "argoproj.io/v1alpha1".into(),
        kind: "Application".into(),
        metadata,
        spec: ApplicationSpec {
            project: "default".into(),
            source: ApplicationSource {
                repo_url: g.repo_url.to_string(),
                target_revision: g.revision.clone(),
                path: g.path.clone(),
                directory,
                kustomize,
                helm,
            },
            destination: ApplicationDestination {
                server: IN_CLUSTER_SERVER.into(),
                namespace: argocd(plan).namespace.clone(),
            },
            sync_policy: SyncPolicy {
                automated: AutomatedSync {
                    prune: true,
                    self_heal: true,
                },
                sync_options: vec!["CreateNamespace=true".into()],
                retry: RetryStrategy {
                    limit: 5,
                    backoff: Backoff {
                        duration: "5s".into(),
                        factor: 2,
                        max_duration: "3m".into(),
                    },
                },
            },
        },
    }
}

/// The repository Secret (label `argocd.argoproj.io/secret-type: repository`), rendered on the
/// node only when the profile gives credentials.
pub fn gitops_repo_secret(plan: &Plan, password: &crate::Secret) -> Option<Vec<u8>> {
    let creds = gitops(plan).credentials.as_ref()?;
    let mut metadata = meta(
        &format!("{}-repo", gitops(plan).app_name),
        Some(&argocd(plan).namespace),
    );
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("argocd.argoproj.io/secret-type".into(), "repository".into());
    let b = |s: &str| ByteString(s.as_bytes().to_vec());
    let secret = K8sSecret {
        metadata,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            ("type".to_string(), b("git")),
            ("url".to_string(), b(gitops(plan).repo_url.as_str())),
            ("username".to_string(), b(&creds.username)),
            ("password".to_string(), b(password.expose().trim())),
        ])),
        ..K8sSecret::default()
    };
    Some(yaml_docs(&[to_yaml(&secret)]))
}

/// Kinds that are cluster-scoped: they must not get a `metadata.namespace`.
pub const CLUSTER_SCOPED_KINDS: &[&str] = &[
    "APIService",
    "CSIDriver",
    "CSINode",
    "CertificateSigningRequest",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "FlowSchema",
    "IngressClass",
    "MutatingWebhookConfiguration",
    "Namespace",
    "Node",
    "PersistentVolume",
    "PriorityClass",
    "PriorityLevelConfiguration",
    "RuntimeClass",
    "StorageClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ValidatingWebhookConfiguration",
    "VolumeAttachment",
];

pub fn is_cluster_scoped(kind: &str) -> bool {
    CLUSTER_SCOPED_KINDS.contains(&kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_file_names_are_rfc1123_addon_names() {
        for f in [
            TAILSCALE_OPERATOR_FILE,
            TAILSCALE_OAUTH_FILE,
            ARGOCD_INSTALL_FILE,
            ARGOCD_INGRESS_FILE,
            GITOPS_ROOT_FILE,
            GITOPS_REPO_FILE,
        ] {
            assert!(f.ends_with(".yaml"));
            assert!(is_rfc1123_label(addon_name(f)), "{f}");
        }
        assert!(!is_rfc1123_label("tailscale_operator"));
        assert!(!is_rfc1123_label("-a"));
    }
}
