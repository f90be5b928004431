//! Profile → [`Plan`]: defaults, pins, artifact URLs, secrets, and the checks that need more
//! than one key (compatibility, K3s config keys). Errors point at the key that caused them.

// ProfileError carries the source text for its snippet; it is built once per failed run, so
// its size on the (cold) error path does not matter.

use crate::diag::ProfileError;
use crate::pins::{self, PinKeys};
use crate::profile::{
    self, DeliverySpec, Loaded, RoleSpec, SecretRef, ARGOCD_V3_4_7_INSTALL_SHA256,
    ARGOCD_V3_4_7_INSTALL_SIZE,
};
use crate::source::{key_path, Seg, Sources};
use kiln_plan::{
    k3s_config, ArgoCd, Artifact, Artifacts, GitOps, K3s, Node, Pin, Plan, RepoCredentials, Role,
    Secret, Sha256, StepId, Tailscale, TailscaleApi, TailscaleOperator, Version, PLAN_VERSION,
};
use std::collections::BTreeMap;
use url::Url;

/// Secret files on the node (0600 root), named by `kiln_plan::paths`' contract.
pub const TAILSCALE_AUTH_KEY_FILE: &str = "/etc/kiln/secrets/tailscale-auth-key";
pub const TAILSCALE_OAUTH_SECRET_FILE: &str = "/etc/kiln/secrets/tailscale-oauth-client-secret";
pub const GITOPS_PASSWORD_FILE: &str = "/etc/kiln/secrets/gitops-repo-password";
/// An agent's join token (the server's `k3s.agent-token`): `token-file` in its config.
pub const K3S_TOKEN_FILE: &str = "/etc/kiln/secrets/k3s-token";
/// A server's agent token: `agent-token-file` in its config.
pub const K3S_AGENT_TOKEN_FILE: &str = "/etc/kiln/secrets/k3s-agent-token";

/// A secret to be written on the node.
#[derive(Debug, Clone)]
pub struct SecretFile {
    pub node_path: &'static str,
    /// Profile key it came from (`tailscale.auth-key`).
    pub key: String,
    /// `env:NAME` / `file:path`, safe to print.
    pub source: String,
    pub value: Secret,
}

/// cloud-config settings that are not the daemon's business.
#[derive(Debug, Clone)]
pub struct CloudSettings {
    pub hostname: String,
    pub admin_user: String,
    pub ssh_authorized_keys: Vec<String>,
    pub timezone: String,
    pub locale: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The bundle is fetched from `<base>bundle-<sha256>.tar.gz`.
    Url { base: Url },
    /// The bundle is a file on the NoCloud `CIDATA` seed volume (`seed.img`).
    Seed,
}

