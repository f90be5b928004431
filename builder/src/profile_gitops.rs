//! `argocd.gitops` source options, with Argo CD's own names: `directory` (recurse, include,
//! exclude), `kustomize`, or `helm` (a chart at the path). At most one; none means Argo CD's
//! default, a directory source that is not recursive. Checked in `resolve_gitops`.

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirectorySpec {
    #[serde(default)]
    pub recurse: bool,
    /// A glob as Argo CD matches it (braces allowed) against paths relative to `path`.
    #[serde(default)]
    pub include: Option<String>,
    #[serde(default)]
    pub exclude: Option<String>,
}

/// `kustomize: {}`: Argo CD runs `kustomize build` on the path with its defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KustomizeSpec {}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HelmSpec {
    /// Values files relative to the chart (Argo CD's `helm.valueFiles`).
    #[serde(default)]
    pub value_files: Vec<String>,
}
