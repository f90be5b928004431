//! The check itself: what Argo CD v3.4.7 would do with the root Application's source, offline,
//! on a local checkout; every document that would fail or cannot apply becomes a [`Finding`].
//!
//! Per file, as the repo-server's `getObjsFromYAMLOrJSON`: a YAML file is decoded document by
//! document; the first document that does not decode (bad YAML, not a mapping, no `kind`)
//! fails the whole Application when a document before it decoded, or when the file holds the
//! texts `apiVersion:`, `kind:` and `metadata:`; otherwise Argo CD ignores the file as "not a
//! manifest". A JSON file is one object with a `kind`. Lists (`items: [...]`) are expanded.
//! Then per object: an apiVersion, a kind the target cluster serves, no Kustomization, and the
//! schema where kiln has it. Child Applications of the same repository are followed.

use super::kinds::{self, Origin, Served};
use super::reader::{self, Doc, Item};
use super::select::{self, Selected};
use kiln_plan::{DirectoryOptions, GitOpsSource};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeSet, VecDeque};
use std::path::Path;

mod children;

/// Applications followed at most (app-of-apps loops are also cut by path).
const MAX_APPS: usize = 200;
/// Schema violations reported per object.
const MAX_VIOLATIONS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// The file cannot be read, or points outside the repository.
    Unreadable,
    NotParseable,
    NoKind,
    NoApiVersion,
    NotServed,
    Kustomization,
    HelmChart,
    Schema,
    /// A child Application Argo CD cannot use as written.
    Application,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    /// Relative to the checkout root.
    pub file: String,
    pub line: Option<usize>,
    pub class: Class,
    /// The Application whose source reads the file.
    pub app: String,
    pub reason: String,
    pub fix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppStatus {
    Checked,
    NotRenderedHere,
    OtherRepository,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppReport {
    pub name: String,
    /// `directory`, `directory (recurse)`, `kustomize`, `helm`, `plugin`, `helm chart NAME` …
    pub source: String,
    pub repo: String,
    pub path: String,
    pub status: AppStatus,
    /// Where it is defined: `file:line`, or the profile for the root.
    pub defined_in: String,
    pub files: usize,
    pub objects: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub applications: Vec<AppReport>,
    /// Files Argo CD reads and ignores (YAML that is not a manifest).
    pub ignored: Vec<String>,
    /// `.jsonnet` files Argo CD evaluates; kiln does not.
    pub jsonnet: Vec<String>,
}

/// The root Application, from the profile.
#[derive(Debug, Clone)]
pub struct Root {
    pub name: String,
    pub repo_url: String,
    pub path: String,
    pub source: GitOpsSource,
    /// Where the source is set, for findings about the root itself.
    pub defined_in: String,
}

struct App {
    name: String,
    path: String,
    source: GitOpsSource,
    defined_in: String,
}

struct Ctx<'a> {
    checkout: &'a Path,
    repo: String,
    served: Served,
    report: Report,
    queue: VecDeque<App>,
    seen: BTreeSet<String>,
}

pub fn check(checkout: &Path, root: &Root) -> std::io::Result<Report> {
    let mut served = Served::target_cluster();
    scan_crds(checkout, &mut served)?;
    let mut cx = Ctx {
        checkout,
        repo: normalize_repo(&root.repo_url),
        served,
        report: Report::default(),
        queue: VecDeque::new(),
        seen: BTreeSet::new(),
    };
    cx.queue.push_back(App {
        name: root.name.clone(),
        path: root.path.clone(),
        source: root.source.clone(),
        defined_in: root.defined_in.clone(),
    });
    let mut n = 0;
    while let Some(app) = cx.queue.pop_front() {
        n += 1;
        if n > MAX_APPS {
            break;
        }
        cx.app(app, &root.repo_url)?;
    }
    cx.report.findings.sort();
    cx.report.findings.dedup();
    Ok(cx.report)
}

