//! `kiln` command line: one `run()` per subcommand.

use crate::pipeline::{self, BuildError};
use crate::render::{self, Rendered};
use crate::resolve::{self, Delivery, Resolved};
use crate::{bench, cmd_qemu, elf};
use anyhow::Result;
use clap::{Parser, Subcommand};
use kiln_plan::{Role, StepId};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "kiln",
    version,
    about = "Build a self-provisioning node from one declarative profile"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Render user-data, custom_data.gz, meta-data, seed.img, bundle.tar.gz and build.json.
    Build(BuildArgs),
    /// Parse, resolve and schema-check a profile without writing anything.
    Validate(ProfileArgs),
    /// Print what the node will do, step by step (secrets redacted).
    Plan(ProfileArgs),
    /// Time `kiln build` against `cloud-localds` making only the seed, in the same run.
    Bench(bench::Args),
    /// Boot a profile's payload in a local QEMU VM.
    Qemu(cmd_qemu::Args),
    /// Bake a base image with the profile's daemon and pinned artifacts pre-staged: qcow2 + fixed VHD.
    Bake(crate::bake::Args),
    /// Upload the bundle to Azure Blob Storage and write the url-mode payload.
    Publish(crate::publish::Args),
    /// Azure helpers: `kiln azure terraform PROFILE`.
    Azure(crate::publish::AzureArgs),
    /// GitOps helpers: `kiln gitops check PROFILE --checkout DIR`.
    Gitops(crate::cmd_gitops::Args),
    /// Resolve or refresh every pin from upstream's checksum publications (needs network).
    Lock(crate::lock::Args),
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    pub profile: PathBuf,
    /// Output directory.
    #[arg(short, long, default_value = "out")]
    pub out: PathBuf,
    #[command(flatten)]
    pub daemon: crate::opts::DaemonOpts,
    /// Run `kiln gitops check` on this checkout first and refuse to build on findings.
    #[arg(long)]
    pub gitops_checkout: Option<PathBuf>,
    /// Compress every bundle member and check the schemas again instead of reusing kiln's
    /// cache (`~/.cache/kiln`: gz-members/, schema-ok/; the output bytes are the same either way).
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    pub profile: PathBuf,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Build(a) => report(run_build(&a)),
        Command::Validate(a) => report(run_validate(&a)),
        Command::Plan(a) => report(run_plan(&a)),
        Command::Bench(a) => report(bench::run(&a).map_err(BuildError::Other)),
        Command::Qemu(a) => cmd_qemu::run(a),
        Command::Bake(a) => report(crate::bake::run(&a)),
        Command::Publish(a) => report(crate::publish::run(&a)),
        Command::Azure(a) => report(crate::publish::run_azure(&a)),
        Command::Gitops(a) => crate::cmd_gitops::run(a),
        Command::Lock(a) => report(crate::lock::run(&a)),
    }
}

