//! tailscale: owned by the steps work.
