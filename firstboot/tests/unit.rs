//! The systemd unit shipped in the bundle: parsed by the real `systemd-analyze verify` (no
//! unknown keys or bad values), and tied to the daemon's contract (path, subcommand, notify
//! semantics, restart policy that matches the exit codes). See docs/firstboot.md.

use kiln_plan::paths;
use std::process::Command;

const UNIT: &str = include_str!("../systemd/kiln-firstboot.service");

fn values(key: &str) -> Vec<String> {
    UNIT.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

#[test]
fn unit_states_the_daemons_contract() {
    assert_eq!(values("ExecStart"), [format!("{} run", paths::DAEMON_BIN)]);
    assert_eq!(values("Type"), ["notify"]);
    assert_eq!(values("NotifyAccess"), ["main"]);
    assert_eq!(values("RemainAfterExit"), ["yes"]);
    assert_eq!(values("Restart"), ["on-failure"]);
    // Exit 2 = refused (engine::Outcome::Refused): restarting cannot help.
    assert_eq!(values("RestartPreventExitStatus"), ["2"]);
    assert_eq!(
        kiln_firstboot::engine::Outcome::Refused {
            error: String::new()
        }
        .exit_code(),
        2
    );
    assert_eq!(values("StandardOutput"), ["journal+console"]);
    assert_eq!(values("WantedBy"), ["multi-user.target"]);
    assert_eq!(values("ConditionPathExists"), [paths::PLAN]);
    assert!(values("After")[0].contains("network-online.target"));
    assert!(values("Wants")[0].contains("network-online.target"));
    assert!(!values("StartLimitBurst").is_empty() && !values("StartLimitIntervalSec").is_empty());
    assert!(!values("TimeoutStartSec").is_empty());
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("kiln-firstboot.service");
    std::fs::write(&p, UNIT).unwrap();
    let out = match Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&p)
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("systemd-analyze (Debian package systemd) is needed: {e}"),
    };
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // The one finding allowed: the daemon is not installed on the build host.
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains(&format!("Command {} is not executable", paths::DAEMON_BIN)))
        .collect();
    assert!(problems.is_empty(), "systemd-analyze verify:\n{text}");
}
