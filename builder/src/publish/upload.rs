//! Content-addressed, verified uploads.
//!
//! The blob name carries the content's sha256, so an existing blob of that name is *meant* to hold
//! those bytes; we still read it back and hash it before trusting it, because a name is not a proof
//! (an interrupted or tampered upload keeps its name). Every upload is confirmed the same way: the
//! bytes the service returns must hash to the pin the bootstrap will check on the VM.

use anyhow::{Context as _, Result};
use azure_core::http::{RequestContent, StatusCode};
use azure_storage_blob::models::{
    BlockBlobClientCommitBlockListOptions, BlockLookupList, StorageErrorCode,
};
use azure_storage_blob::{BlobClient, BlobContainerClient};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_plan::Sha256;
use std::collections::HashMap;

/// Blocks are staged separately so progress is real and a retry resends one block, not the file.
pub const BLOCK_SIZE: usize = 4 * 1024 * 1024;

/// Metadata key recording the content hash (informational: verification always re-hashes).
pub const SHA256_METADATA: &str = "kiln_sha256";

/// Content-addressed name of a bundle in its container (the builder's `bundle-base-url` layout).
pub fn bundle_blob_name(sha: &Sha256) -> String {
    format!("bundle-{}.tar.gz", sha.to_hex())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Bytes were sent and verified.
    Uploaded,
    /// A blob with this name and these exact bytes was already there; nothing was sent.
    AlreadyPresent,
    /// A blob with this name held other bytes; it was overwritten and verified.
    Replaced,
}

#[derive(Debug, thiserror::Error)]
#[error("blob {url} read back with sha256 {actual}, expected {expected}")]
pub struct ReadBackMismatch {
    pub url: String,
    pub expected: Sha256,
    pub actual: Sha256,
}

/// Turns an SDK error into one a person can act on: the HTTP status and the service's error code,
/// or "could not reach", and a hint for the usual causes. The caller adds which request and URL.
pub fn explain(e: azure_core::Error) -> anyhow::Error {
    use azure_core::error::ErrorKind;
    let what = match e.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => {
            let code = error_code
                .as_deref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            let hint = match u16::from(*status) {
                403 => "; check the account key and that this machine's clock is right",
                404 => "; check the account and container names",
                408 | 429 | 500..=599 => "; still failing after the retry policy gave up",
                _ => "",
            };
            format!(
                "the storage service answered HTTP {} {}{code}{hint}",
                u16::from(*status),
                status.canonical_reason()
            )
        }
        ErrorKind::Connection | ErrorKind::Io => {
            "could not reach the storage endpoint, or it did not answer (still failing after the retry policy gave up)"
                .to_string()
        }
        _ => "the storage request failed".to_string(),
    };
    anyhow::Error::new(e).context(what)
}

/// Creates the container (private: no anonymous access) unless it exists.
pub async fn ensure_container(container: &BlobContainerClient) -> Result<()> {
    let url = container.url().clone();
    match container.create(None).await {
        Ok(_) => Ok(()),
        Err(e) if e.http_status() == Some(StatusCode::Conflict) => match e.kind() {
            azure_core::error::ErrorKind::HttpResponse {
                error_code: Some(code),
                ..
            } if code == StorageErrorCode::ContainerAlreadyExists.as_ref() => Ok(()),
            _ => Err(explain(e).context(format!("creating container {url}"))),
        },
        Err(e) => Err(explain(e).context(format!("creating container {url}"))),
    }
}

/// Ranged reads of this size keep memory flat for multi-GiB page blobs (VHDs).
pub const READ_CHUNK: u64 = 8 * 1024 * 1024;

