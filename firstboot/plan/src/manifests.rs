//! Kubernetes objects the node gets, built from typed structs and rendered once.

use crate::{Plan, StepId};

/// A rendered manifest file shipped in the bundle.
pub struct ManifestFile {
    pub step: StepId,
    /// RFC 1123 file name (`tailscale-operator.yaml`); K3s names the Addon after it.
    pub file: String,
    pub bytes: Vec<u8>,
}

/// The secret-free manifests the builder renders into the bundle. The plan's own `manifests`
/// list is ignored here (it holds the hashes of this function's output).
pub fn bundled(_plan: &Plan) -> Vec<ManifestFile> {
    Vec::new()
}
