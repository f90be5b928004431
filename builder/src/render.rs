//! Rendering: bundle, cloud-config (user-data), custom_data.gz, meta-data, seed.img and
//! build.json, all in memory and deterministic. Nothing here touches the output directory.

use crate::gzcache::{self, gzip, Cache, FileSpan};
use crate::resolve::{Delivery, Resolved};
use crate::{seed, validate};
use anyhow::{Context, Result};
use flate2::{Compression, GzBuilder};
use kiln_plan::{manifests, paths, BundledManifest, Plan, Sha256};
use serde::Serialize;
use std::io::Write;
use std::ops::Range;

pub const USER_DATA_TEMPLATE: &str = include_str!("../templates/user-data.tera");
pub const BOOTSTRAP_TEMPLATE: &str = include_str!("../templates/bootstrap.sh.tera");
pub const META_DATA_TEMPLATE: &str = include_str!("../templates/meta-data.tera");
/// The daemon's unit, owned by the daemon (firstboot/systemd/).
pub const UNIT: &str = include_str!("../../firstboot/systemd/kiln-firstboot.service");
pub const BOOTSTRAP_PATH: &str = "/var/lib/kiln/bootstrap.sh";

/// Output file names, in the order build.json lists them.
pub const USER_DATA: &str = "user-data";
pub const CUSTOM_DATA: &str = "custom_data.gz";
pub const META_DATA: &str = "meta-data";
pub const SEED: &str = "seed.img";
pub const BUNDLE: &str = "bundle.tar.gz";
/// The bundle's file name on a `CIDATA` seed volume (seed delivery, and the bake seed).
pub const SEED_BUNDLE: &str = "bundle.tar.gz";
/// The label NoCloud seeds carry (cloud-init also accepts lower case).
pub const SEED_LABEL: &str = "CIDATA";
pub const BUILD_JSON: &str = "build.json";
/// Every output of `kiln build`, in the order `Rendered::files` holds them.
pub const OUTPUTS: [&str; 6] = [USER_DATA, CUSTOM_DATA, META_DATA, SEED, BUNDLE, BUILD_JSON];

/// Build-time inputs besides the resolved profile.
pub struct Inputs<'a> {
    pub daemon: &'a [u8],
    /// Tar mtimes and FAT timestamps (SOURCE_DATE_EPOCH, or 0).
    pub epoch: u64,
    /// Shown in the cloud-config header and build.json (the profile path as given).
    pub profile_name: String,
    /// Compressed bundle members from earlier builds (`kiln build`); `None` compresses all.
    pub cache: Option<&'a Cache>,
}

#[derive(Debug)]
pub struct Rendered {
    pub plan: Plan,
    pub bundle_sha256: Sha256,
    pub bundle_url: Option<url::Url>,
    /// (name, bytes) for every output, build.json last.
    pub files: Vec<(&'static str, Vec<u8>)>,
    /// The sha256 of each of `files`, in the same order (hashed once, shown and recorded).
    pub sums: Vec<Sha256>,
    pub bootstrap: String,
    pub budget: validate::Budget,
    pub warnings: Vec<String>,
}

impl Rendered {
    pub fn file(&self, name: &str) -> &[u8] {
        &self
            .files
            .iter()
            .find(|(n, _)| *n == name)
            .expect("known output")
            .1
    }
}

/// SOURCE_DATE_EPOCH when set (reproducible-builds.org), else 0.
pub fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
        Err(_) => Ok(0),
    }
}

/// Bundle compression: independent gzip members of fixed-size chunks, compressed in parallel
/// (like pigz). A multi-member gzip file is one valid gzip stream for `gzip -d`/`tar -xz`; the
/// result depends only on the input bytes, not on the number of threads.
pub const BUNDLE_CHUNK: usize = 512 * 1024;

pub fn gzip_parallel(data: &[u8], level: Compression) -> Vec<u8> {
    gzip_parallel_cached(data, level, None)
}

