//! How the steps fail and repair: a release checksum file that disagrees with the pin stops the
//! k3s step at once with nothing installed; a hand-edited config.yaml is put back and K3s
//! restarted; the stand-ins refuse what the real programs refuse.

mod steps_common;

use std::fs;
use std::process::Command;
use steps_common::*;

#[test]
fn k3s_pin_disagreeing_with_the_release_checksums_fails_at_once_installing_nothing() {
    let (node, mirror, pins, _plan) = setup(|_, mirror_dir| {
        let rel = "k3s/v1.32.4+k3s1/sha256sum-amd64.txt";
        fs::write(mirror_dir.join(rel), format!("{}  k3s\n", "ab".repeat(32))).unwrap();
    });
    let out = node.run_daemon();
    assert!(!out.status.success());
    let st = status(&node.root);
    let k3s = &st["steps"][0];
    assert_eq!(k3s["id"], "k3s");
    assert_eq!(k3s["state"], "failed", "{st}");
    assert_eq!(
        k3s["attempts"], 1,
        "a pin mismatch is permanent, never retried: {st}"
    );
    let err = k3s["last-error"].as_str().unwrap_or_else(|| panic!("{st}"));
    assert!(
        err.contains("sha256sum-amd64.txt") && err.contains(&"ab".repeat(32)),
        "{err}"
    );
    assert!(
        !node.p("/usr/local/bin/k3s").exists(),
        "nothing may be installed"
    );
    assert_eq!(mirror.hits(pins["k3s"]["path"].as_str().unwrap()), 0);
    assert!(argv_of(&node.log(), "k3s").is_empty(), "k3s must never run");
    // The later steps did not start.
    assert!(st["steps"][1]["state"] != "done", "{st}");
}

#[test]
fn edited_k3s_config_is_restored_and_k3s_restarted_on_the_next_run() {
    let (node, _mirror, _pins, _plan) = setup(|_, _| {});
    let out = node.run_daemon();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let cfg = node.p("/etc/rancher/k3s/config.yaml");
    let good = fs::read(&cfg).unwrap();
    fs::write(&cfg, "disable: [coredns]\n").unwrap();
    let servers_before = argv_of(&node.log(), "k3s")
        .iter()
        .filter(|a| a[0] == "server")
        .count();
    let out = node.run_daemon();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(fs::read(&cfg).unwrap(), good);
    let states = step_states(&status(&node.root));
    assert_eq!(
        states[0],
        ("k3s".to_string(), "done".to_string()),
        "{states:?}"
    );
    assert!(states[1..].iter().all(|s| s.1 == "skipped"), "{states:?}");
    let log = node.log();
    let servers_after = argv_of(&log, "k3s")
        .iter()
        .filter(|a| a[0] == "server")
        .count();
    assert_eq!(
        servers_after,
        servers_before + 1,
        "k3s must restart with the restored config"
    );
    let restarts = argv_of(&log, "systemctl")
        .iter()
        .filter(|a| a.first().map(String::as_str) == Some("restart"))
        .count();
    assert!(restarts >= 1);
}

