//! k3s: owned by the steps work.
