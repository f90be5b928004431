//! The plan: everything `kiln-firstboot` will do on a node, decided at build time.
//!
//! This crate is the one contract between the builder (`kiln`) and the daemon
//! (`kiln-firstboot`). The builder resolves a profile into a [`Plan`]; the daemon reads it and
//! never sees the profile. Every struct denies unknown fields, so a plan written by a newer
//! builder is refused rather than half-understood. Secrets are never in the plan: it names the
//! node paths of the secret files (written 0600 by cloud-init, or by the daemon from a Key
//! Vault reference, [`keyvault`]) instead.

pub mod gitops_source;
pub mod k3s_config;
pub mod keyvault;
pub mod manifests;
pub mod paths;
pub mod types;

pub use gitops_source::{DirectoryOptions, GitOpsSource, HelmOptions};
pub use types::{Digest, Hasher, Hashes, ParseError, Pin, Secret, Sha256, Sha512, Version};
pub use url::Url;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bumped on any incompatible change to the plan's shape.
pub const PLAN_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Plan {
    pub version: u32,
    pub node: Node,
    pub artifacts: Artifacts,
    pub k3s: K3s,
    pub tailscale: Tailscale,
    /// Argo CD and the GitOps root: a server's (absent on an agent, which runs neither).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argocd: Option<ArgoCd>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitops: Option<GitOps>,
    /// Manifests rendered at build time and shipped in the bundle (no secrets in them).
    #[serde(default)]
    pub manifests: Vec<BundledManifest>,
    /// Overall deadline per step, seconds; retries stop when it passes.
    pub deadlines: BTreeMap<StepId, u64>,
    /// Secrets the node reads from Azure Key Vault itself (references only, never values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_vault: Option<keyvault::KeyVault>,
}

impl Plan {
    pub fn from_json(bytes: &[u8]) -> Result<Plan, PlanError> {
        let plan: Plan = serde_json::from_slice(bytes).map_err(PlanError::Parse)?;
        if plan.version != PLAN_VERSION {
            return Err(PlanError::Version {
                found: plan.version,
                expected: PLAN_VERSION,
            });
        }
        plan.check_role()?;
        Ok(plan)
    }

