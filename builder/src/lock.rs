//! `kiln lock PROFILE`: resolves or refreshes every pin of a profile from upstream's own
//! checksum publications, shows the change as a diff and writes it back into the profile
//! text, keeping everything else (comments, order, quoting) byte for byte.
//!
//! Sources, per artifact (URLs from the profile: `artifacts.mirror` in kiln's mirror layout,
//! upstream otherwise, `tailscale.operator.chart-repo` for the chart):
//! - K3s binary (and `k3s.images` listed there): the release's `sha256sum-amd64.txt`;
//! - Tailscale tarball: the `<tarball>.sha256` published beside it;
//! - the operator chart (only when the profile pins it): the `digest` of its entry in the chart
//!   repository's `index.yaml`;
//! - Argo CD `install.yaml`: none is published, so the downloaded bytes are the only source.
//!
//! Every artifact is downloaded and hashed (sha256 and sha512 in one pass, and its length), so
//! a publication is checked against the bytes it describes, and the profile's existing pin
//! against both. Any two that disagree stop the command with both values shown and nothing
//! written; `--refresh` lets the profile's own (old) pins be replaced, after a version bump.
//! The written pin keeps the profile's algorithm (sha256 unless it said sha512) and gains the
//! exact `size`.

// ProfileError carries the source text for its snippet; it is built once per failed run, so
// its size on the (cold) error path does not matter.

use crate::diag::SourceFile;
use crate::pins::PinKeys;
use crate::profile::{self, Loaded, Profile, ARGOCD_V3_4_7_INSTALL_SHA256};
use crate::resolve::upstream;
use crate::source::{display_path, key_path, Seg, Sources};
use anyhow::{bail, Context, Result};
use kiln_plan::{Digest, Hasher, Hashes, Pin, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

#[derive(clap::Args, Debug)]
pub struct Args {
    pub profile: PathBuf,
    /// Show what would change and write nothing; exit status 1 when a pin would change.
    #[arg(long)]
    pub check: bool,
    /// Replace pins in the profile that disagree with upstream (after changing a version)
    /// instead of refusing. Upstream sources that disagree with each other still refuse.
    #[arg(long)]
    pub refresh: bool,
}

/// One pinned artifact of the profile and where upstream vouches for it.
#[derive(Debug, Clone)]
pub struct Target {
    pub keys: PinKeys,
    /// For messages: `k3s v1.32.4+k3s1 binary`.
    pub what: String,
    /// What the node downloads.
    pub url: Url,
    /// The profile's pin (or kiln's built-in one); an all-zero placeholder counts as none.
    pub current: Option<Pin>,
    /// The profile writes this pin as sha512 (a placeholder included): the new one is too.
    pub sha512: bool,
    pub published: Option<Published>,
}

/// Where upstream publishes a sha256 of the artifact, and how to read it.
#[derive(Debug, Clone)]
pub enum Published {
    /// A `sha256sum`-style file: the line whose file name is `name`.
    SumsFile { url: Url, name: String },
    /// A file holding the hex digest (optionally followed by a name).
    DigestFile { url: Url },
    /// A Helm repository `index.yaml`: `entries.<chart>[version].digest`.
    HelmIndex {
        url: Url,
        chart: String,
        version: String,
    },
}

impl Published {
    pub fn url(&self) -> &Url {
        match self {
            Published::SumsFile { url, .. }
            | Published::DigestFile { url }
            | Published::HelmIndex { url, .. } => url,
        }
    }
}

/// A pin that would change, and the source text edit that makes it so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub old: Option<String>,
    pub new: String,
}

