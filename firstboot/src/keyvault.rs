//! Secrets from Azure Key Vault, read with the VM's managed identity (plan `key-vault`).
//!
//! A step that needs a secret file asks for it ([`ensure`], called by `Cx::ensure_secret` and
//! by the tailscale step before `tailscale up`). When the plan names a vault for that file
//! and the file is not there yet, the daemon takes a token from the managed-identity endpoint
//! and reads the secret over the Key Vault REST API, then writes it 0600 to the same node path
//! a file secret uses. So a secret is fetched exactly when it is first needed, failures are
//! the step's (journalled, resumable), and retries are the engine's: transient errors are
//! [`Transient`] and the engine retries the step with its backoff until the step's deadline.
//!
//! - Transient: the token endpoint's 404/410/429/5xx (IMDS asks for retries with backoff on
//!   these), "Identity not found" (a fresh VM's identity still propagating), Key Vault 429/5xx,
//!   and network errors.
//! - Permanent, with the vault, the secret and what to do: Key Vault 401/403 (the role the
//!   identity needs), 404 (no such secret or version), any other answer.
//!
//! No secret value and no token ever reaches a log, an error, the status or the journal.

use crate::download::Fetcher;
use crate::fs::write_atomic;
use crate::fs::Root;
use crate::retry::Transient;
use anyhow::{bail, Context, Result};
use kiln_plan::keyvault::{
    ManagedIdentity, VaultSecret, IMDS_API_VERSION, IMDS_TOKEN_ENDPOINT, SECRETS_READER_ROLE,
};
use kiln_plan::{Plan, Secret, Url};
use std::io::Read;

/// Bodies read from the identity endpoint and the vault are small; a bigger one is refused.
const BODY_LIMIT: u64 = 256 * 1024;