/// "CRDs defined in the same checkout": every CustomResourceDefinition document in any
/// `.yaml`/`.yml`/`.json` file (outside `.git`), wherever Argo CD would apply it from.
fn scan_crds(checkout: &Path, served: &mut Served) -> std::io::Result<()> {
    let all = DirectoryOptions {
        recurse: true,
        ..Default::default()
    };
    let sel = select::select(checkout, "", &all)?;
    for f in sel.files {
        if f.repo_rel.starts_with(".git/") || !f.text.contains("CustomResourceDefinition") {
            continue;
        }
        let items = if f.rel.ends_with(".json") {
            reader::read_json(&f.text)
        } else {
            reader::read_yaml(&f.text)
        };
        for item in items {
            if let Item::Value(d) = item {
                if d.value["kind"] == "CustomResourceDefinition" {
                    served.add_crd(&d.value, Origin::Checkout(f.repo_rel.clone()));
                }
            }
        }
    }
    Ok(())
}

/// `https://github.com/org/repo.git`, `git@github.com:org/repo` … → `github.com/org/repo`.
pub fn normalize_repo(url: &str) -> String {
    let mut s = url.trim().to_ascii_lowercase();
    for scheme in ["https://", "http://", "ssh://", "git://"] {
        if let Some(rest) = s.strip_prefix(scheme) {
            s = rest.to_string();
            break;
        }
    }
    if let Some((user, rest)) = s.split_once('@') {
        if !user.contains('/') {
            s = rest.to_string();
        }
    }
    // scp-like `host:org/repo`
    if let Some((host, rest)) = s.split_once(':') {
        if !host.contains('/') && !rest.starts_with(|c: char| c.is_ascii_digit()) {
            s = format!("{host}/{rest}");
        }
    }
    let s = s.trim_end_matches('/');
    s.strip_suffix(".git").unwrap_or(s).to_string()
}

fn source_name(s: &GitOpsSource) -> String {
    match s {
        GitOpsSource::Directory(d) => {
            let mut out = String::from("directory");
            if d.recurse {
                out.push_str(", recurse");
            }
            if let Some(i) = &d.include {
                out.push_str(&format!(", include '{i}'"));
            }
            if let Some(e) = &d.exclude {
                out.push_str(&format!(", exclude '{e}'"));
            }
            out
        }
        GitOpsSource::Kustomize {} => "kustomize".into(),
        GitOpsSource::Helm(_) => "helm".into(),
    }
}

fn finding(
    file: &str,
    line: Option<usize>,
    class: Class,
    app: &str,
    reason: String,
    fix: String,
) -> Finding {
    Finding {
        file: file.to_string(),
        line,
        class,
        app: app.to_string(),
        reason,
        fix,
    }
}

/// `file:line` → (`file`, `line`).
fn split_at(defined_in: &str) -> (String, Option<usize>) {
    match defined_in.rsplit_once(':') {
        Some((f, l)) if l.parse::<usize>().is_ok() => (f.to_string(), l.parse().ok()),
        _ => (defined_in.to_string(), None),
    }
}

