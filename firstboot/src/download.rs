//! The one download path: stream to `<cache>/<digest hex>.partial`, hashing sha256 and sha512
//! while streaming (one pass), resume with `Range` when the server honours it, rename to
//! `<cache>/<digest hex>` only when the pin (digest and size) matches, and any cross-check
//! (a release's own published sha256) agrees too. A stream longer than a pinned size is cut off
//! as soon as it passes it.
//!
//! Nothing reaches the cache's final names unverified, and callers only ever get final names
//! back, so nothing unverified is ever executed or installed.

use crate::fs::{copy_atomic, sync_dir, Root};
use crate::retry::Backoff;
use anyhow::{Context, Result};
use kiln_plan::{paths, Artifact, Artifacts, Digest, Hasher, Hashes, Pin, Sha256, Url};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Download failures a caller branches on. `is_transient()` decides whether a retry can help.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(
        "{} mismatch for {url}: expected {expected}, got {actual}; the file was discarded",
        expected.algorithm()
    )]
    ChecksumMismatch {
        url: String,
        // Boxed: a sha512 pair would make every download Result large.
        expected: Box<Digest>,
        actual: Box<Digest>,
    },
    #[error("size mismatch for {url}: the pin says {expected} bytes, the {what} is {actual} bytes; the file was discarded")]
    SizeMismatch {
        url: String,
        expected: u64,
        /// What was measured: `body` (bytes received) or `announced length`.
        what: &'static str,
        actual: u64,
    },
    #[error("{url} matches its pin but not {source_name}: that says sha256 {published}, the bytes are sha256 {actual}; the file was discarded")]
    CrossCheckMismatch {
        url: String,
        source_name: String,
        published: Box<Sha256>,
        actual: Box<Sha256>,
    },
    #[error("{url}: HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: connection closed after {received} of {expected} bytes")]
    Truncated {
        url: String,
        received: u64,
        expected: u64,
    },
    #[error("{url}: server answered a range request with an inconsistent Content-Range {got:?}")]
    BadRange { url: String, got: String },
    #[error("{url}: deadline passed after {elapsed:.1?}")]
    Deadline { url: String, elapsed: Duration },
    #[error("air-gap is on and {name} is neither in the cache nor in the local artifact dir; refusing to download {url}")]
    AirGap { name: String, url: String },
    #[error("{url}: body larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: reading the body: {source}")]
    Read {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Local {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl DownloadError {
    /// Connection problems, timeouts, HTTP 408/429/5xx and short bodies can heal by retrying;
    /// a 404, a checksum mismatch or an air-gap refusal cannot.
    pub fn is_transient(&self) -> bool {
        match self {
            DownloadError::Http { status, .. } => {
                *status == 408 || *status == 429 || (500..600).contains(status)
            }
            DownloadError::Transport { source, .. } => reqwest_is_transient(source),
            DownloadError::Truncated { .. }
            | DownloadError::BadRange { .. }
            | DownloadError::Read { .. } => true,
            DownloadError::Deadline { .. } => true,
            DownloadError::ChecksumMismatch { .. }
            | DownloadError::SizeMismatch { .. }
            | DownloadError::CrossCheckMismatch { .. }
            | DownloadError::AirGap { .. }
            | DownloadError::TooLarge { .. }
            | DownloadError::Local { .. } => false,
        }
    }
}

pub(crate) fn reqwest_is_transient(e: &reqwest::Error) -> bool {
    if let Some(s) = e.status() {
        let s = s.as_u16();
        return s == 408 || s == 429 || (500..600).contains(&s);
    }
    // Builder and redirect-policy errors are bugs or bad URLs; everything on the wire
    // (connect, timeout, body cut short, DNS) may be a passing network condition. (A body
    // read that times out surfaces as a "decode" error; no content decoding is enabled.)
    !(e.is_builder() || e.is_redirect())
}

/// A URL for messages: no userinfo, no query (which may hold a SAS token), no fragment.
pub fn display_url(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let had_query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    let mut s = u.to_string();
    if had_query {
        s.push_str("?<redacted>");
    }
    s
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<Sha256> {
    Ok(hash_file(path)?.sha256)
}

/// Every pin digest (and the length) of a file, in one streamed pass.
pub fn hash_file(path: &Path) -> Result<Hashes> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    hash_reader(f).with_context(|| format!("reading {}", path.display()))
}

fn hash_reader(mut r: impl Read) -> io::Result<Hashes> {
    let mut h = Hasher::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

/// A second, independent publication the bytes must also agree with: K3s's release
/// `sha256sum-amd64.txt` beside the profile's own pin.
#[derive(Debug, Clone)]
pub struct CrossCheck {
    /// Names the publication in errors (its URL).
    pub source: String,
    pub sha256: Sha256,
}

/// Are bytes with hashes `h` what `pin` (and `also`, when given) say? The one verdict used for
/// fresh downloads, resumed ones, local copies, cache hits and installed files.
pub fn verify(
    url: &str,
    pin: &Pin,
    also: Option<&CrossCheck>,
    h: &Hashes,
) -> Result<(), DownloadError> {
    if let Some(n) = pin.size {
        if n != h.size {
            return Err(DownloadError::SizeMismatch {
                url: url.to_string(),
                expected: n,
                what: "body",
                actual: h.size,
            });
        }
    }
    if !pin.digest.matches(h) {
        return Err(DownloadError::ChecksumMismatch {
            url: url.to_string(),
            expected: Box::new(pin.digest),
            actual: Box::new(pin.digest.of(h)),
        });
    }
    if let Some(c) = also {
        if c.sha256 != h.sha256 {
            return Err(DownloadError::CrossCheckMismatch {
                url: url.to_string(),
                source_name: c.source.clone(),
                published: Box::new(c.sha256),
                actual: Box::new(h.sha256),
            });
        }
    }
    Ok(())
}

/// Timeouts and retry pacing of a [`Fetcher`].
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    pub connect_timeout: Duration,
    /// Longest silence while waiting for headers or for the next body chunk: a hung server is
    /// given up on after this, and the retry resumes from the bytes already received.
    pub read_timeout: Duration,
    /// Retries of transient failures inside one fetch stop at the deadline (the step's).
    pub backoff: Backoff,
    /// Used when no step deadline is set.
    pub default_deadline: Duration,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
            default_deadline: Duration::from_secs(600),
        }
    }
}

