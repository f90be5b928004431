//! Which files Argo CD v3.4.7's repo-server reads for a directory source
//! (`reposerver/repository/repository.go`, `getPotentiallyValidManifests`): a walk of the app
//! path in lexical order (subdirectories only with `recurse`), names matching
//! `^.*\.(yaml|yml|json|jsonnet)$`, symlinks resolved (one pointing out of the repository fails
//! the Application; a dangling one or one to a non-file is skipped), then `exclude` and
//! `include` matched against the path relative to the app path, then files holding
//! `+argocd:skip-file-rendering` dropped.

use super::glob::Glob;
use kiln_plan::DirectoryOptions;
use std::path::{Path, PathBuf};

pub const SKIP_MARKER: &str = "+argocd:skip-file-rendering";
/// Larger files are not read (Argo CD's default combined limit is about this size too).
pub const MAX_FILE_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone)]
pub struct Selected {
    /// Relative to the app path (what include/exclude see), `/`-separated.
    pub rel: String,
    /// Relative to the checkout root.
    pub repo_rel: String,
    pub text: String,
}

/// A file Argo CD would fail on before reading it.
#[derive(Debug, Clone)]
pub struct Refused {
    pub repo_rel: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Selection {
    pub files: Vec<Selected>,
    /// `.jsonnet` files: Argo CD evaluates them; kiln does not.
    pub jsonnet: Vec<String>,
    /// Directories (repo-relative) under the app path that hold a `Chart.yaml`.
    pub charts: Vec<String>,
    pub refused: Vec<Refused>,
}

fn is_manifest_name(name: &str) -> bool {
    [".yaml", ".yml", ".json", ".jsonnet"]
        .iter()
        .any(|x| name.ends_with(x))
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() || base == "." {
        name.to_string()
    } else {
        format!("{}/{name}", base.trim_end_matches('/'))
    }
}

/// Selects the files of `app_path` (relative to `checkout`) for a directory source.
pub fn select(
    checkout: &Path,
    app_path: &str,
    opts: &DirectoryOptions,
) -> std::io::Result<Selection> {
    let root = checkout.canonicalize()?;
    let include = opts
        .include
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(Glob::new);
    let exclude = opts
        .exclude
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(Glob::new);
    let mut sel = Selection::default();
    let app_dir = root.join(app_path.trim_start_matches("./"));
    let w = Walk {
        root: &root,
        recurse: opts.recurse,
        include: include.as_ref(),
        exclude: exclude.as_ref(),
    };
    let base = app_path.trim_matches('/').trim_start_matches("./");
    let base = if base == "." { "" } else { base };
    w.dir(&app_dir, "", base, &mut sel)?;
    Ok(sel)
}

struct Walk<'a> {
    root: &'a Path,
    recurse: bool,
    include: Option<&'a Glob>,
    exclude: Option<&'a Glob>,
}