impl Delivery {
    pub fn name(&self) -> &'static str {
        match self {
            Delivery::Url { .. } => "url",
            Delivery::Seed => "seed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Resolved {
    /// `manifests` is empty here; rendering fills it with the bundled files' hashes.
    pub plan: Plan,
    pub secrets: Vec<SecretFile>,
    pub cloud: CloudSettings,
    pub delivery: Delivery,
    /// Things that build but deserve a human look (printed, recorded in build.json).
    pub warnings: Vec<String>,
}

/// Environment lookup, injected so tests need not touch the process environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

const DEFAULT_DEADLINES: [(StepId, u64); 6] = [
    (StepId::K3s, 900),
    (StepId::Tailscale, 600),
    (StepId::TailscaleOperator, 900),
    (StepId::Argocd, 1200),
    (StepId::Gitops, 600),
    (StepId::Verify, 1200),
];

/// Upstream release locations (used when the profile names no mirror).
pub mod upstream {
    pub const K3S: &str = "https://github.com/k3s-io/k3s/releases/download/";
    pub const TAILSCALE: &str = "https://pkgs.tailscale.com/stable/";
    pub const ARGOCD: &str = "https://raw.githubusercontent.com/argoproj/argo-cd/";
}

pub fn resolve(loaded: &Loaded, env: Env) -> Result<Resolved, ProfileError> {
    let Loaded {
        profile: p,
        sources,
    } = loaded;
    let s = sources;
    let mut warnings = Vec::new();

    // --- node
    check_hostname(s, &["node", "hostname"], &p.node.hostname)?;
    let user = &p.node.admin.user;
    let user_ok = user.len() <= 32
        && user
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !user_ok || user == "root" {
        return Err(s.error(
            &key_path(&["node", "admin", "user"]),
            false,
            format!(
                "invalid admin user name {user:?}: lowercase letters, digits, `_`, `-`, not root"
            ),
        ));
    }
    if p.node.admin.ssh_authorized_keys.is_empty() {
        return Err(s.error(
            &key_path(&["node", "admin", "ssh-authorized-keys"]),
            false,
            "at least one SSH public key is needed (the admin user has no password)",
        ));
    }
    for (i, k) in p.node.admin.ssh_authorized_keys.iter().enumerate() {
        let kind = k.split_whitespace().next().unwrap_or("");
        let known =
            kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-");
        if !known || k.split_whitespace().count() < 2 || k.contains('\n') {
            let mut path = key_path(&["node", "admin", "ssh-authorized-keys"]);
            path.push(Seg::Index(i));
            return Err(s.error(
                &path,
                false,
                "not an SSH public key (expected `ssh-ed25519 AAAA... comment`); private keys never go in a profile",
            ));
        }
    }
    let tz = &p.node.timezone;
    if tz.is_empty() || tz.contains(' ') || tz.contains("..") || tz.starts_with('/') {
        return Err(s.error(
            &key_path(&["node", "timezone"]),
            false,
            format!("invalid timezone {tz:?} (e.g. America/Recife)"),
        ));
    }

    let mut secrets = Vec::new();
    let mut vault_secrets = Vec::new();
    crate::resolve_role::check_sections(s, p)?;
    let role = match &p.node.role {
        RoleSpec::Server => Role::Server,
        RoleSpec::Agent(a) => {
            let server = crate::resolve_role::agent_server(s, &a.server)?;
            take_secret(
                s,
                env,
                &mut secrets,
                &mut vault_secrets,
                &["node", "role", "agent", "token"],
                &a.token,
                K3S_TOKEN_FILE,
            )?;
            Role::Agent {
                server,
                token_file: K3S_TOKEN_FILE.into(),
            }
        }
    };

    // --- artifacts
    let a = &p.artifacts;
    let mirror = match &a.mirror {
        Some(m) => {
            check_http(s, &["artifacts", "mirror"], m)?;
            Some(with_slash(m))
        }
        None => None,
    };
    let delivery = match a.delivery {
        DeliverySpec::Inline => {
            return Err(s.error(
                &key_path(&["artifacts", "delivery"]),
                false,
                "`delivery: inline` was removed: use `delivery: seed` (the bundle travels as a file on the NoCloud CIDATA seed; see docs/profile.md)",
            ))
        }
        DeliverySpec::Seed => {
            if a.bundle_base_url.is_some() {
                return Err(s.error(
                    &key_path(&["artifacts", "bundle-base-url"]),
                    true,
                    "bundle-base-url is only used with `delivery: url`",
                ));
            }
            Delivery::Seed
        }
        DeliverySpec::Url => match &a.bundle_base_url {
            Some(u) => {
                check_http(s, &["artifacts", "bundle-base-url"], u)?;
                if u.query().is_some() || u.fragment().is_some() {
                    return Err(s.error(
                        &key_path(&["artifacts", "bundle-base-url"]),
                        false,
                        "bundle-base-url is a directory URL without query or fragment",
                    ));
                }
                Delivery::Url { base: with_slash(u) }
            }
            None => {
                return Err(s.error(
                    &key_path(&["artifacts", "delivery"]),
                    true,
                    "`delivery: url` needs `artifacts.bundle-base-url` (where bundle-<sha256>.tar.gz is published)",
                ))
            }
        },
    };
    if let Some(dir) = &a.local_dir {
        if !dir.starts_with('/') {
            return Err(s.error(
                &key_path(&["artifacts", "local-dir"]),
                false,
                "local-dir is an absolute path on the node",
            ));
        }
    }
    if a.air_gap && a.local_dir.is_none() {
        warnings.push("artifacts.air-gap is on: every artifact must already be in the node's cache (a baked image)".into());
    }
    let artifacts = Artifacts {
        air_gap: a.air_gap,
        local_dir: a.local_dir.clone(),
        ca_bundle: crate::keyvault::ca_bundle(s, a.ca_bundle.as_deref())?,
    };

    // --- k3s
    let k = &p.k3s;
    if k.version.major != 1 {
        return Err(s.error(
            &key_path(&["k3s", "version"]),
            false,
            format!("unsupported K3s version {}", k.version),
        ));
    }
    if k.version
        .build
        .as_deref()
        .is_none_or(|b| !b.starts_with("k3s"))
    {
        return Err(s.error(
            &key_path(&["k3s", "version"]),
            false,
            format!(
                "K3s tags carry a +k3sN suffix, e.g. v1.32.4+k3s1; got {}",
                k.version
            ),
        ));
    }
    for (i, item) in k.disable().iter().enumerate() {
        if !k3s_config::DISABLE_ITEMS.contains(&item.as_str()) {
            let mut path = key_path(&["k3s", "disable"]);
            path.push(Seg::Index(i));
            return Err(s.error(
                &path,
                false,
                format!(
                    "cannot disable {item:?}; packaged components are {}",
                    k3s_config::DISABLE_ITEMS.join(", ")
                ),
            ));
        }
    }
    if !matches!(k.write_kubeconfig_mode().as_str(), "0600" | "0640" | "0644") {
        return Err(s.error(
            &key_path(&["k3s", "write-kubeconfig-mode"]),
            false,
            format!(
                "write-kubeconfig-mode must be \"0600\", \"0640\" or \"0644\", got {:?}",
                k.write_kubeconfig_mode()
            ),
        ));
    }
    let agent = matches!(role, Role::Agent { .. });
    let mut config: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for (key, value) in &k.config {
        // `key: null` removes a base's key (docs/profile.md, extends).
        if value.is_null() {
            continue;
        }
        let checked = if agent {
            k3s_config::check_agent(key, value)
        } else {
            k3s_config::check(key, value)
        };
        if let Err(e) = checked {
            let unknown = matches!(
                e,
                k3s_config::KeyError::Unknown(_)
                    | k3s_config::KeyError::UnknownAgent(_)
                    | k3s_config::KeyError::Managed { .. }
                    | k3s_config::KeyError::Secret(_)
            );
            return Err(s.error(&key_path(&["k3s", "config", key]), unknown, e.to_string()));
        }
        config.insert(key.clone(), value.clone());
    }
    config.insert("node-name".into(), p.node.hostname.clone().into());
    match &role {
        Role::Agent { server, token_file } => {
            // `node-ip` (the tailnet address) is added on the node once Tailscale is up.
            config.insert(
                "server".into(),
                server.as_str().trim_end_matches('/').into(),
            );
            config.insert("token-file".into(), token_file.clone().into());
            config.insert("flannel-iface".into(), "tailscale0".into());
        }
        Role::Server => {
            config.insert(
                "write-kubeconfig-mode".into(),
                k.write_kubeconfig_mode().into(),
            );
            config.insert("disable".into(), serde_json::json!(k.disable()));
            config.insert("secrets-encryption".into(), k.secrets_encryption().into());
            // Agents join by the server's tailnet name (`server: NAME` → https://NAME:6443), so
            // its certificate must carry it from the start; the MagicDNS name and the 100.x
            // address are added on the node once Tailscale knows them.
            let ts_name = p
                .tailscale
                .hostname
                .clone()
                .unwrap_or_else(|| p.node.hostname.clone());
            let san = config
                .entry("tls-san".to_string())
                .or_insert_with(|| serde_json::json!([]));
            if let serde_json::Value::String(one) = san {
                *san = serde_json::json!([one.clone()]);
            }
            if let serde_json::Value::Array(list) = san {
                if !list.contains(&serde_json::json!(ts_name)) {
                    list.push(serde_json::json!(ts_name));
                }
            }
            if let Some(r) = &k.agent_token {
                take_secret(
                    s,
                    env,
                    &mut secrets,
                    &mut vault_secrets,
                    &["k3s", "agent-token"],
                    r,
                    K3S_AGENT_TOKEN_FILE,
                )?;
                config.insert("agent-token-file".into(), K3S_AGENT_TOKEN_FILE.into());
            }
            if !k.secrets_encryption() {
                warnings.push(
                    "k3s.secrets-encryption is off: Secrets are stored unencrypted in the datastore"
                        .into(),
                );
            }
        }
    }
    let k3s_tag = k.version.url_tag();
    let (k3s_url, sums_url) = match &mirror {
        Some(m) => (
            join(m, &format!("k3s/{k3s_tag}/k3s")),
            join(m, &format!("k3s/{k3s_tag}/sha256sum-amd64.txt")),
        ),
        None => {
            let base = Url::parse(upstream::K3S).expect("valid");
            (
                join(&base, &format!("{k3s_tag}/k3s")),
                join(&base, &format!("{k3s_tag}/sha256sum-amd64.txt")),
            )
        }
    };
    let k3s_pin = pins::require(s, &PinKeys::plain(&["k3s"]), k.digest, k.size)?;
    let k3s = K3s {
        version: k.version.clone(),
        binary: Artifact {
            name: "k3s".into(),
            url: k3s_url,
            pin: k3s_pin,
        },
        checksums_url: Some(sums_url),
        config,
        images: image_archives(s, &k.images)?,
    };

    // --- tailscale
    let t = &p.tailscale;
    if t.version.minor % 2 == 1 {
        warnings.push(format!(
            "tailscale.version {} has an odd minor number: an unstable Tailscale track",
            t.version
        ));
    }
    let ts_host = t
        .hostname
        .clone()
        .unwrap_or_else(|| p.node.hostname.clone());
    check_hostname(s, &["tailscale", "hostname"], &ts_host)?;
    for (i, tag) in t.tags.iter().enumerate() {
        let name = tag.strip_prefix("tag:").unwrap_or("");
        let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok {
            let mut path = key_path(&["tailscale", "tags"]);
            path.push(Seg::Index(i));
            return Err(s.error(
                &path,
                false,
                format!("invalid tag {tag:?}: expected tag:<letters, digits, ->"),
            ));
        }
    }
    let tarball_name = format!("tailscale_{}_amd64.tgz", t.version.bare());
    let ts_url = match &mirror {
        Some(m) => join(m, &format!("tailscale/{tarball_name}")),
        None => join(
            &Url::parse(upstream::TAILSCALE).expect("valid"),
            &tarball_name,
        ),
    };
    let ts_pin = pins::require(s, &PinKeys::plain(&["tailscale"]), t.digest, t.size)?;
    let mint = t.api.as_ref().is_some_and(|a| a.mint_auth_key);
    match &t.auth_key {
        Some(r) => take_secret(
            s,
            env,
            &mut secrets,
            &mut vault_secrets,
            &["tailscale", "auth-key"],
            r,
            TAILSCALE_AUTH_KEY_FILE,
        )?,
        None if mint => {}
        None => {
            return Err(s.error(
                &key_path(&["tailscale"]),
                true,
                "tailscale.auth-key is required unless tailscale.api.mint-auth-key is true",
            ))
        }
    }
    let api = match &t.api {
        None => None,
        Some(a) => {
            check_http(s, &["tailscale", "api", "base-url"], &a.base_url)?;
            for name in &a.delete_proxy_devices {
                check_label(s, &["tailscale", "api", "delete-proxy-devices"], name)?;
            }
            if !(60..=90 * 86400).contains(&a.key_expiry_seconds) {
                return Err(s.error(
                    &key_path(&["tailscale", "api", "key-expiry-seconds"]),
                    false,
                    "key-expiry-seconds must be between 60 and 7776000 (90 days)",
                ));
            }
            if a.mint_auth_key && t.tags.is_empty() {
                return Err(s.error(
                    &key_path(&["tailscale", "api", "mint-auth-key"]),
                    false,
                    "a key minted by an OAuth client must carry tags: set tailscale.tags",
                ));
            }
            Some(TailscaleApi {
                base_url: a.base_url.clone(),
                delete_stale: a.delete_stale,
                delete_proxy_devices: a.delete_proxy_devices.clone(),
                mint_auth_key: a.mint_auth_key,
                key_expiry_seconds: a.key_expiry_seconds,
            })
        }
    };
    let login_server = tailscale_login_server(s, t)?;
    if login_server.is_some() && !t.tags.is_empty() {
        // Measured with Headscale v0.29.2: "requested tags [tag:k8s] are invalid or not
        // permitted" for any pre-auth key registration that advertises tags.
        warnings.push(
            "tailscale.tags with tailscale.login-server: Headscale (0.28 and later) refuses \
             --advertise-tags when a node joins with a pre-auth key; give the tags to the key \
             (headscale preauthkeys create --tags) and leave tailscale.tags empty"
                .into(),
        );
    }
    let mut sink = SecretSink {
        env,
        secrets: &mut secrets,
        vault: &mut vault_secrets,
    };
    let operator = match &t.operator {
        Some(o) => Some(operator(s, &mut sink, t, o, mirror.as_ref())?),
        None => None,
    };
    let tailscale = Tailscale {
        version: t.version.clone(),
        tarball: Artifact {
            name: tarball_name,
            url: ts_url,
            pin: ts_pin,
        },
        hostname: ts_host,
        tags: t.tags.clone(),
        auth_key_file: Some(TAILSCALE_AUTH_KEY_FILE.into()),
        operator,
        api,
        login_server,
    };

    let (argocd, gitops) = match (&p.argocd, &tailscale.operator) {
        (Some(ac), Some(o)) => {
            let (a, g) = argocd_gitops(
                s,
                &mut sink,
                ac,
                &k.version,
                &o.ingress_class,
                mirror.as_ref(),
            )?;
            (Some(a), Some(g))
        }
        _ => (None, None),
    };

    let mut deadlines: BTreeMap<StepId, u64> = DEFAULT_DEADLINES.into_iter().collect();
    for (step, secs) in &p.deadlines {
        if *secs < 30 || *secs > 6 * 3600 {
            return Err(s.error(
                &key_path(&["deadlines", step.as_str()]),
                false,
                "a step deadline is between 30 and 21600 seconds",
            ));
        }
        deadlines.insert(*step, *secs);
    }

    let plan = Plan {
        version: PLAN_VERSION,
        node: Node {
            hostname: p.node.hostname.clone(),
            role,
        },
        artifacts,
        k3s,
        tailscale,
        argocd,
        gitops,
        manifests: Vec::new(),
        deadlines,
        key_vault: crate::keyvault::plan_section(
            s,
            p.managed_identity.as_ref(),
            vault_secrets,
            &mut warnings,
        )?,
    };
    if matches!(delivery, Delivery::Url { .. }) {
        warnings.extend(crate::keyvault::inline_secrets_warning(&secrets));
    }
    let cloud = CloudSettings {
        hostname: p.node.hostname.clone(),
        admin_user: user.clone(),
        ssh_authorized_keys: p.node.admin.ssh_authorized_keys.clone(),
        timezone: p.node.timezone.clone(),
        locale: p.node.locale.clone(),
    };
    Ok(Resolved {
        plan,
        secrets,
        cloud,
        delivery,
        warnings,
    })
}

/// Where secrets read at build time go, and the Key Vault references the node reads itself.
struct SecretSink<'a, 'e> {
    env: Env<'e>,
    secrets: &'a mut Vec<SecretFile>,
    vault: &'a mut Vec<kiln_plan::keyvault::VaultSecret>,
}

impl SecretSink<'_, '_> {
    fn take(
        &mut self,
        s: &Sources,
        at: &[&str],
        r: &SecretRef,
        node_path: &'static str,
    ) -> Result<(), ProfileError> {
        take_secret(s, self.env, self.secrets, self.vault, at, r, node_path)
    }
}

/// `tailscale.operator` (a server's).
fn operator(
    s: &Sources,
    sink: &mut SecretSink,
    t: &crate::profile::TailscaleSpec,
    o: &crate::profile::OperatorSpec,
    mirror: Option<&Url>,
) -> Result<TailscaleOperator, ProfileError> {
    let chart_version = o.chart_version.clone().unwrap_or_else(|| t.version.bare());
    if chart_version.parse::<Version>().is_err()
        && format!("v{chart_version}").parse::<Version>().is_err()
    {
        return Err(s.error(
            &key_path(&["tailscale", "operator", "chart-version"]),
            false,
            format!("invalid chart version {chart_version:?} (the Tailscale version without v, e.g. 1.102.3)"),
        ));
    }
    check_http(s, &["tailscale", "operator", "chart-repo"], &o.chart_repo)?;
    check_label(s, &["tailscale", "operator", "namespace"], &o.namespace)?;
    check_label(s, &["tailscale", "operator", "hostname"], &o.hostname)?;
    check_label(
        s,
        &["tailscale", "operator", "ingress-class"],
        &o.ingress_class,
    )?;
    if o.oauth_client_id.trim().is_empty() || o.oauth_client_id.starts_with("tskey-client-") {
        return Err(s.error(
            &key_path(&["tailscale", "operator", "oauth-client-id"]),
            false,
            "the OAuth client id is the short id (e.g. kXXXXXXCNTRL), not the tskey-client- secret",
        ));
    }
    sink.take(
        s,
        &["tailscale", "operator", "oauth-client-secret"],
        &o.oauth_client_secret,
        TAILSCALE_OAUTH_SECRET_FILE,
    )?;
    let chart_keys = PinKeys::new(
        key_path(&["tailscale", "operator"]),
        "chart-digest",
        "chart-size",
    );
    let chart_archive = match o.chart_digest {
        // No chart pin: the helm-controller fetches the chart from chart-repo itself.
        None if o.chart_size.is_none() => None,
        digest => {
            let pin = pins::require(s, &chart_keys, digest, o.chart_size)?;
            let name = format!("tailscale-operator-{chart_version}.tgz");
            let url = match mirror {
                Some(m) => join(m, &format!("tailscale/{name}")),
                None => join(&with_slash(&o.chart_repo), &name),
            };
            Some(Artifact { name, url, pin })
        }
    };
    Ok(TailscaleOperator {
        chart_repo: o.chart_repo.clone(),
        chart_version,
        namespace: o.namespace.clone(),
        oauth_client_id: o.oauth_client_id.clone(),
        oauth_client_secret_file: TAILSCALE_OAUTH_SECRET_FILE.into(),
        ingress_class: o.ingress_class.clone(),
        hostname: o.hostname.clone(),
        chart_archive,
    })
}

/// `argocd` and its `gitops` repository (a server's).
fn argocd_gitops(
    s: &Sources,
    sink: &mut SecretSink,
    ac: &crate::profile::ArgoCdSpec,
    k3s_version: &Version,
    ingress_class: &str,
    mirror: Option<&Url>,
) -> Result<(ArgoCd, GitOps), ProfileError> {
    // --- argocd
    check_argocd_compat(s, &ac.version, k3s_version)?;
    let argo_pin = match ac.digest {
        Some(_) => pins::require(s, &PinKeys::plain(&["argocd"]), ac.digest, ac.size)?,
        None if ac.version.to_string() == profile::DEFAULT_ARGOCD_VERSION => Pin::new(
            ARGOCD_V3_4_7_INSTALL_SHA256.parse::<Sha256>().expect("valid pin"),
            Some(ARGOCD_V3_4_7_INSTALL_SIZE),
        ),
        None => {
            return Err(s.error(
                &key_path(&["argocd", "version"]),
                false,
                format!(
                    "argocd.digest is required for {} (kiln carries a pin for {} only)",
                    ac.version,
                    profile::DEFAULT_ARGOCD_VERSION
                ),
            )
            .with_help("upstream publishes no checksum for install.yaml: run `kiln lock PROFILE` (it downloads and hashes it), review the file, and keep the pin"))
        }
    };
    check_label(s, &["argocd", "namespace"], &ac.namespace)?;
    check_label(s, &["argocd", "ingress-host"], &ac.ingress_host)?;
    let argo_tag = ac.version.tag();
    let argo_url = match mirror {
        Some(m) => join(m, &format!("argocd/{argo_tag}/install.yaml")),
        None => join(
            &Url::parse(upstream::ARGOCD).expect("valid"),
            &format!("{argo_tag}/manifests/install.yaml"),
        ),
    };
    let argocd = ArgoCd {
        version: ac.version.clone(),
        manifest: Artifact {
            name: format!("argocd-{argo_tag}-install.yaml"),
            url: argo_url,
            pin: argo_pin,
        },
        namespace: ac.namespace.clone(),
        ingress_host: ac.ingress_host.clone(),
        ingress_class: ingress_class.to_string(),
    };

    // --- gitops
    let g = &ac.gitops;
    let gp = |k: &str| key_path(&["argocd", "gitops", k]);
    match g.repo.scheme() {
        "https" | "ssh" | "http" => {}
        other => {
            return Err(s.error(
                &gp("repo"),
                false,
                format!("unsupported repository scheme {other:?} (https or ssh)"),
            ))
        }
    }
    if !g.repo.username().is_empty() || g.repo.password().is_some() {
        return Err(s.error(
            &gp("repo"),
            false,
            "the repository URL must not carry credentials; use argocd.gitops.credentials",
        ));
    }
    if g.path.starts_with('/') || g.path.split('/').any(|c| c == "..") {
        return Err(s.error(
            &gp("path"),
            false,
            "path is relative to the repository root, without `..`",
        ));
    }
    if g.revision.trim().is_empty() || g.revision.contains(char::is_whitespace) {
        return Err(s.error(
            &gp("revision"),
            false,
            "revision is a branch, tag, commit or HEAD",
        ));
    }
    check_label(s, &["argocd", "gitops", "app-name"], &g.app_name)?;
    let credentials = match &g.credentials {
        None => None,
        Some(c) => {
            if c.username.trim().is_empty() {
                return Err(s.error(
                    &key_path(&["argocd", "gitops", "credentials", "username"]),
                    false,
                    "username must not be empty",
                ));
            }
            sink.take(
                s,
                &["argocd", "gitops", "credentials", "password"],
                &c.password,
                GITOPS_PASSWORD_FILE,
            )?;
            Some(RepoCredentials {
                username: c.username.clone(),
                password_file: GITOPS_PASSWORD_FILE.into(),
            })
        }
    };
    let source = crate::resolve_gitops::source(s, g)?;
    let gitops = GitOps {
        app_name: g.app_name.clone(),
        repo_url: g.repo.clone(),
        revision: g.revision.clone(),
        path: g.path.clone(),
        credentials,
        source,
    };

    Ok((argocd, gitops))
}

/// Argo CD's tested Kubernetes versions (docs/operator-manual/tested-kubernetes-versions.md):
/// 3.3 and 3.4 → 1.32–1.35; 3.5 → 1.33–1.36. 3.5 dropped 1.32, K3s 1.32's Kubernetes.
fn check_argocd_compat(s: &Sources, argo: &Version, k3s: &Version) -> Result<(), ProfileError> {
    let range = match (argo.major, argo.minor) {
        (3, 3) | (3, 4) => Some((32, 35)),
        (3, 5) => Some((33, 36)),
        _ => None,
    };
    let Some((lo, hi)) = range else {
        return Err(s.error(
            &key_path(&["argocd", "version"]),
            false,
            format!("Argo CD {argo} is not a release kiln knows the Kubernetes support of (3.3, 3.4, 3.5)"),
        ));
    };
    if k3s.minor < lo || k3s.minor > hi {
        return Err(s
            .error(
                &key_path(&["argocd", "version"]),
                false,
                format!(
                    "Argo CD {argo} does not support Kubernetes 1.{} (K3s {k3s}); it is tested on 1.{lo}–1.{hi}",
                    k3s.minor
                ),
            )
            .with_help("with K3s v1.32 use Argo CD v3.4.x (default v3.4.7)"));
    }
    Ok(())
}

/// A secret reference: a value read now (env, file), or a Key Vault reference the node
/// resolves itself (no value at build time).
fn take_secret(
    s: &Sources,
    env: Env,
    secrets: &mut Vec<SecretFile>,
    vault_secrets: &mut Vec<kiln_plan::keyvault::VaultSecret>,
    at: &[&str],
    r: &SecretRef,
    node_path: &'static str,
) -> Result<(), ProfileError> {
    match r {
        SecretRef::KeyVault(kv) => {
            vault_secrets.push(crate::keyvault::reference(s, at, kv, node_path)?)
        }
        _ => secrets.push(read_secret(s, env, at, r, node_path)?),
    }
    Ok(())
}

fn read_secret(
    s: &Sources,
    env: Env,
    at: &[&str],
    r: &SecretRef,
    node_path: &'static str,
) -> Result<SecretFile, ProfileError> {
    let mut path = key_path(at);
    let value = match r {
        SecretRef::Env(name) => {
            path.push(Seg::Key("env".into()));
            match env(name) {
                Some(v) if !v.trim().is_empty() => v,
                Some(_) => {
                    return Err(s.error(
                        &path,
                        false,
                        format!("environment variable {name} is empty"),
                    ))
                }
                None => {
                    return Err(s.error(
                        &path,
                        false,
                        format!("environment variable {name} is not set"),
                    ))
                }
            }
        }
        SecretRef::KeyVault(_) => {
            return Err(s.error(
                &path,
                false,
                "a Key Vault reference has no value at build time",
            ))
        }
        SecretRef::File(rel) => {
            path.push(Seg::Key("file".into()));
            let file = s.file_of(&path).dir().join(rel);
            match crate::source::read_limited(&file, 1 << 20).and_then(|b| {
                String::from_utf8(b)
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
            }) {
                Ok(v) if !v.trim().is_empty() => v,
                Ok(_) => {
                    return Err(s.error(
                        &path,
                        false,
                        format!("secret file {} is empty", file.display()),
                    ))
                }
                Err(e) => {
                    return Err(s.error(
                        &path,
                        false,
                        format!("cannot read secret file {}: {e}", file.display()),
                    ))
                }
            }
        }
    };
    let value = value.trim_end_matches(['\n', '\r']).to_string();
    if value.contains('\n') {
        return Err(s.error(&path, false, "a secret is one line"));
    }
    Ok(SecretFile {
        node_path,
        key: at.join("."),
        source: r.to_string(),
        value: Secret::new(value),
    })
}

fn check_hostname(s: &Sources, at: &[&str], h: &str) -> Result<(), ProfileError> {
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !h.starts_with('-')
        && !h.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(s.error(
            &key_path(at),
            false,
            format!("invalid hostname {h:?}: an RFC 1123 label (a-z, 0-9, -; at most 63)"),
        ))
    }
}

