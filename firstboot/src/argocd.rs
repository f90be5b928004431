//! Argo CD: the pinned upstream `install.yaml` placed in its namespace and handed to K3s's
//! deploy controller, the Tailscale Ingress for the UI, the GitOps root Application (and its
//! repository Secret), and the final `verify` step that reads the cluster back.
//!
//! Why `install.yaml` rather than the argo-cd HelmChart: the manifest is Argo CD's own release
//! artifact for the exact tag (v3.4.7), pinned here by sha256; the Helm chart is a separate
//! project whose version-to-appVersion mapping for v3.4.7 is not confirmed in the chart repository,
//! and it would need the chart and all its values pinned too. K3s applies the file itself, so
//! nothing else (helm job, chart repo access) is on the boot path. See docs/node.md.

use crate::download::sha256_file;
use crate::engine::{Cx, Step};
use crate::fs::copy_atomic;
use crate::k3s;
use crate::retry::Transient;
use anyhow::{bail, Context, Result};
use kiln_plan::manifests::{
    self, is_cluster_scoped, ARGOCD_INSTALL_FILE, GITOPS_REPO_FILE, HELMCHART_NAMESPACE,
    TAILSCALE_OAUTH_FILE, TAILSCALE_OPERATOR_CHART,
};
use kiln_plan::{Sha256, StepId};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::time::Duration;

const STAGING: &str = "/var/lib/kiln/staging/argocd.yaml";

/// Copies a multi-document `install.yaml` to `out`, giving every namespaced object
/// `metadata.namespace: NS` and pointing (Cluster)RoleBinding subjects at NS, with a Namespace
/// document first. Works line by line on the text (kustomize's output: top-level keys at column
/// 0, metadata children at two spaces), buffering at most the part of one document up to the
/// end of its `metadata` block, so a 2 MB manifest streams through in a few KiB.
pub fn namespace_manifest(input: impl BufRead, mut out: impl Write, ns: &str) -> Result<()> {
    let header = manifests::yaml_docs(&[serde_yaml::to_string(&manifests::namespace(ns))?]);
    out.write_all(&header)?;
    out.write_all(b"---\n")?;
    let mut doc = Doc::new(ns);
    for (n, line) in input.split(b'\n').enumerate() {
        let mut line = line.with_context(|| format!("reading line {}", n + 1))?;
        line.push(b'\n');
        if line == b"---\n" || line.starts_with(b"--- ") {
            doc.finish(&mut out)?;
            out.write_all(&line)?;
            doc = Doc::new(ns);
            continue;
        }
        doc.line(line, &mut out)
            .with_context(|| format!("install.yaml line {}", n + 1))?;
    }
    doc.finish(&mut out)?;
    out.flush()?;
    Ok(())
}

struct Doc<'a> {
    ns: &'a str,
    buf: Vec<Vec<u8>>,
    kind: Option<String>,
    top: Option<String>,
    seen_meta: bool,
    meta_done: bool,
    flushed: bool,
}

fn top_key(line: &[u8]) -> Option<String> {
    let first = *line.first()?;
    if first == b' ' || first == b'#' || first == b'-' || first == b'\n' || first == b'\t' {
        return None;
    }
    let s = std::str::from_utf8(line).ok()?;
    let (k, _) = s.split_once(':')?;
    Some(k.trim().to_string())
}

impl<'a> Doc<'a> {
    fn new(ns: &'a str) -> Self {
        Doc {
            ns,
            buf: Vec::new(),
            kind: None,
            top: None,
            seen_meta: false,
            meta_done: false,
            flushed: false,
        }
    }

    fn line(&mut self, line: Vec<u8>, out: &mut impl Write) -> Result<()> {
        if let Some(k) = top_key(&line) {
            if self.top.as_deref() == Some("metadata") {
                self.meta_done = true;
            }
            if k == "kind" {
                let s = String::from_utf8_lossy(&line);
                let v = s.split_once(':').map(|x| x.1).unwrap_or("");
                self.kind = Some(v.trim().trim_matches('"').to_string());
            }
            if k == "metadata" {
                let s = String::from_utf8_lossy(&line);
                if !s
                    .split_once(':')
                    .map(|x| x.1)
                    .unwrap_or("")
                    .trim()
                    .is_empty()
                {
                    bail!("flow-style metadata is not supported: {}", s.trim());
                }
                self.seen_meta = true;
            }
            self.top = Some(k);
        }
        if self.flushed {
            return self.emit(line, out);
        }
        self.buf.push(line);
        if self.meta_done && self.kind.is_some() {
            self.flush(out)?;
        }
        Ok(())
    }

