//! Checks on the rendered payload: cloud-init's own JSON schemas (22.4.2, the oldest cloud-init
//! kiln supports, and 26.1, the newest on Ubuntu 22.04) and the platforms' user-data budgets.

use crate::gzcache::{gzip, Cache};
use crate::resolve::Delivery;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::sync::OnceLock;

pub const SCHEMAS: [(&str, &str); 2] = [
    (
        "cloud-init 22.4.2",
        include_str!("../schemas/cloud-init-22.4.2.schema-cloud-config-v1.json"),
    ),
    (
        "cloud-init 26.1",
        include_str!("../schemas/cloud-init-26.1.schema-cloud-config-v1.json"),
    ),
];

/// Azure: custom_data is at most 65,535 bytes after base64 decoding.
pub const AZURE_LIMIT: usize = 65_535;
/// kiln's own goal for the reference profile in url delivery.
pub const GOAL_URL_MODE: usize = 8 * 1024;
/// Other platforms, for the table (user-data limits as documented by each).
pub const LIMITS: [(&str, usize); 4] = [
    ("azure custom_data", AZURE_LIMIT),
    ("aws user-data", 16 * 1024),
    ("hetzner user-data", 32 * 1024),
    ("openstack user-data", 65_535),
];

fn validators() -> &'static Vec<(&'static str, jsonschema::Validator)> {
    static V: OnceLock<Vec<(&'static str, jsonschema::Validator)>> = OnceLock::new();
    V.get_or_init(|| {
        SCHEMAS
            .iter()
            .map(|(name, text)| {
                let schema: serde_json::Value =
                    serde_json::from_str(text).expect("bundled schema is JSON");
                let v = jsonschema::draft4::new(&schema).expect("bundled schema compiles");
                (*name, v)
            })
            .collect()
    })
}

/// What a [`cloud_config`] verdict depends on besides the document: the schemas, this file (the
/// YAML-to-JSON step and the validator setup) and the exact versions of every dependency
/// (serde_yaml, jsonschema: Cargo.lock).
const VERDICT_INPUTS: [&str; 4] = [
    SCHEMAS[0].1,
    SCHEMAS[1].1,
    include_str!("validate.rs"),
    include_str!("../../Cargo.lock"),
];

/// The key under which a passing [`cloud_config`] of `user_data` is remembered: a digest of
/// the document and of everything the verdict depends on, each length-prefixed.
pub fn verdict_key(user_data: &str) -> kiln_plan::Sha256 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"kiln cloud-config schema verdict v1\0");
    for part in VERDICT_INPUTS.iter().chain([&user_data]) {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    kiln_plan::Sha256::from_bytes(h.finalize().into())
}

/// [`cloud_config`], skipped when `cache` recorded a pass for the same inputs
/// ([`verdict_key`]); a pass is recorded, a failure never is.
pub fn cloud_config_cached(user_data: &str, cache: Option<&Cache>) -> Result<()> {
    let Some(cache) = cache else {
        return cloud_config(user_data);
    };
    let key = verdict_key(user_data);
    if cache.passed(&key) {
        return Ok(());
    }
    cloud_config(user_data)?;
    cache.record_pass(&key);
    Ok(())
}

