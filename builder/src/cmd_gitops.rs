//! `kiln gitops check PROFILE --checkout DIR [--format json]`: the root Application's source,
//! checked offline against a local clone of the GitOps repository the way Argo CD v3.4.7's
//! repo-server would read it. Exit 0 clean, 1 with findings, 2 on usage errors (bad profile,
//! missing checkout). `kiln build --gitops-checkout DIR` runs the same check first.

use crate::gitops::{self, report, Report, Root};
use crate::pipeline::{self, BuildError};
use crate::resolve::{self, Resolved};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: GitopsCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum GitopsCommand {
    /// Check a checkout of the GitOps repository against the profile's root Application.
    Check(CheckArgs),
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    pub profile: PathBuf,
    /// A local clone of the repository `argocd.gitops.repo` names, at the revision to check.
    #[arg(long)]
    pub checkout: PathBuf,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// The root Application as the profile resolves it.
pub fn root(r: &Resolved, profile: &Path) -> anyhow::Result<Root> {
    let g = r.plan.gitops().map_err(|_| {
        anyhow::anyhow!(
            "{} is an agent's profile: agents have no GitOps repository (it is the server's)",
            profile.display()
        )
    })?;
    Ok(Root {
        name: g.app_name.clone(),
        repo_url: g.repo_url.to_string(),
        path: g.path.clone(),
        source: g.source.clone(),
        defined_in: format!("{} (argocd.gitops)", profile.display()),
    })
}

/// Runs the check of `checkout` for a resolved profile.
pub fn check(r: &Resolved, profile: &Path, checkout: &Path) -> anyhow::Result<Report> {
    if !checkout.is_dir() {
        anyhow::bail!("--checkout {}: not a directory", checkout.display());
    }
    gitops::check(checkout, &root(r, profile)?)
        .with_context(|| format!("reading the checkout {}", checkout.display()))
}

pub fn run(a: Args) -> ExitCode {
    let GitopsCommand::Check(c) = a.command;
    let resolved = match pipeline::resolve(&c.profile, &resolve::process_env) {
        Ok((_, r)) => r,
        Err(e) => {
            eprintln!("{:?}", miette::Report::new(e));
            return ExitCode::from(2);
        }
    };
    let rep = match check(&resolved, &c.profile, &c.checkout) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match c.format {
        Format::Text => print!("{}", report::text(&rep, &c.checkout.display().to_string())),
        Format::Json => print!("{}", report::json(&rep)),
    }
    if rep.findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `kiln build --gitops-checkout DIR`: refuse to build on findings.
pub fn gate(r: &Resolved, profile: &Path, checkout: &Path) -> Result<(), BuildError> {
    let rep = check(r, profile, checkout)?;
    if rep.findings.is_empty() {
        return Ok(());
    }
    eprint!("{}", report::text(&rep, &checkout.display().to_string()));
    Err(BuildError::Other(anyhow::anyhow!(
        "refusing to build: `kiln gitops check` found {} problem(s) in {} that would stop Argo CD",
        rep.findings.len(),
        checkout.display()
    )))
}