    fn namespaced(&self) -> bool {
        self.kind.as_deref().is_some_and(|k| !is_cluster_scoped(k))
    }

    /// Lines after the metadata block: only binding subjects change.
    fn emit(&mut self, line: Vec<u8>, out: &mut impl Write) -> Result<()> {
        let binding = self
            .kind
            .as_deref()
            .is_some_and(|k| k.ends_with("RoleBinding"));
        if binding && self.top.as_deref() == Some("subjects") && line.starts_with(b"  namespace:") {
            writeln!(out, "  namespace: {}", self.ns)?;
            return Ok(());
        }
        out.write_all(&line)?;
        Ok(())
    }

    fn flush(&mut self, out: &mut impl Write) -> Result<()> {
        let namespaced = self.namespaced();
        let mut in_meta = false;
        let mut has_ns = false;
        let buf = std::mem::take(&mut self.buf);
        // Pass one: does metadata already carry a namespace?
        for l in &buf {
            match top_key(l) {
                Some(k) => in_meta = k == "metadata",
                None if in_meta && l.starts_with(b"  namespace:") => has_ns = true,
                None => {}
            }
        }
        in_meta = false;
        let mut top: Option<String> = None;
        for l in buf {
            if let Some(k) = top_key(&l) {
                in_meta = k == "metadata";
                top = Some(k);
                out.write_all(&l)?;
                if in_meta && namespaced && !has_ns {
                    writeln!(out, "  namespace: {}", self.ns)?;
                }
                continue;
            }
            if in_meta && l.starts_with(b"  namespace:") {
                if namespaced {
                    writeln!(out, "  namespace: {}", self.ns)?;
                }
                // A cluster-scoped object must not carry one: drop it.
                continue;
            }
            let saved = self.top.take();
            self.top = top.clone();
            self.emit(l, out)?;
            self.top = saved;
        }
        self.flushed = true;
        Ok(())
    }

    fn finish(&mut self, out: &mut impl Write) -> Result<()> {
        if !self.flushed {
            if self.kind.is_some() && !self.seen_meta {
                bail!(
                    "a {} document has no metadata",
                    self.kind.as_deref().unwrap_or("")
                );
            }
            self.flush(out)?;
        }
        Ok(())
    }
}