impl Walk<'_> {
    fn dir(
        &self,
        dir: &Path,
        rel: &str,
        repo_rel: &str,
        sel: &mut Selection,
    ) -> std::io::Result<()> {
        let mut entries: Vec<(Vec<u8>, PathBuf)> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| (e.file_name().as_encoded_bytes().to_vec(), e.path()))
            .collect();
        // filepath.Walk visits names in lexical (byte) order.
        entries.sort();
        if entries.iter().any(|(n, _)| n == b"Chart.yaml") {
            sel.charts.push(repo_rel.to_string());
        }
        for (name, path) in entries {
            let name = String::from_utf8_lossy(&name).into_owned();
            let (r, rr) = (join(rel, &name), join(repo_rel, &name));
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                if self.recurse {
                    self.dir(&path, &r, &rr, sel)?;
                }
                continue;
            }
            self.file(&path, &name, r, rr, meta, sel);
        }
        Ok(())
    }

    fn file(
        &self,
        path: &Path,
        name: &str,
        rel: String,
        repo_rel: String,
        meta: std::fs::Metadata,
        sel: &mut Selection,
    ) {
        if !is_manifest_name(name) {
            return;
        }
        let mut real = meta;
        if real.file_type().is_symlink() {
            let Ok(target) = path.canonicalize() else {
                return; // dangling: Argo CD skips it with a warning
            };
            if !target.starts_with(self.root) {
                sel.refused.push(Refused {
                    repo_rel,
                    reason: "illegal filepath in symlink: it points outside the repository".into(),
                });
                return;
            }
            match std::fs::metadata(&target) {
                Ok(m) => real = m,
                Err(_) => return,
            }
        }
        if !real.is_file() {
            return;
        }
        if self.exclude.is_some_and(|g| g.matches(&rel)) {
            return;
        }
        if self.include.is_some_and(|g| !g.matches(&rel)) {
            return;
        }
        if name.ends_with(".jsonnet") {
            sel.jsonnet.push(repo_rel);
            return;
        }
        if real.len() > MAX_FILE_BYTES {
            sel.refused.push(Refused {
                repo_rel,
                reason: format!(
                    "larger than {} MiB: kiln does not read it",
                    MAX_FILE_BYTES >> 20
                ),
            });
            return;
        }
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                sel.refused.push(Refused {
                    repo_rel,
                    reason: format!("cannot read: {e}"),
                });
                return;
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text).to_string();
        if text.contains(SKIP_MARKER) {
            return;
        }
        sel.files.push(Selected {
            rel,
            repo_rel,
            text,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("repo");
        let app = repo.join("app");
        fs::create_dir_all(app.join("sub/deeper")).unwrap();
        for f in [
            "a.yaml",
            "b.yml",
            "c.json",
            "d.jsonnet",
            "README.md",
            "sub/e.yaml",
            "sub/deeper/f.yaml",
        ] {
            fs::write(app.join(f), "kind: X\n").unwrap();
        }
        fs::write(
            app.join("skip.yaml"),
            "# +argocd:skip-file-rendering\nkind: X\n",
        )
        .unwrap();
        fs::write(t.path().join("outside.yaml"), "kind: X\n").unwrap();
        std::os::unix::fs::symlink("../../outside.yaml", app.join("out.yaml")).unwrap();
        std::os::unix::fs::symlink("missing.yaml", app.join("dangling.yaml")).unwrap();
        std::os::unix::fs::symlink("a.yaml", app.join("z-link.yaml")).unwrap();
        t
    }

    fn names(opts: DirectoryOptions) -> (Vec<String>, Vec<String>, Vec<String>) {
        let t = tree();
        let s = select(&t.path().join("repo"), "app", &opts).unwrap();
        (
            s.files.iter().map(|f| f.rel.clone()).collect(),
            s.jsonnet,
            s.refused.iter().map(|r| r.repo_rel.clone()).collect(),
        )
    }

    #[test]
    fn a_directory_source_reads_what_argo_cd_reads() {
        // Default: not recursive; manifest names only; skip marker honoured; a symlink out of
        // the repository refused, a dangling one skipped, one inside followed.
        let (files, jsonnet, refused) = names(DirectoryOptions::default());
        assert_eq!(files, ["a.yaml", "b.yml", "c.json", "z-link.yaml"]);
        assert_eq!(jsonnet, ["app/d.jsonnet"]);
        assert_eq!(refused, ["app/out.yaml"]);
        // recurse, lexical order, paths relative to the app path.
        let (files, _, _) = names(DirectoryOptions {
            recurse: true,
            ..Default::default()
        });
        assert_eq!(
            files,
            [
                "a.yaml",
                "b.yml",
                "c.json",
                "sub/deeper/f.yaml",
                "sub/e.yaml",
                "z-link.yaml"
            ]
        );
        // include '*.yaml' crosses directories; exclude 'sub/*' takes the whole subtree.
        let (files, _, refused) = names(DirectoryOptions {
            recurse: true,
            include: Some("*.yaml".into()),
            exclude: Some("{sub/*,out.yaml}".into()),
        });
        assert_eq!(files, ["a.yaml", "z-link.yaml"]);
        // Argo CD resolves a symlink before it matches exclude: one pointing out of the
        // repository fails the Application even when excluded.
        assert_eq!(refused, ["app/out.yaml"]);
    }
}
