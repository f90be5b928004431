//! The Tailscale API, for a node's identity on rebuild: with the operator's OAuth client,
//! delete stale devices that carry the node's name (and, optionally, the operator's proxy
//! devices such as `argocd`) before `tailscale up`, so the node keeps `HOSTNAME` instead of
//! becoming `HOSTNAME-1`; and mint a single-use, preauthorized, tagged auth key.
//!
//! Endpoints (tailscale/tailscale `publicapi/*.md`):
//! - `POST /api/v2/oauth/token` (form `client_id`, `client_secret`, `grant_type=client_credentials`)
//!   → `{"access_token": ..., "token_type": "Bearer", "expires_in": ...}`;
//! - `GET /api/v2/tailnet/-/devices` → `{"devices": [{"id", "nodeId", "hostname", "name", ...}]}`.
//!   The API documents no pagination for this list; a `Link: <...>; rel="next"` header
//!   (RFC 8288) on the same origin is followed anyway, so a paginated answer is never cut short;
//! - `DELETE /api/v2/device/{id}` (200; a 404 means the device is already gone);
//! - `POST /api/v2/tailnet/-/keys` with `capabilities.devices.create` and `expirySeconds`
//!   → `{"key": "tskey-auth-...", ...}`.
//!
//! HTTP goes through the daemon's one client ([`crate::download::Fetcher::client`]) and errors
//! are [`DownloadError`]s, so the engine classifies them like downloads: 408/429/5xx and
//! connection failures are retried (here, with backoff until the step's deadline), a 401 or
//! 403 is permanent. The client secret, the bearer token and the minted key are [`Secret`]s:
//! never logged, never in an error message.

use crate::download::{display_url, DownloadError};
use crate::engine::Cx;
use crate::fs::{write_atomic, Root};
use crate::retry::Backoff;
use anyhow::{Context, Result};
use kiln_plan::{Plan, Secret, TailscaleApi, Url};
use serde_json::Value;
use std::io::Read;
use std::time::{Duration, Instant};

/// Longest error body quoted in a message (the API answers `{"message": "..."}`).
const MESSAGE_LIMIT: usize = 300;
/// A paginated device list longer than this is refused rather than followed forever.
const MAX_PAGES: usize = 100;

/// A device as listed by the API (only what kiln needs).
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// `nodeId` when present (preferred by the API), else the legacy numeric `id`.
    pub id: String,
    pub hostname: String,
    /// The MagicDNS name (`host.tailnet.ts.net`).
    pub name: String,
    pub tags: Vec<String>,
    pub external: bool,
}

impl Device {
    fn from_json(v: &Value) -> Option<Device> {
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let id = [s("nodeId"), s("id")].into_iter().find(|x| !x.is_empty())?;
        Some(Device {
            id,
            hostname: s("hostname"),
            name: s("name"),
            tags: v["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect(),
            external: v["isExternal"].as_bool().unwrap_or(false),
        })
    }

    /// Does this device hold the tailnet name `label`? Its machine name is `label`, or its
    /// MagicDNS name starts with `label.` (a device renamed in the admin console).
    pub fn carries(&self, label: &str) -> bool {
        self.hostname.eq_ignore_ascii_case(label)
            || self
                .name
                .split('.')
                .next()
                .is_some_and(|first| first.eq_ignore_ascii_case(label))
    }
}

/// An authenticated API session (one OAuth access token).
pub struct Api<'a> {
    http: &'a reqwest::blocking::Client,
    base: Url,
    token: Secret,
    deadline: Instant,
    backoff: Backoff,
}

/// Joins an API path to the base URL (which may or may not end in `/`).
fn endpoint(base: &Url, path: &str) -> Result<Url> {
    let mut b = base.clone();
    if !b.path().ends_with('/') {
        let p = format!("{}/", b.path());
        b.set_path(&p);
    }
    b.join(path.trim_start_matches('/')).with_context(|| {
        format!(
            "joining {path} to the Tailscale API URL {}",
            display_url(base)
        )
    })
}

fn form(pairs: &[(&str, &str)]) -> String {
    // application/x-www-form-urlencoded, by the url crate's serializer.
    let mut u = Url::parse("http://form.invalid/").expect("valid");
    u.query_pairs_mut().extend_pairs(pairs);
    u.query().unwrap_or("").to_string()
}

/// `message` of a JSON error body, or the start of the body text.
fn error_message(body: &str) -> String {
    let msg = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
    msg.chars().take(MESSAGE_LIMIT).collect()
}

