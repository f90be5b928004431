//! kiln-firstboot: the daemon that turns a plan into a running node.

pub mod argocd;
pub mod argocd_status;
pub mod bundle;
pub mod cli;
pub mod cmd;
pub mod download;
pub mod engine;
pub mod fs;
pub mod journal;
pub mod k3s;
pub mod k3s_agent;
pub mod keyvault;
pub mod retry;
pub mod stage;
pub mod status;
pub mod systemd;
pub mod tailscale;
pub mod tailscale_api;
pub mod time;

/// THE step registry: every step the daemon runs, in order (k3s → tailscale →
/// tailscale-operator → argocd → gitops → verify). The engine refuses to start unless this
/// list covers `kiln_plan::StepId::ALL` in that order, so a missing step is an error, not a
/// silent success.
///
/// Owned jointly: the steps work adds its step structs here, e.g.
/// `Box::new(k3s::K3sStep)`, one line per step; nothing else in this file is theirs.
pub fn all_steps() -> Vec<Box<dyn engine::Step>> {
    vec![
        Box::new(k3s::K3sStep),
        Box::new(tailscale::TailscaleStep),
        Box::new(tailscale::TailscaleOperatorStep),
        Box::new(argocd::ArgocdStep),
        Box::new(argocd::GitopsStep),
        Box::new(argocd::VerifyStep),
    ]
}