/// Downloads the blob in ranges and returns the sha256 of what the service serves. The ranges
/// are pinned to the ETag of the first look, so a blob replaced mid-read is an error, not a mix.
pub async fn read_back_sha256(blob: &BlobClient) -> Result<Sha256> {
    use azure_storage_blob::models::{
        BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders, HttpRange,
    };
    use sha2::Digest;
    let url = redacted(blob.url());
    let props = blob
        .get_properties(None)
        .await
        .map_err(explain)
        .with_context(|| format!("reading the properties of {url}"))?;
    let len = props
        .content_length()
        .map_err(explain)?
        .with_context(|| format!("{url} has no Content-Length"))?;
    let etag = props.etag().map_err(explain)?;
    let mut hasher = sha2::Sha256::new();
    let mut off = 0u64;
    while off < len {
        let n = READ_CHUNK.min(len - off);
        let options = BlobClientDownloadOptions {
            range: Some(HttpRange::new(off, n)),
            if_match: etag.clone(),
            ..Default::default()
        };
        let body = blob
            .download(Some(options))
            .await
            .map_err(explain)
            .with_context(|| format!("reading back {url} at {off}+{n}"))?
            .body
            .collect()
            .await
            .map_err(explain)
            .with_context(|| format!("reading back the body of {url} at {off}+{n}"))?;
        anyhow::ensure!(
            body.len() as u64 == n,
            "reading back {url} at {off}: got {} bytes, expected {n}",
            body.len()
        );
        hasher.update(&body);
        off += n;
    }
    Ok(Sha256::from_bytes(hasher.finalize().into()))
}

/// Uploads `data` as block blob `name` unless a blob of that name already holds exactly these
/// bytes, then proves the result by reading it back.
pub async fn upload_verified(
    container: &BlobContainerClient,
    name: &str,
    data: &[u8],
    content_type: &str,
    progress: &ProgressBar,
) -> Result<Outcome> {
    let sha = Sha256::digest(data);
    let blob = container.blob_client(name);
    let url = redacted(blob.url());

    let existed = blob
        .exists()
        .await
        .map_err(explain)
        .with_context(|| format!("checking whether {url} exists"))?;
    if existed {
        let actual = read_back_sha256(&blob).await?;
        if actual == sha {
            return Ok(Outcome::AlreadyPresent);
        }
        tracing::warn!(%url, expected = %sha, %actual, "existing blob has other content; replacing it");
    }

    put_blocks(&blob, data, content_type, &sha, progress)
        .await
        .with_context(|| format!("uploading {url}"))?;

    let actual = read_back_sha256(&blob).await?;
    if actual != sha {
        return Err(ReadBackMismatch {
            url,
            expected: sha,
            actual,
        }
        .into());
    }
    Ok(if existed {
        Outcome::Replaced
    } else {
        Outcome::Uploaded
    })
}

async fn put_blocks(
    blob: &BlobClient,
    data: &[u8],
    content_type: &str,
    sha: &Sha256,
    progress: &ProgressBar,
) -> Result<()> {
    let block_client = blob.block_blob_client();
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[][..]]
    } else {
        data.chunks(BLOCK_SIZE).collect()
    };
    let total = chunks.len();
    let mut ids = Vec::with_capacity(total);
    progress.set_length(data.len() as u64);
    for (i, chunk) in chunks.into_iter().enumerate() {
        // Fixed-width ids: the service requires equal-length block ids within one blob.
        let id = format!("kiln-block-{i:08}").into_bytes();
        block_client
            .stage_block(
                &id,
                chunk.len() as u64,
                RequestContent::from_slice(chunk),
                None,
            )
            .await
            .map_err(explain)
            .with_context(|| format!("staging block {}/{total}", i + 1))?;
        progress.inc(chunk.len() as u64);
        ids.push(id);
    }
    let list = BlockLookupList {
        latest: Some(ids),
        ..Default::default()
    };
    let options = BlockBlobClientCommitBlockListOptions {
        blob_content_type: Some(content_type.to_string()),
        metadata: Some(HashMap::from([(SHA256_METADATA.to_string(), sha.to_hex())])),
        ..Default::default()
    };
    let body: RequestContent<BlockLookupList, _> =
        list.try_into().context("encoding the block list")?;
    block_client
        .commit_block_list(body, Some(options))
        .await
        .map_err(explain)
        .with_context(|| format!("committing {total} block(s)"))?;
    if data.len() > BLOCK_SIZE {
        progress.finish();
    } else {
        progress.finish_and_clear();
    }
    Ok(())
}

/// A byte progress bar on stderr; indicatif hides it when stderr is not a terminal.
pub fn progress_bar(label: &str) -> ProgressBar {
    let pb = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(label.to_string());
    pb
}

/// A URL without its query (a SAS token must never reach logs or errors).
pub fn redacted(u: &azure_core::http::Url) -> String {
    let mut u = u.clone();
    if u.query().is_some_and(|q| q.contains("sig=")) {
        u.set_query(Some("<sas-redacted>"));
    }
    u.to_string()
}
