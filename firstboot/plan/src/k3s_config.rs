//! The K3s server flags a profile may set in `/etc/rancher/k3s/config.yaml`.
//!
//! Keys are the `k3s server` flag names without `--` (https://docs.k3s.io/cli/server,
//! K3s v1.32). A key outside this list is refused when the profile is built, not when K3s
//! starts on the node and exits. Some real flags are deliberately not settable here:
//! - [`MANAGED`]: kiln writes them from typed profile fields (`k3s.disable`, ...);
//! - [`SECRET`]: they carry credentials, which never live in a profile or in the plan;
//! - `config`: the file is the config.

/// What a flag's value must look like in YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    String,
    Int,
    /// Repeatable flag: a YAML list of strings (a single string is accepted too).
    List,
}

/// Keys kiln sets itself, with the profile field to use instead.
pub const MANAGED: &[(&str, &str)] = &[
    ("disable", "k3s.disable"),
    ("secrets-encryption", "k3s.secrets-encryption"),
    ("write-kubeconfig-mode", "k3s.write-kubeconfig-mode"),
    ("node-name", "node.hostname"),
    ("server", "node.role"),
];

/// Keys holding credentials: not allowed in a profile's config (use secret references).
pub const SECRET: &[&str] = &[
    "token",
    "agent-token",
    "token-file",
    "agent-token-file",
    "datastore-endpoint",
    "etcd-s3-access-key",
    "etcd-s3-secret-key",
    "etcd-s3-session-token",
    "vpn-auth",
    "vpn-auth-file",
];

/// Server flags a profile may set, with their value kind.
pub const ALLOWED: &[(&str, Kind)] = &[
    // Logging
    ("debug", Kind::Bool),
    ("v", Kind::Int),
    ("vmodule", Kind::String),
    ("log", Kind::String),
    ("alsologtostderr", Kind::Bool),
    // Listener
    ("bind-address", Kind::String),
    ("https-listen-port", Kind::Int),
    ("supervisor-port", Kind::Int),
    ("apiserver-port", Kind::Int),
    ("apiserver-bind-address", Kind::String),
    ("advertise-address", Kind::String),
    ("advertise-port", Kind::Int),
    ("tls-san", Kind::List),
    ("tls-san-security", Kind::Bool),
    // Data
    ("data-dir", Kind::String),
    // Networking
    ("cluster-cidr", Kind::List),
    ("service-cidr", Kind::List),
    ("service-node-port-range", Kind::String),
    ("cluster-dns", Kind::List),
    ("cluster-domain", Kind::String),
    ("flannel-backend", Kind::String),
    ("flannel-ipv6-masq", Kind::Bool),
    ("flannel-external-ip", Kind::Bool),
    ("egress-selector-mode", Kind::String),
    ("servicelb-namespace", Kind::String),
    // Client
    ("write-kubeconfig", Kind::String),
    ("write-kubeconfig-group", Kind::String),
    // Cluster
    ("cluster-init", Kind::Bool),
    ("helm-job-image", Kind::String),
    // Components
    ("kube-apiserver-arg", Kind::List),
    ("etcd-arg", Kind::List),
    ("kube-controller-manager-arg", Kind::List),
    ("kube-scheduler-arg", Kind::List),
    ("kube-cloud-controller-manager-arg", Kind::List),
    ("kubelet-arg", Kind::List),
    ("kube-proxy-arg", Kind::List),
    // Database
    ("datastore-cafile", Kind::String),
    ("datastore-certfile", Kind::String),
    ("datastore-keyfile", Kind::String),
    ("etcd-expose-metrics", Kind::Bool),
    ("etcd-disable-snapshots", Kind::Bool),
    ("etcd-snapshot-name", Kind::String),
    ("etcd-snapshot-schedule-cron", Kind::String),
    ("etcd-snapshot-retention", Kind::Int),
    ("etcd-snapshot-dir", Kind::String),
    ("etcd-snapshot-compress", Kind::Bool),
    ("etcd-s3", Kind::Bool),
    ("etcd-s3-endpoint", Kind::String),
    ("etcd-s3-endpoint-ca", Kind::String),
    ("etcd-s3-skip-ssl-verify", Kind::Bool),
    ("etcd-s3-region", Kind::String),
    ("etcd-s3-bucket", Kind::String),
    ("etcd-s3-folder", Kind::String),
    ("etcd-s3-insecure", Kind::Bool),
    ("etcd-s3-timeout", Kind::String),
    // Storage
    ("default-local-storage-path", Kind::String),
    // Components to run
    ("disable-scheduler", Kind::Bool),
    ("disable-cloud-controller", Kind::Bool),
    ("disable-kube-proxy", Kind::Bool),
    ("disable-network-policy", Kind::Bool),
    ("disable-helm-controller", Kind::Bool),
    ("embedded-registry", Kind::Bool),
    ("supervisor-metrics", Kind::Bool),
    // Agent part of the server
    ("with-node-id", Kind::Bool),
    ("node-label", Kind::List),
    ("node-taint", Kind::List),
    ("image-credential-provider-bin-dir", Kind::String),
    ("image-credential-provider-config", Kind::String),
    ("docker", Kind::Bool),
    ("container-runtime-endpoint", Kind::String),
    ("default-runtime", Kind::String),
    ("image-service-endpoint", Kind::String),
    ("disable-default-registry-endpoint", Kind::Bool),
    ("nonroot-devices", Kind::Bool),
    ("pause-image", Kind::String),
    ("snapshotter", Kind::String),
    ("private-registry", Kind::String),
    ("system-default-registry", Kind::String),
    ("node-ip", Kind::List),
    ("node-external-ip", Kind::List),
    ("node-internal-dns", Kind::List),
    ("node-external-dns", Kind::List),
    ("resolv-conf", Kind::String),
    ("flannel-iface", Kind::String),
    ("flannel-conf", Kind::String),
    ("flannel-cni-conf", Kind::String),
    ("protect-kernel-defaults", Kind::Bool),
    ("secrets-encryption-provider", Kind::String),
    ("enable-pprof", Kind::Bool),
    ("rootless", Kind::Bool),
    ("prefer-bundled-bin", Kind::Bool),
    ("selinux", Kind::Bool),
    ("lb-server-port", Kind::Int),
    ("airgap-extra-registry", Kind::List),
];

