//! `kiln publish`: put a profile's bundle in Azure Blob Storage and write the url-mode payload.
//!
//! Flow: build the bundle → upload it as `bundle-<sha256>.tar.gz` (skipped when a blob of that
//! name already serves exactly those bytes; otherwise staged in blocks with progress, retried on
//! transient failures, and read back to prove the hash) → sign a read-only, single-blob SAS URL
//! that expires at the profile's/CLI's date → render `custom_data.gz` whose bootstrap downloads that
//! URL and checks the sha256 before anything runs. Why a SAS and not public-read or managed
//! identity: see docs/azure.md.

pub mod account;
pub mod expiry;
pub mod sas;
pub mod shared_key;
pub mod terraform;
pub mod upload;
pub mod vhd;

pub use account::{RetrySettings, StorageAccount};
pub use upload::{bundle_blob_name, Outcome};

use crate::pipeline::{self, BuildError};
use crate::render::{self, Inputs, Rendered};
use crate::resolve::{self, Delivery, Env};
use anyhow::{Context as _, Result};
use azure_core::time::OffsetDateTime;
use kiln_plan::Sha256;
use std::path::{Path, PathBuf};
use url::Url;

/// Where a bundle ended up and how the VM will fetch it.
#[derive(Debug, Clone)]
pub struct PublishedBundle {
    pub sha256: Sha256,
    pub size: u64,
    pub blob_name: String,
    /// The blob URL without a token (safe to print).
    pub blob_url: Url,
    /// The read-only SAS URL baked into the payload. Treat as a credential.
    pub read_url: Url,
    pub expiry: OffsetDateTime,
    pub outcome: Outcome,
}

/// Uploads `bundle` content-addressed into `container` and signs a read URL for it.
pub async fn publish_bundle(
    account: &StorageAccount,
    container: &str,
    bundle: &[u8],
    expiry: OffsetDateTime,
    retry: RetrySettings,
    progress: &indicatif::ProgressBar,
) -> Result<PublishedBundle> {
    expiry::check_in_future(expiry)?;
    let sha256 = Sha256::digest(bundle);
    let blob_name = bundle_blob_name(&sha256);
    let client = account.container_client(container, retry)?;
    upload::ensure_container(&client).await?;
    let outcome =
        upload::upload_verified(&client, &blob_name, bundle, "application/gzip", progress).await?;
    let blob_url = account.blob_url(container, &blob_name)?;
    let read_url = account
        .read_sas_url(container, &blob_name, expiry)
        .with_context(|| format!("signing a read URL for {blob_url}"))?;
    Ok(PublishedBundle {
        sha256,
        size: bundle.len() as u64,
        blob_name,
        blob_url,
        read_url,
        expiry,
        outcome,
    })
}

/// A baked image uploaded as a page blob.
#[derive(Debug, Clone)]
pub struct PublishedImage {
    pub sha256: Sha256,
    pub size: u64,
    pub blob_name: String,
    /// For `az image create --source` / `azurerm_image` (same subscription: no token needed).
    pub blob_url: Url,
    pub outcome: Outcome,
}

/// Uploads a fixed VHD content-addressed into `container` as a page blob and verifies it.
pub async fn publish_vhd(
    account: &StorageAccount,
    container: &str,
    path: &Path,
    retry: RetrySettings,
    progress: &indicatif::ProgressBar,
) -> Result<PublishedImage> {
    let size = vhd::check_fixed_vhd(path)?;
    let sha256 = vhd::hash_file(path)?;
    let blob_name = vhd::blob_name(path, &sha256);
    let client = account.container_client(container, retry)?;
    upload::ensure_container(&client).await?;
    let outcome = vhd::upload_verified(&client, &blob_name, path, &sha256, progress).await?;
    Ok(PublishedImage {
        sha256,
        size,
        blob_url: account.blob_url(container, &blob_name)?,
        blob_name,
        outcome,
    })
}

/// Runs an async publish step on a small current-thread runtime (the CLI is otherwise sync).
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime for Azure uploads")?;
    Ok(rt.block_on(f))
}

