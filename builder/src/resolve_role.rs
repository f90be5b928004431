//! The node's role: which sections a server needs and an agent must not have, and an agent's
//! server. A server runs K3s with the Tailscale operator, Argo CD and GitOps; an agent runs
//! `k3s agent` and joins its server over the tailnet, so server settings on an agent would be
//! accepted keys that nothing reads (and the other way round).

// ProfileError carries the source text for its snippet (cold error path).
#![allow(clippy::result_large_err)]

use crate::diag::ProfileError;
use crate::profile::{Profile, RoleSpec};
use crate::source::{key_path, Sources};
use url::Url;

/// K3s's supervisor and API port: where agents join.
pub const K3S_PORT: u16 = 6443;

/// Refuses server-only settings on an agent and a server without its server sections.
pub fn check_sections(s: &Sources, p: &Profile) -> Result<(), ProfileError> {
    let agent = matches!(p.node.role, RoleSpec::Agent(_));
    // A missing section is reported where it was removed (`argocd: null`), else at the role.
    let at = |section: &[&str]| {
        [
            key_path(section),
            key_path(&["node", "role"]),
            key_path(&["node"]),
        ]
        .into_iter()
        .find(|k| s.index.contains_key(k))
        .unwrap_or_default()
    };
    if !agent {
        if p.argocd.is_none() {
            return Err(s.error(
                &at(&["argocd"]),
                true,
                "a server needs `argocd` (Argo CD and its GitOps repository); only an agent (`role: {agent: …}`) has none",
            ));
        }
        if p.tailscale.operator.is_none() {
            return Err(s.error(
                &at(&["tailscale", "operator"]),
                true,
                "a server needs `tailscale.operator` (the Tailscale Kubernetes operator); only an agent has none",
            ));
        }
        return Ok(());
    }
    // Set on the agent (present in the merged profile): each is read by server steps only.
    let present: [(&[&str], bool, &str); 7] = [
        (&["argocd"], p.argocd.is_some(), "Argo CD and GitOps run on the server"),
        (
            &["tailscale", "operator"],
            p.tailscale.operator.is_some(),
            "the Tailscale operator runs in the server's cluster",
        ),
        (
            &["tailscale", "api"],
            p.tailscale.api.is_some(),
            "the Tailscale API settings use the operator's OAuth client, which only a server has",
        ),
        (
            &["k3s", "agent-token"],
            p.k3s.agent_token.is_some(),
            "the agent token is the server's (`agent-token-file`); an agent's own token is `node.role.agent.token`",
        ),
        (
            &["k3s", "disable"],
            p.k3s.disable.is_some(),
            "packaged components are deployed by the server (`k3s server --disable`)",
        ),
        (
            &["k3s", "secrets-encryption"],
            p.k3s.secrets_encryption.is_some(),
            "the datastore (and its encryption) is the server's",
        ),
        (
            &["k3s", "write-kubeconfig-mode"],
            p.k3s.write_kubeconfig_mode.is_some(),
            "an agent writes no admin kubeconfig",
        ),
    ];
    for (at, here, why) in present {
        if here {
            return Err(s.error(
                &key_path(at),
                true,
                format!(
                    "`{}` is a server setting and this node is an agent: {why} (remove it, or set it to null over a shared base)",
                    at.join(".")
                ),
            ));
        }
    }
    Ok(())
}

/// `node.role.agent.server`: a tailnet name (`ameciclo-k3s` or its MagicDNS name) becomes
/// `https://NAME:6443`; a URL must be `https://HOST[:PORT]`, as `k3s agent --server` takes it
/// (K3s refuses any other scheme: "only https:// URLs are supported").
pub fn agent_server(s: &Sources, server: &str) -> Result<Url, ProfileError> {
    let at = key_path(&["node", "role", "agent", "server"]);
    let bad = |msg: String| s.error(&at, false, msg);
    if server.contains("://") {
        let u =
            Url::parse(server).map_err(|e| bad(format!("invalid server URL {server:?}: {e}")))?;
        if u.scheme() != "https" {
            return Err(bad(format!(
                "K3s agents join over https only (`https://HOST:6443`), got {server:?}"
            )));
        }
        if u.host_str().is_none_or(str::is_empty)
            || !matches!(u.path(), "" | "/")
            || u.query().is_some()
            || u.fragment().is_some()
            || !u.username().is_empty()
            || u.password().is_some()
        {
            return Err(bad(format!(
                "the server URL is `https://HOST[:PORT]` without path, query or credentials, got {server:?}"
            )));
        }
        return Ok(u);
    }
    let name_ok = !server.is_empty()
        && server.len() <= 253
        && server.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !name_ok {
        return Err(bad(format!(
            "invalid server {server:?}: the server's tailnet name (`ameciclo-k3s`, `ameciclo-k3s.example.ts.net`) or `https://HOST:6443`"
        )));
    }
    Url::parse(&format!("https://{server}:{K3S_PORT}"))
        .map_err(|e| bad(format!("invalid server {server:?}: {e}")))
}