/// Fetches pinned artifacts into the verified cache (`/var/lib/kiln/cache/<sha256>`).
pub struct Fetcher {
    root: Root,
    cache_dir: PathBuf,
    local_dir: Option<PathBuf>,
    air_gap: bool,
    /// The plan's extra CAs (PEM), trusted besides the system store.
    ca_bundle: Option<String>,
    policy: FetchPolicy,
    /// Built on first use: a re-verify run that finds everything cached never starts the
    /// HTTP client (and its runtime thread).
    client: OnceLock<reqwest::blocking::Client>,
    deadline: Mutex<Option<Instant>>,
}

const TEXT_LIMIT: u64 = 1024 * 1024;

impl Fetcher {
    pub fn new(root: &Root, artifacts: &Artifacts) -> Fetcher {
        Fetcher::with_policy(root, artifacts, FetchPolicy::default())
    }

    pub fn with_policy(root: &Root, artifacts: &Artifacts, policy: FetchPolicy) -> Fetcher {
        Fetcher {
            root: root.clone(),
            cache_dir: root.path(paths::CACHE_DIR),
            local_dir: artifacts.local_dir.as_ref().map(|d| root.path(d)),
            air_gap: artifacts.air_gap,
            ca_bundle: artifacts.ca_bundle.clone(),
            policy,
            client: OnceLock::new(),
            deadline: Mutex::new(None),
        }
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// Where a verified artifact lives (whether or not it is there yet): named by the hex of
    /// its pinned digest (64 digits for sha256, 128 for sha512).
    pub fn cache_path(&self, digest: &Digest) -> PathBuf {
        self.cache_dir.join(digest.to_hex())
    }

    /// Sets the instant at which retries inside a fetch give up. The engine sets the running
    /// step's deadline before each attempt.
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        *self.deadline.lock().unwrap() = deadline;
    }