type Answer = (u16, reqwest::header::HeaderMap, String);

/// One exchange: the answer, or the error with the API's message (if any).
fn attempt(
    req: reqwest::blocking::RequestBuilder,
    shown: &str,
    accept: &[u16],
) -> Result<Answer, (DownloadError, String)> {
    let resp = req.send().map_err(|source| {
        let e = DownloadError::Transport {
            url: shown.to_string(),
            source: source.without_url(),
        };
        (e, String::new())
    })?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = String::new();
    resp.take(4 * 1024 * 1024)
        .read_to_string(&mut body)
        .map_err(|e| {
            let e = DownloadError::Read {
                url: shown.to_string(),
                source: e,
            };
            (e, String::new())
        })?;
    if (200..300).contains(&status) || accept.contains(&status) {
        return Ok((status, headers, body));
    }
    let e = DownloadError::Http {
        url: shown.to_string(),
        status,
    };
    Err((e, error_message(&body)))
}

/// One request with retries of transient failures until `deadline`. Returns the status,
/// headers and body of a 2xx answer, or of a non-2xx answer listed in `accept`.
fn send(
    http: &reqwest::blocking::Client,
    backoff: &mut Backoff,
    deadline: Instant,
    what: &str,
    url: &Url,
    accept: &[u16],
    make: &dyn Fn(&reqwest::blocking::Client) -> reqwest::blocking::RequestBuilder,
) -> Result<Answer> {
    let shown = display_url(url);
    loop {
        let (e, msg) = match attempt(make(http), &shown, accept) {
            Ok(ok) => return Ok(ok),
            Err(err) => err,
        };
        let transient = e.is_transient();
        let delay = backoff.next_delay();
        if transient && Instant::now() + delay < deadline {
            tracing::warn!(
                "Tailscale API: {what}: transient failure, retrying in {delay:.1?}: {e}"
            );
            std::thread::sleep(delay);
            continue;
        }
        let hint = match &e {
            DownloadError::Http { status: 401, .. } => {
                " (the OAuth client id or secret is wrong, or the client was deleted: check tailscale.operator.oauth-client-id and the client secret file)"
            }
            DownloadError::Http { status: 403, .. } => {
                " (the OAuth client lacks a scope: deleting devices needs devices:core, minting keys needs auth_keys, and the client must own the tags it assigns)"
            }
            _ if transient => " (gave up at the step's deadline)",
            _ => "",
        };
        let msg = if msg.is_empty() {
            String::new()
        } else {
            format!(": {msg:?}")
        };
        return Err(
            anyhow::Error::new(e).context(format!("Tailscale API: {what} failed{msg}{hint}"))
        );
    }
}

/// The next page of a list: a same-origin `Link: <URL>; rel="next"` (RFC 8288).
fn next_link(headers: &reqwest::header::HeaderMap, current: &Url) -> Option<Url> {
    for v in headers.get_all(reqwest::header::LINK) {
        let v = v.to_str().ok()?;
        for part in v.split(',') {
            let Some((target, params)) = part.split_once(';') else {
                continue;
            };
            let Some(target) = target
                .trim()
                .strip_prefix('<')
                .and_then(|t| t.strip_suffix('>'))
            else {
                continue;
            };
            let is_next = params.split(';').any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=next" || p == "rel=\"next\""
            });
            if is_next {
                let next = current.join(target).ok()?;
                return (next.origin() == current.origin()).then_some(next);
            }
        }
    }
    None
}