/// Makes sure the secret file `node_path` exists: a no-op for file secrets (written by
/// cloud-init) and for a vault secret already fetched; otherwise reads it from its vault.
pub fn ensure(plan: &Plan, root: &Root, fetcher: &Fetcher, node_path: &str) -> Result<()> {
    let Some(kv) = &plan.key_vault else {
        return Ok(());
    };
    let Some(entry) = kv.secrets.iter().find(|s| s.file == node_path) else {
        return Ok(());
    };
    let target = root.path(node_path);
    if target.exists() {
        return Ok(());
    }
    let http = fetcher.client()?;
    let value = fetch(http, &kv.identity, entry, &process_env)?;
    write_atomic(&target, value.expose().as_bytes(), 0o600)?;
    tracing::info!(key = %entry.key, vault = %entry.vault, secret = %entry.secret, file = %node_path,
        "secret read from Key Vault with the managed identity");
    Ok(())
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Token, then secret: the whole exchange for one vault secret.
pub fn fetch(
    http: &reqwest::blocking::Client,
    identity: &ManagedIdentity,
    entry: &VaultSecret,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret> {
    let token = token(http, identity, &entry.resource, env)?;
    read_secret(http, entry, &token, identity)
}

/// Which kind of token endpoint is spoken to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// IMDS, or an endpoint that speaks its protocol (the profile's `managed-identity.endpoint`).
    Imds(Url),
    /// Azure Arc: `IDENTITY_ENDPOINT` without `IDENTITY_HEADER`; answers 401 with a challenge
    /// file whose content proves the caller is privileged on the machine.
    Arc(Url),
    /// App Service and similar hosts: `IDENTITY_ENDPOINT` plus `IDENTITY_HEADER`.
    Header(Url, String),
}

/// The endpoint: the plan's, else `IDENTITY_ENDPOINT` (Arc, App Service), else IMDS.
pub fn endpoint(
    identity: &ManagedIdentity,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Endpoint> {
    if let Some(u) = &identity.endpoint {
        return Ok(Endpoint::Imds(u.clone()));
    }
    match env("IDENTITY_ENDPOINT") {
        Some(e) => {
            let u =
                Url::parse(&e).with_context(|| format!("IDENTITY_ENDPOINT={e:?} is not a URL"))?;
            Ok(match env("IDENTITY_HEADER") {
                Some(h) => Endpoint::Header(u, h),
                None => Endpoint::Arc(u),
            })
        }
        None => Ok(Endpoint::Imds(
            Url::parse(IMDS_TOKEN_ENDPOINT).expect("valid"),
        )),
    }
}

/// The token request URL for `resource`, with the user-assigned identity when there is one.
pub fn token_url(ep: &Endpoint, identity: &ManagedIdentity, resource: &str) -> Url {
    let (mut u, version) = match ep {
        Endpoint::Imds(u) => (u.clone(), IMDS_API_VERSION),
        // The API versions Azure's own SDKs use with these hosts.
        Endpoint::Arc(u) => (u.clone(), "2019-11-01"),
        Endpoint::Header(u, _) => (u.clone(), "2019-08-01"),
    };
    {
        let mut q = u.query_pairs_mut();
        q.append_pair("api-version", version);
        q.append_pair("resource", resource);
        if let Some(id) = &identity.client_id {
            q.append_pair("client_id", id);
        }
    }
    u
}

fn shown(u: &Url) -> String {
    let mut u = u.clone();
    u.set_query(None);
    u.to_string()
}

/// An access token for `resource` from the managed-identity endpoint.
pub fn token(
    http: &reqwest::blocking::Client,
    identity: &ManagedIdentity,
    resource: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret> {
    let ep = endpoint(identity, env)?;
    let url = token_url(&ep, identity, resource);
    let mut req = http.get(url.clone()).header("Metadata", "true");
    if let Endpoint::Header(_, h) = &ep {
        req = req.header("X-IDENTITY-HEADER", h);
    }
    let resp = req
        .send()
        .with_context(|| format!("asking {} for a managed-identity token", shown(&url)))?;
    let resp = match (&ep, resp.status().as_u16()) {
        (Endpoint::Arc(_), 401) => arc_challenge(http, &url, &resp)?,
        _ => resp,
    };
    let status = resp.status().as_u16();
    let body = body_text(resp, &url)?;
    if status == 200 {
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("{}: the token answer is not JSON", shown(&url)))?;
        return match v["access_token"].as_str() {
            Some(t) if !t.is_empty() => Ok(Secret::new(t)),
            _ => bail!("{}: the token answer has no access_token", shown(&url)),
        };
    }
    Err(token_error(&url, status, &body, identity))
}

/// How a failed token request is reported (and whether the engine retries it).
pub fn token_error(
    url: &Url,
    status: u16,
    body: &str,
    identity: &ManagedIdentity,
) -> anyhow::Error {
    let why = error_text(body);
    let who = match &identity.client_id {
        Some(id) => format!("user-assigned identity {id}"),
        None => "system-assigned identity".to_string(),
    };
    if status == 400 && body.to_ascii_lowercase().contains("identity not found") {
        // A fresh VM: the identity is assigned but IMDS does not know it yet.
        return Transient(format!(
            "the managed identity endpoint {} does not know the {who} yet ({why}); it may still be propagating to a new VM, or not be assigned to it",
            shown(url)
        ))
        .into();
    }
    if matches!(status, 404 | 410 | 429) || (500..600).contains(&status) {
        return Transient(format!(
            "the managed identity endpoint {} answered HTTP {status} ({why})",
            shown(url)
        ))
        .into();
    }
    anyhow::anyhow!(
        "the managed identity endpoint {} refused a token for the {who}: HTTP {status} ({why}); is that identity attached to this VM?",
        shown(url)
    )
}

/// Azure Arc's challenge: the 401 names a key file (under the agent's token dir) whose content
/// goes back as `Authorization: Basic`. Only root can read it, which is the point.
fn arc_challenge(
    http: &reqwest::blocking::Client,
    url: &Url,
    resp: &reqwest::blocking::Response,
) -> Result<reqwest::blocking::Response> {
    let header = resp
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let path = header
        .split_once("realm=")
        .map(|(_, p)| p.trim().trim_matches('"'))
        .filter(|p| !p.is_empty())
        .with_context(|| {
            format!(
                "{}: HTTP 401 without an Arc challenge (WWW-Authenticate: Basic realm=FILE)",
                shown(url)
            )
        })?;
    const TOKENS_DIR: &str = "/var/opt/azcmagent/tokens/";
    if !path.starts_with(TOKENS_DIR) || !path.ends_with(".key") || path.contains("..") {
        bail!(
            "{}: the Arc challenge names {path:?}, not a .key file in {TOKENS_DIR}",
            shown(url)
        );
    }
    let mut key = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_string(&mut key))
        .with_context(|| format!("reading the Arc challenge file {path}"))?;
    http.get(url.clone())
        .header("Metadata", "true")
        .header(
            reqwest::header::AUTHORIZATION,
            format!("Basic {}", key.trim()),
        )
        .send()
        .with_context(|| format!("asking {} for a managed-identity token", shown(url)))
}

fn body_text(resp: reqwest::blocking::Response, url: &Url) -> Result<String> {
    let mut body = Vec::new();
    resp.take(BODY_LIMIT + 1)
        .read_to_end(&mut body)
        .with_context(|| format!("reading the answer of {}", shown(url)))?;
    if body.len() as u64 > BODY_LIMIT {
        bail!("{}: answer larger than {BODY_LIMIT} bytes", shown(url));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The error text of an IMDS (`error`, `error_description`) or Key Vault (`error.code`,
/// `error.message`) answer; neither ever carries a secret value.
fn error_text(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let e = &v["error"];
    let parts: Vec<&str> = [
        e.as_str(),
        v["error_description"].as_str(),
        e["code"].as_str(),
        e["innererror"]["code"].as_str(),
        e["message"].as_str(),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "no error details".into()
    } else {
        parts.join(": ")
    }
}

/// `GET {vault-url}secrets/{name}[/{version}]?api-version=7.4` with the token.
fn read_secret(
    http: &reqwest::blocking::Client,
    entry: &VaultSecret,
    token: &Secret,
    identity: &ManagedIdentity,
) -> Result<Secret> {
    let url = entry.url();
    let resp = http
        .get(url.clone())
        .bearer_auth(token.expose())
        .send()
        .with_context(|| format!("reading secret {} from {}", entry.secret, shown(&url)))?;
    let status = resp.status().as_u16();
    let body = body_text(resp, &url)?;
    if status == 200 {
        let v: serde_json::Value = serde_json::from_str(&body)
            .ok()
            .with_context(|| format!("{}: the answer is not JSON", shown(&url)))?;
        return match v["value"].as_str() {
            Some(s) if !s.trim().is_empty() => Ok(Secret::new(s)),
            _ => bail!(
                "secret {} in vault {} ({}) has an empty value",
                entry.secret,
                entry.vault,
                entry.key
            ),
        };
    }
    Err(secret_error(entry, status, &body, identity))
}

/// How a failed secret read is reported (and whether the engine retries it).
pub fn secret_error(
    entry: &VaultSecret,
    status: u16,
    body: &str,
    identity: &ManagedIdentity,
) -> anyhow::Error {
    let why = error_text(body);
    let what = format!(
        "secret {}{} in vault {} ({}, for {})",
        entry.secret,
        entry
            .version
            .as_ref()
            .map(|v| format!(" version {v}"))
            .unwrap_or_default(),
        entry.vault,
        shown(&entry.vault_url),
        entry.key
    );
    let who = match &identity.client_id {
        Some(id) => format!("the user-assigned identity {id}"),
        None => "the VM's system-assigned identity".to_string(),
    };
    match status {
        401 | 403 => anyhow::anyhow!(
            "{what}: HTTP {status} ({why}): {who} may not read it; grant it the role \"{SECRETS_READER_ROLE}\" on the vault (RBAC), or a `get` secret access policy on a vault that uses access policies"
        ),
        404 => anyhow::anyhow!("{what}: HTTP 404 ({why}): no such secret; create it (az keyvault secret set --vault-name {} --name {} --file ...) or fix the reference", entry.vault, entry.secret),
        429 => Transient(format!("{what}: HTTP 429 ({why}), throttled")).into(),
        s if (500..600).contains(&s) => Transient(format!("{what}: HTTP {s} ({why})")).into(),
        s => anyhow::anyhow!("{what}: HTTP {s} ({why})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::is_transient;

    fn entry() -> VaultSecret {
        VaultSecret {
            file: "/etc/kiln/secrets/tailscale-auth-key".into(),
            key: "tailscale.auth-key".into(),
            vault: "ameciclo-kv".into(),
            vault_url: "https://ameciclo-kv.vault.azure.net/".parse().unwrap(),
            secret: "tailscale-auth-key".into(),
            version: None,
            resource: "https://vault.azure.net".into(),
        }
    }

    #[test]
    fn the_endpoint_is_the_plans_then_identity_endpoint_then_imds() {
        let none = |_: &str| None;
        let id = ManagedIdentity::default();
        assert_eq!(
            endpoint(&id, &none).unwrap(),
            Endpoint::Imds(IMDS_TOKEN_ENDPOINT.parse().unwrap())
        );
        let arc = |k: &str| {
            (k == "IDENTITY_ENDPOINT")
                .then(|| "http://localhost:40342/metadata/identity/oauth2/token".to_string())
        };
        assert!(matches!(endpoint(&id, &arc).unwrap(), Endpoint::Arc(_)));
        let app = |k: &str| match k {
            "IDENTITY_ENDPOINT" => Some("http://127.0.0.1:41000/msi/token".to_string()),
            "IDENTITY_HEADER" => Some("h".to_string()),
            _ => None,
        };
        assert!(matches!(endpoint(&id, &app).unwrap(), Endpoint::Header(_, h) if h == "h"));
        let pinned = ManagedIdentity {
            endpoint: Some(
                "http://10.0.2.102:8080/metadata/identity/oauth2/token"
                    .parse()
                    .unwrap(),
            ),
            client_id: None,
        };
        assert!(
            matches!(endpoint(&pinned, &arc).unwrap(), Endpoint::Imds(u) if u.host_str() == Some("10.0.2.102"))
        );
    }

    #[test]
    fn the_imds_token_url_names_the_resource_and_a_user_assigned_identity() {
        let id = ManagedIdentity {
            endpoint: None,
            client_id: Some("11111111-2222-3333-4444-555555555555".into()),
        };
        let u = token_url(
            &endpoint(&id, &|_| None).unwrap(),
            &id,
            "https://vault.azure.net",
        );
        assert_eq!(
            u.as_str(),
            "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net&client_id=11111111-2222-3333-4444-555555555555"
        );
    }

    #[test]
    fn imds_throttling_server_errors_and_a_propagating_identity_are_retried() {
        let id = ManagedIdentity::default();
        let u: Url = IMDS_TOKEN_ENDPOINT.parse().unwrap();
        for s in [404, 410, 429, 500, 503] {
            assert!(is_transient(&token_error(&u, s, "", &id)), "{s}");
        }
        let nf = r#"{"error":"invalid_request","error_description":"Identity not found"}"#;
        let e = token_error(&u, 400, nf, &id);
        assert!(is_transient(&e));
        assert!(format!("{e:#}").contains("propagating"));
        assert!(!is_transient(&token_error(
            &u,
            400,
            r#"{"error":"invalid_request"}"#,
            &id
        )));
    }

    #[test]
    fn vault_refusals_name_the_vault_the_secret_and_the_role_and_are_permanent() {
        let id = ManagedIdentity::default();
        let body = r#"{"error":{"code":"Forbidden","message":"Caller is not authorized","innererror":{"code":"ForbiddenByRbac"}}}"#;
        for s in [401, 403] {
            let e = secret_error(&entry(), s, body, &id);
            let msg = format!("{e:#}");
            assert!(!is_transient(&e), "{s}");
            for want in [
                "ameciclo-kv",
                "tailscale-auth-key",
                "Key Vault Secrets User",
                "ForbiddenByRbac",
            ] {
                assert!(msg.contains(want), "{s}: {msg} lacks {want}");
            }
        }
        let e = secret_error(&entry(), 404, r#"{"error":{"code":"SecretNotFound"}}"#, &id);
        assert!(!is_transient(&e));
        assert!(format!("{e:#}").contains("no such secret"));
        assert!(is_transient(&secret_error(&entry(), 429, "", &id)));
        assert!(is_transient(&secret_error(&entry(), 503, "", &id)));
    }
}
