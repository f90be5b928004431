//! Secrets the node reads itself from Azure Key Vault with its managed identity, instead of
//! receiving them in the payload. The plan carries the references (vault, secret, version,
//! the node path to write), never a value: the daemon takes a token from the managed-identity
//! endpoint, reads the secret over the Key Vault REST API and writes it 0600 to the same
//! `/etc/kiln/secrets/` path a file secret uses. See docs/keyvault.md.

use serde::{Deserialize, Serialize};
use url::Url;

/// The Azure Instance Metadata Service's managed-identity token endpoint (link-local).
pub const IMDS_TOKEN_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
/// The IMDS token API version kiln speaks.
pub const IMDS_API_VERSION: &str = "2018-02-01";
/// The Key Vault data-plane API version kiln speaks.
pub const KEY_VAULT_API_VERSION: &str = "7.4";
/// The Azure built-in role that lets an identity read secret values (RBAC vaults).
pub const SECRETS_READER_ROLE: &str = "Key Vault Secrets User";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KeyVault {
    pub identity: ManagedIdentity,
    /// One entry per secret file, in profile order.
    pub secrets: Vec<VaultSecret>,
}

/// Which managed identity the node uses and where it gets its tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ManagedIdentity {
    /// Token endpoint. Absent: `IDENTITY_ENDPOINT` from the daemon's environment (Azure Arc,
    /// App Service) when set, else IMDS ([`IMDS_TOKEN_ENDPOINT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Url>,
    /// A user-assigned identity's client id; absent: the system-assigned identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// One secret read from a vault into a node file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VaultSecret {
    /// Node path of the file it is written to (0600 root), as for a file secret.
    pub file: String,
    /// The profile key it came from (`tailscale.auth-key`), for messages.
    pub key: String,
    /// The vault's name, for messages.
    pub vault: String,
    /// The vault's base URL, with a trailing `/` (`https://NAME.vault.azure.net/`).
    pub vault_url: Url,
    pub secret: String,
    /// A fixed secret version; absent: the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The token audience for this vault's cloud (`https://vault.azure.net`).
    pub resource: String,
}

impl VaultSecret {
    /// `{vault-url}secrets/{name}[/{version}]?api-version=7.4`.
    pub fn url(&self) -> Url {
        let mut path = format!("secrets/{}", self.secret);
        if let Some(v) = &self.version {
            path.push('/');
            path.push_str(v);
        }
        let mut u = self.vault_url.join(&path).expect("validated at build time");
        u.set_query(Some(&format!("api-version={KEY_VAULT_API_VERSION}")));
        u
    }
}

/// The token audience of a vault host: each Azure cloud has its own Key Vault resource
/// (`NAME.vault.azure.cn` → `https://vault.azure.cn`). Hosts of no known cloud (a private
/// endpoint alias, an emulator) get the public cloud's.
pub fn resource_for_host(host: &str) -> String {
    const CLOUDS: [&str; 4] = [
        "vault.azure.net",
        "vault.azure.cn",
        "vault.usgovcloudapi.net",
        "vault.microsoftazure.de",
    ];
    let cloud = CLOUDS
        .iter()
        .find(|c| host.ends_with(&format!(".{c}")))
        .unwrap_or(&CLOUDS[0]);
    format!("https://{cloud}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_url_has_the_version_when_pinned_and_the_api_version() {
        let mut s = VaultSecret {
            file: "/etc/kiln/secrets/x".into(),
            key: "k".into(),
            vault: "kv".into(),
            vault_url: "https://kv.vault.azure.net/".parse().unwrap(),
            secret: "ts-key".into(),
            version: None,
            resource: resource_for_host("kv.vault.azure.net"),
        };
        assert_eq!(
            s.url().as_str(),
            "https://kv.vault.azure.net/secrets/ts-key?api-version=7.4"
        );
        s.version = Some("0123abcd".into());
        assert_eq!(
            s.url().as_str(),
            "https://kv.vault.azure.net/secrets/ts-key/0123abcd?api-version=7.4"
        );
    }

    #[test]
    fn each_cloud_has_its_own_token_audience() {
        assert_eq!(
            resource_for_host("a.vault.azure.net"),
            "https://vault.azure.net"
        );
        assert_eq!(
            resource_for_host("a.vault.azure.cn"),
            "https://vault.azure.cn"
        );
        assert_eq!(
            resource_for_host("a.vault.usgovcloudapi.net"),
            "https://vault.usgovcloudapi.net"
        );
        assert_eq!(resource_for_host("localhost"), "https://vault.azure.net");
    }
}