/// Keys kiln sets itself in an agent's config (the rest of the plan or the node decides them).
pub const AGENT_MANAGED: &[(&str, &str)] = &[
    ("server", "node.role.agent.server"),
    ("node-name", "node.hostname"),
    // The node's tailnet address and interface: an agent talks to its server over the tailnet.
    ("node-ip", "tailscale (kiln sets the tailnet address)"),
    ("flannel-iface", "tailscale (kiln sets tailscale0)"),
];

/// `k3s agent` flags a profile may set on an agent (`k3s.config`), with their value kind.
/// Every name is in the real v1.32 agent flag list, tests/upstream/k3s-v1.32-agent-flags.txt.
pub const AGENT_ALLOWED: &[(&str, Kind)] = &[
    ("debug", Kind::Bool),
    ("v", Kind::Int),
    ("vmodule", Kind::String),
    ("log", Kind::String),
    ("alsologtostderr", Kind::Bool),
    ("data-dir", Kind::String),
    ("with-node-id", Kind::Bool),
    ("node-label", Kind::List),
    ("node-taint", Kind::List),
    ("image-credential-provider-bin-dir", Kind::String),
    ("image-credential-provider-config", Kind::String),
    ("selinux", Kind::Bool),
    ("lb-server-port", Kind::Int),
    ("protect-kernel-defaults", Kind::Bool),
    ("container-runtime-endpoint", Kind::String),
    ("default-runtime", Kind::String),
    ("image-service-endpoint", Kind::String),
    ("pause-image", Kind::String),
    ("snapshotter", Kind::String),
    ("private-registry", Kind::String),
    ("disable-default-registry-endpoint", Kind::Bool),
    ("nonroot-devices", Kind::Bool),
    ("airgap-extra-registry", Kind::List),
    ("bind-address", Kind::String),
    ("node-external-ip", Kind::List),
    ("node-internal-dns", Kind::List),
    ("node-external-dns", Kind::List),
    ("resolv-conf", Kind::String),
    ("flannel-conf", Kind::String),
    ("flannel-cni-conf", Kind::String),
    ("kubelet-arg", Kind::List),
    ("kube-proxy-arg", Kind::List),
    ("enable-pprof", Kind::Bool),
    ("rootless", Kind::Bool),
    ("prefer-bundled-bin", Kind::Bool),
    ("docker", Kind::Bool),
    ("disable-apiserver-lb", Kind::Bool),
];

/// Valid items of `--disable` (https://docs.k3s.io/installation/packaged-components).
pub const DISABLE_ITEMS: &[&str] = &[
    "coredns",
    "servicelb",
    "traefik",
    "local-storage",
    "metrics-server",
    "runtimes",
];

