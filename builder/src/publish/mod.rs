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

pub use account::{RetrySettings, StorageAccount};
pub use upload::{bundle_blob_name, Outcome};

use anyhow::{Context as _, Result};
use azure_core::time::OffsetDateTime;
use kiln_plan::Sha256;
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

/// Runs an async publish step on a small current-thread runtime (the CLI is otherwise sync).
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime for Azure uploads")?;
    Ok(rt.block_on(f))
}