    /// A server plan carries the operator, Argo CD and GitOps sections; an agent plan none of
    /// them (they would be settings nothing reads).
    fn check_role(&self) -> Result<(), PlanError> {
        let present = [
            ("tailscale.operator", self.tailscale.operator.is_some()),
            ("argocd", self.argocd.is_some()),
            ("gitops", self.gitops.is_some()),
        ];
        for (section, here) in present {
            match (&self.node.role, here) {
                (Role::Server, false) => {
                    return Err(PlanError::Role {
                        section,
                        why: "a server plan needs it",
                    })
                }
                (Role::Agent { .. }, true) => {
                    return Err(PlanError::Role {
                        section,
                        why: "an agent runs no server steps",
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn is_agent(&self) -> bool {
        matches!(self.node.role, Role::Agent { .. })
    }

    /// The steps in the order this node runs them. An agent joins the tailnet first: its K3s
    /// needs the tailnet address (`node-ip`) and reaches its server over the tailnet. A server
    /// starts K3s first (docs/node.md, "Step order").
    pub fn step_order(&self) -> Vec<StepId> {
        if self.is_agent() {
            let first = [StepId::Tailscale, StepId::K3s];
            let rest = StepId::ALL.into_iter().filter(|s| !first.contains(s));
            first.into_iter().chain(rest).collect()
        } else {
            StepId::ALL.to_vec()
        }
    }

    /// Does `step` do anything on this node? The operator, Argo CD and GitOps steps run on
    /// servers only; an agent records them as not applicable.
    pub fn applies(&self, step: StepId) -> bool {
        !(self.is_agent() && step.server_only())
    }

    /// The operator section, for the steps that only a server runs.
    pub fn operator(&self) -> Result<&TailscaleOperator, PlanError> {
        self.tailscale
            .operator
            .as_ref()
            .ok_or(PlanError::ServerOnly("tailscale.operator"))
    }

    pub fn argocd(&self) -> Result<&ArgoCd, PlanError> {
        self.argocd.as_ref().ok_or(PlanError::ServerOnly("argocd"))
    }

    pub fn gitops(&self) -> Result<&GitOps, PlanError> {
        self.gitops.as_ref().ok_or(PlanError::ServerOnly("gitops"))
    }

    /// Canonical bytes: pretty JSON with a trailing newline. Same plan, same bytes.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("plan serializes");
        out.push(b'\n');
        out
    }

    /// Every pinned download of the plan with the step that uses it, in step order: what a
    /// baked image pre-stages into the cache and an air-gap bundle must carry.
    pub fn pinned_artifacts(&self) -> Vec<(StepId, &Artifact)> {
        let mut v = vec![(StepId::K3s, &self.k3s.binary)];
        v.extend(self.k3s.images.iter().map(|a| (StepId::K3s, a)));
        v.push((StepId::Tailscale, &self.tailscale.tarball));
        if let Some(chart) = self
            .tailscale
            .operator
            .as_ref()
            .and_then(|o| o.chart_archive.as_ref())
        {
            v.push((StepId::TailscaleOperator, chart));
        }
        if let Some(argocd) = &self.argocd {
            v.push((StepId::Argocd, &argocd.manifest));
        }
        v
    }

    pub fn deadline(&self, step: StepId) -> std::time::Duration {
        std::time::Duration::from_secs(self.deadlines.get(&step).copied().unwrap_or(600))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("plan is not valid: {0}")]
    Parse(serde_json::Error),
    #[error("plan version {found} is not supported (this daemon reads version {expected})")]
    Version { found: u32, expected: u32 },
    #[error("plan is not valid: section {section}: {why}")]
    Role {
        section: &'static str,
        why: &'static str,
    },
    #[error("{0} is a server's: this plan is an agent's")]
    ServerOnly(&'static str),
}

/// The steps, in the order the daemon runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepId {
    K3s,
    Tailscale,
    TailscaleOperator,
    Argocd,
    Gitops,
    Verify,
}

impl StepId {
    pub const ALL: [StepId; 6] = [
        StepId::K3s,
        StepId::Tailscale,
        StepId::TailscaleOperator,
        StepId::Argocd,
        StepId::Gitops,
        StepId::Verify,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            StepId::K3s => "k3s",
            StepId::Tailscale => "tailscale",
            StepId::TailscaleOperator => "tailscale-operator",
            StepId::Argocd => "argocd",
            StepId::Gitops => "gitops",
            StepId::Verify => "verify",
        }
    }

    /// Steps that only a K3s server runs (they install into the server's manifests dir).
    pub fn server_only(self) -> bool {
        matches!(
            self,
            StepId::TailscaleOperator | StepId::Argocd | StepId::Gitops
        )
    }
}

/// What the journal, `status.json` and the milestones say of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    Pending,
    Running,
    Done,
    Failed,
    /// `check` found the desired state already there (and `verify` confirmed it).
    Skipped,
    /// The step has nothing to do on this node: a server step (operator, Argo CD, GitOps) on
    /// a K3s agent. Not "skipped": nothing was checked or verified, there is nothing to be.
    NotApplicable,
}

impl StepState {
    /// The step's desired state is in place.
    pub fn is_satisfied(self) -> bool {
        matches!(
            self,
            StepState::Done | StepState::Skipped | StepState::NotApplicable
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Done => "done",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
            StepState::NotApplicable => "not-applicable",
        }
    }
}

impl std::fmt::Display for StepId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StepId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        StepId::ALL
            .into_iter()
            .find(|id| id.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = StepId::ALL.iter().map(|i| i.as_str()).collect();
                format!("unknown step {s:?}; steps are {}", names.join(", "))
            })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Node {
    pub hostname: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", tag = "kind")]
pub enum Role {
    Server,
    /// Runs `k3s agent`, joining `server` (`https://<host>:6443`, reached over the tailnet)
    /// with the token in `token-file` (a node path, 0600).
    Agent {
        server: Url,
        token_file: String,
    },
}

/// Where artifacts come from on the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Artifacts {
    /// When true, any network download is an error: everything must already be in the cache
    /// or in `local-dir` (baked images, air-gap bundles).
    #[serde(default)]
    pub air_gap: bool,
    /// A directory on the node holding artifacts by file name (an attached disk, a baked image).
    #[serde(default)]
    pub local_dir: Option<String>,
    /// Extra CA certificates (PEM) the daemon's HTTP client trusts besides the system store:
    /// private CAs of mirrors, vaults or identity endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

/// One downloadable file, pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Artifact {
    /// File name, used in the cache and when looking in `local-dir`.
    pub name: String,
    pub url: Url,
    /// `sha256:`/`sha512:` digest and optional size; the cache file is named by the digest.
    pub pin: Pin,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct K3s {
    pub version: Version,
    pub binary: Artifact,
    /// The release's `sha256sum-amd64.txt`: the downloaded binary must match both the pin and
    /// the sha256 on its `k3s` line.
    #[serde(default)]
    pub checksums_url: Option<Url>,
    /// The complete `/etc/rancher/k3s/config.yaml`, keys already checked against the allowed
    /// server flags at build time.
    pub config: BTreeMap<String, serde_json::Value>,
    /// Container image archives K3s imports at start from its agent images dir, so the images
    /// they hold need no registry (baked and air-gapped nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Artifact>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Tailscale {
    pub version: Version,
    pub tarball: Artifact,
    pub hostname: String,
    /// With the `tag:` prefix.
    pub tags: Vec<String>,
    /// Node path of the auth key file (0600); removed once the node is Running.
    #[serde(default)]
    pub auth_key_file: Option<String>,
    /// The Kubernetes operator: a server's only (absent on an agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<TailscaleOperator>,
    /// Tailscale API use before joining (rebuilds): absent = never call the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<TailscaleApi>,
    /// Self-hosted control server (Headscale) for `tailscale up --login-server`; absent =
    /// Tailscale's own coordination server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_server: Option<Url>,
}

/// What the tailscale step does through the Tailscale API, with the operator's OAuth client
/// (`operator.oauth-client-id` and its secret file), before `tailscale up` on a node that is
/// logged out: a rebuilt node keeps `HOSTNAME` instead of becoming `HOSTNAME-1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TailscaleApi {
    /// The API origin (`https://api.tailscale.com`); paths `/api/v2/...` are joined to it.
    pub base_url: Url,
    /// Delete devices whose name is the node's Tailscale hostname.
    #[serde(default)]
    pub delete_stale: bool,
    /// Also delete devices with these names (the operator's proxies, e.g. `argocd`).
    #[serde(default)]
    pub delete_proxy_devices: Vec<String>,
    /// Mint a single-use, preauthorized, tagged auth key instead of using a stored one.
    #[serde(default)]
    pub mint_auth_key: bool,
    /// Lifetime of a minted key, seconds.
    #[serde(default = "default_key_expiry")]
    pub key_expiry_seconds: u64,
}

fn default_key_expiry() -> u64 {
    3600
}

pub const DEFAULT_TAILSCALE_API: &str = "https://api.tailscale.com";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TailscaleOperator {
    pub chart_repo: Url,
    /// Chart version as published (the Tailscale tag without `v`).
    pub chart_version: String,
    pub namespace: String,
    pub oauth_client_id: String,
    /// Node path of the OAuth client secret file (0600).
    pub oauth_client_secret_file: String,
    pub ingress_class: String,
    pub hostname: String,
    /// The chart archive, pinned: served to the HelmChart from K3s's static charts dir
    /// instead of being fetched from `chart-repo` by the helm-controller at install time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chart_archive: Option<Artifact>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ArgoCd {
    pub version: Version,
    /// Upstream `install.yaml`, pinned by our own digest (upstream publishes none).
    pub manifest: Artifact,
    pub namespace: String,
    /// First label of the Tailscale Ingress TLS host: the device name in the tailnet.
    pub ingress_host: String,
    pub ingress_class: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GitOps {
    pub app_name: String,
    pub repo_url: Url,
    pub revision: String,
    pub path: String,
    #[serde(default)]
    pub credentials: Option<RepoCredentials>,
    /// How Argo CD reads `path` (default: a non-recursive directory source, as Argo CD's).
    #[serde(default)]
    pub source: GitOpsSource,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RepoCredentials {
    pub username: String,
    /// Node path of the password or token file (0600).
    pub password_file: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BundledManifest {
    pub step: StepId,
    /// File name inside the bundle's `manifests/` and in the K3s manifests directory.
    pub file: String,
    pub sha256: Sha256,
}
