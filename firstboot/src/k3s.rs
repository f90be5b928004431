//! K3s: the binary, `/etc/rancher/k3s/config.yaml`, the systemd unit as K3s's `install.sh`
//! writes it, readiness through `k3s kubectl`, and the auto-deploy manifests directory (the
//! later steps hand their Kubernetes objects to K3s through it).

use crate::cmd::Cmd;
use crate::download::{display_url, hash_file, sha256_file, CrossCheck, Fetcher};
use crate::engine::{Cx, Step};
use crate::fs::{copy_atomic, write_atomic, Root};
use crate::retry::Transient;
use crate::systemd;
use anyhow::{bail, Context, Result};
use kiln_plan::manifests::addon_name;
use kiln_plan::{paths, Artifact, Digest, Plan, Sha256, StepId};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

pub const UNIT: &str = "k3s.service";
/// sha256 of everything the running server was (re)started with; a crash between writing a
/// file and restarting K3s leaves this stale, so the next run restarts.
const APPLIED_MARKER: &str = "/var/lib/kiln/k3s.applied";
/// Links install.sh creates next to the binary (only where the command is not already on PATH).
const LINKS: [&str; 3] = ["kubectl", "crictl", "ctr"];
const PATH_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];
/// Facts recorded by the tailscale step that K3s adds to `tls-san`.
pub const FACT_TS_DNS: &str = "tailscale.dns-name";
pub const FACT_TS_IPV4: &str = "tailscale.ipv4";

/// The unit exactly as K3s's `install.sh` writes it (`create_systemd_service_file`), for
/// `k3s {command}` with the env file named after its `{service}`: every setting lives in
/// config.yaml, so ExecStart carries no flags and a re-install loses nothing.
const INSTALL_SH_UNIT: &str = "[Unit]
Description=Lightweight Kubernetes
Documentation=https://k3s.io
Wants=network-online.target
After=network-online.target

[Install]
WantedBy=multi-user.target

[Service]
Type=notify
EnvironmentFile=-/etc/default/%N
EnvironmentFile=-/etc/sysconfig/%N
EnvironmentFile=-/etc/systemd/system/{service}.service.env
KillMode=process
Delegate=yes
User=root
# Having non-zero Limit*s causes performance problems due to accounting overhead
# in the kernel. We recommend using cgroups to do container-local accounting.
LimitNOFILE=1048576
LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity
TimeoutStartSec=0
Restart=always
RestartSec=5s
ExecStartPre=-/sbin/modprobe br_netfilter
ExecStartPre=-/sbin/modprobe overlay
ExecStart=/usr/local/bin/k3s {command}
";

/// [`INSTALL_SH_UNIT`] for one service (`k3s` running `server`, `k3s-agent` running `agent`).
pub fn install_sh_unit(service: &str, command: &str) -> String {
    INSTALL_SH_UNIT
        .replace("{service}", service)
        .replace("{command}", command)
}

/// The server's unit (`k3s.service`).
pub fn unit_text() -> &'static str {
    static TEXT: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| install_sh_unit("k3s", "server"));
    &TEXT
}

/// install.sh puts every exported `K3S_*`/`CONTAINERD_*`/proxy variable here; kiln exports
/// none (the token and everything else are config keys), so the file is empty but present, 0600.
pub fn env_text() -> &'static str {
    ""
}

/// `/etc/rancher/k3s/config.yaml`: the plan's keys (checked against the allowed server flags at
/// build time), plus the node's Tailscale name and IPv4 in `tls-san` once the tailscale step
/// has learned them. Keys sorted, so the same inputs give the same bytes.
pub fn config_yaml(plan: &Plan, facts: &BTreeMap<String, String>) -> Result<String> {
    let cfg = if plan.is_agent() {
        crate::k3s_agent::config(plan, facts)?
    } else {
        server_config(plan, facts)?
    };
    let body = serde_yaml::to_string(&cfg).context("rendering k3s config.yaml")?;
    Ok(format!(
        "# Written by kiln-firstboot from the node plan; edits are overwritten.\n{body}"
    ))
}