/// [`gzip_parallel`], taking each member from `cache` when it holds it (same bytes either way).
/// `spans` says where `data` holds files of known sha256 (see [`gzcache::member_key`]).
pub fn gzip_parallel_cached(
    data: &[u8],
    level: Compression,
    cache: Option<(&Cache, &[FileSpan])>,
) -> Vec<u8> {
    let chunks: Vec<Range<usize>> = (0..data.len())
        .step_by(BUNDLE_CHUNK)
        .map(|a| a..(a + BUNDLE_CHUNK).min(data.len()))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(chunks.len().max(1));
    let per_thread = chunks.len().div_ceil(threads).max(1);
    let mut members: Vec<Vec<u8>> = vec![Vec::new(); chunks.len()];
    std::thread::scope(|s| {
        for (t, slots) in members.chunks_mut(per_thread).enumerate() {
            let chunks = &chunks[t * per_thread..];
            s.spawn(move || {
                for (slot, range) in slots.iter_mut().zip(chunks) {
                    let key = cache.map(|(c, spans)| {
                        let k = gzcache::member_key(data, range.clone(), spans, level.level());
                        (c, k)
                    });
                    if let Some(m) = key.as_ref().and_then(|(c, k)| c.get(k, level.level())) {
                        *slot = m;
                        continue;
                    }
                    let mut enc = GzBuilder::new().mtime(0).write(Vec::new(), level);
                    enc.write_all(&data[range.clone()])
                        .expect("in-memory write");
                    *slot = enc.finish().expect("in-memory write");
                    if let Some((c, k)) = key {
                        c.put(&k, level.level(), slot);
                    }
                }
            });
        }
    });
    if members.is_empty() {
        return gzip(&[]);
    }
    members.concat()
}

/// Single-quotes a string for POSIX sh.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Indents every non-empty line by `n` spaces (a block scalar inside write_files).
pub(crate) fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{pad}{l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn tera(template: &str, ctx: &tera::Context) -> Result<String> {
    tera::Tera::one_off(template, ctx, false).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        anyhow::anyhow!("template error: {msg}")
    })
}

/// The release bundle: sorted entries, fixed owner/mode/mtime, gzip mtime 0.
pub fn bundle(
    plan_json: &[u8],
    daemon: &[u8],
    manifests: &[manifests::ManifestFile],
    epoch: u64,
    cache: Option<&Cache>,
) -> Vec<u8> {
    let mut files: Vec<(String, &[u8], u32)> = vec![
        ("kiln-firstboot".into(), daemon, 0o755),
        ("kiln-firstboot.service".into(), UNIT.as_bytes(), 0o644),
        ("plan.json".into(), plan_json, 0o644),
    ];
    for m in manifests {
        files.push((format!("manifests/{}", m.file), &m.bytes, 0o644));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let digests: Vec<Sha256> = files.iter().map(|(_, d, _)| Sha256::digest(d)).collect();
    let sums: String = files
        .iter()
        .zip(&digests)
        .map(|((name, _, _), sum)| format!("{sum}  {name}\n"))
        .collect();
    // (path, Some((content, mode, sha256 when known))) for files, None for the directory.
    type Entry<'a> = (String, Option<(&'a [u8], u32, Option<Sha256>)>);
    let mut entries: Vec<Entry> = files
        .iter()
        .zip(&digests)
        .map(|((n, d, m), sum)| (n.clone(), Some((*d, *m, Some(*sum)))))
        .collect();
    entries.push(("SHA256SUMS".into(), Some((sums.as_bytes(), 0o644, None))));
    if !manifests.is_empty() {
        entries.push(("manifests/".into(), None));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));

    // Headers, data padded to 512 bytes, two zero blocks at the end.
    let size: usize = entries
        .iter()
        .map(|(_, c)| 512 + c.map_or(0, |(d, _, _)| d.len().div_ceil(512) * 512))
        .sum::<usize>()
        + 1024;
    let mut tar = tar::Builder::new(Vec::with_capacity(size));
    let mut spans = Vec::new();
    for (name, content) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_username("root").expect("short name");
        h.set_groupname("root").expect("short name");
        h.set_mtime(epoch);
        match content {
            Some((data, mode, sum)) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(mode);
                h.set_size(data.len() as u64);
                h.set_path(&name).expect("short path");
                h.set_cksum();
                let start = tar.get_ref().len() + 512;
                tar.append(&h, data).expect("in-memory tar");
                if let Some(sha256) = sum {
                    let len = data.len();
                    // The key describes these bytes by their digest: they must be where it says.
                    assert!(tar.get_ref().get(start..start + len) == Some(data));
                    spans.push(FileSpan { start, len, sha256 });
                }
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_path(&name).expect("short path");
                h.set_cksum();
                tar.append(&h, std::io::empty()).expect("in-memory tar");
            }
        }
    }
    // Level 6: the static daemon dominates the bundle; level 9 costs several times the CPU
    // for a few percent.
    gzip_parallel_cached(
        &tar.into_inner().expect("in-memory tar"),
        Compression::default(),
        cache.map(|c| (c, &spans[..])),
    )
}