impl Ctx<'_> {
    fn app(&mut self, app: App, repo_url: &str) -> std::io::Result<()> {
        let key = format!("{}|{:?}", app.path, app.source);
        if !self.seen.insert(key) {
            return Ok(());
        }
        let dir = self.checkout.join(app.path.trim_start_matches("./"));
        let mut report = AppReport {
            name: app.name.clone(),
            source: source_name(&app.source),
            repo: repo_url.to_string(),
            path: app.path.clone(),
            status: AppStatus::Checked,
            defined_in: app.defined_in.clone(),
            files: 0,
            objects: 0,
        };
        if !dir.is_dir() {
            let (file, line) = split_at(&app.defined_in);
            self.report.findings.push(finding(
                &file,
                line,
                Class::Application,
                &app.name,
                format!(
                    "app path does not exist: {:?} is not a directory of the checkout",
                    app.path
                ),
                "point `path` at a directory of the repository".into(),
            ));
            self.report.applications.push(report);
            return Ok(());
        }
        match &app.source {
            GitOpsSource::Directory(opts) => {
                let (files, objects) = self.directory(&app, opts)?;
                report.files = files;
                report.objects = objects;
            }
            GitOpsSource::Kustomize {} => {
                report.status = AppStatus::NotRenderedHere;
                if !["kustomization.yaml", "kustomization.yml", "Kustomization"]
                    .iter()
                    .any(|n| dir.join(n).is_file())
                {
                    let (file, line) = split_at(&app.defined_in);
                    self.report.findings.push(finding(
                        &file,
                        line,
                        Class::Application,
                        &app.name,
                        format!(
                            "a kustomize source, but {:?} has no kustomization.yaml",
                            app.path
                        ),
                        "add the kustomization, or use a directory source".into(),
                    ));
                }
            }
            GitOpsSource::Helm(h) => {
                report.status = AppStatus::NotRenderedHere;
                let (file, line) = split_at(&app.defined_in);
                if !dir.join("Chart.yaml").is_file() {
                    self.report.findings.push(finding(
                        &file,
                        line,
                        Class::Application,
                        &app.name,
                        format!("a helm source, but {:?} has no Chart.yaml", app.path),
                        "point `path` at the chart directory".into(),
                    ));
                }
                for v in &h.value_files {
                    if !v.contains("://") && !dir.join(v).is_file() {
                        self.report.findings.push(finding(
                            &file,
                            line,
                            Class::Application,
                            &app.name,
                            format!("values file {v:?} does not exist in {:?}", app.path),
                            "list value files relative to the chart".into(),
                        ));
                    }
                }
            }
        }
        self.report.applications.push(report);
        Ok(())
    }

    /// A directory source: select, read, judge. Returns (files read, objects).
    fn directory(&mut self, app: &App, opts: &DirectoryOptions) -> std::io::Result<(usize, usize)> {
        let sel = select::select(self.checkout, &app.path, opts)?;
        for r in &sel.refused {
            self.report.findings.push(finding(
                &r.repo_rel,
                None,
                Class::Unreadable,
                &app.name,
                format!("Argo CD fails the Application: {}", r.reason),
                format!(
                    "exclude it: directory.exclude '{}'",
                    rel_to(&app.path, &r.repo_rel)
                ),
            ));
        }
        self.report.jsonnet.extend(sel.jsonnet.iter().cloned());
        // A Helm chart under a directory source: one finding for the chart, not one per template.
        let mut charts: Vec<&String> = Vec::new();
        for c in &sel.charts {
            let prefix = if c.is_empty() {
                String::new()
            } else {
                format!("{c}/")
            };
            if sel.files.iter().any(|f| f.repo_rel.starts_with(&prefix)) {
                charts.push(c);
                let chart_file = if c.is_empty() {
                    "Chart.yaml".to_string()
                } else {
                    format!("{c}/Chart.yaml")
                };
                let rel = rel_to(&app.path, c);
                let pattern = if rel.is_empty() {
                    "*".to_string()
                } else {
                    format!("{rel}/*")
                };
                self.report.findings.push(finding(&chart_file, Some(1), Class::HelmChart, &app.name,
                    "a Helm chart inside a directory source: Argo CD reads its templates and values as plain manifests".into(),
                    format!("exclude '{pattern}' and deploy the chart with a child Application whose source is `helm`")));
            }
        }
        let in_chart = |f: &Selected| {
            charts
                .iter()
                .any(|c| c.is_empty() || f.repo_rel.starts_with(&format!("{c}/")))
        };
        let mut objects = 0;
        let mut files = 0;
        for f in &sel.files {
            if in_chart(f) {
                continue;
            }
            files += 1;
            objects += self.file(app, f);
        }
        Ok((files, objects))
    }

    /// One file, as the repo-server reads it; returns the objects it yields.
    fn file(&mut self, app: &App, f: &Selected) -> usize {
        let json = f.rel.ends_with(".json");
        let items = if json {
            reader::read_json(&f.text)
        } else {
            reader::read_yaml(&f.text)
        };
        let mut docs: Vec<Doc> = Vec::new();
        let mut failure: Option<(usize, Class, String)> = None;
        for item in items {
            match item {
                Item::Empty => {}
                Item::Error(e) => {
                    failure = Some((e.line, Class::NotParseable, e.message));
                    break;
                }
                Item::Value(d) => match d.value.get("kind") {
                    _ if !d.value.is_object() => {
                        let what = match &d.value {
                            Value::Array(_) => "a list",
                            Value::String(_) => "a string",
                            _ => "a scalar",
                        };
                        failure = Some((
                            d.line,
                            Class::NotParseable,
                            format!("the document is {what}, not an object"),
                        ));
                        break;
                    }
                    Some(Value::String(k)) if !k.is_empty() => docs.push(d),
                    _ => {
                        failure = Some((d.line, Class::NoKind, "Object 'Kind' is missing".into()));
                        break;
                    }
                },
            }
        }
        if let Some((line, class, msg)) = failure {
            let manifest_like = f.text.contains("apiVersion:")
                && f.text.contains("kind:")
                && f.text.contains("metadata:");
            if json || !docs.is_empty() || manifest_like {
                let pattern = rel_to(&app.path, &f.repo_rel);
                self.report.findings.push(finding(&f.repo_rel, Some(line), class, &app.name,
                    format!("Argo CD fails the whole Application: Failed to unmarshal {:?}: {msg}", base_name(&f.repo_rel)),
                    format!("not a Kubernetes object? exclude it: directory.exclude '{pattern}' (or add `# {}` to the file)", select::SKIP_MARKER)));
            } else {
                self.report.ignored.push(f.repo_rel.clone());
            }
            // Argo CD stops at the failure; what decoded before it is still judged.
        }
        let mut n = 0;
        for d in &docs {
            n += self.object(app, f, d, &d.value, "");
        }
        n
    }

    /// One decoded object (or a List's items); returns the objects it counts for.
    /// A List's items, each judged as an object.
    fn list(&mut self, app: &App, f: &Selected, d: &Doc, items: &[Value], ptr: &str) -> usize {
        let mut n = 0;
        for (i, item) in items.iter().enumerate() {
            let p = format!("{ptr}/items/{i}");
            if item.is_object()
                && item
                    .get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| !k.is_empty())
            {
                n += self.object(app, f, d, item, &p);
            } else {
                self.report.findings.push(finding(
                    &f.repo_rel,
                    Some(d.line_of(&p)),
                    Class::NoKind,
                    &app.name,
                    "a List item without a kind: Argo CD cannot load it (Object 'Kind' is missing)"
                        .into(),
                    "give every item apiVersion and kind".into(),
                ));
            }
        }
        n
    }

    fn object(&mut self, app: &App, f: &Selected, d: &Doc, obj: &Value, ptr: &str) -> usize {
        if let Some(items) = obj.get("items").and_then(Value::as_array) {
            return self.list(app, f, d, items, ptr);
        }
        if obj.get("items").is_some_and(Value::is_null)
            && obj.get("spec").is_none()
            && obj.get("status").is_none()
        {
            return 0; // an empty List: Argo CD drops it
        }
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let line = d.line_of(ptr);
        let api = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if api.is_empty() {
            let known = self.served.api_versions_of(&kind);
            let fix = match known.first() {
                Some(a) => format!("add `apiVersion: {a}`"),
                None => "add the object's apiVersion".into(),
            };
            self.report.findings.push(finding(
                &f.repo_rel,
                Some(line),
                Class::NoApiVersion,
                &app.name,
                format!("{kind} has no apiVersion: the sync cannot apply it"),
                fix,
            ));
            return 1;
        }
        let Some((group, version)) = kinds::split_api_version(&api) else {
            self.report.findings.push(finding(
                &f.repo_rel,
                Some(d.line_of(&format!("{ptr}/apiVersion"))),
                Class::NotServed,
                &app.name,
                format!("malformed apiVersion {api:?}"),
                "apiVersion is `group/version` or `v1`".into(),
            ));
            return 1;
        };
        if kind == "Kustomization"
            && (group.starts_with("kustomize.config.k8s.io") || group.is_empty())
        {
            let dir = f.repo_rel.rsplit_once('/').map(|x| x.0).unwrap_or("");
            let rel = rel_to(&app.path, dir);
            let pattern = if rel.is_empty() {
                base_name(&f.repo_rel).to_string()
            } else {
                format!("{rel}/*")
            };
            self.report.findings.push(finding(&f.repo_rel, Some(line), Class::Kustomization, &app.name,
                format!("a Kustomization inside a directory source: Argo CD applies it as an object of kind {kind} ({api}), which no cluster serves"),
                format!("exclude '{pattern}' and build it with a child Application whose source is `kustomize: {{}}`")));
            return 1;
        }
        if !self.served.serves(group, version, &kind) {
            let (reason, fix) = self.not_served(group, version, &kind, &api);
            self.report.findings.push(finding(
                &f.repo_rel,
                Some(d.line_of(&format!("{ptr}/apiVersion"))),
                Class::NotServed,
                &app.name,
                reason,
                fix,
            ));
            return 1;
        }
        self.known(app, f, d, obj, ptr, (&api, &kind, line));
        1
    }

    /// A served object: its schema, and what an Application or ApplicationSet leads to.
    fn known(
        &mut self,
        app: &App,
        f: &Selected,
        d: &Doc,
        obj: &Value,
        ptr: &str,
        what: (&str, &str, usize),
    ) {
        let (api, kind, line) = (what.0.to_string(), what.1.to_string(), what.2);
        if let Some(violations) = kinds::validate(&api, &kind, obj, MAX_VIOLATIONS) {
            let name = obj["metadata"]["name"].as_str().unwrap_or("?");
            for v in violations {
                let at = if v.pointer.is_empty() {
                    "the object".to_string()
                } else {
                    v.pointer.clone()
                };
                self.report.findings.push(finding(
                    &f.repo_rel,
                    Some(d.line_of(&format!("{ptr}{}", v.pointer))),
                    Class::Schema,
                    &app.name,
                    format!("{kind} {name}: {} (at {at})", v.message),
                    format!("make it valid for the {api} {kind} schema"),
                ));
            }
        }
        if api == "argoproj.io/v1alpha1" && kind == "Application" {
            self.child(app, f, d, obj, ptr);
        } else if api == "argoproj.io/v1alpha1" && kind == "ApplicationSet" {
            self.report.applications.push(AppReport {
                name: obj["metadata"]["name"].as_str().unwrap_or("?").into(),
                source: "applicationset (generators are not run here)".into(),
                repo: String::new(),
                path: String::new(),
                status: AppStatus::NotRenderedHere,
                defined_in: format!("{}:{line}", f.repo_rel),
                files: 0,
                objects: 0,
            });
        }
    }

    fn not_served(&self, group: &str, version: &str, kind: &str, api: &str) -> (String, String) {
        let elsewhere = self.served.api_versions_of(kind);
        let in_group = self.served.kinds_in_group(group);
        let fix = match elsewhere.as_slice() {
            [] => None,
            [one] => Some(format!("apiVersion: {one}")),
            many => Some(format!("apiVersion: one of {}", many.join(", "))),
        };
        if !in_group.is_empty() {
            let reason = if self
                .served
                .api_versions_of(kind)
                .iter()
                .any(|a| kinds::split_api_version(a).map(|x| x.0) == Some(group))
            {
                format!("{kind} is not served as {api} (the group {group} serves it in another version)")
            } else {
                format!(
                    "the group {} has no kind {kind} (it serves {})",
                    if group.is_empty() { "core" } else { group },
                    in_group.join(", ")
                )
            };
            return (
                reason,
                fix.unwrap_or_else(|| "use a kind the group serves".into()),
            );
        }
        match fix {
            Some(fix) => (format!("no cluster serves {kind} as {api}: the group {group} is unknown here"), fix),
            None => (
                format!("{kind} ({api}) is not served: no CRD of group {group} is installed by kiln or defined in this checkout"),
                format!("add the CRD of {group} to the repository (served version {version}), or exclude the file"),
            ),
        }
    }
}

fn base_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// `repo_rel` relative to the app path (what include/exclude patterns see).
pub fn rel_to(app_path: &str, repo_rel: &str) -> String {
    let base = app_path.trim_matches('/').trim_start_matches("./");
    if base.is_empty() || base == "." {
        return repo_rel.to_string();
    }
    if repo_rel == base {
        return String::new();
    }
    repo_rel
        .strip_prefix(&format!("{base}/"))
        .unwrap_or(repo_rel)
        .to_string()
}