/// Validates a `#cloud-config` document; the error names the schema and the JSON path.
pub fn cloud_config(user_data: &str) -> Result<()> {
    if !user_data.starts_with("#cloud-config\n") {
        bail!("user-data must start with #cloud-config");
    }
    let doc: serde_yaml::Value =
        serde_yaml::from_str(user_data).context("rendered user-data is not valid YAML")?;
    let json = serde_json::to_value(&doc).context("rendered user-data is not JSON-compatible")?;
    for (name, v) in validators() {
        let errors: Vec<String> = v
            .iter_errors(&json)
            .map(|e| {
                let path = e.instance_path().to_string();
                format!(
                    "{}: {e}",
                    if path.is_empty() {
                        "/".to_string()
                    } else {
                        path
                    }
                )
            })
            .collect();
        if !errors.is_empty() {
            return Err(anyhow!(
                "rendered cloud-config violates the {name} schema:\n  {}",
                errors.join("\n  ")
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub platform: &'static str,
    pub limit: usize,
    pub size: usize,
    pub fits: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Contributor {
    pub what: String,
    /// Bytes in user-data.
    pub bytes: usize,
    /// Bytes when gzip-compressed alone: a fair guide to its share of custom_data.gz.
    pub gzip_bytes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    pub delivery: &'static str,
    pub user_data: usize,
    pub custom_data_gz: usize,
    pub goal: Option<usize>,
    pub rows: Vec<Row>,
    /// Largest first.
    pub contributors: Vec<Contributor>,
}

impl Budget {
    pub fn table(&self) -> String {
        let mut out = format!(
            "budget ({} delivery): user-data {} bytes, custom_data.gz {} bytes{}\n",
            self.delivery,
            self.user_data,
            self.custom_data_gz,
            match self.goal {
                Some(g) => format!(" (goal ≤ {g})"),
                None => String::new(),
            }
        );
        for r in &self.rows {
            out.push_str(&format!(
                "  {:<22} limit {:>6}  {}\n",
                r.platform,
                r.limit,
                if r.fits { "fits" } else { "TOO LARGE" }
            ));
        }
        out.push_str("  largest contributors (bytes / gzip alone):\n");
        for c in self.contributors.iter().take(6) {
            out.push_str(&format!(
                "    {:<44} {:>9} / {:>7}\n",
                c.what, c.bytes, c.gzip_bytes
            ));
        }
        out
    }
}

fn contributors(user_data: &str) -> Vec<Contributor> {
    let mut out = Vec::new();
    let mut accounted = 0usize;
    if let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(user_data) {
        if let Some(files) = doc.get("write_files").and_then(|w| w.as_sequence()) {
            for f in files {
                let path = f.get("path").and_then(|p| p.as_str()).unwrap_or("?");
                let content = f.get("content").and_then(|c| c.as_str()).unwrap_or("");
                let secret = path.starts_with(kiln_plan::paths::SECRETS_DIR);
                accounted += content.len();
                out.push(Contributor {
                    what: format!(
                        "write_files {path}{}",
                        if secret { " (secret)" } else { "" }
                    ),
                    bytes: content.len(),
                    gzip_bytes: gzip(content.as_bytes()).len(),
                });
            }
        }
    }
    let rest = user_data.len().saturating_sub(accounted);
    let files_gz: usize = out.iter().map(|c| c.gzip_bytes).sum();
    out.push(Contributor {
        what: "cloud-config keys and YAML structure".into(),
        bytes: rest,
        gzip_bytes: gzip(user_data.as_bytes())
            .len()
            .saturating_sub(files_gz)
            .min(rest),
    });
    out.sort_by(|a, b| b.gzip_bytes.cmp(&a.gzip_bytes).then(a.what.cmp(&b.what)));
    out
}

/// The budget table; an error when a url-delivery payload exceeds Azure's limit. (Inline
/// payloads carry the whole bundle and are meant for NoCloud seeds, which have no limit.)
pub fn budget(user_data: &str, gz_len: usize, delivery: &Delivery) -> Result<Budget, OverBudget> {
    let url = matches!(delivery, Delivery::Url { .. });
    let budget = Budget {
        delivery: delivery.name(),
        user_data: user_data.len(),
        custom_data_gz: gz_len,
        goal: url.then_some(GOAL_URL_MODE),
        rows: LIMITS
            .iter()
            .map(|(platform, limit)| Row {
                platform,
                limit: *limit,
                size: gz_len,
                fits: gz_len <= *limit,
            })
            .collect(),
        contributors: contributors(user_data),
    };
    if url && gz_len > AZURE_LIMIT {
        let largest = budget
            .contributors
            .first()
            .map(|c| c.what.clone())
            .unwrap_or_default();
        return Err(OverBudget {
            size: gz_len,
            table: budget.table(),
            largest,
        });
    }
    Ok(budget)
}

/// A url-delivery payload over Azure's custom_data limit.
#[derive(Debug, thiserror::Error)]
#[error("custom_data.gz is {size} bytes, over Azure's limit of 65535 bytes by {}\n{table}", size - AZURE_LIMIT)]
pub struct OverBudget {
    pub size: usize,
    pub table: String,
    /// The largest contributor (`write_files /etc/kiln/secrets/... (secret)`).
    pub largest: String,
}
