//! The K3s agent side of the `k3s` and `verify` steps: `k3s agent` under its own unit
//! (`k3s-agent.service`, as K3s's `install.sh` names it), joining the plan's server with the
//! token file, on the tailnet address the tailscale step (which runs first on an agent)
//! recorded. What an agent can see of itself is its unit, the kubelet credentials its server
//! issued when it accepted the node, and its tailnet state: that is what `verify` checks.

use crate::engine::Cx;
use crate::k3s::FACT_TS_IPV4;
use crate::retry::Transient;
use anyhow::{bail, Result};
use kiln_plan::{paths, Plan};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

pub const UNIT: &str = "k3s-agent.service";

/// The unit as K3s's `install.sh` writes it for an agent (`K3S_URL` set): the server's unit
/// with `k3s agent` and the agent's env file; every setting is in config.yaml.
pub fn unit_text() -> &'static str {
    static TEXT: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| crate::k3s::install_sh_unit("k3s-agent", "agent"));
    &TEXT
}

/// An agent's config: the plan's keys (`server`, `token-file`, `node-name`,
/// `flannel-iface: tailscale0` and the profile's agent flags) plus `node-ip`, the node's
/// tailnet IPv4, so the kubelet and flannel use the tailnet and the server sees the agent at
/// its 100.x address.
pub fn config(plan: &Plan, facts: &BTreeMap<String, String>) -> Result<BTreeMap<String, Value>> {
    let mut cfg = plan.k3s.config.clone();
    let Some(ip) = facts.get(FACT_TS_IPV4).filter(|v| !v.is_empty()) else {
        bail!(
            "this K3s agent needs its tailnet address for node-ip, and the tailscale step has not recorded one (it runs before k3s on an agent)"
        );
    };
    cfg.insert("node-ip".into(), Value::String(ip.clone()));
    Ok(cfg)
}

/// Has the server accepted this node? A K3s agent writes the kubelet's kubeconfig and the
/// client certificate its server issued once it joined.
fn registered(cx: &Cx) -> bool {
    [
        paths::K3S_AGENT_KUBELET_KUBECONFIG,
        paths::K3S_AGENT_KUBELET_CERT,
    ]
    .iter()
    .all(|p| {
        std::fs::metadata(cx.root.path(p))
            .map(|m| m.len() > 0)
            .unwrap_or(false)
    })
}

/// Waits until the agent unit runs and its kubelet holds the credentials of a joined node.
pub fn wait_joined(cx: &mut Cx) -> Result<()> {
    let server = match &cx.plan.node.role {
        kiln_plan::Role::Agent { server, .. } => server.to_string(),
        kiln_plan::Role::Server => bail!("not an agent plan"),
    };
    let what = format!("the K3s agent to join {server}");
    cx.wait_for(&what, Duration::from_millis(500), || {
        if !crate::k3s::running(UNIT)? {
            return Err(Transient(format!("{UNIT} is not running")).into());
        }
        Ok(registered(cx).then_some(()))
    })?;
    cx.facts.insert("k3s.agent.server".into(), server);
    Ok(())
}

/// `verify` on an agent: its own unit, its kubelet's registration and its tailnet state.
pub fn probe(cx: &Cx) -> Result<Option<()>> {
    if !crate::k3s::running(UNIT)? {
        return Err(Transient(format!("{UNIT} is not running")).into());
    }
    if !registered(cx) {
        return Err(Transient("the kubelet has no credentials from the server yet".into()).into());
    }
    let st = crate::tailscale::status(cx.root).map_err(|e| Transient(format!("{e:#}")))?;
    if st.backend_state != "Running" {
        return Err(Transient(format!("Tailscale is {}", st.backend_state)).into());
    }
    Ok(Some(()))
}