    fn deadline(&self) -> Instant {
        self.deadline
            .lock()
            .unwrap()
            .unwrap_or_else(|| Instant::now() + self.policy.default_deadline)
    }

    /// The daemon's one HTTP client (also used by `tailscale_api`).
    pub fn client(&self) -> Result<&reqwest::blocking::Client> {
        if let Some(c) = self.client.get() {
            return Ok(c);
        }
        // reqwest is built without a default crypto provider (ring keeps the static binary
        // small); the process-wide one must exist before any client. Err = already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let extra = match &self.ca_bundle {
            Some(pem) => reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .context("the plan's CA bundle (artifacts.ca-bundle) is not valid PEM")?,
            None => Vec::new(),
        };
        let c = reqwest::blocking::Client::builder()
            .tls_certs_merge(extra)
            .connect_timeout(self.policy.connect_timeout)
            // In the blocking client this bounds each wait: for the response head and for every
            // body read, i.e. a read timeout, not a cap on the whole transfer.
            .timeout(self.policy.read_timeout)
            .user_agent(concat!("kiln-firstboot/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(self.client.get_or_init(|| c))
    }

    /// The cache's verified copy of `artifact`, if it holds one (re-hashed now; never touches
    /// the network, never changes the cache).
    pub fn cached(&self, artifact: &Artifact) -> Result<Option<PathBuf>> {
        let dest = self.cache_path(&artifact.pin.digest);
        if dest.is_file() && artifact.pin.matches(&hash_file(&dest)?) {
            return Ok(Some(dest));
        }
        Ok(None)
    }

    /// Returns the path of a verified copy of `artifact` in the cache, downloading it if needed.
    /// A cached file is re-hashed before reuse; a file of that name in the plan's local
    /// artifact dir is used before the network; with air-gap on, the network is never used.
    pub fn fetch(&self, artifact: &Artifact) -> Result<PathBuf> {
        self.fetch_checked(artifact, None)
    }

    /// [`Fetcher::fetch`], with the bytes also required to agree with `also` (computed in the
    /// same streaming pass). A cache hit is re-checked against both.
    pub fn fetch_checked(&self, artifact: &Artifact, also: Option<&CrossCheck>) -> Result<PathBuf> {
        let dest = self.cache_path(&artifact.pin.digest);
        let url = display_url(&artifact.url);
        if dest.exists() {
            let got = hash_file(&dest)?;
            if artifact.pin.matches(&got) {
                if let Err(e) = verify(&dest.display().to_string(), &artifact.pin, also, &got) {
                    // The pin holds but the cross-check does not: no download can fix that.
                    return Err(
                        anyhow::Error::new(e).context(format!("checking {}", artifact.name))
                    );
                }
                tracing::debug!(name = %artifact.name, "cache hit");
                return Ok(dest);
            }
            tracing::warn!(path = %dest.display(), "cached file fails its pin; discarding it");
            fs::remove_file(&dest).with_context(|| format!("removing {}", dest.display()))?;
        }
        self.ensure_cache_dir()?;
        if let Some(local) = self.local_copy(&artifact.name) {
            match self.import_local(&local, &artifact.pin, also, &dest) {
                Ok(()) => {
                    tracing::info!(name = %artifact.name, from = %local.display(), "artifact taken from the local dir");
                    return Ok(dest);
                }
                Err(e) if self.air_gap => return Err(e),
                Err(e) => tracing::warn!("{e:#}; downloading instead"),
            }
        }
        if self.air_gap {
            return Err(DownloadError::AirGap {
                name: artifact.name.clone(),
                url,
            }
            .into());
        }
        let deadline = self.deadline();
        let start = Instant::now();
        let mut backoff = self.policy.backoff.clone();
        loop {
            match self.download_once(&artifact.url, &artifact.pin, also, &dest, deadline) {
                Ok(()) => {
                    tracing::info!(name = %artifact.name, url = %url, elapsed = ?start.elapsed(), "downloaded and verified");
                    return Ok(dest);
                }
                Err(e) if e.is_transient() => {
                    let delay = backoff.next_delay();
                    if Instant::now() + delay >= deadline {
                        return Err(anyhow::Error::new(e).context(format!(
                            "downloading {} gave up at its deadline",
                            artifact.name
                        )));
                    }
                    tracing::warn!(name = %artifact.name, "transient download failure, retrying in {delay:.1?}: {e}");
                    std::thread::sleep(delay);
                }
                Err(e) => {
                    return Err(
                        anyhow::Error::new(e).context(format!("downloading {}", artifact.name))
                    )
                }
            }
        }
    }

    /// Fetches `artifact` and installs it at `node_path` (under the root) with `mode`, atomically.
    /// Returns false, writing nothing, when the file there already has the pinned sha256.
    pub fn install(&self, artifact: &Artifact, node_path: &str, mode: u32) -> Result<bool> {
        self.install_checked(artifact, None, node_path, mode)
    }

    /// [`Fetcher::install`] with a cross-check (see [`Fetcher::fetch_checked`]).
    pub fn install_checked(
        &self,
        artifact: &Artifact,
        also: Option<&CrossCheck>,
        node_path: &str,
        mode: u32,
    ) -> Result<bool> {
        let target = self.root.path(node_path);
        let installed = |t: &Path| -> Result<bool> {
            let h = hash_file(t)?;
            Ok(artifact.pin.matches(&h) && also.is_none_or(|c| c.sha256 == h.sha256))
        };
        if target.exists() && installed(&target)? {
            let meta = fs::metadata(&target)?;
            if meta.permissions().mode() & 0o7777 != mode {
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .with_context(|| format!("chmod {}", target.display()))?;
            }
            return Ok(false);
        }
        let src = self.fetch_checked(artifact, also)?;
        copy_atomic(&src, &target, mode)?;
        // The copy is re-hashed: the cache file could have been changed since it was verified.
        let got = hash_file(&target)?;
        if let Err(e) = verify(&display_url(&artifact.url), &artifact.pin, also, &got) {
            let _ = fs::remove_file(&target);
            return Err(e.into());
        }
        Ok(true)
    }

    /// Small unpinned text (a release's `sha256sum-amd64.txt`): at most 1 MiB, retried like
    /// downloads. With air-gap on it is read from the local dir by the URL's last path segment.
    pub fn fetch_text(&self, url: &Url) -> Result<String> {
        let shown = display_url(url);
        let name = url
            .path_segments()
            .and_then(|mut s| s.next_back())
            .unwrap_or("")
            .to_string();
        if !name.is_empty() {
            if let Some(local) = self.local_copy(&name) {
                return fs::read_to_string(&local)
                    .with_context(|| format!("reading {}", local.display()));
            }
        }
        if self.air_gap {
            return Err(DownloadError::AirGap { name, url: shown }.into());
        }
        let deadline = self.deadline();
        let mut backoff = self.policy.backoff.clone();
        loop {
            match self.get_text_once(url) {
                Ok(t) => return Ok(t),
                Err(e) if e.is_transient() => {
                    let delay = backoff.next_delay();
                    if Instant::now() + delay >= deadline {
                        return Err(anyhow::Error::new(e)
                            .context(format!("fetching {shown} gave up at its deadline")));
                    }
                    tracing::warn!(url = %shown, "transient failure, retrying in {delay:.1?}: {e}");
                    std::thread::sleep(delay);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn get_text_once(&self, url: &Url) -> Result<String, DownloadError> {
        let shown = display_url(url);
        let client = self.client().map_err(|e| DownloadError::Local {
            path: "HTTP client".into(),
            source: io::Error::other(format!("{e:#}")),
        })?;
        let resp = client
            .get(url.clone())
            .send()
            .map_err(|source| DownloadError::Transport {
                url: shown.clone(),
                // reqwest's messages quote the full URL, query string included.
                source: source.without_url(),
            })?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(DownloadError::Http { url: shown, status });
        }
        let mut body = Vec::new();
        resp.take(TEXT_LIMIT + 1)
            .read_to_end(&mut body)
            .map_err(|e| io_to_download(&shown, e))?;
        if body.len() as u64 > TEXT_LIMIT {
            return Err(DownloadError::TooLarge {
                url: shown,
                limit: TEXT_LIMIT,
            });
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn ensure_cache_dir(&self) -> Result<()> {
        if !self.cache_dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.cache_dir)
                .with_context(|| format!("creating {}", self.cache_dir.display()))?;
        }
        Ok(())
    }

    fn local_copy(&self, name: &str) -> Option<PathBuf> {
        // A name is a plain file name; anything else could point outside the local dir.
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return None;
        }
        let p = self.local_dir.as_ref()?.join(name);
        p.is_file().then_some(p)
    }

    fn import_local(
        &self,
        src: &Path,
        pin: &Pin,
        also: Option<&CrossCheck>,
        dest: &Path,
    ) -> Result<()> {
        let partial = partial_path(dest);
        copy_atomic(src, &partial, 0o600)?;
        let got = hash_file(&partial)?;
        if let Err(e) = verify(&src.display().to_string(), pin, also, &got) {
            let _ = fs::remove_file(&partial);
            return Err(e.into());
        }
        fs::rename(&partial, dest)
            .with_context(|| format!("renaming {} to {}", partial.display(), dest.display()))?;
        sync_dir(&self.cache_dir)
    }

    /// One HTTP exchange (two when a resumed download has to start over), ending in a
    /// verified file at `dest` or an error. The `.partial` file is kept across transient
    /// errors so the next attempt can resume; it is deleted whenever its content is wrong.
    fn download_once(
        &self,
        url: &Url,
        pin: &Pin,
        also: Option<&CrossCheck>,
        dest: &Path,
        deadline: Instant,
    ) -> Result<(), DownloadError> {
        let shown = display_url(url);
        let partial = partial_path(dest);
        let io_err = |e: io::Error| DownloadError::Local {
            path: partial.display().to_string(),
            source: e,
        };
        let client = self.client().map_err(|e| DownloadError::Local {
            path: "HTTP client".into(),
            source: io::Error::other(format!("{e:#}")),
        })?;
        let start = Instant::now();
        let mut allow_resume = true;
        loop {
            let have = if allow_resume {
                fs::metadata(&partial).map(|m| m.len()).unwrap_or(0)
            } else {
                0
            };
            let mut req = client.get(url.clone());
            if have > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
            }
            let resp = req.send().map_err(|source| DownloadError::Transport {
                url: shown.clone(),
                source: source.without_url(),
            })?;
            let status = resp.status().as_u16();
            let mut file = OpenOptions::new()
                .create(true)
                .read(true)
                .write(true)
                .truncate(false)
                .open(&partial)
                .map_err(io_err)?;
            let mut hasher = Hasher::default();
            let offset = match status {
                206 if have > 0 => {
                    let cr = resp
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    if content_range_start(&cr) != Some(have) || pin.size.is_some_and(|n| have > n)
                    {
                        // Not the bytes we asked for: never splice them in. Start over.
                        drop(file);
                        let _ = fs::remove_file(&partial);
                        if !allow_resume {
                            return Err(DownloadError::BadRange {
                                url: shown,
                                got: cr,
                            });
                        }
                        allow_resume = false;
                        continue;
                    }
                    // Hash the prefix we already have, then append.
                    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
                    let mut prefix = (&file).take(have);
                    io::copy(&mut prefix, &mut HashWriter(&mut hasher)).map_err(io_err)?;
                    file.set_len(have).map_err(io_err)?;
                    file.seek(SeekFrom::Start(have)).map_err(io_err)?;
                    have
                }
                200 => {
                    // Fresh body (or a server that ignores Range): from byte 0.
                    file.set_len(0).map_err(io_err)?;
                    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
                    0
                }
                416 if have > 0 => {
                    // We already hold at least the whole file: it must verify as it is.
                    drop(file);
                    let got = hash_reader(File::open(&partial).map_err(io_err)?).map_err(io_err)?;
                    if verify(&shown, pin, also, &got).is_ok() {
                        return finish(&partial, dest, &self.cache_dir).map_err(io_err);
                    }
                    let _ = fs::remove_file(&partial);
                    allow_resume = false;
                    continue;
                }
                _ => {
                    drop(file);
                    if status == 206 {
                        let _ = fs::remove_file(&partial);
                    }
                    return Err(DownloadError::Http { url: shown, status });
                }
            };
            let expected_len = resp.content_length().map(|l| l + offset);
            if let (Some(n), Some(len)) = (pin.size, expected_len) {
                if len != n {
                    // The server announces another length than the pin: the wrong file, known
                    // before a byte of it is read.
                    drop(file);
                    let _ = fs::remove_file(&partial);
                    return Err(DownloadError::SizeMismatch {
                        url: shown,
                        expected: n,
                        what: "announced length",
                        actual: len,
                    });
                }
            }
            let mut received = offset;
            let mut body = resp;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if Instant::now() >= deadline {
                    let _ = file.sync_all();
                    return Err(DownloadError::Deadline {
                        url: shown,
                        elapsed: start.elapsed(),
                    });
                }
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Keep what arrived: the next attempt resumes from it.
                        let _ = file.sync_all();
                        return Err(io_to_download(&shown, e));
                    }
                };
                if let Some(limit) = pin.size.filter(|l| received + n as u64 > *l) {
                    // Longer than pinned (no or a lying Content-Length): stop reading now.
                    drop(file);
                    let _ = fs::remove_file(&partial);
                    return Err(DownloadError::SizeMismatch {
                        url: shown,
                        expected: limit,
                        what: "body",
                        actual: received + n as u64,
                    });
                }
                file.write_all(&buf[..n]).map_err(io_err)?;
                hasher.update(&buf[..n]);
                received += n as u64;
            }
            if let Some(exp) = expected_len {
                if received < exp {
                    let _ = file.sync_all();
                    return Err(DownloadError::Truncated {
                        url: shown,
                        received,
                        expected: exp,
                    });
                }
            }
            file.sync_all().map_err(io_err)?;
            drop(file);
            let got = hasher.finish();
            if let Err(e) = verify(&shown, pin, also, &got) {
                let _ = fs::remove_file(&partial);
                if offset > 0 && allow_resume {
                    // The prefix came from an earlier response; give a whole fresh body one try
                    // before calling the server's content wrong.
                    allow_resume = false;
                    continue;
                }
                return Err(e);
            }
            return finish(&partial, dest, &self.cache_dir).map_err(io_err);
        }
    }
}

fn finish(partial: &Path, dest: &Path, dir: &Path) -> io::Result<()> {
    fs::set_permissions(partial, fs::Permissions::from_mode(0o600))?;
    fs::rename(partial, dest)?;
    File::open(dir)?.sync_all()
}

fn partial_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Start offset of `bytes START-END/TOTAL`.
fn content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, _total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    start.trim().parse().ok()
}

fn io_to_download(url: &str, e: io::Error) -> DownloadError {
    // reqwest's blocking body reader wraps its own error in io::Error.
    let kind = e.kind();
    match e.into_inner() {
        Some(inner) => match inner.downcast::<reqwest::Error>() {
            Ok(source) => DownloadError::Transport {
                url: url.to_string(),
                source: source.without_url(),
            },
            Err(other) => DownloadError::Read {
                url: url.to_string(),
                source: io::Error::new(kind, other),
            },
        },
        None => DownloadError::Read {
            url: url.to_string(),
            source: io::Error::from(kind),
        },
    }
}

struct HashWriter<'a>(&'a mut Hasher);
impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
