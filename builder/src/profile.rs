//! The profile: one node, declared in YAML. Strict (`deny_unknown_fields` everywhere,
//! kebab-case keys), typed values parsed during deserialization, secrets only by reference.
//! See `docs/profile.md` for the reference.

// ProfileError carries the source text for its snippet; it is built once per failed run, so
// its size on the (cold) error path does not matter.

use crate::diag::ProfileError;
use crate::source::{self, Seg, Sources};
use kiln_plan::{Digest, StepId, Version};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use url::Url;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Profile {
    pub node: NodeSpec,
    pub k3s: K3sSpec,
    pub tailscale: TailscaleSpec,
    /// Required on a server; refused on an agent (which runs no Argo CD).
    #[serde(default)]
    pub argocd: Option<ArgoCdSpec>,
    #[serde(default)]
    pub artifacts: ArtifactsSpec,
    /// Per-step deadline in seconds (the daemon stops retrying after it).
    #[serde(default)]
    pub deadlines: BTreeMap<StepId, u64>,
    /// The VM's managed identity, for `{azure-key-vault: ...}` secrets (docs/keyvault.md).
    #[serde(default)]
    pub managed_identity: Option<crate::keyvault::ManagedIdentitySpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeSpec {
    pub hostname: String,
    #[serde(default)]
    pub role: RoleSpec,
    pub admin: AdminSpec,
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// System locale set by cloud-init (`C.UTF-8` for minimal images without `locales`).
    #[serde(default)]
    pub locale: Option<String>,
}

fn default_timezone() -> String {
    "Etc/UTC".into()
}

#[derive(Debug, Clone, Default)]
pub enum RoleSpec {
    #[default]
    Server,
    /// `k3s agent`: joins an existing server over the tailnet.
    Agent(AgentSpec),
}

/// `role: server` or `role: {agent: {server: NAME-OR-URL, token: SECRET}}`.
impl<'de> Deserialize<'de> for RoleSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RoleSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`server` or `{agent: {server: NAME-OR-URL, token: SECRET}}`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RoleSpec, E> {
                match v {
                    "server" => Ok(RoleSpec::Server),
                    "agent" => Err(E::custom(
                        "an agent needs its server: `{agent: {server: NAME-OR-URL, token: SECRET}}`",
                    )),
                    other => Err(E::unknown_variant(other, &["server", "agent"])),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RoleSpec, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom("empty role"));
                };
                let role = match key.as_str() {
                    "agent" => RoleSpec::Agent(map.next_value()?),
                    "server" => {
                        return Err(de::Error::custom(
                            "a server takes no role settings: write `role: server`",
                        ))
                    }
                    other => return Err(de::Error::unknown_variant(other, &["server", "agent"])),
                };
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom("a role has exactly one kind"));
                }
                Ok(role)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentSpec {
    /// The server's tailnet name (`ameciclo-k3s`, `ameciclo-k3s.example.ts.net`) or its
    /// `https://HOST[:PORT]` URL.
    pub server: String,
    /// The server's agent token (`k3s.agent-token` there), in K3s's `K10…` form or bare.
    pub token: SecretRef,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdminSpec {
    pub user: String,
    pub ssh_authorized_keys: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct K3sSpec {
    #[serde(default = "default_k3s_version")]
    pub version: Version,
    /// Digest (`sha256:`/`sha512:`) of the `k3s` (amd64) release binary: required (checked
    /// in resolve, so a missing pin is reported like any other and `kiln lock` can fill it in).
    #[serde(default)]
    pub digest: Option<Digest>,
    /// Exact length of the binary in bytes.
    #[serde(default)]
    pub size: Option<u64>,
    /// Server settings, with defaults a server gets when they are absent (`None`: not set, so
    /// an agent, which has none of them, can tell them from defaults).
    #[serde(default)]
    pub disable: Option<Vec<String>>,
    #[serde(default)]
    pub secrets_encryption: Option<bool>,
    #[serde(default)]
    pub write_kubeconfig_mode: Option<String>,
    /// Extra `/etc/rancher/k3s/config.yaml` keys, checked against the allowed server flags.
    #[serde(default)]
    pub config: BTreeMap<String, serde_json::Value>,
    /// Container image archives staged in K3s's agent images dir (imported at start).
    #[serde(default)]
    pub images: Vec<ImageArchiveSpec>,
    /// Server only: the token agents join with (`agent-token-file`), so they never hold the
    /// server's full token.
    #[serde(default)]
    pub agent_token: Option<SecretRef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ImageArchiveSpec {
    pub url: Url,
    #[serde(default)]
    pub digest: Option<Digest>,
    #[serde(default)]
    pub size: Option<u64>,
}

pub const DEFAULT_K3S_VERSION: &str = "v1.32.4+k3s1";
fn default_k3s_version() -> Version {
    DEFAULT_K3S_VERSION.parse().expect("valid default")
}
impl K3sSpec {
    pub fn disable(&self) -> Vec<String> {
        self.disable
            .clone()
            .unwrap_or_else(|| vec!["traefik".into(), "servicelb".into()])
    }
    pub fn secrets_encryption(&self) -> bool {
        self.secrets_encryption.unwrap_or(true)
    }
    /// The kubeconfig holds cluster-admin credentials and only root (the daemon) reads it.
    pub fn write_kubeconfig_mode(&self) -> String {
        self.write_kubeconfig_mode
            .clone()
            .unwrap_or_else(|| "0600".into())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TailscaleSpec {
    #[serde(default = "default_tailscale_version")]
    pub version: Version,
    /// Digest of `tailscale_<version>_amd64.tgz`: required.
    #[serde(default)]
    pub digest: Option<Digest>,
    #[serde(default)]
    pub size: Option<u64>,
    /// Device name in the tailnet; defaults to the node hostname.
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Required unless `api.mint-auth-key` is on.
    #[serde(default)]
    pub auth_key: Option<SecretRef>,
    /// Required on a server; refused on an agent (the operator runs in the server's cluster).
    #[serde(default)]
    pub operator: Option<OperatorSpec>,
    /// Tailscale API use before joining (rebuilds keep the node's name); see docs/rebuild.md.
    #[serde(default)]
    pub api: Option<TailscaleApiSpec>,
    /// A self-hosted control server (Headscale): `tailscale up --login-server`. Absent =
    /// Tailscale's own. Not combinable with `api` (that is Tailscale's SaaS API).
    #[serde(default)]
    pub login_server: Option<Url>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TailscaleApiSpec {
    #[serde(default = "default_tailscale_api")]
    pub base_url: Url,
    #[serde(default)]
    pub delete_stale: bool,
    #[serde(default)]
    pub delete_proxy_devices: Vec<String>,
    #[serde(default)]
    pub mint_auth_key: bool,
    #[serde(default = "default_key_expiry")]
    pub key_expiry_seconds: u64,
}

fn default_tailscale_api() -> Url {
    Url::parse(kiln_plan::DEFAULT_TAILSCALE_API).expect("valid default")
}
fn default_key_expiry() -> u64 {
    3600
}

pub const DEFAULT_TAILSCALE_VERSION: &str = "v1.102.3";
fn default_tailscale_version() -> Version {
    DEFAULT_TAILSCALE_VERSION.parse().expect("valid default")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OperatorSpec {
    /// Defaults to the Tailscale version without `v`.
    #[serde(default)]
    pub chart_version: Option<String>,
    #[serde(default = "default_chart_repo")]
    pub chart_repo: Url,
    #[serde(default = "default_operator_namespace")]
    pub namespace: String,
    pub oauth_client_id: String,
    pub oauth_client_secret: SecretRef,
    #[serde(default = "default_ingress_class")]
    pub ingress_class: String,
    #[serde(default = "default_operator_hostname")]
    pub hostname: String,
    /// Digest of `tailscale-operator-<chart-version>.tgz`: when given, the node fetches the
    /// pinned archive (or finds it baked) and K3s serves it to the HelmChart.
    #[serde(default)]
    pub chart_digest: Option<Digest>,
    #[serde(default)]
    pub chart_size: Option<u64>,
}

fn default_chart_repo() -> Url {
    Url::parse("https://pkgs.tailscale.com/helmcharts").expect("valid default")
}
fn default_operator_namespace() -> String {
    "tailscale".into()
}
fn default_ingress_class() -> String {
    "tailscale".into()
}
fn default_operator_hostname() -> String {
    "tailscale-operator".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ArgoCdSpec {
    #[serde(default = "default_argocd_version")]
    pub version: Version,
    /// Digest of the upstream `install.yaml`; defaults to kiln's pin for v3.4.7 only.
    #[serde(default)]
    pub digest: Option<Digest>,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default = "default_argocd_namespace")]
    pub namespace: String,
    /// First label of the Tailscale Ingress TLS host (`argocd` → `argocd.<tailnet>.ts.net`).
    #[serde(default = "default_ingress_host")]
    pub ingress_host: String,
    pub gitops: GitOpsSpec,
}

pub const DEFAULT_ARGOCD_VERSION: &str = "v3.4.7";
/// sha256 of argo-cd v3.4.7 `manifests/install.yaml` (commit 7b6113c1, 1,890,752 bytes),
/// computed from the upstream file (see tests/upstream PROVENANCE).
pub const ARGOCD_V3_4_7_INSTALL_SHA256: &str =
    "11016889371e4b1e3754b7ba2494b36ab1111338bd2362d499abe3ff2f63c906";
pub const ARGOCD_V3_4_7_INSTALL_SIZE: u64 = 1_890_752;
fn default_argocd_version() -> Version {
    DEFAULT_ARGOCD_VERSION.parse().expect("valid default")
}
fn default_argocd_namespace() -> String {
    "argocd".into()
}
fn default_ingress_host() -> String {
    "argocd".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GitOpsSpec {
    pub repo: Url,
    #[serde(default = "default_revision")]
    pub revision: String,
    pub path: String,
    /// Name of the root Application (app-of-apps).
    #[serde(default = "default_app_name")]
    pub app_name: String,
    #[serde(default)]
    pub credentials: Option<RepoCredentialsSpec>,
    /// Source options (see `profile_gitops`): at most one of the three.
    #[serde(default)]
    pub directory: Option<crate::profile_gitops::DirectorySpec>,
    #[serde(default)]
    pub kustomize: Option<crate::profile_gitops::KustomizeSpec>,
    #[serde(default)]
    pub helm: Option<crate::profile_gitops::HelmSpec>,
}

fn default_revision() -> String {
    "HEAD".into()
}
fn default_app_name() -> String {
    "root".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RepoCredentialsSpec {
    pub username: String,
    pub password: SecretRef,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ArtifactsSpec {
    /// One base URL serving every artifact under kiln's mirror layout; upstream otherwise.
    #[serde(default)]
    pub mirror: Option<Url>,
    #[serde(default)]
    pub delivery: DeliverySpec,
    /// `delivery: url`: where `bundle-<sha256>.tar.gz` is published (e.g. an Azure Blob container).
    #[serde(default)]
    pub bundle_base_url: Option<Url>,
    #[serde(default)]
    pub air_gap: bool,
    #[serde(default)]
    pub local_dir: Option<String>,
    /// PEM file (relative to this profile) of extra CAs the node's HTTP client trusts.
    #[serde(default)]
    pub ca_bundle: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliverySpec {
    /// The bootstrap downloads the bundle (Azure: custom_data stays small).
    #[default]
    Url,
    /// The bundle travels as a file on the NoCloud `CIDATA` seed volume, beside `user-data`
    /// and `meta-data` (QEMU and any NoCloud target).
    Seed,
    /// Removed: the bundle base64-encoded inside user-data cost cloud-init about 5 minutes of
    /// YAML parsing per boot under TCG (docs/profile.md). Parsed only to name `seed` instead.
    Inline,
}

/// A secret is never written in a profile: it is read from an environment variable or a file
/// (relative to the directory of the profile file that names it) at build time, or by the
/// node itself from Azure Key Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(String),
    KeyVault(Box<crate::keyvault::KeyVaultRefSpec>),
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(n) => write!(f, "env:{n}"),
            SecretRef::File(p) => write!(f, "file:{p}"),
            SecretRef::KeyVault(r) => write!(f, "{r}"),
        }
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const HOW: &str = "secrets are never written in a profile: use {env: NAME}, {file: path} or {azure-key-vault: {vault: NAME, secret: NAME}}";
        impl<'de> Visitor<'de> for V {
            type Value = SecretRef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "{env: NAME}, {file: path} or {azure-key-vault: {vault: NAME, secret: NAME}}",
                )
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<SecretRef, E> {
                Err(E::custom(format!(
                    "a literal value is not allowed here; {HOW}"
                )))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretRef, A::Error> {
                let mut out = None;
                while let Some(key) = map.next_key::<String>()? {
                    if out.is_some() {
                        return Err(de::Error::custom(format!(
                            "a secret has exactly one source; {HOW}"
                        )));
                    }
                    const KINDS: &[&str] = &["env", "file", "azure-key-vault"];
                    if key == "azure-key-vault" {
                        out = Some(SecretRef::KeyVault(map.next_value()?));
                        continue;
                    }
                    if !KINDS.contains(&key.as_str()) {
                        return Err(de::Error::unknown_field(&key, KINDS));
                    }
                    let v: String = map.next_value()?;
                    if v.trim().is_empty() {
                        return Err(de::Error::custom(format!("`{key}` must not be empty")));
                    }
                    out = Some(match key.as_str() {
                        "env" => SecretRef::Env(v),
                        _ => SecretRef::File(v),
                    });
                }
                out.ok_or_else(|| de::Error::custom(HOW))
            }
        }
        d.deserialize_any(V)
    }
}

/// A parsed profile with the places of its keys.
pub struct Loaded {
    pub profile: Profile,
    pub sources: Sources,
}

/// Reads, merges and deserializes a profile. Every error names file:line:col and the key.
pub fn load(path: &Path) -> Result<Loaded, ProfileError> {
    let (value, sources) = source::load(path)?;
    let profile: Profile = serde_path_to_error::deserialize(value).map_err(|e| {
        let path: Vec<Seg> = e
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
                serde_path_to_error::Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
                serde_path_to_error::Segment::Unknown => None,
            })
            .collect();
        let msg = e.inner().to_string();
        // serde_yaml appends its own (meaningless after merging) position; ours is exact.
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        // For unknown map keys (e.g. a step name in `deadlines`) serde's path stops at the
        // map; the key itself is named in the message, so point at it when the file has it.
        let mut path = path;
        let named = msg.split('`').nth(1).map(str::to_string);
        let unknown = msg.starts_with("unknown field") || msg.starts_with("unknown variant");
        let mut at_key = msg.starts_with("unknown field");
        if let (true, Some(name)) = (unknown, named) {
            let mut child = path.clone();
            child.push(Seg::Key(name));
            if sources.index.contains_key(&child) {
                path = child;
                at_key = true;
            }
        }
        sources.error(&path, at_key, msg)
    })?;
    Ok(Loaded { profile, sources })
}
