//! Storage account credentials and the blob client built from them.
//!
//! Sources, in order: `AZURE_STORAGE_CONNECTION_STRING` (what Azurite and `az storage account
//! show-connection-string` give), else `AZURE_STORAGE_ACCOUNT`/`--account` with
//! `AZURE_STORAGE_KEY` (the variables the Azure CLI reads). The key never leaves this module
//! except as an HMAC input: `Secret`'s `Debug` is redacted, and no error message includes it.

use super::sas::{BlobReadSas, Protocols};
use super::shared_key::{SharedKeyPolicy, TryTimeout};
use anyhow::{bail, Context as _, Result};
use azure_core::credentials::Secret;
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Url};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use std::sync::Arc;
use std::time::Duration;

/// The REST version we send. The SDK's default (2026-04-06) is newer than Azurite 3.35 accepts;
/// 2025-11-05 is served by both Azure and Azurite, so no emulator flag is needed.
pub const API_VERSION: &str = "2025-11-05";

pub const ENV_CONNECTION_STRING: &str = "AZURE_STORAGE_CONNECTION_STRING";
pub const ENV_ACCOUNT: &str = "AZURE_STORAGE_ACCOUNT";
pub const ENV_KEY: &str = "AZURE_STORAGE_KEY";

#[derive(Debug, Clone)]
pub struct StorageAccount {
    pub name: String,
    key: Secret,
    /// Ends with `/`: container names are joined onto it.
    pub blob_endpoint: Url,
    /// Where the VM fetches blobs, when that differs from where kiln uploads them (a proxy,
    /// private-endpoint DNS, or a QEMU guest's forwarded address). A SAS signs the account,
    /// container and blob names, not the host, so the same token works at either address.
    pub download_endpoint: Option<Url>,
}

/// How hard the pipeline retries transient failures (408, 429, 5xx, connection errors).
#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    pub max_retries: u32,
    pub initial_delay: Duration,
    pub max_total: Duration,
    /// Deadline for one try (request sent, response headers back). A hung connection counts as
    /// a transient failure and is retried like a refused one.
    pub try_timeout: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_retries: 6,
            initial_delay: Duration::from_millis(500),
            max_total: Duration::from_secs(120),
            try_timeout: Duration::from_secs(120),
        }
    }
}

fn with_trailing_slash(mut u: Url) -> Url {
    if !u.path().ends_with('/') {
        let p = format!("{}/", u.path());
        u.set_path(&p);
    }
    u
}