/// A server's config: the plan's keys and its tailnet name and address in `tls-san`.
fn server_config(plan: &Plan, facts: &BTreeMap<String, String>) -> Result<BTreeMap<String, Value>> {
    let mut cfg: BTreeMap<String, Value> = plan.k3s.config.clone();
    let extra: Vec<&String> = [FACT_TS_DNS, FACT_TS_IPV4]
        .iter()
        .filter_map(|k| facts.get(*k))
        .filter(|v| !v.is_empty())
        .collect();
    if !extra.is_empty() {
        let san = cfg
            .entry("tls-san".to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::String(s) = san {
            *san = Value::Array(vec![Value::String(s.clone())]);
        }
        let Value::Array(list) = san else {
            bail!("plan: k3s config key tls-san must be a string or a list");
        };
        for v in extra {
            let v = Value::String(v.clone());
            if !list.contains(&v) {
                list.push(v);
            }
        }
    }
    Ok(cfg)
}

/// The unit name, unit file (path, text) and env file of this node's K3s: `k3s.service`
/// running `k3s server`, or `k3s-agent.service` running `k3s agent`.
pub struct Units {
    pub unit: &'static str,
    pub unit_path: &'static str,
    pub unit_text: &'static str,
    pub env_path: &'static str,
}

pub fn units(plan: &Plan) -> Units {
    if plan.is_agent() {
        Units {
            unit: crate::k3s_agent::UNIT,
            unit_path: paths::K3S_AGENT_UNIT,
            unit_text: crate::k3s_agent::unit_text(),
            env_path: paths::K3S_AGENT_ENV,
        }
    } else {
        Units {
            unit: UNIT,
            unit_path: paths::K3S_UNIT,
            unit_text: unit_text(),
            env_path: paths::K3S_ENV,
        }
    }
}

/// Writes `data` to a node path unless it already holds exactly that with `mode`.
/// Returns whether anything was written.
pub fn write_if_changed(root: &Root, node_path: &str, data: &[u8], mode: u32) -> Result<bool> {
    if file_is(root, node_path, data, mode) {
        return Ok(false);
    }
    write_atomic(&root.path(node_path), data, mode)?;
    Ok(true)
}

/// Permission bits of a file, if it exists.
pub fn file_mode(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// Does the node path hold exactly `data` with `mode`?
pub fn file_is(root: &Root, node_path: &str, data: &[u8], mode: u32) -> bool {
    let p = root.path(node_path);
    match (fs::metadata(&p), fs::read(&p)) {
        (Ok(m), Ok(cur)) => cur == data && m.permissions().mode() & 0o7777 == mode,
        _ => false,
    }
}

fn applied_digest(cx: &Cx) -> Result<String> {
    let cfg = config_yaml(cx.plan, cx.facts)?;
    let mut all = Vec::new();
    for part in [
        cx.plan.k3s.binary.pin.digest.to_string().as_bytes(),
        cfg.as_bytes(),
        units(cx.plan).unit_text.as_bytes(),
        env_text().as_bytes(),
    ] {
        all.extend_from_slice(Sha256::digest(part).as_bytes());
    }
    Ok(format!("{}\n", Sha256::digest(&all).to_hex()))
}

/// Is the K3s config (incl. the Tailscale `tls-san`) on disk and what the server runs with?
pub fn config_current(cx: &Cx) -> Result<bool> {
    let cfg = config_yaml(cx.plan, cx.facts)?;
    Ok(file_is(cx.root, paths::K3S_CONFIG, cfg.as_bytes(), 0o600)
        && file_is(
            cx.root,
            APPLIED_MARKER,
            applied_digest(cx)?.as_bytes(),
            0o600,
        ))
}

/// Rewrites config.yaml from the plan and current facts and restarts K3s when it changed or
/// when the running server has not seen it yet; then waits for readiness. Used by the tailscale
/// step once the node's tailnet name is known.
pub fn reconcile_config(cx: &mut Cx) -> Result<bool> {
    let cfg = config_yaml(cx.plan, cx.facts)?;
    let wrote = write_if_changed(cx.root, paths::K3S_CONFIG, cfg.as_bytes(), 0o600)?;
    let digest = applied_digest(cx)?;
    if !wrote && file_is(cx.root, APPLIED_MARKER, digest.as_bytes(), 0o600) {
        return Ok(false);
    }
    tracing::info!("k3s config changed; restarting k3s");
    systemd::restart(units(cx.plan).unit)?;
    write_atomic(&cx.root.path(APPLIED_MARKER), digest.as_bytes(), 0o600)?;
    wait_ready(cx)?;
    Ok(true)
}

/// Is the unit running or on its way (`active`, `activating`, `reloading`)? After a reboot the
/// daemon may look while K3s or tailscaled is still starting; that is not a reason to re-apply
/// (verify waits for readiness).
pub fn running(unit: &str) -> Result<bool> {
    let out = Cmd::new("systemctl")
        .args(["is-active", unit])
        .timeout(Duration::from_secs(60))
        .output()?;
    Ok(matches!(
        out.stdout.trim(),
        "active" | "activating" | "reloading"
    ))
}

/// `sha256sum-amd64.txt` → the hash on the line for `k3s` (install.sh: `grep " k3s$"`).
pub fn checksum_for_k3s(sums: &str) -> Result<Sha256> {
    let line = sums
        .lines()
        .find(|l| l.trim_end().ends_with(" k3s"))
        .context("the release checksum file has no line for `k3s`")?;
    let hex = line.split_whitespace().next().unwrap_or("");
    hex.parse::<Sha256>()
        .with_context(|| format!("the release checksum file's k3s line is malformed: {line:?}"))
}

/// `{root}/usr/local/bin/k3s kubectl ARGS` → stdout. Errors (server down, unknown resource)
/// carry kubectl's stderr.
pub fn kubectl(root: &Root, args: &[&str]) -> Result<String> {
    Cmd::new(root.path(paths::K3S_BIN))
        .arg("kubectl")
        .args(args)
        .timeout(Duration::from_secs(60))
        .run()
}

/// Like [`kubectl`] with JSON output, any failure marked [`Transient`] (the API may be coming
/// up, a CRD may not be established yet): for probes inside waits.
pub fn kubectl_json(root: &Root, args: &[&str]) -> Result<Value> {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let out = kubectl(root, &a).map_err(|e| Transient(format!("{e:#}")))?;
    serde_json::from_str(&out).with_context(|| format!("parsing `kubectl {}` output", a.join(" ")))
}

fn readyz(root: &Root) -> Result<Option<()>> {
    match kubectl(root, &["get", "--raw", "/readyz"]) {
        Ok(out) if out.trim() == "ok" => Ok(Some(())),
        Ok(_) => Ok(None),
        Err(e) => Err(Transient(format!("{e:#}")).into()),
    }
}

/// Is the node (the only one, or the one named like the host) Ready?
pub fn node_ready(root: &Root) -> Result<Option<String>> {
    let v = kubectl_json(root, &["get", "nodes"])?;
    let items = v["items"].as_array().cloned().unwrap_or_default();
    for n in &items {
        let ready = n["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if ready {
            return Ok(Some(
                n["metadata"]["name"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    Ok(None)
}

/// Waits until the API answers `/readyz` with `ok` and the node is Ready.
pub fn wait_ready(cx: &mut Cx) -> Result<()> {
    let root = cx.root.clone();
    cx.wait_for("the K3s API (/readyz)", Duration::from_millis(500), || {
        readyz(&root)
    })?;
    let node = cx.wait_for(
        "the K3s node to be Ready",
        Duration::from_millis(500),
        || node_ready(&root),
    )?;
    cx.facts.insert("k3s.node".into(), node);
    Ok(())
}

fn link_needed(root: &Root, cmd: &str) -> bool {
    // install.sh skips a link when the command already exists elsewhere on PATH.
    !PATH_DIRS
        .iter()
        .any(|d| *d != "/usr/local/bin" && root.path(format!("{d}/{cmd}")).exists())
}

fn links_ok(root: &Root) -> bool {
    LINKS.iter().all(|cmd| {
        !link_needed(root, cmd)
            || fs::read_link(root.path(format!("/usr/local/bin/{cmd}")))
                .map(|t| t == Path::new("k3s"))
                .unwrap_or(false)
    })
}

fn ensure_links(root: &Root) -> Result<bool> {
    let mut changed = false;
    for cmd in LINKS {
        if !link_needed(root, cmd) {
            continue;
        }
        let link = root.path(format!("/usr/local/bin/{cmd}"));
        if fs::read_link(&link)
            .map(|t| t == Path::new("k3s"))
            .unwrap_or(false)
        {
            continue;
        }
        // Relative, so the link is right both on the node and under --root.
        let tmp = link.with_file_name(format!(".{cmd}.kiln-tmp"));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink("k3s", &tmp)
            .with_context(|| format!("creating symlink {}", tmp.display()))?;
        fs::rename(&tmp, &link).with_context(|| format!("installing {}", link.display()))?;
        changed = true;
    }
    Ok(changed)
}

/// The release's published sha256 of the binary, from its `sha256sum-amd64.txt` (when the plan
/// names it), as a cross-check the download must also pass: the bytes must match both the
/// plan's pin (sha256 or sha512) and the release. A sha256 pin that already disagrees with the
/// release is refused before anything is downloaded.
pub fn check_release_pin(fetcher: &Fetcher, k3s: &kiln_plan::K3s) -> Result<Option<CrossCheck>> {
    let Some(url) = &k3s.checksums_url else {
        return Ok(None);
    };
    let shown = display_url(url);
    let published = checksum_for_k3s(&fetcher.fetch_text(url)?)
        .with_context(|| format!("checking the k3s pin against {shown}"))?;
    if let Digest::Sha256(pinned) = k3s.binary.pin.digest {
        if pinned != published {
            // Permanent: retrying cannot make the plan's pin and the release agree.
            bail!(
                "the plan pins k3s {} at sha256 {pinned}, but the release's checksum file {shown} says {published}",
                k3s.version,
            );
        }
    }
    Ok(Some(CrossCheck {
        source: shown,
        sha256: published,
    }))
}

/// Does the file at `p` hold the artifact's pinned bytes?
pub fn holds(p: &Path, artifact: &Artifact) -> Result<bool> {
    Ok(p.exists() && artifact.pin.matches(&hash_file(p)?))
}

pub struct K3sStep;

impl Step for K3sStep {
    fn id(&self) -> StepId {
        StepId::K3s
    }

    fn check(&self, cx: &mut Cx) -> Result<bool> {
        let bin = cx.root.path(paths::K3S_BIN);
        if !holds(&bin, &cx.plan.k3s.binary)? {
            return Ok(false);
        }
        let u = units(cx.plan);
        Ok(config_current(cx)?
            && images_current(cx)?
            && file_is(cx.root, u.unit_path, u.unit_text.as_bytes(), 0o644)
            && file_is(cx.root, u.env_path, env_text().as_bytes(), 0o600)
            && links_ok(cx.root)
            && systemd::is_enabled(u.unit)?
            && running(u.unit)?)
    }

    fn apply(&self, cx: &mut Cx) -> Result<()> {
        // K3s reads its token files itself: one kept in Key Vault is fetched now, before K3s
        // starts (the daemon never reads it otherwise).
        for f in token_files(cx.plan) {
            cx.ensure_secret(&f)?;
        }
        let k3s = &cx.plan.k3s;
        // A verified copy in the cache was cross-checked when it got there (by this step or by
        // `kiln-firstboot stage` on a baked image): a baked or air-gapped node must not need
        // the release's checksum file, which lives on the network.
        let also = match cx.fetcher.cached(&k3s.binary)? {
            None => check_release_pin(cx.fetcher, k3s)?,
            Some(_) => None,
        };
        let mut changed =
            cx.fetcher
                .install_checked(&k3s.binary, also.as_ref(), paths::K3S_BIN, 0o755)?;
        // Before K3s (re)starts: it imports the archives in this dir when it starts.
        for image in &k3s.images {
            changed |= cx.fetcher.install(image, &image_path(&image.name), 0o644)?;
        }
        let cfg = config_yaml(cx.plan, cx.facts)?;
        changed |= write_if_changed(cx.root, paths::K3S_CONFIG, cfg.as_bytes(), 0o600)?;
        let u = units(cx.plan);
        let unit_changed = write_if_changed(cx.root, u.unit_path, u.unit_text.as_bytes(), 0o644)?;
        let env_changed = write_if_changed(cx.root, u.env_path, env_text().as_bytes(), 0o600)?;
        ensure_links(cx.root)?;
        changed |= unit_changed || env_changed;
        if unit_changed || env_changed {
            systemd::daemon_reload()?;
        }
        if !systemd::is_enabled(u.unit)? {
            systemd::enable(u.unit)?;
        }
        let digest = applied_digest(cx)?;
        let stale = !file_is(cx.root, APPLIED_MARKER, digest.as_bytes(), 0o600);
        if !running(u.unit)? {
            systemd::start(u.unit)?;
        } else if changed || stale {
            systemd::restart(u.unit)?;
        }
        write_atomic(&cx.root.path(APPLIED_MARKER), digest.as_bytes(), 0o600)?;
        Ok(())
    }

    fn verify(&self, cx: &mut Cx) -> Result<()> {
        // An agent has no admin kubeconfig: it proves its join by the kubelet's credentials.
        if cx.plan.is_agent() {
            crate::k3s_agent::wait_joined(cx)
        } else {
            wait_ready(cx)
        }
    }
}

/// The secret files K3s itself reads: an agent's `token-file`, a server's `agent-token-file`.
pub fn token_files(plan: &Plan) -> Vec<String> {
    let mut v = Vec::new();
    if let kiln_plan::Role::Agent { token_file, .. } = &plan.node.role {
        v.push(token_file.clone());
    }
    if let Some(Value::String(f)) = plan.k3s.config.get("agent-token-file") {
        v.push(f.clone());
    }
    v
}

fn image_path(name: &str) -> String {
    format!("{}/{name}", paths::K3S_AGENT_IMAGES)
}

/// Are the plan's image archives in the agent images dir with their pinned content?
fn images_current(cx: &Cx) -> Result<bool> {
    for image in &cx.plan.k3s.images {
        let p = cx.root.path(image_path(&image.name));
        if !holds(&p, image)? {
            return Ok(false);
        }
    }
    Ok(true)
}

// ---- the auto-deploy manifests directory ---------------------------------------------------

/// Copies the bundled manifests of `step` from the unpacked bundle into the K3s manifests dir,
/// each verified against the plan's sha256 first. Returns whether any file was written.
pub fn install_bundled(cx: &Cx, step: StepId) -> Result<bool> {
    let mut changed = false;
    for m in cx.plan.manifests.iter().filter(|m| m.step == step) {
        let dst = cx.root.path(manifest_path(&m.file));
        if dst.exists() && sha256_file(&dst)? == m.sha256 {
            continue;
        }
        let src = cx
            .root
            .path(format!("{}/manifests/{}", paths::BUNDLE_DIR, m.file));
        let got = sha256_file(&src)
            .with_context(|| format!("bundled manifest {} for step {step}", m.file))?;
        if got != m.sha256 {
            bail!(
                "bundled manifest {} has sha256 {got}, but the plan pins {}; refusing to install it",
                src.display(),
                m.sha256
            );
        }
        copy_atomic(&src, &dst, 0o644)?;
        changed = true;
    }
    Ok(changed)
}

/// Are the bundled manifests of `step` in place with the pinned content?
pub fn bundled_current(cx: &Cx, step: StepId) -> Result<bool> {
    for m in cx.plan.manifests.iter().filter(|m| m.step == step) {
        let dst = cx.root.path(manifest_path(&m.file));
        if !dst.exists() || sha256_file(&dst)? != m.sha256 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The bundled manifest file names of `step`.
pub fn bundled_files(plan: &Plan, step: StepId) -> Vec<String> {
    plan.manifests
        .iter()
        .filter(|m| m.step == step)
        .map(|m| m.file.clone())
        .collect()
}

pub fn manifest_path(file: &str) -> String {
    format!("{}/{file}", paths::K3S_MANIFESTS)
}

/// Waits until K3s has an `Addon` for each file whose checksum is the file's current sha256,
/// i.e. the deploy controller applied exactly what is on disk.
pub fn wait_addons(cx: &Cx, files: &[String]) -> Result<()> {
    let mut want = BTreeMap::new();
    for f in files {
        let sum = sha256_file(&cx.root.path(manifest_path(f)))?;
        want.insert(addon_name(f).to_string(), sum.to_hex());
    }
    let root = cx.root.clone();
    cx.wait_for(
        &format!("K3s to apply {}", files.join(", ")),
        Duration::from_millis(500),
        || Ok(addons_match(&root, &want)?.then_some(())),
    )
}

/// Do the Addons in kube-system carry these names with these checksums?
pub fn addons_match(root: &Root, want: &BTreeMap<String, String>) -> Result<bool> {
    let v = kubectl_json(root, &["get", "addons", "-n", "kube-system"])?;
    let have: BTreeMap<&str, &str> = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            Some((
                a["metadata"]["name"].as_str()?,
                a["spec"]["checksum"].as_str()?,
            ))
        })
        .collect();
    Ok(want
        .iter()
        .all(|(n, sum)| have.get(n.as_str()) == Some(&sum.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_line_for_k3s_is_found_like_install_sh_greps_it() {
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let sums = format!("{a}  k3s-airgap-images-amd64.tar\n{b}  k3s\n");
        assert_eq!(checksum_for_k3s(&sums).unwrap().to_hex(), b);
        assert!(checksum_for_k3s(&format!("{a}  k3s-arm64\n")).is_err());
        assert!(checksum_for_k3s("zz  k3s\n").is_err());
    }

    #[test]
    fn unit_carries_install_sh_keys_verbatim() {
        for key in [
            "Wants=network-online.target",
            "After=network-online.target",
            "WantedBy=multi-user.target",
            "Type=notify",
            "EnvironmentFile=-/etc/default/%N",
            "EnvironmentFile=-/etc/sysconfig/%N",
            "EnvironmentFile=-/etc/systemd/system/k3s.service.env",
            "KillMode=process",
            "Delegate=yes",
            "User=root",
            "LimitNOFILE=1048576",
            "LimitNPROC=infinity",
            "LimitCORE=infinity",
            "TasksMax=infinity",
            "TimeoutStartSec=0",
            "Restart=always",
            "RestartSec=5s",
            "ExecStartPre=-/sbin/modprobe br_netfilter",
            "ExecStartPre=-/sbin/modprobe overlay",
            "ExecStart=/usr/local/bin/k3s server",
        ] {
            assert!(unit_text().lines().any(|l| l == key), "missing {key}");
        }
    }
}
