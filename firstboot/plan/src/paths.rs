//! Absolute paths on the node. The daemon maps them under `--root` when given one.

pub const PLAN: &str = "/etc/kiln/plan.json";
pub const SECRETS_DIR: &str = "/etc/kiln/secrets";
/// sha256 of the bundle the bootstrap verified (hex, one line).
pub const BUNDLE_PIN: &str = "/etc/kiln/bundle.sha256";
pub const STATE_DIR: &str = "/var/lib/kiln";
pub const JOURNAL: &str = "/var/lib/kiln/journal.json";
pub const CACHE_DIR: &str = "/var/lib/kiln/cache";
pub const BUNDLE_TARBALL: &str = "/var/lib/kiln/bundle.tar.gz";
/// The cloud-init instance id the bootstrap finished for (see the payload's bootcmd).
pub const BOOTSTRAP_DONE: &str = "/var/lib/kiln/bootstrap.done";
/// Where the bootstrap unpacks the verified bundle.
pub const BUNDLE_DIR: &str = "/var/lib/kiln/bundle";
pub const RUN_DIR: &str = "/run/kiln";
pub const STATUS: &str = "/run/kiln/status.json";
pub const DAEMON_BIN: &str = "/usr/local/sbin/kiln-firstboot";
pub const UNIT: &str = "/etc/systemd/system/kiln-firstboot.service";
/// cloud-init's record of the current instance id (a rebuilt VM has a new one).
pub const CLOUD_INSTANCE_ID: &str = "/var/lib/cloud/data/instance-id";
/// cloud-init's per-instance module semaphores (`config_<module>`).
pub const CLOUD_SEM_DIR: &str = "/var/lib/cloud/instance/sem";

pub const K3S_BIN: &str = "/usr/local/bin/k3s";
pub const K3S_CONFIG: &str = "/etc/rancher/k3s/config.yaml";
pub const K3S_KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";
pub const K3S_UNIT: &str = "/etc/systemd/system/k3s.service";
pub const K3S_ENV: &str = "/etc/systemd/system/k3s.service.env";
/// An agent's unit and env file, named as K3s's `install.sh` names them for `k3s agent`.
pub const K3S_AGENT_UNIT: &str = "/etc/systemd/system/k3s-agent.service";
pub const K3S_AGENT_ENV: &str = "/etc/systemd/system/k3s-agent.service.env";
/// What a K3s agent writes once its server accepted it: the kubelet's kubeconfig and the client
/// certificate the server issued to the kubelet.
pub const K3S_AGENT_KUBELET_KUBECONFIG: &str = "/var/lib/rancher/k3s/agent/kubelet.kubeconfig";
pub const K3S_AGENT_KUBELET_CERT: &str = "/var/lib/rancher/k3s/agent/client-kubelet.crt";
pub const K3S_MANIFESTS: &str = "/var/lib/rancher/k3s/server/manifests";
/// Served by the K3s supervisor at `https://%{KUBERNETES_API}%/static/charts/<file>`.
pub const K3S_STATIC_CHARTS: &str = "/var/lib/rancher/k3s/server/static/charts";
/// Image archives K3s imports into containerd when it starts.
pub const K3S_AGENT_IMAGES: &str = "/var/lib/rancher/k3s/agent/images";
pub const K3S_NODE_TOKEN: &str = "/var/lib/rancher/k3s/server/node-token";

pub const TAILSCALE_BIN: &str = "/usr/bin/tailscale";
pub const TAILSCALED_BIN: &str = "/usr/sbin/tailscaled";
pub const TAILSCALED_UNIT: &str = "/lib/systemd/system/tailscaled.service";
pub const TAILSCALED_DEFAULTS: &str = "/etc/default/tailscaled";
pub const TAILSCALED_SOCKET: &str = "/run/tailscale/tailscaled.sock";