/// `kiln publish PROFILE --container NAME [--account NAME]`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The node profile (its delivery is forced to `url`).
    pub profile: PathBuf,
    /// Storage account; default $AZURE_STORAGE_ACCOUNT or the connection string's AccountName.
    #[arg(long)]
    pub account: Option<String>,
    /// Blob container for bundles; created (private) when missing.
    #[arg(long)]
    pub container: String,
    /// Output directory for user-data, custom_data.gz, build.json, …
    #[arg(short, long, default_value = "out")]
    pub out: PathBuf,
    /// When the bundle's read URL stops working: YYYY-MM-DD, an RFC 3339 time, or <N>d.
    #[arg(long, default_value = expiry::DEFAULT)]
    pub expires: String,
    #[command(flatten)]
    pub daemon: crate::opts::DaemonOpts,
    /// Blob endpoint the VM downloads from, when it differs from the upload endpoint (a proxy,
    /// private-endpoint DNS, a QEMU guest's forwarded address), e.g. http://10.0.2.100:10000/devstoreaccount1
    #[arg(long)]
    pub download_endpoint: Option<Url>,
    /// Also upload this fixed VHD (e.g. from `kiln bake`) as a page blob, for `az image create`.
    #[arg(long)]
    pub vhd: Option<PathBuf>,
}

/// Everything `kiln publish` needs besides the profile path; tests fill it directly.
pub struct Request<'a> {
    pub profile: &'a Path,
    pub daemon: &'a [u8],
    pub epoch: u64,
    pub env: Env<'a>,
    pub account: &'a StorageAccount,
    pub container: &'a str,
    pub expiry: OffsetDateTime,
    pub retry: RetrySettings,
    pub progress: &'a indicatif::ProgressBar,
}

#[derive(Debug)]
pub struct Published {
    /// The url-mode outputs, with the bundle URL (including its SAS) baked into the bootstrap.
    pub rendered: Rendered,
    pub bundle: PublishedBundle,
    pub warnings: Vec<String>,
}

/// Build → upload → sign → render the url-mode payload. Writes nothing locally.
///
/// The bundle does not depend on the delivery URL (the plan carries no URL), so it is rendered
/// once to learn its bytes and hash, uploaded, and the payload rendered again with the signed
/// URL; the two bundles are checked to be identical.
pub fn publish_profile(req: &Request<'_>) -> Result<Published, BuildError> {
    let (_, mut resolved) = pipeline::resolve(req.profile, req.env)?;
    let mut warnings = Vec::new();
    let container_base = req.account.download_container_url(req.container)?;
    match &resolved.delivery {
        Delivery::Seed => warnings.push(format!(
            "{}: delivery is seed; kiln publish renders url delivery",
            req.profile.display()
        )),
        Delivery::Url { base } if *base != container_base => warnings.push(format!(
            "{}: artifacts.bundle-base-url is {base}, but the bundle is published to {container_base}; the payload uses the latter",
            req.profile.display()
        )),
        Delivery::Url { .. } => {}
    }
    let inputs = Inputs {
        daemon: req.daemon,
        epoch: req.epoch,
        profile_name: req.profile.display().to_string(),
        cache: None,
    };

    resolved.delivery = Delivery::Url {
        base: container_base.clone(),
    };
    let unsigned = render::render(&resolved, &inputs)?;
    let bundle = unsigned.file(render::BUNDLE);

    let published = block_on(publish_bundle(
        req.account,
        req.container,
        bundle,
        req.expiry,
        req.retry,
        req.progress,
    ))??;

    let mut signed_base = container_base;
    signed_base.set_query(published.read_url.query());
    resolved.delivery = Delivery::Url { base: signed_base };
    let rendered = render::render(&resolved, &inputs)?;
    if rendered.bundle_sha256 != published.sha256 {
        return Err(anyhow::anyhow!(
            "the bundle changed between renders ({} then {}): rendering is not deterministic",
            published.sha256,
            rendered.bundle_sha256
        )
        .into());
    }
    if rendered.bundle_url.as_ref() != Some(&published.read_url) {
        return Err(anyhow::anyhow!(
            "the payload's bundle URL is not the published blob {}",
            published.blob_url
        )
        .into());
    }
    warnings.extend(rendered.warnings.iter().cloned());
    Ok(Published {
        rendered,
        bundle: published,
        warnings,
    })
}

pub fn run(args: &Args) -> Result<(), BuildError> {
    let epoch = render::source_date_epoch()?;
    // Profile errors first: they need neither the daemon nor credentials.
    pipeline::resolve(&args.profile, &resolve::process_env)?;
    let expiry = expiry::parse(&args.expires, OffsetDateTime::now_utc())?;
    let mut account = StorageAccount::from_env(args.account.as_deref())?;
    if let Some(e) = &args.download_endpoint {
        account = account.with_download_endpoint(e.clone())?;
    }
    let daemon_path = args.daemon.find()?;
    let daemon = crate::elf::load_daemon(&daemon_path)?;
    let progress = upload::progress_bar("uploading bundle");
    let p = publish_profile(&Request {
        profile: &args.profile,
        daemon: &daemon,
        epoch,
        env: &resolve::process_env,
        account: &account,
        container: &args.container,
        expiry,
        retry: RetrySettings::default(),
        progress: &progress,
    })?;
    let image = match &args.vhd {
        Some(path) => Some(block_on(publish_vhd(
            &account,
            &args.container,
            path,
            RetrySettings::default(),
            &upload::progress_bar("uploading VHD"),
        ))??),
        None => None,
    };
    pipeline::write_outputs(&args.out, &p.rendered)?;
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    print!("{}", summary(&args.out, &p));
    if let Some(i) = image {
        println!(
            "kiln: VHD {} ({} bytes, sha256 {}): {}",
            i.blob_url,
            i.size,
            i.sha256,
            match i.outcome {
                Outcome::AlreadyPresent => "already present, upload skipped",
                _ => "uploaded and verified",
            }
        );
    }
    Ok(())
}

