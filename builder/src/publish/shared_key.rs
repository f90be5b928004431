//! Shared Key authorization for the Blob service, as a per-try pipeline policy.
//!
//! `azure_storage_blob` 1.x only takes Entra ID token credentials, and the SDK refuses those
//! over plain http (so they can never reach a loopback Azurite). An account key or an Azurite
//! connection string needs Shared Key, documented in "Authorize with Shared Key"
//! (<https://learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key>):
//!
//! ```text
//! VERB \n Content-Encoding \n Content-Language \n Content-Length \n Content-MD5 \n
//! Content-Type \n Date \n If-Modified-Since \n If-Match \n If-None-Match \n
//! If-Unmodified-Since \n Range \n CanonicalizedHeaders CanonicalizedResource
//! ```
//!
//! It runs per try, not per call: every retry gets a fresh `x-ms-date` (the service rejects
//! requests older than 15 minutes) and is signed over what is actually sent.

use async_trait::async_trait;
use azure_core::credentials::Secret;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{Context, Request, Url};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug)]
pub struct SharedKeyPolicy {
    account: String,
    key: Secret,
}

impl SharedKeyPolicy {
    pub fn new(account: impl Into<String>, key: Secret) -> Self {
        SharedKeyPolicy {
            account: account.into(),
            key,
        }
    }
}

/// The parts of a request Shared Key signs, so the canonicalisation is testable without a pipeline.
pub struct SignedParts<'a> {
    pub method: &'a str,
    pub url: &'a Url,
    /// Lower-case header names with their values.
    pub headers: Vec<(String, String)>,
    pub content_length: u64,
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> &'h str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

pub fn string_to_sign(account: &str, parts: &SignedParts<'_>) -> String {
    let h = |name| header(&parts.headers, name);
    // Since version 2015-02-21 a zero Content-Length is signed as the empty string.
    let content_length = match parts.content_length {
        0 => String::new(),
        n => n.to_string(),
    };
    let mut out = String::new();
    for field in [
        parts.method,
        h("content-encoding"),
        h("content-language"),
        &content_length,
        h("content-md5"),
        h("content-type"),
        h("date"),
        h("if-modified-since"),
        h("if-match"),
        h("if-none-match"),
        h("if-unmodified-since"),
        h("range"),
    ] {
        out.push_str(field);
        out.push('\n');
    }
    let ms: BTreeMap<&str, &str> = parts
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-ms-"))
        .map(|(k, v)| (k.as_str(), v.trim()))
        .collect();
    for (k, v) in ms {
        out.push_str(k);
        out.push(':');
        out.push_str(v);
        out.push('\n');
    }
    out.push_str(&canonicalized_resource(account, parts.url));
    out
}

/// `/{account}{encoded path}` then `\n{name}:{v1,v2}` per query parameter, names lower-cased and
/// sorted, values decoded and sorted. For path-style endpoints (Azurite) the path already starts
/// with the account, which therefore appears twice — that is what the service expects.
fn canonicalized_resource(account: &str, url: &Url) -> String {
    let mut out = format!("/{account}{}", url.path());
    let mut params: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in url.query_pairs() {
        params
            .entry(k.to_lowercase())
            .or_default()
            .push(v.into_owned());
    }
    for (k, mut vs) in params {
        vs.sort();
        out.push('\n');
        out.push_str(&k);
        out.push(':');
        out.push_str(&vs.join(","));
    }
    out
}

#[async_trait]
impl Policy for SharedKeyPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let now = azure_core::time::OffsetDateTime::now_utc();
        request.insert_header("x-ms-date", azure_core::time::to_rfc7231(&now));
        let method = request.method().to_string().to_uppercase();
        let headers: Vec<(String, String)> = request
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_lowercase(), v.as_str().to_string()))
            .collect();
        let parts = SignedParts {
            method: &method,
            url: request.url(),
            headers,
            // The generated clients set Content-Length themselves for uploads; fall back to the body.
            content_length: request
                .headers()
                .get_optional_str(&"content-length".into())
                .and_then(|v| v.parse().ok())
                .or_else(|| request.body().len())
                .unwrap_or(0),
        };
        let sts = string_to_sign(&self.account, &parts);
        let sig = azure_core::hmac::hmac_sha256(&sts, &self.key)?;
        request.insert_header(
            "authorization",
            format!("SharedKey {}:{}", self.account, sig),
        );
        next[0].send(ctx, request, &next[1..]).await
    }
}

/// Fails a try that gets no response in time with an I/O error, which the SDK's retry policy
/// treats like a refused connection. Without it a server that accepts and never answers would
/// hang `kiln publish` for ever (the default transport has no timeout).
#[derive(Debug)]
pub struct TryTimeout(pub std::time::Duration);

#[async_trait]
impl Policy for TryTimeout {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        match tokio::time::timeout(self.0, next[0].send(ctx, request, &next[1..])).await {
            Ok(result) => result,
            Err(_) => Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Io,
                format!("no response within {} s", self.0.as_secs_f64()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_of_a_block_upload() {
        let url = Url::parse(
            "http://127.0.0.1:10000/devstoreaccount1/kiln/bundles/x.tar.gz?comp=block&blockid=MDAwMDAwMDA%3D&timeout=30",
        )
        .unwrap();
        let parts = SignedParts {
            method: "PUT",
            url: &url,
            headers: vec![
                ("x-ms-version".into(), "2025-11-05".into()),
                ("x-ms-date".into(), "Mon, 30 Nov 2026 05:00:00 GMT".into()),
                ("content-type".into(), "application/octet-stream".into()),
                ("x-ms-client-request-id".into(), " abc ".into()),
                ("user-agent".into(), "ignored".into()),
            ],
            content_length: 4,
        };
        assert_eq!(
            string_to_sign("devstoreaccount1", &parts),
            "PUT\n\n\n4\n\napplication/octet-stream\n\n\n\n\n\n\n\
             x-ms-client-request-id:abc\nx-ms-date:Mon, 30 Nov 2026 05:00:00 GMT\nx-ms-version:2025-11-05\n\
             /devstoreaccount1/devstoreaccount1/kiln/bundles/x.tar.gz\nblockid:MDAwMDAwMDA=\ncomp:block\ntimeout:30"
        );
    }

    #[test]
    fn zero_content_length_is_signed_as_empty() {
        let url = Url::parse("https://acct.blob.core.windows.net/c?restype=container").unwrap();
        let parts = SignedParts {
            method: "PUT",
            url: &url,
            headers: vec![],
            content_length: 0,
        };
        assert_eq!(
            string_to_sign("acct", &parts),
            "PUT\n\n\n\n\n\n\n\n\n\n\n\n/acct/c\nrestype:container"
        );
    }
}