impl StorageAccount {
    pub fn new(name: &str, key: Secret, blob_endpoint: Url) -> Result<Self> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
            bail!("invalid storage account name {name:?}: expected lowercase letters and digits");
        }
        if azure_core::base64::decode(key.secret()).is_err() {
            bail!("the account key for storage account {name:?} is not valid base64");
        }
        match blob_endpoint.scheme() {
            "https" | "http" => {}
            s => bail!("blob endpoint {blob_endpoint} has unsupported scheme {s:?}"),
        }
        Ok(StorageAccount {
            name: name.to_string(),
            key,
            blob_endpoint: with_trailing_slash(blob_endpoint),
            download_endpoint: None,
        })
    }

    /// See [`StorageAccount::download_endpoint`].
    pub fn with_download_endpoint(mut self, endpoint: Url) -> Result<Self> {
        match endpoint.scheme() {
            "https" | "http" => {}
            s => bail!("download endpoint {endpoint} has unsupported scheme {s:?}"),
        }
        if endpoint.query().is_some() || endpoint.fragment().is_some() {
            bail!("download endpoint {endpoint} must not have a query or fragment");
        }
        self.download_endpoint = Some(with_trailing_slash(endpoint));
        Ok(self)
    }

    /// Parses an Azure Storage connection string
    /// (`DefaultEndpointsProtocol=…;AccountName=…;AccountKey=…;BlobEndpoint=…;EndpointSuffix=…`).
    pub fn from_connection_string(s: &str) -> Result<Self> {
        let mut protocol = "https".to_string();
        let (mut name, mut key, mut endpoint, mut suffix) = (None, None, None, None);
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                bail!(
                    "connection string part {:?} is not Key=Value",
                    redact_part(part)
                );
            };
            match k {
                "DefaultEndpointsProtocol" => protocol = v.to_string(),
                "AccountName" => name = Some(v.to_string()),
                "AccountKey" => key = Some(Secret::new(v.to_string())),
                "BlobEndpoint" => {
                    endpoint = Some(
                        Url::parse(v)
                            .with_context(|| format!("connection string BlobEndpoint {v:?}"))?,
                    )
                }
                "EndpointSuffix" => suffix = Some(v.to_string()),
                "UseDevelopmentStorage" if v.eq_ignore_ascii_case("true") => {
                    bail!("UseDevelopmentStorage=true names no port; give Azurite's full connection string (AccountName, AccountKey, BlobEndpoint=http://127.0.0.1:PORT/devstoreaccount1)")
                }
                "SharedAccessSignature" => {
                    bail!("a SAS connection string cannot sign read URLs for the bundle; use an account key connection string")
                }
                "QueueEndpoint" | "TableEndpoint" | "FileEndpoint" => {}
                other => bail!("unknown connection string key {other:?}"),
            }
        }
        let name = name.context("connection string has no AccountName")?;
        let key = key.context("connection string has no AccountKey")?;
        let endpoint = match endpoint {
            Some(e) => e,
            None => {
                let suffix = suffix.as_deref().unwrap_or("core.windows.net");
                Url::parse(&format!("{protocol}://{name}.blob.{suffix}/"))
                    .with_context(|| format!("blob endpoint for account {name:?}"))?
            }
        };
        Self::new(&name, key, endpoint)
    }

    /// Reads credentials from the environment. `account` (from `--account`) must agree with a
    /// connection string's AccountName when both are given.
    pub fn from_env(account: Option<&str>) -> Result<Self> {
        if let Ok(cs) = std::env::var(ENV_CONNECTION_STRING) {
            let acct = Self::from_connection_string(&cs)
                .with_context(|| format!("parsing ${ENV_CONNECTION_STRING}"))?;
            if let Some(a) = account {
                if a != acct.name {
                    bail!(
                        "--account {a:?} does not match AccountName {:?} in ${ENV_CONNECTION_STRING}",
                        acct.name
                    );
                }
            }
            return Ok(acct);
        }
        let name = match account {
            Some(a) => a.to_string(),
            None => std::env::var(ENV_ACCOUNT).map_err(|_| {
                anyhow::anyhow!("no storage account: pass --account or set ${ENV_ACCOUNT} (or ${ENV_CONNECTION_STRING})")
            })?,
        };
        let key = std::env::var(ENV_KEY).map_err(|_| {
            anyhow::anyhow!(
                "no credentials for storage account {name:?}: set ${ENV_KEY} (e.g. from `az storage account keys list`) or ${ENV_CONNECTION_STRING}"
            )
        })?;
        let endpoint = Url::parse(&format!("https://{name}.blob.core.windows.net/"))
            .with_context(|| format!("blob endpoint for account {name:?}"))?;
        Self::new(&name, Secret::new(key), endpoint)
    }

    pub fn container_url(&self, container: &str) -> Result<Url> {
        validate_container(container)?;
        self.blob_endpoint
            .join(container)
            .with_context(|| format!("container URL for {container:?}"))
    }

    /// The blob's URL without any token.
    pub fn blob_url(&self, container: &str, blob: &str) -> Result<Url> {
        let mut u = self.container_url(container)?;
        {
            let mut segs = u
                .path_segments_mut()
                .map_err(|_| anyhow::anyhow!("blob endpoint cannot carry a path"))?;
            for s in blob.split('/') {
                segs.push(s);
            }
        }
        Ok(u)
    }

    /// The container URL as the VM sees it (the download endpoint when set), ending with `/`.
    pub fn download_container_url(&self, container: &str) -> Result<Url> {
        validate_container(container)?;
        let base = self
            .download_endpoint
            .as_ref()
            .unwrap_or(&self.blob_endpoint);
        base.join(&format!("{container}/"))
            .with_context(|| format!("container URL for {container:?}"))
    }

    /// A read-only SAS URL for one blob as the VM fetches it, valid until `expiry`.
    pub fn read_sas_url(
        &self,
        container: &str,
        blob: &str,
        expiry: azure_core::time::OffsetDateTime,
    ) -> Result<Url> {
        let mut u = self
            .download_container_url(container)?
            .join(blob)
            .with_context(|| format!("blob URL for {blob:?}"))?;
        let sas = BlobReadSas {
            account: &self.name,
            container,
            blob,
            start: None,
            expiry,
            protocols: if u.scheme() == "https" {
                Protocols::HttpsOnly
            } else {
                Protocols::HttpsAndHttp
            },
        };
        u.set_query(Some(&sas.query(&self.key)?));
        Ok(u)
    }

    pub fn container_client(
        &self,
        container: &str,
        retry: RetrySettings,
    ) -> Result<BlobContainerClient> {
        let url = self.container_url(container)?;
        let client_options = ClientOptions {
            per_try_policies: vec![
                Arc::new(TryTimeout(retry.try_timeout)),
                Arc::new(SharedKeyPolicy::new(self.name.clone(), self.key.clone())),
            ],
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: to_time(retry.initial_delay),
                max_retries: retry.max_retries,
                max_total_elapsed: to_time(retry.max_total),
                max_delay: azure_core::time::Duration::seconds(30),
            }),
            ..Default::default()
        };
        let options = BlobContainerClientOptions {
            client_options,
            version: API_VERSION.to_string(),
        };
        BlobContainerClient::new(url.clone(), None, Some(options))
            .with_context(|| format!("creating a blob client for {url}"))
    }
}

