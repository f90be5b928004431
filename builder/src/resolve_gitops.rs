//! `argocd.gitops` source options → [`GitOpsSource`]: one source type at most (Argo CD refuses
//! "multiple application sources defined"), globs that Argo CD can compile, value files that
//! stay inside the repository.

// ProfileError carries the source text for its snippet; it is built once per failed run.

use crate::diag::ProfileError;
use crate::gitops::glob::Glob;
use crate::profile::GitOpsSpec;
use crate::source::{key_path, Seg, Sources};
use kiln_plan::{DirectoryOptions, GitOpsSource, HelmOptions};

const AT: [&str; 2] = ["argocd", "gitops"];

fn at(keys: &[&str]) -> Vec<Seg> {
    let mut p: Vec<&str> = AT.to_vec();
    p.extend_from_slice(keys);
    key_path(&p)
}

pub fn source(s: &Sources, g: &GitOpsSpec) -> Result<GitOpsSource, ProfileError> {
    let set: Vec<&str> = [
        ("directory", g.directory.is_some()),
        ("kustomize", g.kustomize.is_some()),
        ("helm", g.helm.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, on)| on.then_some(k))
    .collect();
    if set.len() > 1 {
        return Err(s
            .error(
                &at(&[set[1]]),
                true,
                format!(
                    "`{}` and `{}` are mutually exclusive: an Argo CD source has one type",
                    set[0], set[1]
                ),
            )
            .with_help(
                "keep one of directory, kustomize, helm (none: a non-recursive directory)",
            ));
    }
    if let Some(d) = &g.directory {
        for (key, pattern) in [("include", &d.include), ("exclude", &d.exclude)] {
            let Some(p) = pattern else { continue };
            if p.is_empty() {
                return Err(s.error(
                    &at(&["directory", key]),
                    false,
                    format!("an empty {key} pattern means no {key}: leave the key out"),
                ));
            }
            if let Err(e) = Glob::check(p) {
                return Err(s.error(
                    &at(&["directory", key]),
                    false,
                    format!("{p:?} is not a glob Argo CD can compile ({e}); Argo CD would match no file with it"),
                ));
            }
        }
        return Ok(GitOpsSource::Directory(DirectoryOptions {
            recurse: d.recurse,
            include: d.include.clone(),
            exclude: d.exclude.clone(),
        }));
    }
    if g.kustomize.is_some() {
        return Ok(GitOpsSource::Kustomize {});
    }
    if let Some(h) = &g.helm {
        for (i, f) in h.value_files.iter().enumerate() {
            let mut p = at(&["helm", "value-files"]);
            p.push(Seg::Index(i));
            let escapes = f.starts_with('/') || {
                // Relative to the chart path; it may climb into the repository, not out of it.
                let depth = g
                    .path
                    .split('/')
                    .filter(|c| !c.is_empty() && *c != ".")
                    .count();
                let mut d: isize = depth as isize;
                f.split('/').any(|c| {
                    match c {
                        ".." => d -= 1,
                        "" | "." => {}
                        _ => d += 1,
                    }
                    d < 0
                })
            };
            if f.trim().is_empty() || escapes {
                return Err(s.error(
                    &p,
                    false,
                    "a values file is a path relative to the chart, inside the repository",
                ));
            }
        }
        return Ok(GitOpsSource::Helm(HelmOptions {
            value_files: h.value_files.clone(),
        }));
    }
    Ok(GitOpsSource::default())
}