#[derive(Serialize)]
struct SecretCtx<'a> {
    path: &'a str,
    value: &'a str,
}

pub fn render(resolved: &Resolved, inputs: &Inputs) -> Result<Rendered> {
    let mut plan = resolved.plan.clone();
    let files = manifests::bundled(&plan);
    plan.manifests = files
        .iter()
        .map(|m| BundledManifest {
            step: m.step,
            file: m.file.clone(),
            sha256: Sha256::digest(&m.bytes),
        })
        .collect();
    let plan_json = plan.to_json();
    let bundle = bundle(
        &plan_json,
        inputs.daemon,
        &files,
        inputs.epoch,
        inputs.cache,
    );
    let bundle_sha256 = Sha256::digest(&bundle);
    let bundle_url = match &resolved.delivery {
        Delivery::Url { base } => Some(
            base.join(&format!("bundle-{bundle_sha256}.tar.gz"))
                // A read token on the base (the SAS `kiln publish` signs) applies to the bundle.
                .map(|mut u| {
                    u.set_query(base.query());
                    u
                })
                .context("bundle URL")?,
        ),
        Delivery::Seed => None,
    };

    let mut ctx = tera::Context::new();
    ctx.insert("delivery", resolved.delivery.name());
    ctx.insert(
        "bundle_url",
        &bundle_url
            .as_ref()
            .map(|u| sh_quote(u.as_str()))
            .unwrap_or_default(),
    );
    ctx.insert("bundle_tarball", paths::BUNDLE_TARBALL);
    ctx.insert("pin_path", paths::BUNDLE_PIN);
    ctx.insert("plan_path", paths::PLAN);
    ctx.insert("state_dir", paths::STATE_DIR);
    ctx.insert("secrets_dir", paths::SECRETS_DIR);
    ctx.insert("bundle_dir", paths::BUNDLE_DIR);
    ctx.insert("daemon", paths::DAEMON_BIN);
    ctx.insert("unit", paths::UNIT);
    ctx.insert("bootstrap_done", paths::BOOTSTRAP_DONE);
    ctx.insert("instance_id_path", paths::CLOUD_INSTANCE_ID);
    ctx.insert("cloud_sem_dir", paths::CLOUD_SEM_DIR);
    ctx.insert("seed_bundle", SEED_BUNDLE);
    ctx.insert("seed_label", SEED_LABEL);
    let bootstrap = tera(BOOTSTRAP_TEMPLATE, &ctx)?;

    let c = &resolved.cloud;
    ctx.insert("kiln_version", env!("CARGO_PKG_VERSION"));
    ctx.insert("hostname", &c.hostname);
    ctx.insert("timezone", &c.timezone);
    ctx.insert("locale", &c.locale);
    ctx.insert("admin_user", &c.admin_user);
    ctx.insert("ssh_keys", &c.ssh_authorized_keys);
    ctx.insert(
        "plan_json",
        &indent(std::str::from_utf8(&plan_json).expect("json is utf-8"), 6),
    );
    ctx.insert("bundle_sha256", &bundle_sha256.to_hex());
    let secrets: Vec<SecretCtx> = resolved
        .secrets
        .iter()
        .map(|s| SecretCtx {
            path: s.node_path,
            value: s.value.expose(),
        })
        .collect();
    ctx.insert("secrets", &secrets);
    ctx.insert("bootstrap_path", BOOTSTRAP_PATH);
    ctx.insert("bootstrap", &indent(&bootstrap, 6));
    let user_data = tera(USER_DATA_TEMPLATE, &ctx)?;
    drop(ctx); // holds secret values

    validate::cloud_config_cached(&user_data, inputs.cache)?;
    let custom_data = gzip(user_data.as_bytes());
    let budget = validate::budget(&user_data, custom_data.len(), &resolved.delivery)?;

    let instance_id = format!(
        "kiln-{}",
        &Sha256::digest(user_data.as_bytes()).to_hex()[..16]
    );
    let mut mctx = tera::Context::new();
    mctx.insert("instance_id", &instance_id);
    mctx.insert("hostname", &c.hostname);
    let meta_data = tera(META_DATA_TEMPLATE, &mctx)?;
    let seed = match resolved.delivery {
        Delivery::Seed => seed::build_files(
            &[
                (META_DATA, meta_data.as_bytes()),
                (USER_DATA, user_data.as_bytes()),
                (SEED_BUNDLE, &bundle),
            ],
            inputs.epoch,
        )?,
        Delivery::Url { .. } => {
            seed::build(user_data.as_bytes(), meta_data.as_bytes(), inputs.epoch)?
        }
    };

    let mut warnings = resolved.warnings.clone();
    if matches!(resolved.delivery, Delivery::Url { .. })
        && custom_data.len() > validate::GOAL_URL_MODE
    {
        warnings.push(format!(
            "custom_data.gz is {} bytes, above kiln's {}-byte goal for url delivery",
            custom_data.len(),
            validate::GOAL_URL_MODE
        ));
    }

    let mut files: Vec<(&'static str, Vec<u8>)> = vec![
        (USER_DATA, user_data.into_bytes()),
        (CUSTOM_DATA, custom_data),
        (META_DATA, meta_data.into_bytes()),
        (SEED, seed),
        (BUNDLE, bundle),
    ];
    let mut sums: Vec<Sha256> = files
        .iter()
        .map(|(n, d)| match *n {
            BUNDLE => bundle_sha256,
            _ => Sha256::digest(d),
        })
        .collect();
    let build_json = build_json(
        &plan,
        resolved,
        inputs,
        &files,
        &sums,
        &bundle_sha256,
        bundle_url.as_ref(),
        &budget,
        &warnings,
    );
    sums.push(Sha256::digest(&build_json));
    files.push((BUILD_JSON, build_json));
    let find = |n: &str| files.iter().find(|(f, _)| *f == n).map(|(_, d)| &d[..]);
    crate::secret_scan::check(
        &resolved.secrets,
        &crate::secret_scan::Outputs {
            user_data: std::str::from_utf8(find(USER_DATA).unwrap_or_default())?,
            seed: find(SEED).unwrap_or_default(),
            bundle_gz: find(BUNDLE).unwrap_or_default(),
            others: vec![
                ("plan.json", &plan_json),
                ("meta-data", find(META_DATA).unwrap_or_default()),
                ("build.json", find(BUILD_JSON).unwrap_or_default()),
                ("the bootstrap", bootstrap.as_bytes()),
            ],
        },
    )?;
    Ok(Rendered {
        plan,
        bundle_sha256,
        bundle_url,
        files,
        sums,
        bootstrap,
        budget,
        warnings,
    })
}

