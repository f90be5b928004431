//! How Argo CD reads the root Application's path: Argo CD's own source types, with its names
//! and defaults (`docs/user-guide/directory.md`, `kustomize.md`, `helm.md` at v3.4.7).

use serde::{Deserialize, Serialize};

/// One source type per source: Argo CD refuses an Application that sets two
/// ("multiple application sources defined").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum GitOpsSource {
    /// Plain manifests (`.yaml`, `.yml`, `.json`) under the path.
    Directory(DirectoryOptions),
    /// `kustomize build` of the path.
    Kustomize {},
    /// The path is a Helm chart.
    Helm(HelmOptions),
}

/// Argo CD's default: a directory source that is not recursive.
impl Default for GitOpsSource {
    fn default() -> Self {
        GitOpsSource::Directory(DirectoryOptions::default())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirectoryOptions {
    #[serde(default)]
    pub recurse: bool,
    /// A glob (braces allowed) matched against paths relative to the app path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HelmOptions {
    /// Values files relative to the chart path, in order.
    #[serde(default)]
    pub value_files: Vec<String>,
}