fn check_label(s: &Sources, at: &[&str], v: &str) -> Result<(), ProfileError> {
    check_hostname(s, at, v).map_err(|_| {
        s.error(
            &key_path(at),
            false,
            format!("invalid name {v:?}: an RFC 1123 label (a-z, 0-9, -; at most 63)"),
        )
    })
}

/// `tailscale.login-server`: an http(s) origin of a self-hosted control server. The Tailscale
/// API settings (device cleanup, key minting) talk to Tailscale's SaaS, whose devices a
/// Headscale node is not among: the two together are refused rather than half-working.
fn tailscale_login_server(
    s: &Sources,
    t: &crate::profile::TailscaleSpec,
) -> Result<Option<Url>, ProfileError> {
    let Some(u) = &t.login_server else {
        return Ok(None);
    };
    check_http(s, &["tailscale", "login-server"], u)?;
    if u.query().is_some() || u.fragment().is_some() {
        return Err(s.error(
            &key_path(&["tailscale", "login-server"]),
            false,
            format!("login-server {u} has a query or fragment: expected the server's URL"),
        ));
    }
    if t.api.is_some() {
        return Err(s.error(
            &key_path(&["tailscale", "api"]),
            true,
            "tailscale.api (device cleanup, key minting) is Tailscale's SaaS API and cannot be \
             combined with tailscale.login-server (a self-hosted control server such as \
             Headscale): remove one of them",
        ));
    }
    Ok(Some(u.clone()))
}