/// Why a key cannot be set from a profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("unknown K3s server config key `{0}` (not a `k3s server` flag kiln allows)")]
    Unknown(String),
    #[error("`{0}` is not a `k3s agent` flag (a server-only key, or unknown): an agent's config takes agent flags only")]
    UnknownAgent(String),
    #[error("`{key}` is set by kiln; use the profile field `{use_instead}`")]
    Managed {
        key: String,
        use_instead: &'static str,
    },
    #[error("`{0}` carries a credential and cannot be set in a profile")]
    Secret(String),
    #[error("`{key}` expects {expected}")]
    Type { key: String, expected: &'static str },
}

/// Checks one extra config key and its value (a server's).
pub fn check(key: &str, value: &serde_json::Value) -> Result<(), KeyError> {
    check_in(key, value, MANAGED, ALLOWED).map_err(|e| match e {
        KeyError::UnknownAgent(k) => KeyError::Unknown(k),
        e => e,
    })
}

/// Checks one extra config key and its value on an agent: `k3s agent` flags only.
pub fn check_agent(key: &str, value: &serde_json::Value) -> Result<(), KeyError> {
    check_in(key, value, AGENT_MANAGED, AGENT_ALLOWED)
}

fn check_in(
    key: &str,
    value: &serde_json::Value,
    managed: &[(&str, &'static str)],
    allowed: &[(&str, Kind)],
) -> Result<(), KeyError> {
    // `key+` appends in K3s drop-ins; one file here, so plain keys only.
    if let Some((_, field)) = managed.iter().find(|(k, _)| *k == key) {
        return Err(KeyError::Managed {
            key: key.into(),
            use_instead: field,
        });
    }
    if SECRET.contains(&key) {
        return Err(KeyError::Secret(key.into()));
    }
    let Some((_, kind)) = allowed.iter().find(|(k, _)| *k == key) else {
        return Err(KeyError::UnknownAgent(key.into()));
    };
    use serde_json::Value as V;
    let ok = match kind {
        Kind::Bool => value.is_boolean(),
        Kind::String => value.is_string(),
        Kind::Int => value.is_u64(),
        Kind::List => match value {
            V::String(_) => true,
            V::Array(items) => items.iter().all(V::is_string),
            _ => false,
        },
    };
    if ok {
        Ok(())
    } else {
        let expected = match kind {
            Kind::Bool => "true or false",
            Kind::String => "a string",
            Kind::Int => "a non-negative integer",
            Kind::List => "a string or a list of strings",
        };
        Err(KeyError::Type {
            key: key.into(),
            expected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn known_flags_pass_and_others_are_named() {
        assert!(check("tls-san", &json!(["a", "b"])).is_ok());
        assert!(check("flannel-iface", &json!("tailscale0")).is_ok());
        assert_eq!(
            check("flannel-ifac", &json!("x")),
            Err(KeyError::Unknown("flannel-ifac".into()))
        );
        assert!(matches!(
            check("disable", &json!([])),
            Err(KeyError::Managed { .. })
        ));
        assert!(matches!(
            check("token", &json!("t")),
            Err(KeyError::Secret(_))
        ));
        assert!(matches!(
            check("cluster-init", &json!("yes")),
            Err(KeyError::Type { .. })
        ));
    }

    #[test]
    fn agent_keys_are_agent_flags_and_server_keys_are_refused_on_agents() {
        assert!(check_agent("node-label", &json!(["a=b"])).is_ok());
        assert!(matches!(
            check_agent("cluster-init", &json!(true)),
            Err(KeyError::UnknownAgent(_))
        ));
        assert!(matches!(
            check_agent("tls-san", &json!(["x"])),
            Err(KeyError::UnknownAgent(_))
        ));
        assert!(matches!(
            check_agent("node-ip", &json!("1.2.3.4")),
            Err(KeyError::Managed { .. })
        ));
        assert!(matches!(
            check_agent("token-file", &json!("/x")),
            Err(KeyError::Secret(_))
        ));
        let real = real_agent_flags();
        let ours = AGENT_ALLOWED.iter().map(|(k, _)| *k);
        for k in ours.chain(AGENT_MANAGED.iter().map(|(k, _)| *k)) {
            assert!(real.contains(&k), "{k} is not a real k3s agent flag");
        }
    }

    /// The committed upstream list (tests/upstream/k3s-v1.32-agent-flags.txt).
    fn real_agent_flags() -> Vec<&'static str> {
        include_str!("../../../tests/upstream/k3s-v1.32-agent-flags.txt")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect()
    }

    #[test]
    fn lists_have_no_duplicates_or_overlaps() {
        let mut all: Vec<&str> = ALLOWED.iter().map(|(k, _)| *k).collect();
        all.extend(MANAGED.iter().map(|(k, _)| *k));
        all.extend(SECRET);
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