fn run(cmd: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn standins_reject_what_the_real_programs_reject() {
    let (node, _mirror, _pins, _plan) = setup(|_, _| {});
    // Install the stand-ins as the steps would, by running the first two steps' work.
    let out = node.run_daemon();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let k3s = node.p("/usr/local/bin/k3s");
    let ts = node.p("/usr/bin/tailscale");

    // kubectl: unknown flags and resource types, like kubectl.
    let (rc, msg) = run(&k3s, &["kubectl", "get", "nodes", "--bogus"]);
    assert!(rc != 0 && msg.contains("unknown flag"), "{msg}");
    let (rc, msg) = run(&k3s, &["kubectl", "get", "widgets"]);
    assert!(
        rc != 0 && msg.contains("doesn't have a resource type"),
        "{msg}"
    );
    let (rc, msg) = run(
        &k3s,
        &["kubectl", "get", "applications", "-n", "argocd", "nope"],
    );
    assert!(rc != 0 && msg.contains("NotFound"), "{msg}");

    // tailscale up: unknown flags, bad tags, no key while logged out.
    let (rc, msg) = run(&ts, &["up", "--authkey-file", "x"]);
    assert!(
        rc != 0 && msg.contains("flag provided but not defined"),
        "{msg}"
    );
    let (rc, msg) = run(&ts, &["up", "--advertise-tags", "tag:9bad"]);
    assert!(rc != 0 && msg.contains("must start with a letter"), "{msg}");
    let (rc, msg) = run(&ts, &["up", "--advertise-tags", "tag:a_b"]);
    assert!(
        rc != 0 && msg.contains("numbers, letters, or dashes"),
        "{msg}"
    );
    // Changing settings of a Running node without --reset is refused.
    let (rc, msg) = run(&ts, &["up", "--hostname", "other"]);
    assert!(
        rc != 0 && msg.contains("requires mentioning all non-default flags"),
        "{msg}"
    );

    // k3s server: an unknown config key, a bad --disable item; kubectl fails when it is down.
    node.systemctl(&["stop", "k3s.service", "tailscaled.service"]);
    let (rc, msg) = run(&k3s, &["kubectl", "get", "nodes"]);
    assert!(rc != 0 && msg.contains("was refused"), "{msg}");
    let (rc, msg) = run(&ts, &["status", "--json"]);
    assert!(
        rc != 0 && msg.contains("failed to connect to local tailscaled"),
        "{msg}"
    );
    let cfg = node.p("/etc/rancher/k3s/config.yaml");
    fs::write(&cfg, "disable:\n- traefik\nno-such-flag: true\n").unwrap();
    let (rc, msg) = run(&k3s, &["server"]);
    assert!(rc != 0 && msg.contains("no-such-flag"), "{msg}");
    fs::write(&cfg, "disable:\n- trafik\n").unwrap();
    let (rc, msg) = run(&k3s, &["server"]);
    assert!(rc != 0 && msg.contains("trafik"), "{msg}");

    // A fresh tailscaled (logged out) refuses `up` without an auth key.
    fs::remove_file(node.p("/var/lib/tailscale/tailscaled.state")).unwrap();
    let o = node.systemctl(&["start", "tailscaled.service"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (rc, msg) = run(&ts, &["up", "--hostname", "x"]);
    assert!(rc != 0 && msg.contains("To authenticate, visit"), "{msg}");
    let (rc, msg) = run(&ts, &["status", "--json"]);
    assert!(rc == 0 && msg.contains("NeedsLogin"), "{msg}");
}

#[test]
fn stopped_services_come_back_without_needing_the_deleted_auth_key() {
    // Like a reboot where nothing started K3s and tailscaled yet: the key file is gone (it is
    // removed once the node has joined), so the node must come back from its Tailscale state.
    let (node, _mirror, _pins, _plan) = setup(|_, _| {});
    let out = node.run_daemon();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!node.p(AUTH_KEY_FILE).exists());
    let o = node.systemctl(&["stop", "k3s.service", "tailscaled.service"]);
    assert!(o.status.success());
    let ups_before = argv_of(&node.log(), "tailscale")
        .iter()
        .filter(|a| a[0] == "up")
        .count();
    let out = node.run_daemon();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let states = step_states(&status(&node.root));
    assert_eq!(states[0].1, "done", "k3s had to be started: {states:?}");
    assert_eq!(
        states[1].1, "done",
        "tailscaled had to be started: {states:?}"
    );
    assert!(states[2..].iter().all(|s| s.1 == "skipped"), "{states:?}");
    let ups_after = argv_of(&node.log(), "tailscale")
        .iter()
        .filter(|a| a[0] == "up")
        .count();
    assert_eq!(
        ups_after, ups_before,
        "a logged-in node must not run `tailscale up` again"
    );
}