pub fn run(a: &Args) -> Result<(), crate::pipeline::BuildError> {
    let loaded = profile::load(&a.profile)?;
    let http = Http::new()?;
    let targets = targets(&loaded.profile);
    let mut changes = Vec::new();
    let mut edits = Edits::default();
    for t in &targets {
        let pin = lock_one(&http, t, a.refresh, &loaded.sources)?;
        plan_edits(&loaded.sources, t, &pin, &mut edits, &mut changes)?;
        println!("kiln lock: {:<44} {pin}", t.what);
    }
    if changes.is_empty() {
        println!("kiln lock: every pin of {} is current", a.profile.display());
        return Ok(());
    }
    let new_texts = edits.apply(&loaded.sources)?;
    print!("{}", diff(&loaded.sources, &new_texts));
    if a.check {
        return Err(anyhow::anyhow!(
            "{} pin(s) of {} differ from upstream (kiln lock --check wrote nothing)",
            changes.len(),
            a.profile.display()
        )
        .into());
    }
    write_back(&a.profile, &loaded.sources, &new_texts, &targets)?;
    println!(
        "kiln lock: wrote {} pin change(s) into {}",
        changes.len(),
        new_texts
            .iter()
            .map(|(i, _)| loaded.sources.files[*i].path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// Every pin the profile has or needs, with the URL the node will download and its
/// publication. URLs follow `resolve` (a test keeps the two in step).
pub fn targets(p: &Profile) -> Vec<Target> {
    let mirror = p.artifacts.mirror.as_ref().map(with_slash);
    let k = &p.k3s;
    let tag = k.version.url_tag();
    let (k3s_base, sums_url) = match &mirror {
        Some(m) => (
            join(m, &format!("k3s/{tag}/")),
            join(m, &format!("k3s/{tag}/sha256sum-amd64.txt")),
        ),
        None => {
            let b = Url::parse(upstream::K3S).expect("valid");
            (
                join(&b, &format!("{tag}/")),
                join(&b, &format!("{tag}/sha256sum-amd64.txt")),
            )
        }
    };
    let sums = |name: &str| Published::SumsFile {
        url: sums_url.clone(),
        name: name.to_string(),
    };
    let mut out = vec![Target {
        keys: PinKeys::plain(&["k3s"]),
        what: format!("k3s {} binary", k.version),
        url: join(&k3s_base, "k3s"),
        current: current(k.digest, k.size),
        sha512: is_sha512(k.digest),
        published: Some(sums("k3s")),
    }];
    for (i, img) in k.images.iter().enumerate() {
        let mut keys = PinKeys::plain(&["k3s", "images"]);
        keys.parent.push(Seg::Index(i));
        let name = img
            .url
            .path_segments()
            .and_then(|mut x| x.next_back())
            .unwrap_or("")
            .to_string();
        out.push(Target {
            keys,
            what: format!("k3s image archive {name}"),
            url: img.url.clone(),
            current: current(img.digest, img.size),
            sha512: is_sha512(img.digest),
            // K3s lists its own airgap image archives in the same sums file; others have none.
            published: Some(sums(&name)).filter(|_| name.starts_with("k3s-airgap-images")),
        });
    }
    let t = &p.tailscale;
    let tarball = format!("tailscale_{}_amd64.tgz", t.version.bare());
    let ts_url = match &mirror {
        Some(m) => join(m, &format!("tailscale/{tarball}")),
        None => join(&Url::parse(upstream::TAILSCALE).expect("valid"), &tarball),
    };
    out.push(Target {
        keys: PinKeys::plain(&["tailscale"]),
        what: format!("tailscale {} tarball", t.version),
        published: Some(Published::DigestFile {
            url: Url::parse(&format!("{ts_url}.sha256")).expect("valid"),
        }),
        url: ts_url,
        current: current(t.digest, t.size),
        sha512: is_sha512(t.digest),
    });
    out.extend(chart_target(p, mirror.as_ref()));
    out.extend(argocd_target(p, mirror.as_ref()));
    out
}

/// The operator chart, only when the profile pins it (otherwise the helm-controller fetches
/// it from the repository itself and there is no pin).
fn chart_target(p: &Profile, mirror: Option<&Url>) -> Option<Target> {
    let t = &p.tailscale;
    let o = t.operator.as_ref()?;
    if o.chart_digest.is_none() && o.chart_size.is_none() {
        return None;
    }
    let version = o.chart_version.clone().unwrap_or_else(|| t.version.bare());
    let name = format!("tailscale-operator-{version}.tgz");
    let (url, index) = match mirror {
        Some(m) => (
            join(m, &format!("tailscale/{name}")),
            join(m, "tailscale/index.yaml"),
        ),
        None => {
            let repo = with_slash(&o.chart_repo);
            (join(&repo, &name), join(&repo, "index.yaml"))
        }
    };
    Some(Target {
        keys: PinKeys::new(
            key_path(&["tailscale", "operator"]),
            "chart-digest",
            "chart-size",
        ),
        what: format!("tailscale-operator chart {version}"),
        url,
        current: current(o.chart_digest, o.chart_size),
        sha512: is_sha512(o.chart_digest),
        published: Some(Published::HelmIndex {
            url: index,
            chart: "tailscale-operator".into(),
            version,
        }),
    })
}

/// Argo CD's install.yaml (a server's; an agent has none).
fn argocd_target(p: &Profile, mirror: Option<&Url>) -> Option<Target> {
    let ac = p.argocd.as_ref()?;
    let argo_tag = ac.version.tag();
    let builtin = (ac.digest.is_none()
        && ac.version.to_string() == profile::DEFAULT_ARGOCD_VERSION)
        .then(|| {
            Pin::new(
                ARGOCD_V3_4_7_INSTALL_SHA256
                    .parse::<Sha256>()
                    .expect("valid"),
                None,
            )
        });
    Some(Target {
        keys: PinKeys::plain(&["argocd"]),
        what: format!("argo-cd {argo_tag} install.yaml"),
        url: match mirror {
            Some(m) => join(m, &format!("argocd/{argo_tag}/install.yaml")),
            None => join(
                &Url::parse(upstream::ARGOCD).expect("valid"),
                &format!("{argo_tag}/manifests/install.yaml"),
            ),
        },
        current: current(ac.digest, ac.size).or(builtin),
        sha512: is_sha512(ac.digest),
        published: None,
    })
}

fn is_sha512(d: Option<Digest>) -> bool {
    matches!(d, Some(Digest::Sha512(_)))
}

fn current(digest: Option<Digest>, size: Option<u64>) -> Option<Pin> {
    digest.filter(|d| !d.is_all_zero()).map(|digest| Pin {
        digest,
        size: size.filter(|n| *n > 0),
    })
}

/// Downloads and hashes one artifact, reads its publication, and returns the pin to write;
/// refuses when any two of the bytes, the publication and the profile disagree.
fn lock_one(http: &Http, t: &Target, refresh: bool, s: &Sources) -> Result<Pin> {
    let published = match &t.published {
        Some(p) => Some((p.url().clone(), read_published(http, p)?)),
        None => None,
    };
    let h = http
        .hash(&t.url)
        .with_context(|| format!("downloading the {} to hash it", t.what))?;
    if let Some((url, sha)) = &published {
        if *sha != h.sha256 {
            bail!(
                "refusing to lock the {}: two sources disagree\n  {}: sha256:{sha}\n  the bytes downloaded from {}: sha256:{}",
                t.what,
                shown(url),
                shown(&t.url),
                h.sha256
            );
        }
    }
    if let (Some(cur), false) = (&t.current, refresh) {
        let at = place(s, &t.keys.digest_path());
        if !cur.digest.matches(&h) {
            bail!(
                "refusing to lock the {}: two sources disagree\n  the profile ({at}): {}\n  {}: {}\n(after changing a version, run `kiln lock --refresh`)",
                t.what,
                cur.digest,
                published.as_ref().map_or_else(|| format!("the bytes downloaded from {}", shown(&t.url)), |(u, _)| shown(u)),
                cur.digest.of(&h)
            );
        }
        if let Some(n) = cur.size.filter(|n| *n != h.size) {
            bail!(
                "refusing to lock the {}: two sources disagree\n  the profile ({}): size {n}\n  the bytes downloaded from {}: size {}",
                t.what,
                place(s, &t.keys.size_path()),
                shown(&t.url),
                h.size
            );
        }
    }
    let digest = match t.sha512 {
        true => Digest::Sha512(h.sha512),
        false => Digest::Sha256(h.sha256),
    };
    Ok(Pin {
        digest,
        size: Some(h.size),
    })
}

fn place(s: &Sources, path: &[Seg]) -> String {
    match s.index.get(path) {
        Some(l) => format!(
            "{}:{}:{}",
            s.files[l.value.file].path.display(),
            l.value.line,
            l.value.col
        ),
        None => "kiln's built-in pin".into(),
    }
}

/// The sha256 a publication states for its artifact.
fn read_published(http: &Http, p: &Published) -> Result<Sha256> {
    let url = p.url();
    let text = http.text(url)?;
    let hex = match p {
        Published::SumsFile { name, .. } => text
            .lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                let (hex, file) = (w.next()?, w.next()?);
                (file.trim_start_matches('*') == name).then(|| hex.to_string())
            })
            .with_context(|| format!("{} has no line for {name}", shown(url)))?,
        Published::DigestFile { .. } => text
            .split_whitespace()
            .next()
            .with_context(|| format!("{} is empty", shown(url)))?
            .to_string(),
        Published::HelmIndex { chart, version, .. } => {
            helm_digest(&text, chart, version).with_context(|| format!("reading {}", shown(url)))?
        }
    };
    hex.parse::<Sha256>().with_context(|| {
        format!(
            "{} does not hold a sha256 for this artifact: {hex:?}",
            shown(url)
        )
    })
}

/// `entries.<chart>[].digest` of the entry with `version` in a Helm repository index.
pub fn helm_digest(index: &str, chart: &str, version: &str) -> Result<String> {
    let v: serde_yaml::Value =
        serde_yaml::from_str(index).context("not a Helm repository index")?;
    let entries = v
        .get("entries")
        .and_then(|e| e.get(chart))
        .and_then(|e| e.as_sequence())
        .with_context(|| format!("the index has no chart {chart:?}"))?;
    let entry = entries
        .iter()
        .find(|e| {
            e.get("version")
                .and_then(|x| x.as_str())
                .map(|x| x.trim_start_matches('v'))
                == Some(version.trim_start_matches('v'))
        })
        .with_context(|| format!("the index has no {chart} version {version}"))?;
    entry
        .get("digest")
        .and_then(|d| d.as_str())
        .map(str::to_string)
        // (A digest YAML reads as a number, all digits, is not one a repository index writes.)
        .with_context(|| format!("the index entry for {chart} {version} has no digest string"))
}

/// A URL for messages: no userinfo, no query (a SAS token), no fragment.
fn shown(u: &Url) -> String {
    let mut u = u.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

fn with_slash(u: &Url) -> Url {
    let mut u = u.clone();
    if !u.path().ends_with('/') {
        let p = format!("{}/", u.path());
        u.set_path(&p);
    }
    u
}

fn join(base: &Url, rel: &str) -> Url {
    base.join(rel).expect("relative artifact path joins")
}

/// Blocking HTTP for a command a person runs: plain GETs, no retries (an error names the URL
/// and the person re-runs), bounded bodies.
struct Http {
    client: reqwest::blocking::Client,
}

const TEXT_LIMIT: u64 = 16 << 20;
const ARTIFACT_LIMIT: u64 = 8 << 30;

impl Http {
    fn new() -> Result<Http> {
        // reqwest is built without a default crypto provider (see firstboot/Cargo.toml); the
        // process-wide one must exist before any client. Err = already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .timeout(Duration::from_secs(120))
            .user_agent(concat!("kiln-lock/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Http { client })
    }

    fn get(&self, url: &Url) -> Result<reqwest::blocking::Response> {
        let resp = self
            .client
            .get(url.clone())
            .send()
            .map_err(|e| anyhow::anyhow!("{}: {}", shown(url), e.without_url()))?;
        if resp.status().as_u16() != 200 {
            bail!("{}: HTTP {}", shown(url), resp.status().as_u16());
        }
        Ok(resp)
    }

    fn text(&self, url: &Url) -> Result<String> {
        let mut body = Vec::new();
        self.get(url)?
            .take(TEXT_LIMIT + 1)
            .read_to_end(&mut body)
            .with_context(|| format!("reading {}", shown(url)))?;
        if body.len() as u64 > TEXT_LIMIT {
            bail!("{}: larger than {TEXT_LIMIT} bytes", shown(url));
        }
        String::from_utf8(body).with_context(|| format!("{} is not UTF-8 text", shown(url)))
    }

    /// Streams the body through both hashes; nothing is stored.
    fn hash(&self, url: &Url) -> Result<Hashes> {
        let mut body = self.get(url)?;
        let mut h = Hasher::default();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = body
                .read(&mut buf)
                .with_context(|| format!("reading {}", shown(url)))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            if h.size() > ARTIFACT_LIMIT {
                bail!("{}: larger than {ARTIFACT_LIMIT} bytes", shown(url));
            }
        }
        Ok(h.finish())
    }
}

/// Text edits per source file: replace a value span, or insert lines after a line.
#[derive(Debug, Default)]
struct Edits {
    /// (file, line, col, old value length in bytes, new text)
    replace: Vec<(usize, usize, usize, usize, String)>,
    /// (file, after line, new line text)
    insert: Vec<(usize, usize, String)>,
}

fn plan_edits(
    s: &Sources,
    t: &Target,
    pin: &Pin,
    edits: &mut Edits,
    changes: &mut Vec<Change>,
) -> Result<()> {
    let wanted = [
        (
            t.keys.digest_path(),
            t.keys.digest,
            format!("\"{}\"", pin.digest),
        ),
        (
            t.keys.size_path(),
            t.keys.size,
            pin.size.map(|n| n.to_string()).unwrap_or_default(),
        ),
    ];
    for (path, key, value) in wanted {
        if value.is_empty() {
            continue;
        }
        match s.index.get(&path) {
            Some(loc) => {
                let f = &s.files[loc.value.file];
                let line = f.text.lines().nth(loc.value.line - 1).unwrap_or("");
                let start = byte_col(line, loc.value.col);
                let len = scalar_len(&line[start..]);
                let old = &line[start..start + len];
                if unquote(old) != unquote(&value) {
                    changes.push(Change {
                        key: display_path(&path),
                        old: Some(old.to_string()),
                        new: value.clone(),
                    });
                    edits
                        .replace
                        .push((loc.value.file, loc.value.line, start, len, value));
                }
            }
            None => {
                // Beside its sibling when that is written (`size` under `digest`), else right
                // under the mapping.
                let sibling = s.index.get(&t.keys.digest_path()).and_then(|l| l.key);
                let (file, after, indent) = match sibling {
                    Some(k) if path != t.keys.digest_path() => (k.file, k.line, k.col - 1),
                    _ => insertion_point(s, &t.keys.parent)?,
                };
                changes.push(Change {
                    key: display_path(&path),
                    old: None,
                    new: value.clone(),
                });
                edits
                    .insert
                    .push((file, after, format!("{}{key}: {value}", " ".repeat(indent))));
            }
        }
    }
    Ok(())
}

fn unquote(v: &str) -> &str {
    v.trim_matches(|c| c == '"' || c == '\'')
}

fn byte_col(line: &str, col: usize) -> usize {
    line.chars()
        .take(col.saturating_sub(1))
        .map(char::len_utf8)
        .sum()
}

/// Length of the scalar at the start of `rest`: a quoted string with its quotes, or a plain
/// scalar up to a comment or the end of the line.
fn scalar_len(rest: &str) -> usize {
    let b = rest.as_bytes();
    match b.first() {
        Some(q @ (b'"' | b'\'')) => rest[1..].find(*q as char).map_or(rest.len(), |i| i + 2),
        _ => {
            let end = rest.find(" #").unwrap_or(rest.len());
            rest[..end].trim_end().len()
        }
    }
}

/// Where a missing key of the mapping at `parent` is written: after the mapping's key line
/// (`k3s:`), or after the first line of a list item, at the indentation of its other keys.
fn insertion_point(s: &Sources, parent: &[Seg]) -> Result<(usize, usize, usize)> {
    let name = display_path(parent);
    let loc = s
        .index
        .get(parent)
        .with_context(|| format!("the profile has no `{name}` to write its pin into"))?;
    let file = loc.value.file;
    let f = &s.files[file];
    // The column of the mapping's own keys.
    let indent = s
        .index
        .iter()
        .filter(|(k, l)| {
            k.len() == parent.len() + 1 && k.starts_with(parent) && l.value.file == file
        })
        .filter_map(|(_, l)| l.key)
        .map(|k| k.col - 1)
        .min();
    let line_no = match loc.key {
        Some(k) => {
            let line = f.text.lines().nth(k.line - 1).unwrap_or("");
            let after_colon = line[byte_col(line, k.col)..]
                .split_once(':')
                .map(|x| x.1)
                .unwrap_or("");
            let rest = after_colon.split(" #").next().unwrap_or("").trim();
            if !rest.is_empty() {
                bail!(
                    "{}:{}: `{name}` is written inline; add its pin by hand",
                    f.path.display(),
                    k.line
                );
            }
            k.line
        }
        None => loc.value.line,
    };
    let indent = indent.or_else(|| loc.key.map(|k| k.col + 1)).unwrap_or(2);
    Ok((file, line_no, indent))
}

impl Edits {
    /// The new text of every file that changes.
    fn apply(&self, s: &Sources) -> Result<Vec<(usize, String)>> {
        let mut out = Vec::new();
        for (i, f) in s.files.iter().enumerate() {
            let mut lines: Vec<String> = f.text.lines().map(str::to_string).collect();
            let mut reps: Vec<_> = self.replace.iter().filter(|r| r.0 == i).collect();
            let ins: Vec<_> = self.insert.iter().filter(|r| r.0 == i).collect();
            if reps.is_empty() && ins.is_empty() {
                continue;
            }
            reps.sort_by_key(|r| std::cmp::Reverse((r.1, r.2)));
            for (_, line, start, len, new) in reps {
                lines[line - 1].replace_range(*start..start + len, new);
            }
            // Inserts after the same line keep their order: digest, then size.
            let mut by_line: Vec<(usize, Vec<String>)> = Vec::new();
            for (_, after, text) in ins {
                match by_line.iter_mut().find(|(l, _)| l == after) {
                    Some((_, v)) => v.push(text.clone()),
                    None => by_line.push((*after, vec![text.clone()])),
                }
            }
            by_line.sort_by_key(|(l, _)| std::cmp::Reverse(*l));
            for (after, texts) in by_line {
                for (k, t) in texts.into_iter().enumerate() {
                    lines.insert(after + k, t);
                }
            }
            let mut text = lines.join("\n");
            if f.text.ends_with('\n') {
                text.push('\n');
            }
            out.push((i, text));
        }
        Ok(out)
    }
}

/// A unified-style diff of the changed lines (each edit touches single lines).
fn diff(s: &Sources, new: &[(usize, String)]) -> String {
    let mut out = String::new();
    for (i, text) in new {
        let f = &s.files[*i];
        out.push_str(&format!(
            "--- {}\n+++ {} (locked)\n",
            f.path.display(),
            f.path.display()
        ));
        let old: Vec<&str> = f.text.lines().collect();
        let newl: Vec<&str> = text.lines().collect();
        let (mut a, mut b) = (0, 0);
        while a < old.len() || b < newl.len() {
            if a < old.len() && b < newl.len() && old[a] == newl[b] {
                a += 1;
                b += 1;
                continue;
            }
            // An inserted line: the old line reappears just below.
            let inserted = a < old.len() && newl[b..].iter().take(4).any(|l| *l == old[a]);
            if inserted || a >= old.len() {
                out.push_str(&format!("@@ -{a} +{} @@\n+{}\n", b + 1, newl[b]));
                b += 1;
            } else {
                out.push_str(&format!(
                    "@@ -{} +{} @@\n-{}\n+{}\n",
                    a + 1,
                    b + 1,
                    old[a],
                    newl.get(b).copied().unwrap_or("")
                ));
                a += 1;
                b += 1;
            }
        }
    }
    out
}

/// Writes the new texts (each atomically), then reads the profile back: it must parse and
/// carry exactly the locked pins, or the old texts are put back.
fn write_back(
    profile_path: &Path,
    s: &Sources,
    new: &[(usize, String)],
    targets: &[Target],
) -> Result<()> {
    for (i, text) in new {
        write_atomic(&s.files[*i].path, text)?;
    }
    let check = || -> Result<Loaded> {
        let l = profile::load(profile_path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let again = self::targets(&l.profile);
        if again.len() != targets.len()
            || again
                .iter()
                .any(|t| t.current.is_none_or(|p| p.size.is_none()))
        {
            bail!("the written profile does not carry every pin");
        }
        Ok(l)
    };
    if let Err(e) = check() {
        for (i, _) in new {
            let f: &SourceFile = &s.files[*i];
            write_atomic(&f.path, &f.text)?;
        }
        return Err(e.context("kiln lock: the edited profile did not read back; restored it"));
    }
    Ok(())
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("kiln-lock.tmp");
    let mode = std::fs::metadata(path).map(|m| m.permissions()).ok();
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    if let Some(m) = mode {
        std::fs::set_permissions(&tmp, m).with_context(|| format!("chmod {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_spans_cover_quotes_and_stop_at_comments() {
        assert_eq!(scalar_len("\"sha256:ab\"  # c"), 11);
        assert_eq!(scalar_len("'x'"), 3);
        assert_eq!(scalar_len("24112  # stand-in"), 5);
        assert_eq!(scalar_len("24112"), 5);
    }

    #[test]
    fn helm_index_digest_is_found_by_chart_and_version() {
        let idx = "apiVersion: v1\nentries:\n  tailscale-operator:\n  - version: 1.102.3\n    digest: abc\n  - version: 1.100.0\n    digest: def\n";
        assert_eq!(
            helm_digest(idx, "tailscale-operator", "1.102.3").unwrap(),
            "abc"
        );
        assert!(helm_digest(idx, "tailscale-operator", "9.9.9").is_err());
        assert!(helm_digest(idx, "other", "1.102.3").is_err());
    }
}