fn check_http(s: &Sources, at: &[&str], u: &Url) -> Result<(), ProfileError> {
    if matches!(u.scheme(), "http" | "https") && u.host().is_some() {
        Ok(())
    } else {
        Err(s.error(
            &key_path(at),
            false,
            format!("expected an http(s) URL, got {u}"),
        ))
    }
}

/// K3s imports these archive kinds from its agent images dir.
const IMAGE_ARCHIVE_SUFFIXES: [&str; 6] = [
    ".tar", ".tar.gz", ".tar.zst", ".tar.lz4", ".tar.bz2", ".tar.xz",
];

fn image_archives(
    s: &Sources,
    specs: &[crate::profile::ImageArchiveSpec],
) -> Result<Vec<Artifact>, ProfileError> {
    let mut out: Vec<Artifact> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let mut at = key_path(&["k3s", "images"]);
        at.push(Seg::Index(i));
        at.push(Seg::Key("url".into()));
        if !(matches!(spec.url.scheme(), "http" | "https") && spec.url.host().is_some()) {
            return Err(s.error(
                &at,
                false,
                format!("expected an http(s) URL, got {}", spec.url),
            ));
        }
        let name = spec
            .url
            .path_segments()
            .and_then(|mut segs| segs.next_back())
            .unwrap_or("")
            .to_string();
        if !IMAGE_ARCHIVE_SUFFIXES.iter().any(|x| name.ends_with(x)) || name.starts_with('.') {
            return Err(s.error(
                &at,
                false,
                format!(
                    "the URL must name an image archive K3s imports ({}), got {name:?}",
                    IMAGE_ARCHIVE_SUFFIXES.join(", ")
                ),
            ));
        }
        if out.iter().any(|a| a.name == name) {
            return Err(s.error(&at, false, format!("two image archives are named {name:?}")));
        }
        let mut keys = PinKeys::plain(&["k3s", "images"]);
        keys.parent.push(Seg::Index(i));
        let pin = pins::require(s, &keys, spec.digest, spec.size)?;
        out.push(Artifact {
            name,
            url: spec.url.clone(),
            pin,
        });
    }
    Ok(out)
}

fn with_slash(u: &Url) -> Url {
    let mut u = u.clone();
    if !u.path().ends_with('/') {
        let p = format!("{}/", u.path());
        u.set_path(&p);
    }
    u
}

fn join(base: &Url, rel: &str) -> Url {
    base.join(rel).expect("relative artifact path joins")
}