fn report(r: Result<(), BuildError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(BuildError::Profile(e)) => {
            eprintln!("{:?}", miette::Report::new(*e));
            ExitCode::from(2)
        }
        Err(BuildError::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

pub fn run_build(a: &BuildArgs) -> Result<(), BuildError> {
    let epoch = render::source_date_epoch()?;
    // Profile errors first: they need no daemon.
    let (loaded, resolved) = pipeline::resolve(&a.profile, &resolve::process_env)?;
    if let Some(dir) = &a.gitops_checkout {
        crate::cmd_gitops::gate(&resolved, &a.profile, dir)?;
    }
    let daemon_path = a.daemon.find()?;
    let daemon = elf::load_daemon(&daemon_path)?;
    let cache = if a.no_cache {
        None
    } else {
        crate::gzcache::Cache::user_default()
    };
    let rendered = pipeline::render_resolved(
        &a.profile,
        &loaded,
        &resolved,
        &daemon,
        epoch,
        cache.as_ref(),
    )?;
    pipeline::write_outputs(&a.out, &rendered)?;
    warn(&rendered.warnings);
    print!("{}", summary(&a.out, &rendered));
    Ok(())
}

pub fn summary(out: &Path, r: &Rendered) -> String {
    let mut s = format!(
        "kiln: built {} into {}\n",
        r.plan.node.hostname,
        out.display()
    );
    for ((name, data), sum) in r.files.iter().zip(&r.sums) {
        s.push_str(&format!(
            "  {:<16} {:>9} bytes  sha256 {}\n",
            name,
            data.len(),
            sum
        ));
    }
    if let Some(u) = &r.bundle_url {
        s.push_str(&format!("  publish bundle.tar.gz at {u}\n"));
    }
    s.push_str(&r.budget.table());
    s
}

pub fn run_validate(a: &ProfileArgs) -> Result<(), BuildError> {
    let (_, resolved) = pipeline::resolve(&a.profile, &resolve::process_env)?;
    // The schema and budget checks need a rendered payload; a stand-in daemon is enough for
    // url delivery (the bundle is not in custom_data) and gives a lower bound for inline.
    let fake = elf::tiny_static_elf();
    let (_, rendered) = pipeline::build(&a.profile, &fake, 0, &resolve::process_env)?;
    warn(&resolved.warnings);
    println!(
        "{}: valid (cloud-init 22.4.2 and 26.1 schemas; custom_data.gz {} bytes in {} delivery)",
        a.profile.display(),
        rendered.budget.custom_data_gz,
        resolved.delivery.name()
    );
    Ok(())
}

pub fn run_plan(a: &ProfileArgs) -> Result<(), BuildError> {
    let (_, resolved) = pipeline::resolve(&a.profile, &resolve::process_env)?;
    warn(&resolved.warnings);
    print!("{}", describe(&resolved));
    Ok(())
}

/// What the node will do, in order. Secrets appear only as `<redacted>` with their source.
pub fn describe(r: &Resolved) -> String {
    let p = &r.plan;
    let mut s = String::new();
    let mut line = |t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    line(format!(
        "node {} ({})",
        p.node.hostname,
        match &p.node.role {
            Role::Server => "K3s server".to_string(),
            Role::Agent { server, .. } => format!("K3s agent of {server}"),
        }
    ));
    line("cloud-init (first boot):".into());
    line(format!(
        "  - hostname {}, timezone {}{}, admin user {} ({} SSH key(s), no password, sudo)",
        r.cloud.hostname,
        r.cloud.timezone,
        r.cloud
            .locale
            .as_deref()
            .map(|l| format!(", locale {l}"))
            .unwrap_or_default(),
        r.cloud.admin_user,
        r.cloud.ssh_authorized_keys.len()
    ));
    line(format!("  - write {} (0644)", kiln_plan::paths::PLAN));
    for sec in &r.secrets {
        line(format!(
            "  - write {} (0600 root) = <redacted> from {} ({})",
            sec.node_path, sec.source, sec.key
        ));
    }
    for v in p.key_vault.iter().flat_map(|kv| &kv.secrets) {
        line(format!(
            "  - kiln-firstboot reads {} (0600 root) from Key Vault {} secret {} with the managed identity ({})",
            v.file, v.vault, v.secret, v.key
        ));
    }
    match &r.delivery {
        Delivery::Url { base } => line(format!(
            "  - bootstrap: download {base}bundle-<sha256>.tar.gz, verify its sha256 with sha256sum, unpack, install and start kiln-firstboot"
        )),
        Delivery::Seed => line(
            "  - bootstrap: copy bundle.tar.gz from the CIDATA seed volume (read-only), verify its sha256 with sha256sum, unpack, install and start kiln-firstboot".into(),
        ),
    }
    line(format!(
        "kiln-firstboot steps{}:",
        if p.artifacts.air_gap {
            " (air-gap: no downloads)"
        } else {
            ""
        }
    ));
    for (i, step) in p.step_order().into_iter().enumerate() {
        let d = p.deadline(step).as_secs();
        let what = describe_step(p, step);
        line(format!("  {}. {step} (deadline {d}s): {what}", i + 1));
    }
    s
}

/// One line of `kiln plan` per step: what the node will do.
fn describe_step(p: &kiln_plan::Plan, step: StepId) -> String {
    if !p.applies(step) {
        return "not applicable: a server step, and this node is a K3s agent".into();
    }
    let na = || "not applicable".to_string();
    match step {
        StepId::K3s => format!(
            "install K3s {} from {} (pin {}), write {} {}, {}",
            p.k3s.version,
            p.k3s.binary.url,
            p.k3s.binary.pin,
            kiln_plan::paths::K3S_CONFIG,
            serde_json::to_string(&p.k3s.config).unwrap_or_default(),
            match &p.node.role {
                Role::Server => "start k3s and wait until the node is Ready".to_string(),
                Role::Agent { server, .. } => format!(
                    "add node-ip = the tailnet address, start k3s-agent joining {server} over the tailnet"
                ),
            }
        ),
        StepId::Tailscale => format!(
            "install Tailscale {} from {} (pin {}), join the tailnet as {}{} with the auth key <redacted>",
            p.tailscale.version,
            p.tailscale.tarball.url,
            p.tailscale.tarball.pin,
            p.tailscale.hostname,
            if p.tailscale.tags.is_empty() { String::new() } else { format!(" tagged {}", p.tailscale.tags.join(",")) }
        ),
        StepId::TailscaleOperator => match p.operator() {
            Ok(o) => format!(
                "install the tailscale-operator chart {} from {} into namespace {} (OAuth client {}, secret <redacted>), ingress class {}, device {}",
                o.chart_version, o.chart_repo, o.namespace, o.oauth_client_id, o.ingress_class, o.hostname
            ),
            Err(_) => na(),
        },
        StepId::Argocd => match p.argocd() {
            Ok(a) => format!(
                "install Argo CD {} from {} (pin {}) into namespace {}, expose argocd-server on the tailnet as {} (ingress class {})",
                a.version, a.manifest.url, a.manifest.pin, a.namespace, a.ingress_host, a.ingress_class
            ),
            Err(_) => na(),
        },
        StepId::Gitops => match p.gitops() {
            Ok(g) => format!(
                "create the root Application {} for {} at {} path {} ({}){} (automated sync, prune, self-heal)",
                g.app_name,
                g.repo_url,
                g.revision,
                g.path,
                serde_json::to_string(&g.source).unwrap_or_default(),
                match &g.credentials {
                    Some(c) => format!(", repository credentials {} / <redacted>", c.username),
                    None => String::new(),
                }
            ),
            Err(_) => na(),
        },
        StepId::Verify if p.is_agent() => "check the k3s-agent unit is running, the kubelet registered with the server, and the node is Running on the tailnet".into(),
        StepId::Verify => "check node Ready, every manifest applied, Helm installs complete, root Application present; report sync/health".into(),
    }
}
