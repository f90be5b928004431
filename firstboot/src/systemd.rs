//! systemd: unit control through `systemctl`, readiness through sd_notify.
