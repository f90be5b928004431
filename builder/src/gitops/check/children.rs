//! App-of-apps: a child Application whose source is the same repository is followed the way
//! Argo CD would read it (its explicit source type, or the one Argo CD discovers at its path:
//! `Chart.yaml` → Helm, `kustomization.yaml` → Kustomize, else a directory). Helm and Kustomize
//! children are listed as not rendered here; other repositories are listed, not checked.

use super::{finding, normalize_repo, App, AppReport, AppStatus, Class, Ctx};
use crate::gitops::reader::Doc;
use crate::gitops::select::Selected;
use kiln_plan::{DirectoryOptions, GitOpsSource, HelmOptions};
use serde_json::Value;

impl Ctx<'_> {
    pub(super) fn child(&mut self, parent: &App, f: &Selected, d: &Doc, obj: &Value, ptr: &str) {
        let name = obj["metadata"]["name"].as_str().unwrap_or("?").to_string();
        let spec = &obj["spec"];
        let sources: Vec<(String, &Value)> = match spec.get("sources").and_then(Value::as_array) {
            Some(list) if !list.is_empty() => list
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("{ptr}/spec/sources/{i}"), s))
                .collect(),
            _ => vec![(format!("{ptr}/spec/source"), &spec["source"])],
        };
        for (sp, src) in sources {
            let at = |k: &str| d.line_of(&format!("{sp}/{k}"));
            let defined_in = format!("{}:{}", f.repo_rel, at("path"));
            let repo = src["repoURL"].as_str().unwrap_or_default().to_string();
            let path = src["path"].as_str().unwrap_or_default().to_string();
            let mut report = AppReport {
                name: name.clone(),
                source: String::new(),
                repo: repo.clone(),
                path: path.clone(),
                status: AppStatus::NotRenderedHere,
                defined_in: defined_in.clone(),
                files: 0,
                objects: 0,
            };
            if let Some(chart) = src.get("chart").and_then(Value::as_str) {
                report.source = format!("helm chart {chart}");
                report.status = if normalize_repo(&repo) == self.repo {
                    AppStatus::NotRenderedHere
                } else {
                    AppStatus::OtherRepository
                };
                self.report.applications.push(report);
                continue;
            }
            if normalize_repo(&repo) != self.repo {
                report.source = "other repository".into();
                report.status = AppStatus::OtherRepository;
                self.report.applications.push(report);
                continue;
            }
            if path.starts_with('/') || path.split('/').any(|c| c == "..") {
                self.report.findings.push(finding(
                    &f.repo_rel,
                    Some(at("path")),
                    Class::Application,
                    &parent.name,
                    format!("Application {name}: path {path:?} leaves the repository"),
                    "give a path relative to the repository root".into(),
                ));
                continue;
            }
            let types: Vec<&str> = ["kustomize", "helm", "directory", "plugin"]
                .into_iter()
                .filter(|k| src.get(*k).is_some_and(|v| !v.is_null()))
                .collect();
            if types.len() > 1 {
                self.report.findings.push(finding(
                    &f.repo_rel,
                    Some(d.line_of(&sp)),
                    Class::Application,
                    &parent.name,
                    format!(
                        "Application {name}: multiple application sources defined: {}",
                        types.join(",")
                    ),
                    "keep one source type".into(),
                ));
                continue;
            }
            let dir = self
                .checkout
                .join(if path.is_empty() { "." } else { &path });
            let Some(source) = source_type(src, types.first().copied(), &dir) else {
                report.source = "plugin".into();
                self.report.applications.push(report);
                continue;
            };
            self.queue.push_back(App {
                name: name.clone(),
                path: if path.is_empty() { ".".into() } else { path },
                source,
                defined_in,
            });
        }
    }
}

/// The child's source type: the explicit one, or what Argo CD discovers at the path
/// (`Chart.yaml` → Helm, a kustomization → Kustomize, else a directory). `None` for a plugin.
fn source_type(src: &Value, explicit: Option<&str>, dir: &std::path::Path) -> Option<GitOpsSource> {
    let discovered = match explicit {
        Some(t) => t,
        None if dir.join("Chart.yaml").is_file() => "helm",
        None if ["kustomization.yaml", "kustomization.yml", "Kustomization"]
            .iter()
            .any(|k| dir.join(k).is_file()) =>
        {
            "kustomize"
        }
        None => "directory",
    };
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
    Some(match discovered {
        "directory" => {
            let dv = &src["directory"];
            GitOpsSource::Directory(DirectoryOptions {
                recurse: dv["recurse"].as_bool().unwrap_or(false),
                include: text(&dv["include"]),
                exclude: text(&dv["exclude"]),
            })
        }
        "kustomize" => GitOpsSource::Kustomize {},
        "helm" => GitOpsSource::Helm(HelmOptions {
            value_files: src["helm"]["valueFiles"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        }),
        _ => return None,
    })
}