impl<'a> Api<'a> {
    /// Exchanges the OAuth client credentials for an access token.
    pub fn login(
        http: &'a reqwest::blocking::Client,
        base: &Url,
        client_id: &str,
        client_secret: &Secret,
        deadline: Instant,
    ) -> Result<Api<'a>> {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        let url = endpoint(base, "api/v2/oauth/token")?;
        let body = form(&[
            ("client_id", client_id),
            ("client_secret", client_secret.expose()),
            ("grant_type", "client_credentials"),
        ]);
        let (_, _, text) = send(
            http,
            &mut backoff,
            deadline,
            "OAuth token",
            &url,
            &[],
            &|c| {
                c.post(url.clone())
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body.clone())
            },
        )?;
        let v: Value = serde_json::from_str(&text)
            .context("Tailscale API: the OAuth token answer is not JSON")?;
        let token = v["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .context("Tailscale API: the OAuth token answer has no access_token")?;
        Ok(Api {
            http,
            base: base.clone(),
            token: Secret::new(token),
            deadline,
            backoff,
        })
    }

    /// Every device in the client's tailnet, following next links.
    pub fn devices(&mut self) -> Result<Vec<Device>> {
        let mut url = endpoint(&self.base, "api/v2/tailnet/-/devices")?;
        let mut out = Vec::new();
        for _ in 0..MAX_PAGES {
            let token = self.token.clone();
            let (_, headers, text) = send(
                self.http,
                &mut self.backoff,
                self.deadline,
                "listing devices",
                &url,
                &[],
                &|c| c.get(url.clone()).bearer_auth(token.expose()),
            )?;
            let v: Value = serde_json::from_str(&text)
                .context("Tailscale API: the device list is not JSON")?;
            // Documented as {"devices": [...]}; a bare array is accepted too.
            let list = v
                .get("devices")
                .and_then(Value::as_array)
                .or_else(|| v.as_array())
                .context("Tailscale API: the device list has no \"devices\" array")?;
            out.extend(list.iter().filter_map(Device::from_json));
            match next_link(&headers, &url) {
                Some(next) => url = next,
                None => return Ok(out),
            }
        }
        anyhow::bail!("Tailscale API: the device list has more than {MAX_PAGES} pages")
    }

    /// Deletes a device; one that is already gone (404) counts as deleted.
    pub fn delete_device(&mut self, id: &str) -> Result<()> {
        let mut url = endpoint(&self.base, "api/v2/device/")?;
        url.path_segments_mut()
            .map_err(|_| anyhow::anyhow!("the Tailscale API URL cannot have a path"))?
            .pop_if_empty()
            .push(id);
        let token = self.token.clone();
        let (status, _, _) = send(
            self.http,
            &mut self.backoff,
            self.deadline,
            &format!("deleting device {id}"),
            &url,
            &[404],
            &|c| c.delete(url.clone()).bearer_auth(token.expose()),
        )?;
        if status == 404 {
            tracing::info!(device = %id, "Tailscale device already gone");
        }
        Ok(())
    }

    /// Mints a single-use, preauthorized, non-ephemeral auth key with `tags`.
    pub fn create_auth_key(&mut self, tags: &[String], expiry_seconds: u64) -> Result<Secret> {
        let url = endpoint(&self.base, "api/v2/tailnet/-/keys")?;
        let body = serde_json::to_vec(&serde_json::json!({
            "capabilities": {"devices": {"create": {
                "reusable": false,
                "ephemeral": false,
                "preauthorized": true,
                "tags": tags,
            }}},
            "expirySeconds": expiry_seconds,
            "description": "kiln-firstboot node join",
        }))?;
        let token = self.token.clone();
        let (_, _, text) = send(
            self.http,
            &mut self.backoff,
            self.deadline,
            "creating an auth key",
            &url,
            &[],
            &|c| {
                c.post(url.clone())
                    .bearer_auth(token.expose())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
            },
        )?;
        let v: Value = serde_json::from_str(&text)
            .context("Tailscale API: the auth key answer is not JSON")?;
        let key = v["key"]
            .as_str()
            .filter(|k| k.starts_with("tskey-"))
            .context("Tailscale API: the auth key answer has no key")?;
        Ok(Secret::new(key))
    }
}

/// What [`prepare_join`] did (ids and names only; no secret).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prepared {
    pub deleted: Vec<Device>,
    pub minted_key: bool,
}

/// The names whose devices are stale on a node that is about to join.
pub fn stale_names(plan: &Plan, api: &TailscaleApi) -> Vec<String> {
    let mut names = Vec::new();
    if api.delete_stale {
        names.push(plan.tailscale.hostname.clone());
    }
    names.extend(api.delete_proxy_devices.iter().cloned());
    names
}

