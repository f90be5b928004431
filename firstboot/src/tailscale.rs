//! Tailscale: the static tarball (`tailscale`, `tailscaled`, their unit), joining the tailnet
//! with the auth key, the node's tailnet facts, and the Kubernetes operator (its OAuth Secret
//! rendered here on the node, its HelmChart shipped in the bundle).

use crate::cmd::Cmd;
use crate::download::sha256_file;
use crate::engine::{Cx, Step};
use crate::fs::{copy_atomic, write_atomic, Root};
use crate::k3s;
use crate::retry::Transient;
use crate::systemd;
use anyhow::{bail, Context, Result};
use kiln_plan::manifests::{self, TAILSCALE_OAUTH_FILE};
use kiln_plan::{paths, StepId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

pub const UNIT: &str = "tailscaled.service";
/// What was installed from which tarball, so a re-run can tell without unpacking again.
const INSTALLED: &str = "/var/lib/kiln/tailscale.installed.json";
const STAGING: &str = "/var/lib/kiln/staging/tailscale";
pub const FACT_IPS: &str = "tailscale.ips";

/// Tarball member (after the `tailscale_<ver>_amd64/` directory) → node path and mode, as the
/// Debian package lays them out.
const MEMBERS: [(&str, &str, u32); 4] = [
    ("tailscale", paths::TAILSCALE_BIN, 0o755),
    ("tailscaled", paths::TAILSCALED_BIN, 0o755),
    ("systemd/tailscaled.service", paths::TAILSCALED_UNIT, 0o644),
    (
        "systemd/tailscaled.defaults",
        paths::TAILSCALED_DEFAULTS,
        0o644,
    ),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Installed {
    tarball: String,
    files: BTreeMap<String, String>,
}

fn read_installed(root: &Root) -> Option<Installed> {
    let bytes = fs::read(root.path(INSTALLED)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn installed_current(cx: &Cx) -> Result<bool> {
    let Some(inst) = read_installed(cx.root) else {
        return Ok(false);
    };
    if inst.tarball != cx.plan.tailscale.tarball.pin.digest.to_string() {
        return Ok(false);
    }
    for (_, node_path, _) in MEMBERS {
        let p = cx.root.path(node_path);
        if !p.exists() || Some(&sha256_file(&p)?.to_hex()) != inst.files.get(node_path) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Unpacks the verified tarball, installing each member atomically where it differs.
/// Returns (anything changed, unit file changed).
fn install_tarball(cx: &Cx) -> Result<(bool, bool)> {
    let ts = &cx.plan.tailscale;
    let tgz = cx.fetcher.fetch(&ts.tarball)?;
    let top = format!("tailscale_{}_amd64/", ts.version.bare());
    let staging = cx.root.path(STAGING);
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let f = fs::File::open(&tgz).with_context(|| format!("opening {}", tgz.display()))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut staged = BTreeMap::new();
    for entry in ar
        .entries()
        .with_context(|| format!("reading {}", tgz.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading {}", tgz.display()))?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let Some(member) = name.strip_prefix(&top) else {
            continue;
        };
        if let Some((m, node_path, mode)) = MEMBERS.iter().find(|(m, _, _)| *m == member) {
            let dst = staging.join(m.replace('/', "_"));
            let mut out =
                fs::File::create(&dst).with_context(|| format!("creating {}", dst.display()))?;
            std::io::copy(&mut entry, &mut out)
                .with_context(|| format!("unpacking {member} from {}", tgz.display()))?;
            staged.insert(*node_path, (dst, *mode));
        }
    }
    let mut files = BTreeMap::new();
    let (mut changed, mut unit_changed) = (false, false);
    for (member, node_path, _) in MEMBERS {
        let (src, mode) = staged
            .get(node_path)
            .with_context(|| format!("{} has no {top}{member}", tgz.display()))?;
        let sum = sha256_file(src)?;
        let dst = cx.root.path(node_path);
        let same = dst.exists() && sha256_file(&dst)? == sum && k3s::file_mode(&dst) == Some(*mode);
        if !same {
            copy_atomic(src, &dst, *mode)?;
            changed = true;
            unit_changed |= node_path == paths::TAILSCALED_UNIT;
        }
        files.insert(node_path.to_string(), sum.to_hex());
    }
    let _ = fs::remove_dir_all(&staging);
    let inst = Installed {
        tarball: ts.tarball.pin.digest.to_string(),
        files,
    };
    let bytes = serde_json::to_vec_pretty(&inst)?;
    k3s::write_if_changed(cx.root, INSTALLED, &bytes, 0o644)?;
    Ok((changed, unit_changed))
}

/// What kiln reads from `tailscale status --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub backend_state: String,
    pub ips: Vec<String>,
    /// FQDN without the trailing dot (`node.tailnet.ts.net`).
    pub dns_name: String,
}

pub fn parse_status(json: &str) -> Result<Status> {
    let v: Value = serde_json::from_str(json).context("parsing `tailscale status --json`")?;
    let backend_state = v["BackendState"]
        .as_str()
        .context("`tailscale status --json` has no BackendState")?
        .to_string();
    let ips = v["TailscaleIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect();
    let dns_name = v["Self"]["DNSName"]
        .as_str()
        .unwrap_or("")
        .trim_end_matches('.')
        .to_string();
    Ok(Status {
        backend_state,
        ips,
        dns_name,
    })
}

fn tailscale(root: &Root) -> Cmd {
    Cmd::new(root.path(paths::TAILSCALE_BIN))
}

/// `tailscale status --json`; failing to reach tailscaled is [`Transient`] (it may be starting).
pub fn status(root: &Root) -> Result<Status> {
    let out = tailscale(root)
        .args(["status", "--json"])
        .timeout(Duration::from_secs(30))
        .run()
        .map_err(|e| Transient(format!("{e:#}")))?;
    parse_status(&out)
}

fn record_facts(cx: &mut Cx, st: &Status) {
    cx.facts.insert(FACT_IPS.into(), st.ips.join(","));
    if let Some(v4) = st.ips.iter().find(|ip| !ip.contains(':')) {
        cx.facts.insert(k3s::FACT_TS_IPV4.into(), v4.clone());
    }
    if !st.dns_name.is_empty() {
        cx.facts
            .insert(k3s::FACT_TS_DNS.into(), st.dns_name.clone());
    }
}

fn facts_match(cx: &Cx, st: &Status) -> bool {
    cx.facts.get(FACT_IPS) == Some(&st.ips.join(","))
        && (st.dns_name.is_empty() || cx.facts.get(k3s::FACT_TS_DNS) == Some(&st.dns_name))
}

fn auth_key_present(cx: &Cx) -> bool {
    cx.plan
        .tailscale
        .auth_key_file
        .as_ref()
        .is_some_and(|p| cx.root.path(p).exists())
}

/// The `tailscale up` command line (the key is passed as `file:PATH`, never as a value).
pub fn up_args(plan: &kiln_plan::Plan, key_file: Option<&str>) -> Vec<String> {
    let ts = &plan.tailscale;
    let mut a = vec!["up".to_string()];
    if let Some(k) = key_file {
        a.push("--auth-key".into());
        a.push(format!("file:{k}"));
    }
    if let Some(server) = &ts.login_server {
        a.push("--login-server".into());
        // As users write it (`https://hs.example.com`); the client trims the slash anyway.
        a.push(server.as_str().trim_end_matches('/').to_string());
    }
    a.push("--hostname".into());
    a.push(ts.hostname.clone());
    if !ts.tags.is_empty() {
        a.push("--advertise-tags".into());
        a.push(ts.tags.join(","));
    }
    a
}

fn wait_running(cx: &Cx) -> Result<Status> {
    let root = cx.root.clone();
    cx.wait_for(
        "Tailscale BackendState Running",
        Duration::from_millis(500),
        || {
            let st = status(&root)?;
            Ok((st.backend_state == "Running" && !st.ips.is_empty()).then_some(st))
        },
    )
}

/// Where tailscaled keeps its node key and login state (`--statedir`).
const TAILSCALED_STATE_DIR: &str = "/var/lib/tailscale";

pub struct TailscaleStep;

impl Step for TailscaleStep {
    fn id(&self) -> StepId {
        StepId::Tailscale
    }

    fn check(&self, cx: &mut Cx) -> Result<bool> {
        if !installed_current(cx)? || !systemd::is_enabled(UNIT)? || !k3s::running(UNIT)? {
            return Ok(false);
        }
        // After a reboot tailscaled may still be starting: give it a moment to settle (a
        // bounded one: apply handles whatever state it ends up in).
        let until = std::time::Instant::now() + Duration::from_secs(15);
        let st = loop {
            match status(cx.root) {
                Ok(st) if !matches!(st.backend_state.as_str(), "NoState" | "Starting") => break st,
                _ if std::time::Instant::now() >= until => return Ok(false),
                _ => std::thread::sleep(Duration::from_millis(300)),
            }
        };
        if st.backend_state != "Running" || auth_key_present(cx) || !facts_match(cx, &st) {
            return Ok(false);
        }
        // On an agent K3s comes after this step, and its k3s step writes the tailnet address.
        if cx.plan.is_agent() {
            return Ok(true);
        }
        k3s::config_current(cx)
    }

    fn apply(&self, cx: &mut Cx) -> Result<()> {
        let (changed, unit_changed) = install_tarball(cx)?;
        if unit_changed {
            systemd::daemon_reload()?;
        }
        if !systemd::is_enabled(UNIT)? {
            systemd::enable(UNIT)?;
        }
        if !k3s::running(UNIT)? {
            systemd::start(UNIT)?;
        } else if changed {
            systemd::restart(UNIT)?;
        }
        // Right after a (re)start tailscaled reports NoState/Starting for a moment; only a
        // settled state says whether the node must log in.
        let root = cx.root.clone();
        let st = cx.wait_for("tailscaled to settle", Duration::from_millis(300), || {
            let st = status(&root)?;
            Ok((!matches!(st.backend_state.as_str(), "NoState" | "Starting")).then_some(st))
        })?;
        match st.backend_state.as_str() {
            "Running" => {}
            "NeedsMachineAuth" => {
                return Err(Transient(
                    "Tailscale: the device waits for approval in the admin console (use a pre-approved auth key to avoid this)".into(),
                )
                .into())
            }
            state => {
                // Rebuild identity (issue 8, tailscale_api.rs, owned by the rebuild work): a
                // logged-out node first deletes stale devices holding its names through the
                // Tailscale API, so it joins as HOSTNAME and not HOSTNAME-1, and with
                // `mint-auth-key` writes a fresh one-off key to the auth key file used below.
                // A no-op without `tailscale.api` in the plan; Stopped keeps its identity.
                if state != "Stopped" {
                    crate::tailscale_api::before_join(cx)?;
                }
                // NeedsLogin needs the key; Stopped (someone ran `tailscale down`) comes back
                // up with the same flags, with the key if it is still there. A key kept in
                // Key Vault is read from it now (keyvault.rs).
                if let (Some(k), false) = (&cx.plan.tailscale.auth_key_file, state == "Stopped") {
                    cx.ensure_secret(k)?;
                }
                let key = cx
                    .plan
                    .tailscale
                    .auth_key_file
                    .clone()
                    .filter(|k| cx.root.path(k).exists());
                if key.is_none() && state != "Stopped" {
                    match &cx.plan.tailscale.auth_key_file {
                        None => bail!(
                            "Tailscale is {state} and the plan has no auth key to log in with"
                        ),
                        Some(k) => bail!(
                            "Tailscale is {state} and the auth key file {k} is gone (it is removed once the node has joined; a node that lost its Tailscale state needs a new key)"
                        ),
                    }
                }
                tailscale(cx.root)
                    .args(up_args(cx.plan, key.as_deref()))
                    .deadline(cx.deadline)
                    .run()?;
            }
        }
        let st = wait_running(cx)?;
        record_facts(cx, &st);
        tracing::info!(ips = %st.ips.join(","), name = %st.dns_name, "tailscale is Running");
        if let Some(key) = &cx.plan.tailscale.auth_key_file {
            let p = cx.root.path(key);
            // The key is the only way back in if tailscaled's state were lost: its state must
            // be on disk before the key goes. tailscaled does not fsync it, and a hard reset
            // right after this step otherwise came back NeedsLogin with no key (VM chaos test).
            let state_dir = cx.root.path(TAILSCALED_STATE_DIR);
            crate::fs::sync_filesystem(if state_dir.is_dir() {
                &state_dir
            } else {
                p.parent().unwrap_or(Path::new("/"))
            })?;
            match fs::remove_file(&p) {
                Ok(()) => crate::fs::sync_dir(p.parent().unwrap_or(Path::new("/")))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
            }
        }
        // K3s's serving certificate should also be valid for the node's tailnet name (a
        // server's; an agent's K3s starts after this step, with the tailnet address).
        if !cx.plan.is_agent() {
            k3s::reconcile_config(cx)?;
        }
        Ok(())
    }

    fn verify(&self, cx: &mut Cx) -> Result<()> {
        let st = wait_running(cx)?;
        record_facts(cx, &st);
        if auth_key_present(cx) {
            bail!("the Tailscale auth key file is still present although the node is Running");
        }
        Ok(())
    }
}

// ---- the Kubernetes operator ---------------------------------------------------------------

fn oauth_manifest(cx: &Cx) -> Result<Vec<u8>> {
    let secret = cx.read_secret(&cx.plan.operator()?.oauth_client_secret_file)?;
    Ok(manifests::tailscale_oauth_secret(cx.plan, &secret))
}

fn operator_files(cx: &Cx) -> Vec<String> {
    let mut files = k3s::bundled_files(cx.plan, StepId::TailscaleOperator);
    files.push(TAILSCALE_OAUTH_FILE.to_string());
    files
}

fn chart_path(name: &str) -> String {
    format!("{}/{name}", paths::K3S_STATIC_CHARTS)
}

/// The pinned chart archive, when the plan has one, is in K3s's static charts dir.
fn chart_current(cx: &Cx) -> Result<bool> {
    let Some(chart) = &cx.plan.operator()?.chart_archive else {
        return Ok(true);
    };
    let p = cx.root.path(chart_path(&chart.name));
    k3s::holds(&p, chart)
}

pub struct TailscaleOperatorStep;

impl Step for TailscaleOperatorStep {
    fn id(&self) -> StepId {
        StepId::TailscaleOperator
    }

    fn check(&self, cx: &mut Cx) -> Result<bool> {
        Ok(chart_current(cx)?
            && k3s::bundled_current(cx, StepId::TailscaleOperator)?
            && k3s::file_is(
                cx.root,
                &k3s::manifest_path(TAILSCALE_OAUTH_FILE),
                &oauth_manifest(cx)?,
                0o600,
            ))
    }

    fn apply(&self, cx: &mut Cx) -> Result<()> {
        // The Secret first: the operator pod cannot start without it.
        let secret = oauth_manifest(cx)?;
        let path = k3s::manifest_path(TAILSCALE_OAUTH_FILE);
        if !k3s::file_is(cx.root, &path, &secret, 0o600) {
            write_atomic(&cx.root.path(&path), &secret, 0o600)?;
        }
        // The archive before the HelmChart that points at it.
        if let Some(chart) = &cx.plan.operator()?.chart_archive {
            cx.fetcher.install(chart, &chart_path(&chart.name), 0o644)?;
        }
        k3s::install_bundled(cx, StepId::TailscaleOperator)?;
        Ok(())
    }

    fn verify(&self, cx: &mut Cx) -> Result<()> {
        k3s::wait_addons(cx, &operator_files(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_passes_the_key_as_a_file_reference_and_tags_comma_joined() {
        // The test plan the integration tests use (written by steps_upstream).
        let plan: kiln_plan::Plan =
            serde_json::from_str(include_str!("../../tests/golden/manifests/plan.json")).unwrap();
        let a = up_args(&plan, Some("/etc/kiln/secrets/tailscale-auth-key"));
        assert_eq!(
            a,
            [
                "up",
                "--auth-key",
                "file:/etc/kiln/secrets/tailscale-auth-key",
                "--hostname",
                "ameciclo",
                "--advertise-tags",
                "tag:k8s"
            ]
        );
        assert_eq!(
            up_args(&plan, None),
            [
                "up",
                "--hostname",
                "ameciclo",
                "--advertise-tags",
                "tag:k8s"
            ]
        );
    }

    #[test]
    fn status_json_gives_state_ips_and_dns_name_without_dot() {
        let st = parse_status(
            r#"{"BackendState":"Running","TailscaleIPs":["100.64.1.2","fd7a::1"],
                "Self":{"DNSName":"node.tail1.ts.net."}}"#,
        )
        .unwrap();
        assert_eq!(st.backend_state, "Running");
        assert_eq!(st.ips, ["100.64.1.2", "fd7a::1"]);
        assert_eq!(st.dns_name, "node.tail1.ts.net");
        let st =
            parse_status(r#"{"BackendState":"NeedsLogin","TailscaleIPs":null,"Self":{}}"#).unwrap();
        assert!(st.ips.is_empty() && st.dns_name.is_empty());
        assert!(parse_status("{}").is_err());
    }
}
