//! kiln-firstboot: the daemon that turns a plan into a running node.

pub mod argocd;
pub mod cli;
pub mod download;
pub mod engine;
pub mod fs;
pub mod k3s;
pub mod systemd;
pub mod tailscale;
