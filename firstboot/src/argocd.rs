//! argocd: owned by the steps work.