fn to_time(d: Duration) -> azure_core::time::Duration {
    azure_core::time::Duration::milliseconds(d.as_millis() as i64)
}

fn redact_part(part: &str) -> &str {
    if part.to_ascii_lowercase().contains("key") {
        "<redacted>"
    } else {
        part
    }
}

/// Container names: 3-63 chars, lowercase letters, digits and single dashes, not at the ends.
pub fn validate_container(name: &str) -> Result<()> {
    let ok = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if !ok {
        bail!("invalid container name {name:?}: 3-63 lowercase letters, digits and single dashes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV_KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    #[test]
    fn azurite_connection_string_keeps_the_path_style_endpoint() {
        let cs = format!("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_KEY};BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;");
        let a = StorageAccount::from_connection_string(&cs).unwrap();
        assert_eq!(a.name, "devstoreaccount1");
        assert_eq!(
            a.blob_url("kiln", "bundles/ab.tar.gz").unwrap().as_str(),
            "http://127.0.0.1:10000/devstoreaccount1/kiln/bundles/ab.tar.gz"
        );
    }

    #[test]
    fn public_cloud_connection_string_derives_the_endpoint() {
        let cs = format!("DefaultEndpointsProtocol=https;AccountName=kilnacct;AccountKey={DEV_KEY};EndpointSuffix=core.windows.net");
        let a = StorageAccount::from_connection_string(&cs).unwrap();
        assert_eq!(
            a.container_url("kiln").unwrap().as_str(),
            "https://kilnacct.blob.core.windows.net/kiln"
        );
        let url = a
            .read_sas_url("kiln", "b", azure_core::time::OffsetDateTime::UNIX_EPOCH)
            .unwrap();
        assert!(url.query().unwrap().contains("spr=https&"), "{url}");
    }

    #[test]
    fn the_key_never_appears_in_errors_or_debug() {
        let cs = format!("AccountName=Bad_Name;AccountKey={DEV_KEY}");
        let err = format!(
            "{:#}",
            StorageAccount::from_connection_string(&cs).unwrap_err()
        );
        assert!(!err.contains(DEV_KEY), "{err}");
        let cs = format!("AccountName=ok;AccountKey={DEV_KEY};Bogus");
        let err = format!(
            "{:#}",
            StorageAccount::from_connection_string(&cs).unwrap_err()
        );
        assert!(!err.contains(&DEV_KEY[..20]), "{err}");
        let cs = format!("AccountName=ok;AccountKey={DEV_KEY}");
        let dbg = format!("{:?}", StorageAccount::from_connection_string(&cs).unwrap());
        assert!(!dbg.contains(&DEV_KEY[..20]), "{dbg}");
    }

    #[test]
    fn bad_container_names_are_refused() {
        for bad in ["", "ab", "Kiln", "-kiln", "kiln-", "ki--ln", "kiln_x"] {
            assert!(validate_container(bad).is_err(), "{bad:?}");
        }
        validate_container("kiln-bundles").unwrap();
    }
}
