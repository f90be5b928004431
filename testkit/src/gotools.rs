//! The real Go programs the tests run (Tailscale's client v1.102.3, Headscale v0.29.2, helm
//! v3), where `.ci/go-tools.sh` caches them: `~/.cache/kiln/go/<module>@<version>/`
//! (`KILN_GO_TOOLS` overrides the root). Tests that need them skip, saying so, when they are
//! missing on a developer machine, and fail under CI (`KILN_VM_TESTS=1` or
//! `KILN_REQUIRE_GO_TOOLS=1`), so a machine without them never passes by skipping.
//! (Test support: nothing in the product calls it.)

use std::path::{Path, PathBuf};
use std::process::Command;

pub const TAILSCALE_KEY: &str = "tailscale.com@v1.102.3";
pub const HEADSCALE_KEY: &str = "headscale@v0.29.2";
pub const HELM_KEY: &str = "helm@v3.21.4";

/// The cache root `.ci/go-tools.sh` builds into.
pub fn root() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_GO_TOOLS") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    cache.join("kiln/go")
}

/// The real tools, all present.
#[derive(Debug, Clone)]
pub struct GoTools {
    /// Holds `tailscale` and `tailscaled`.
    pub tailscale_dir: PathBuf,
    pub headscale: PathBuf,
    pub helm: PathBuf,
}

impl GoTools {
    pub fn tailscale(&self) -> PathBuf {
        self.tailscale_dir.join("tailscale")
    }
    pub fn tailscaled(&self) -> PathBuf {
        self.tailscale_dir.join("tailscaled")
    }
    /// The tailscale.com module source at v1.102.3 (systemd files, the operator chart).
    pub fn tailscale_module(&self) -> PathBuf {
        module_dir("tailscale.com@v1.102.3")
    }
    /// `cmd/k8s-operator/deploy/chart` in that module: the operator chart's source.
    pub fn operator_chart(&self) -> PathBuf {
        self.tailscale_module()
            .join("cmd/k8s-operator/deploy/chart")
    }
}

/// `$(go env GOMODCACHE)/<module@version>`.
pub fn module_dir(module_at_version: &str) -> PathBuf {
    let cache = Command::new("go")
        .args(["env", "GOMODCACHE"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/root/go/pkg/mod".into());
    Path::new(&cache).join(module_at_version)
}

fn required() -> bool {
    ["KILN_VM_TESTS", "KILN_REQUIRE_GO_TOOLS"]
        .iter()
        .any(|v| std::env::var(v).as_deref() == Ok("1"))
}

/// The tools, or `None` after saying why `test` is skipped; panics when they are missing and
/// required (CI).
pub fn find(test: &str) -> Option<GoTools> {
    let r = root();
    let t = GoTools {
        tailscale_dir: r.join(TAILSCALE_KEY),
        headscale: r.join(HEADSCALE_KEY).join("headscale"),
        helm: r.join(HELM_KEY).join("helm"),
    };
    let mut missing: Vec<PathBuf> = [t.tailscale(), t.tailscaled(), t.headscale.clone()]
        .into_iter()
        .chain([t.helm.clone()])
        .filter(|p| !p.is_file())
        .collect();
    if !t.operator_chart().join("Chart.yaml").is_file() {
        missing.push(t.operator_chart());
    }
    if missing.is_empty() {
        return Some(t);
    }
    let msg = format!(
        "{test}: missing {} (run .ci/go-tools.sh)",
        missing
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if required() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED {msg}");
    None
}