/// A `Write` that only hashes (checking the rendered manifest without writing it).
struct HashWriter(sha2::Sha256);
impl Write for HashWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        sha2::Digest::update(&mut self.0, b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn rendered_sha256(cx: &Cx) -> Result<Sha256> {
    let src = cx.fetcher.fetch(&cx.plan.argocd()?.manifest)?;
    let f = fs::File::open(&src).with_context(|| format!("opening {}", src.display()))?;
    let mut h = HashWriter(<sha2::Sha256 as sha2::Digest>::new());
    namespace_manifest(BufReader::new(f), &mut h, &cx.plan.argocd()?.namespace)
        .with_context(|| format!("rewriting {}", src.display()))?;
    Ok(Sha256::from_bytes(sha2::Digest::finalize(h.0).into()))
}

fn install_current(cx: &Cx) -> Result<bool> {
    let dst = cx.root.path(k3s::manifest_path(ARGOCD_INSTALL_FILE));
    if !dst.exists() {
        return Ok(false);
    }
    Ok(sha256_file(&dst)? == rendered_sha256(cx)?)
}

fn install(cx: &Cx) -> Result<bool> {
    if install_current(cx)? {
        return Ok(false);
    }
    let src = cx.fetcher.fetch(&cx.plan.argocd()?.manifest)?;
    let staging = cx.root.path(STAGING);
    if let Some(d) = staging.parent() {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    {
        let input = fs::File::open(&src).with_context(|| format!("opening {}", src.display()))?;
        let out = fs::File::create(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        namespace_manifest(
            BufReader::with_capacity(64 * 1024, input),
            BufWriter::with_capacity(64 * 1024, out),
            &cx.plan.argocd()?.namespace,
        )
        .with_context(|| format!("rewriting {}", src.display()))?;
    }
    let dst = cx.root.path(k3s::manifest_path(ARGOCD_INSTALL_FILE));
    copy_atomic(&staging, &dst, 0o644)?;
    let _ = fs::remove_file(&staging);
    Ok(true)
}

fn argocd_files(cx: &Cx) -> Vec<String> {
    let mut files = vec![ARGOCD_INSTALL_FILE.to_string()];
    files.extend(k3s::bundled_files(cx.plan, StepId::Argocd));
    files
}

pub struct ArgocdStep;

impl Step for ArgocdStep {
    fn id(&self) -> StepId {
        StepId::Argocd
    }
    fn check(&self, cx: &mut Cx) -> Result<bool> {
        Ok(k3s::bundled_current(cx, StepId::Argocd)? && install_current(cx)?)
    }
    fn apply(&self, cx: &mut Cx) -> Result<()> {
        install(cx)?;
        k3s::install_bundled(cx, StepId::Argocd)?;
        Ok(())
    }
    fn verify(&self, cx: &mut Cx) -> Result<()> {
        k3s::wait_addons(cx, &argocd_files(cx))
    }
}

// ---- gitops -----------------------------------------------------------------------------------

fn repo_secret(cx: &Cx) -> Result<Option<Vec<u8>>> {
    let Some(creds) = &cx.plan.gitops()?.credentials else {
        return Ok(None);
    };
    let password = cx.read_secret(&creds.password_file)?;
    Ok(manifests::gitops_repo_secret(cx.plan, &password))
}

fn gitops_files(cx: &Cx) -> Vec<String> {
    let mut files = k3s::bundled_files(cx.plan, StepId::Gitops);
    if has_repo_credentials(cx) {
        files.push(GITOPS_REPO_FILE.to_string());
    }
    files
}

fn has_repo_credentials(cx: &Cx) -> bool {
    cx.plan
        .gitops
        .as_ref()
        .is_some_and(|g| g.credentials.is_some())
}

pub struct GitopsStep;

impl Step for GitopsStep {
    fn id(&self) -> StepId {
        StepId::Gitops
    }
    fn check(&self, cx: &mut Cx) -> Result<bool> {
        let secret_ok = match repo_secret(cx)? {
            Some(s) => k3s::file_is(cx.root, &k3s::manifest_path(GITOPS_REPO_FILE), &s, 0o600),
            None => true,
        };
        Ok(secret_ok && k3s::bundled_current(cx, StepId::Gitops)?)
    }
    fn apply(&self, cx: &mut Cx) -> Result<()> {
        // The credentials before the Application, so the first sync can already read the repo.
        if let Some(s) = repo_secret(cx)? {
            k3s::write_if_changed(cx.root, &k3s::manifest_path(GITOPS_REPO_FILE), &s, 0o600)?;
        }
        k3s::install_bundled(cx, StepId::Gitops)?;
        Ok(())
    }
    fn verify(&self, cx: &mut Cx) -> Result<()> {
        k3s::wait_addons(cx, &gitops_files(cx))
    }
}

// ---- verify ----------------------------------------------------------------------------------

/// Every manifest file kiln put into the K3s manifests dir for this plan.
pub fn all_manifest_files(cx: &Cx) -> Vec<String> {
    let mut files: Vec<String> = cx.plan.manifests.iter().map(|m| m.file.clone()).collect();
    files.push(TAILSCALE_OAUTH_FILE.into());
    files.push(ARGOCD_INSTALL_FILE.into());
    if has_repo_credentials(cx) {
        files.push(GITOPS_REPO_FILE.into());
    }
    files.sort();
    files
}

/// Read-only probe of the finished node; `Ok(None)` names nothing yet (the wait goes on),
/// errors in the probe are [`Transient`].
fn probe(cx: &Cx) -> Result<Option<()>> {
    let root = cx.root;
    if k3s::node_ready(root)?.is_none() {
        return Err(Transient("the K3s node is not Ready".into()).into());
    }
    let mut want = BTreeMap::new();
    for f in all_manifest_files(cx) {
        let p = root.path(k3s::manifest_path(&f));
        let sum = sha256_file(&p).map_err(|e| Transient(format!("{e:#}")))?;
        want.insert(manifests::addon_name(&f).to_string(), sum.to_hex());
    }
    if !k3s::addons_match(root, &want)? {
        return Err(Transient(
            "K3s has not applied every manifest yet (Addon checksums differ)".into(),
        )
        .into());
    }
    let chart = k3s::kubectl_json(
        root,
        &[
            "get",
            "helmcharts",
            "-n",
            HELMCHART_NAMESPACE,
            TAILSCALE_OPERATOR_CHART,
        ],
    )?;
    let job = chart["status"]["jobName"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("helm-install-{TAILSCALE_OPERATOR_CHART}"));
    let j = k3s::kubectl_json(root, &["get", "jobs", "-n", HELMCHART_NAMESPACE, &job])?;
    let complete = j["status"]["succeeded"].as_i64().unwrap_or(0) >= 1
        || j["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Complete" && c["status"] == "True");
    if !complete {
        return Err(Transient(format!("HelmChart install job {job} has not completed")).into());
    }
    let g = cx.plan.gitops()?;
    k3s::kubectl_json(
        root,
        &[
            "get",
            "applications",
            "-n",
            &cx.plan.argocd()?.namespace,
            &g.app_name,
        ],
    )?;
    Ok(Some(()))
}

pub struct VerifyStep;

impl Step for VerifyStep {
    fn id(&self) -> StepId {
        StepId::Verify
    }
    fn check(&self, cx: &mut Cx) -> Result<bool> {
        let probed = if cx.plan.is_agent() {
            crate::k3s_agent::probe(cx)
        } else {
            probe(cx)
        };
        Ok(probed.map(|o| o.is_some()).unwrap_or(false))
    }
    fn apply(&self, cx: &mut Cx) -> Result<()> {
        if cx.plan.is_agent() {
            return cx.wait_for(
                "the K3s agent to run, joined, on the tailnet",
                Duration::from_secs(1),
                || crate::k3s_agent::probe(cx),
            );
        }
        cx.wait_for(
            "the node to be Ready with every manifest applied",
            Duration::from_secs(1),
            || probe(cx),
        )
    }
    fn verify(&self, cx: &mut Cx) -> Result<()> {
        // An agent runs no Argo CD: its own unit, registration and tailnet are all it has.
        if cx.plan.is_agent() {
            return crate::k3s_agent::probe(cx).map(|_| ());
        }
        // Argo CD's view of the root Application, recorded. An unreachable repository or an
        // Argo CD still pulling images is only recorded; a problem in the repository's content
        // (a file Argo CD cannot unmarshal, a kind the cluster does not serve) fails the step
        // with Argo CD's own message, so status and console name the file instead of "done".
        let g = cx.plan.gitops()?;
        let ns = cx.plan.argocd()?.namespace.clone();
        let app = k3s::kubectl_json(cx.root, &["get", "applications", "-n", &ns, &g.app_name])?;
        let st = crate::argocd_status::root_state(&app);
        tracing::info!(sync = %st.sync, health = %st.health, reason = %st.reason, "root Application");
        cx.facts.insert("argocd.root.sync".into(), st.sync);
        cx.facts.insert("argocd.root.health".into(), st.health);
        cx.facts.insert("argocd.root.reason".into(), st.reason);
        if let Some(problem) = st.problem {
            bail!(
                "Argo CD cannot sync the root Application {}: {problem} (check the repository with `kiln gitops check`; rerun kiln-firstboot after fixing it)",
                g.app_name
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(s: &str) -> String {
        let mut out = Vec::new();
        namespace_manifest(s.as_bytes(), &mut out, "argocd").unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn namespaced_objects_get_the_namespace_cluster_scoped_ones_do_not() {
        let out = rewrite(
            "# header\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  labels:\n    a: b\n  name: sa\n---\napiVersion: v1\ndata:\n  k: |\n    kind: Fake\nkind: ConfigMap\nmetadata:\n  name: cm\n---\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: x\nspec:\n  names:\n    kind: X\n",
        );
        let docs: Vec<&str> = out.split("\n---\n").collect();
        assert_eq!(docs.len(), 4, "{out}");
        assert!(docs[0].contains("kind: Namespace") && docs[0].contains("name: argocd"));
        assert!(
            docs[1].contains("metadata:\n  namespace: argocd\n  labels:"),
            "{}",
            docs[1]
        );
        assert!(
            docs[2].contains("kind: ConfigMap\nmetadata:\n  namespace: argocd\n  name: cm"),
            "{}",
            docs[2]
        );
        assert!(!docs[3].contains("namespace:"), "{}", docs[3]);
    }

    #[test]
    fn binding_subjects_follow_the_namespace_and_existing_namespaces_are_replaced() {
        let mut out = Vec::new();
        namespace_manifest(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: b\nroleRef:\n  kind: ClusterRole\n  name: r\nsubjects:\n- kind: ServiceAccount\n  name: s\n  namespace: argocd\n---\nkind: Service\nmetadata:\n  name: s\n  namespace: other\n".as_bytes(),
            &mut out,
            "gitops",
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("  name: s\n  namespace: gitops\n---"), "{out}");
        assert!(
            out.contains("kind: Service\nmetadata:\n  name: s\n  namespace: gitops\n"),
            "{out}"
        );
        assert!(!out.contains("other") && !out.contains("argocd"), "{out}");
    }
}
