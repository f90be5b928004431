//! Azure Key Vault secret references (`{azure-key-vault: {vault: NAME, secret: NAME}}`), the
//! `managed-identity` section and the `artifacts.ca-bundle` setting: the profile side and
//! their resolution into the plan. A Key Vault reference is never resolved at build time:
//! the plan names the vault and the secret, the payload carries no value, and the node reads
//! it with its managed identity (docs/keyvault.md).

// ProfileError carries the source text for its snippet; it is built once per failed run, so
// its size on the (cold) error path does not matter.

use crate::diag::ProfileError;
use crate::resolve::SecretFile;
use crate::source::{key_path, Seg, Sources};
use kiln_plan::keyvault::{resource_for_host, KeyVault, ManagedIdentity, VaultSecret};
use serde::Deserialize;
use url::Url;

/// `{azure-key-vault: {vault: NAME, secret: NAME, version?: V, vault-url?: URL}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KeyVaultRefSpec {
    /// The vault's name (3–24 letters, digits, `-`).
    pub vault: String,
    /// The secret's name (1–127 letters, digits, `-`).
    pub secret: String,
    /// A fixed version; absent: the current version when the node boots.
    #[serde(default)]
    pub version: Option<String>,
    /// The vault's URL when it is not `https://NAME.vault.azure.net/` (other clouds:
    /// `vault.azure.cn`, `vault.usgovcloudapi.net`; a private endpoint alias).
    #[serde(default)]
    pub vault_url: Option<Url>,
}

impl std::fmt::Display for KeyVaultRefSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "azure-key-vault:{}/{}", self.vault, self.secret)?;
        if let Some(v) = &self.version {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// `managed-identity:`, which identity reads the vaults and where its tokens come from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ManagedIdentitySpec {
    /// The client id of a user-assigned identity attached to the VM; absent: system-assigned.
    #[serde(default)]
    pub client_id: Option<String>,
    /// The token endpoint; absent: `IDENTITY_ENDPOINT` on the node when set, else IMDS.
    #[serde(default)]
    pub endpoint: Option<Url>,
}