/// Runs the plan's API actions for a node that is logged out and about to `tailscale up`:
/// deletes devices carrying its names, then (with `mint-auth-key`) writes a fresh key to the
/// plan's auth key file (0600), where the step's usual `--auth-key file:` flow picks it up and
/// removes it once the node is Running. Does nothing without `tailscale.api` in the plan.
pub fn prepare_join(
    plan: &Plan,
    root: &Root,
    http: &reqwest::blocking::Client,
    client_secret: &Secret,
    deadline: Instant,
) -> Result<Prepared> {
    let Some(api_plan) = &plan.tailscale.api else {
        return Ok(Prepared::default());
    };
    let names = stale_names(plan, api_plan);
    if names.is_empty() && !api_plan.mint_auth_key {
        return Ok(Prepared::default());
    }
    let mut api = Api::login(
        http,
        &api_plan.base_url,
        &plan.operator()?.oauth_client_id,
        client_secret,
        deadline,
    )?;
    let mut done = Prepared::default();
    if !names.is_empty() {
        for d in api.devices()? {
            if d.external || !names.iter().any(|n| d.carries(n)) {
                continue;
            }
            tracing::info!(device = %d.id, hostname = %d.hostname, name = %d.name, "deleting stale Tailscale device before joining");
            api.delete_device(&d.id)?;
            done.deleted.push(d);
        }
    }
    if api_plan.mint_auth_key {
        let key_file = plan.tailscale.auth_key_file.as_deref().context(
            "tailscale.api.mint-auth-key is on but the plan names no auth key file to write it to",
        )?;
        let key = api.create_auth_key(&plan.tailscale.tags, api_plan.key_expiry_seconds)?;
        let mut bytes = key.expose().as_bytes().to_vec();
        bytes.push(b'\n');
        write_atomic(&root.path(key_file), &bytes, 0o600)?;
        tracing::info!(file = %key_file, "minted a single-use Tailscale auth key");
        done.minted_key = true;
    }
    Ok(done)
}

/// [`prepare_join`] from a step: the OAuth secret from its file, the daemon's HTTP client,
/// retries until the step's deadline.
pub fn before_join(cx: &Cx) -> Result<Prepared> {
    if cx.plan.tailscale.api.is_none() {
        return Ok(Prepared::default());
    }
    let secret = cx.read_secret(&cx.plan.operator()?.oauth_client_secret_file)?;
    let http = cx.fetcher.client()?;
    prepare_join(cx.plan, cx.root, http, &secret, cx.deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_join_under_the_base_with_or_without_a_trailing_slash() {
        for base in ["https://api.tailscale.com", "https://api.tailscale.com/"] {
            let b = Url::parse(base).unwrap();
            assert_eq!(
                endpoint(&b, "api/v2/oauth/token").unwrap().as_str(),
                "https://api.tailscale.com/api/v2/oauth/token"
            );
        }
        let b = Url::parse("http://127.0.0.1:9/prefix").unwrap();
        assert_eq!(
            endpoint(&b, "api/v2/tailnet/-/devices").unwrap().as_str(),
            "http://127.0.0.1:9/prefix/api/v2/tailnet/-/devices"
        );
    }

    #[test]
    fn form_body_is_urlencoded() {
        assert_eq!(
            form(&[
                ("client_secret", "a b&c=d"),
                ("grant_type", "client_credentials")
            ]),
            "client_secret=a+b%26c%3Dd&grant_type=client_credentials"
        );
    }

    #[test]
    fn next_link_follows_only_same_origin_rel_next() {
        let cur = Url::parse("http://127.0.0.1:5/api/v2/tailnet/-/devices").unwrap();
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::LINK,
            "</api/v2/tailnet/-/devices?cursor=2>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            next_link(&h, &cur).unwrap().as_str(),
            "http://127.0.0.1:5/api/v2/tailnet/-/devices?cursor=2"
        );
        h.insert(
            reqwest::header::LINK,
            "<http://elsewhere.example/x>; rel=next".parse().unwrap(),
        );
        assert_eq!(next_link(&h, &cur), None);
        h.insert(reqwest::header::LINK, "</x>; rel=\"prev\"".parse().unwrap());
        assert_eq!(next_link(&h, &cur), None);
    }

    #[test]
    fn a_device_carries_its_machine_name_or_its_magicdns_label() {
        let d = Device::from_json(&serde_json::json!({
            "id": "1", "nodeId": "nABC", "hostname": "ameciclo",
            "name": "ameciclo-1.tail1.ts.net", "tags": ["tag:k8s"]
        }))
        .unwrap();
        assert_eq!(d.id, "nABC");
        assert!(d.carries("ameciclo") && d.carries("ameciclo-1") && !d.carries("amec"));
        let legacy = Device::from_json(&serde_json::json!({"id": "42"})).unwrap();
        assert_eq!(legacy.id, "42");
        assert!(Device::from_json(&serde_json::json!({"hostname": "x"})).is_none());
    }
}
