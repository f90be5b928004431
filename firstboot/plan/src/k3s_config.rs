//! The K3s server flags a profile may set in `/etc/rancher/k3s/config.yaml`.
