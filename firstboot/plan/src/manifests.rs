//! Kubernetes objects the node gets, built from typed structs and rendered once.
//! (Filled in by the steps work: HelmChart, Ingress, Application, Secrets.)
