//! Argo CD's view of the root Application (`.status` of argoproj.io/v1alpha1 Application,
//! `pkg/apis/application/v1alpha1/types.go` at v3.4.7): sync status, health status, conditions
//! and the last sync operation, and whether they name a problem in the repository's content.
//!
//! Two kinds of problem are the repository's and will not go away by waiting:
//! - a `ComparisonError` from manifest generation: the repo-server answers gRPC
//!   `FailedPrecondition` for a file it cannot unmarshal ("Failed to unmarshal "values.yaml":
//!   … Object 'Kind' is missing"), `InvalidArgument`-like "app path does not exist", or an
//!   illegal symlink;
//! - a sync that failed on a kind the cluster does not serve (`AugmentSyncMsg`: "The Kubernetes
//!   API could not find helm.sh/HelmChart for requested resource …").
//!
//! A `ComparisonError` that says the repository cannot be reached (DNS, credentials, Argo CD
//! still starting) is recorded, not a failure: the node itself is fine.

use serde_json::Value;

/// What `verify` records about the root Application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootState {
    pub sync: String,
    pub health: String,
    /// The first condition's or failed operation's message (shortened), or empty.
    pub reason: String,
    /// A problem in the repository's content, in Argo CD's words (file and reason).
    pub problem: Option<String>,
}

const MAX_MESSAGE: usize = 600;

/// Marks of a manifest-generation failure in a ComparisonError message.
const CONTENT_MARKS: [&str; 6] = [
    "code = FailedPrecondition",
    "Failed to unmarshal",
    "Object 'Kind' is missing",
    "app path does not exist",
    "illegal filepath in symlink",
    "Found multiple objects",
];

/// Marks of a resource the cluster does not serve, in a sync result message.
const UNKNOWN_KIND_MARKS: [&str; 3] = [
    "could not find the requested resource",
    "The Kubernetes API could not find",
    "no matches for kind",
];

fn short(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() <= MAX_MESSAGE {
        return s.to_string();
    }
    format!("{}…", s.chars().take(MAX_MESSAGE).collect::<String>())
}

/// The part of a repo-server error after gRPC's `desc = ` (where the file is named).
fn readable(message: &str) -> &str {
    message
        .rsplit_once("desc = ")
        .map(|x| x.1)
        .unwrap_or(message)
}

pub fn root_state(app: &Value) -> RootState {
    let status = &app["status"];
    let s = |v: &Value| v.as_str().unwrap_or("Unknown").to_string();
    let conditions: Vec<&Value> = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let mut reason = conditions
        .first()
        .and_then(|c| c["message"].as_str())
        .map(short)
        .unwrap_or_default();
    let mut problem = conditions.iter().find_map(|c| {
        let msg = c["message"].as_str().unwrap_or_default();
        (c["type"] == "ComparisonError" && CONTENT_MARKS.iter().any(|m| msg.contains(m)))
            .then(|| format!("ComparisonError: {}", short(readable(msg))))
    });
    let op = &status["operationState"];
    if problem.is_none() && matches!(op["phase"].as_str(), Some("Failed") | Some("Error")) {
        let failed = op["syncResult"]["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| {
                let m = r["message"].as_str().unwrap_or_default();
                UNKNOWN_KIND_MARKS.iter().any(|k| m.contains(k))
            });
        if let Some(r) = failed {
            let what = format!(
                "{}/{} {} in namespace {}",
                r["group"].as_str().unwrap_or(""),
                r["kind"].as_str().unwrap_or("?"),
                r["name"].as_str().unwrap_or("?"),
                r["namespace"].as_str().unwrap_or("")
            );
            problem = Some(format!(
                "sync failed on {what}: {}",
                short(r["message"].as_str().unwrap_or_default())
            ));
            if reason.is_empty() {
                reason = short(op["message"].as_str().unwrap_or_default());
            }
        }
    }
    RootState {
        sync: s(&status["sync"]["status"]),
        health: s(&status["health"]["status"]),
        reason,
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The message Argo CD v3.4.7 writes for a values file in a directory source: the
    /// controller's prefix (`controller/state.go`) around the repo-server's gRPC error
    /// (`getObjsFromYAMLOrJSON`).
    pub const UNMARSHAL: &str = "Failed to load target state: failed to generate manifest for source 1 of 1: rpc error: code = FailedPrecondition desc = Failed to unmarshal \"values.yaml\": failed to unmarshal manifest: error unmarshaling JSON: while decoding JSON: Object 'Kind' is missing in '{\"replicaCount\":1}'";

    #[test]
    fn a_manifest_error_is_a_problem_named_by_file() {
        let app = json!({"status": {"sync": {"status": "Unknown"}, "health": {"status": "Healthy"},
            "conditions": [{"type": "ComparisonError", "message": UNMARSHAL}]}});
        let s = root_state(&app);
        assert_eq!((s.sync.as_str(), s.health.as_str()), ("Unknown", "Healthy"));
        let p = s.problem.unwrap();
        assert!(
            p.starts_with("ComparisonError: Failed to unmarshal \"values.yaml\""),
            "{p}"
        );
        assert!(p.contains("Object 'Kind' is missing"), "{p}");
    }

    #[test]
    fn an_unreachable_repository_is_recorded_not_a_problem() {
        let app = json!({"status": {"sync": {"status": "Unknown"}, "health": {"status": "Healthy"},
            "conditions": [{"type": "ComparisonError", "message": "Failed to load target state: failed to generate manifest for source 1 of 1: rpc error: code = Unknown desc = failed to list refs: dial tcp: lookup github.com: no such host"}]}});
        let s = root_state(&app);
        assert_eq!(s.problem, None);
        assert!(s.reason.contains("failed to list refs"));
        assert_eq!(root_state(&json!({})).sync, "Unknown");
    }

    #[test]
    fn a_sync_that_failed_on_an_unserved_kind_is_a_problem() {
        let app = json!({"status": {"sync": {"status": "OutOfSync"}, "health": {"status": "Missing"},
            "operationState": {"phase": "Failed", "message": "one or more synchronization tasks are not valid",
                "syncResult": {"resources": [
                    {"group": "", "kind": "ConfigMap", "name": "a", "namespace": "x", "status": "Synced", "message": "configmap/a created"},
                    {"group": "helm.sh", "kind": "HelmChart", "name": "traefik", "namespace": "kube-system", "status": "SyncFailed",
                     "message": "The Kubernetes API could not find helm.sh/HelmChart for requested resource kube-system/traefik. Make sure the \"HelmChart\" CRD is installed on the destination cluster."}]}}}});
        let s = root_state(&app);
        let p = s.problem.unwrap();
        assert!(
            p.contains("helm.sh/HelmChart traefik") && p.contains("CRD is installed"),
            "{p}"
        );
        assert_eq!(s.reason, "one or more synchronization tasks are not valid");
    }
}