#[allow(clippy::too_many_arguments)]
fn build_json(
    plan: &Plan,
    resolved: &Resolved,
    inputs: &Inputs,
    files: &[(&'static str, Vec<u8>)],
    sums: &[Sha256],
    bundle_sha256: &Sha256,
    bundle_url: Option<&url::Url>,
    budget: &validate::Budget,
    warnings: &[String],
) -> Vec<u8> {
    use serde_json::json;
    let outputs: Vec<_> = files
        .iter()
        .zip(sums)
        .map(
            |((name, data), sum)| json!({"name": name, "size": data.len(), "sha256": sum.to_hex()}),
        )
        .collect();
    let secrets: Vec<_> = resolved
        .secrets
        .iter()
        .map(|s| json!({"key": s.key, "source": s.source, "node-path": s.node_path, "value": "<redacted>"}))
        .chain(plan.key_vault.iter().flat_map(|kv| &kv.secrets).map(|v| {
            json!({"key": v.key, "source": format!("azure-key-vault:{}/{}", v.vault, v.secret), "node-path": v.file, "value": "<read on the node>"})
        }))
        .collect();
    let doc = json!({
        "kiln": env!("CARGO_PKG_VERSION"),
        "profile": inputs.profile_name,
        "source-date-epoch": inputs.epoch,
        "delivery": resolved.delivery.name(),
        "bundle": {"sha256": bundle_sha256.to_hex(), "url": bundle_url.map(|u| u.as_str())},
        "outputs": outputs,
        "plan": plan,
        "secrets": secrets,
        "budget": budget,
        "warnings": warnings,
    });
    let mut out = serde_json::to_vec_pretty(&doc).expect("json");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn parallel_gzip_is_one_gzip_stream_and_deterministic() {
        let data: Vec<u8> = (0..3 * BUNDLE_CHUNK + 12345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let a = gzip_parallel(&data, Compression::default());
        assert_eq!(a, gzip_parallel(&data, Compression::default()));
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&a[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
        // GNU gzip agrees (tar -xz on the node uses it).
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("x.gz"), &a).unwrap();
        let o = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(tmp.path().join("x.gz"))
            .output()
            .unwrap();
        assert!(o.status.success());
        assert_eq!(o.stdout, data);
    }
}