/// What was published and written; never prints the SAS token.
pub fn summary(out: &Path, p: &Published) -> String {
    let b = &p.bundle;
    let what = match b.outcome {
        Outcome::Uploaded => "uploaded and verified",
        Outcome::AlreadyPresent => "already present with the same sha256; upload skipped",
        Outcome::Replaced => "replaced a blob with other content, verified",
    };
    let mut s = format!(
        "kiln: published {} ({} bytes, sha256 {})\n  {what}\n  read access: single-blob read-only SAS, expires {}\n",
        b.blob_url,
        b.size,
        b.sha256,
        sas::sas_time(b.expiry)
    );
    s.push_str(&format!("  wrote into {}:\n", out.display()));
    for (name, data) in &p.rendered.files {
        s.push_str(&format!(
            "  {:<16} {:>9} bytes  sha256 {}\n",
            name,
            data.len(),
            Sha256::digest(data)
        ));
    }
    s.push_str(&p.rendered.budget.table());
    s.push_str("  custom_data.gz holds the bundle URL with its SAS token: treat it like the secrets it carries.\n");
    s
}

/// `kiln azure …`
#[derive(clap::Args, Debug)]
pub struct AzureArgs {
    #[command(subcommand)]
    pub command: AzureCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AzureCommand {
    /// Write Terraform for this node: examples/terraform + kiln.auto.tfvars.json from the profile.
    Terraform(TerraformArgs),
}

#[derive(clap::Args, Debug)]
pub struct TerraformArgs {
    pub profile: PathBuf,
    /// Directory for main.tf, variables.tf, outputs.tf and kiln.auto.tfvars.json.
    #[arg(short, long, default_value = "terraform")]
    pub out: PathBuf,
    /// The custom_data.gz `kiln publish` wrote (made absolute when it exists).
    #[arg(long, default_value = "out/custom_data.gz")]
    pub custom_data: PathBuf,
    /// Give the VM a system-assigned identity with read access to the bundle container.
    #[arg(long)]
    pub managed_identity: bool,
    /// Bundle storage account (needed with --managed-identity).
    #[arg(long)]
    pub account: Option<String>,
    /// Bundle container (with --managed-identity).
    #[arg(long)]
    pub container: Option<String>,
}

pub fn run_azure(args: &AzureArgs) -> Result<(), BuildError> {
    match &args.command {
        AzureCommand::Terraform(t) => run_terraform(t),
    }
}

pub fn terraform_vars(t: &TerraformArgs, env: Env<'_>) -> Result<terraform::Vars, BuildError> {
    let (_, resolved) = pipeline::resolve(&t.profile, env)?;
    let c = &resolved.cloud;
    let custom_data =
        std::fs::canonicalize(&t.custom_data).unwrap_or_else(|_| t.custom_data.clone());
    Ok(terraform::Vars {
        name: c.hostname.clone(),
        computer_name: c.hostname.clone(),
        admin_username: c.admin_user.clone(),
        admin_ssh_public_keys: c.ssh_authorized_keys.clone(),
        custom_data_path: custom_data.display().to_string(),
        managed_identity: t.managed_identity,
        bundle_storage_account: t.account.clone(),
        bundle_container: t.container.clone(),
    })
}

pub fn run_terraform(t: &TerraformArgs) -> Result<(), BuildError> {
    let vars = terraform_vars(t, &resolve::process_env)?;
    if !Path::new(&vars.custom_data_path).exists() {
        eprintln!(
            "warning: {} does not exist yet; run `kiln publish` before `terraform apply`",
            vars.custom_data_path
        );
    }
    let written = terraform::write(&t.out, &vars)?;
    println!(
        "kiln: wrote Terraform for {} into {}:",
        vars.computer_name,
        t.out.display()
    );
    for w in written {
        println!("  {}", w.display());
    }
    println!(
        "  next: cd {} && terraform init && terraform apply",
        t.out.display()
    );
    Ok(())
}