/// A Key Vault reference at `at` (the secret's profile key), checked, for the node file
/// `node_path`.
pub fn reference(
    s: &Sources,
    at: &[&str],
    r: &KeyVaultRefSpec,
    node_path: &str,
) -> Result<VaultSecret, ProfileError> {
    let mut base = key_path(at);
    base.push(Seg::Key("azure-key-vault".into()));
    let err = |k: &str, msg: String| {
        let mut p = base.clone();
        p.push(Seg::Key(k.into()));
        s.error(&p, false, msg)
    };
    let name_ok = |v: &str, max: usize| {
        !v.is_empty() && v.len() <= max && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if !name_ok(&r.vault, 24)
        || r.vault.len() < 3
        || !r.vault.starts_with(|c: char| c.is_ascii_alphabetic())
    {
        return Err(err(
            "vault",
            format!(
                "invalid vault name {:?}: 3–24 letters, digits and `-`, starting with a letter",
                r.vault
            ),
        ));
    }
    if !name_ok(&r.secret, 127) {
        return Err(err(
            "secret",
            format!(
                "invalid secret name {:?}: 1–127 letters, digits and `-`",
                r.secret
            ),
        ));
    }
    if let Some(v) = &r.version {
        if !name_ok(v, 64) || v.contains('-') {
            return Err(err(
                "version",
                format!("invalid secret version {v:?}: the hex id Key Vault gives a version"),
            ));
        }
    }
    let vault_url = match &r.vault_url {
        Some(u) => {
            if u.scheme() != "https" || u.host().is_none() {
                return Err(err(
                    "vault-url",
                    format!("a vault URL is https://HOST[:PORT]/, got {u}"),
                ));
            }
            if u.query().is_some() || u.fragment().is_some() || !u.username().is_empty() {
                return Err(err(
                    "vault-url",
                    "a vault URL has no credentials, query or fragment".into(),
                ));
            }
            with_slash(u)
        }
        None => Url::parse(&format!("https://{}.vault.azure.net/", r.vault))
            .expect("a checked vault name makes a valid host"),
    };
    let resource = resource_for_host(vault_url.host_str().unwrap_or(""));
    Ok(VaultSecret {
        file: node_path.to_string(),
        key: at.join("."),
        vault: r.vault.clone(),
        vault_url,
        secret: r.secret.clone(),
        version: r.version.clone(),
        resource,
    })
}

/// The plan's `key-vault` section: `None` when no secret comes from a vault.
pub fn plan_section(
    s: &Sources,
    spec: Option<&ManagedIdentitySpec>,
    secrets: Vec<VaultSecret>,
    warnings: &mut Vec<String>,
) -> Result<Option<KeyVault>, ProfileError> {
    let spec = spec.cloned().unwrap_or_default();
    if let Some(id) = &spec.client_id {
        let ok = id.len() == 36
            && id.chars().enumerate().all(|(i, c)| {
                matches!(i, 8 | 13 | 18 | 23) == (c == '-') && (c == '-' || c.is_ascii_hexdigit())
            });
        if !ok {
            return Err(s.error(
                &key_path(&["managed-identity", "client-id"]),
                false,
                format!("invalid client id {id:?}: the identity's client id is a GUID (az identity show --query clientId)"),
            ));
        }
    }
    if let Some(e) = &spec.endpoint {
        if !matches!(e.scheme(), "http" | "https") || e.host().is_none() || e.query().is_some() {
            return Err(s.error(
                &key_path(&["managed-identity", "endpoint"]),
                false,
                format!("the token endpoint is an http(s) URL without a query, got {e}"),
            ));
        }
    }
    if secrets.is_empty() {
        if spec.client_id.is_some() || spec.endpoint.is_some() {
            warnings.push(
                "managed-identity is set but no secret is an {azure-key-vault: ...} reference"
                    .into(),
            );
        }
        return Ok(None);
    }
    Ok(Some(KeyVault {
        identity: ManagedIdentity {
            endpoint: spec.endpoint,
            client_id: spec.client_id,
        },
        secrets,
    }))
}

/// `artifacts.ca-bundle`: a PEM file (relative to the profile file naming it) with the CA
/// certificates the node's HTTP client trusts besides the system store. Not a secret.
pub fn ca_bundle(s: &Sources, rel: Option<&str>) -> Result<Option<String>, ProfileError> {
    let Some(rel) = rel else { return Ok(None) };
    let at = key_path(&["artifacts", "ca-bundle"]);
    let file = s.file_of(&at).dir().join(rel);
    let text = crate::source::read_limited(&file, 1 << 20).map_err(|e| {
        s.error(
            &at,
            false,
            format!("cannot read CA bundle {}: {e}", file.display()),
        )
    })?;
    let text = String::from_utf8(text).map_err(|_| {
        s.error(
            &at,
            false,
            format!("CA bundle {} is not PEM text", file.display()),
        )
    })?;
    if !text.contains("-----BEGIN CERTIFICATE-----") || text.contains("PRIVATE KEY-----") {
        return Err(s.error(
            &at,
            false,
            format!(
                "CA bundle {} must hold PEM certificates (-----BEGIN CERTIFICATE-----) and no private key",
                file.display()
            ),
        ));
    }
    Ok(Some(text))
}

/// Where an inlined secret still lives on an Azure VM after kiln removes its own copy.
pub const AZURE_ON_DISK_COPIES: [&str; 5] = [
    "/var/lib/cloud/instances/<id>/user-data.txt",
    "/var/lib/cloud/instances/<id>/cloud-config.txt",
    "/var/lib/cloud/instances/<id>/obj.pkl",
    "/var/lib/waagent/ovf-env.xml",
    "/var/lib/waagent/CustomData",
];

/// The warning for a custom_data payload (url delivery, Azure's) that still carries secrets.
pub fn inline_secrets_warning(secrets: &[SecretFile]) -> Option<String> {
    if secrets.is_empty() {
        return None;
    }
    let keys: Vec<&str> = secrets.iter().map(|s| s.key.as_str()).collect();
    Some(format!(
        "{} {} inlined in custom_data: on Azure copies outlive kiln's cleanup of /etc/kiln/secrets/ in {}; use {{azure-key-vault: {{vault: NAME, secret: NAME}}}} references instead (docs/keyvault.md)",
        keys.join(", "),
        if keys.len() == 1 { "is" } else { "are" },
        AZURE_ON_DISK_COPIES.join(", ")
    ))
}

fn with_slash(u: &Url) -> Url {
    let mut u = u.clone();
    if !u.path().ends_with('/') {
        let p = format!("{}/", u.path());
        u.set_path(&p);
    }
    u
}
