//! Measures (never asserts) the daemon's cost over a full six-step run against the stand-ins:
//! its own CPU and peak RSS (getrusage(RUSAGE_SELF), reported in status.json and the final
//! milestone) next to `/usr/bin/time -v` of the whole run, stand-ins included, as the peer.
//! Budgets (docs/firstboot.md): daemon peak RSS ≤ 8 MiB, CPU ≤ 0.5 s.
//!
//! Uses the static release binary from `KILN_FIRSTBOOT` (`.ci/run` exports it after
//! `cargo firstboot-static`); otherwise the test build, whose figures are only indicative.

mod steps_common;

use std::process::Command;
use steps_common::*;

#[test]
fn report_daemon_cpu_and_peak_rss_against_the_whole_run() {
    let (node, _mirror, _pins, _plan) = setup(|_, _| {});
    let (bin, kind) = match std::env::var("KILN_FIRSTBOOT") {
        Ok(p) if std::path::Path::new(&p).exists() => (p, "static release"),
        _ => (
            env!("CARGO_BIN_EXE_kiln-firstboot").to_string(),
            "debug test build",
        ),
    };
    let have_time = std::path::Path::new("/usr/bin/time").exists();
    let mut cmd = if have_time {
        let mut c = Command::new("/usr/bin/time");
        c.arg("-v").arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    let path = format!(
        "{}:{}",
        node.bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = cmd
        .args(["run", "--root"])
        .arg(&node.root)
        .env("PATH", path)
        .env("KILN_STANDIN_ROOT", &node.root)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let st = status(&node.root);
    let own_cpu = st["resources"]["cpu-ms"]
        .as_u64()
        .expect("status reports cpu-ms");
    let own_rss = st["resources"]["max-rss-kib"]
        .as_u64()
        .expect("status reports max-rss-kib");
    let field = |name: &str| -> Option<f64> {
        stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let total_cpu_ms = match (
        field("User time (seconds):"),
        field("System time (seconds):"),
    ) {
        (Some(u), Some(s)) => Some(((u + s) * 1000.0) as u64),
        _ => None,
    };
    let total_rss = field("Maximum resident set size (kbytes):").map(|v| v as u64);
    println!("kiln-firstboot resources ({kind}: {bin})");
    println!(
        "  daemon itself:   cpu {:>6} ms   peak rss {:>7} KiB   (budget 500 ms, 8192 KiB)",
        own_cpu, own_rss
    );
    if let (Some(c), Some(r)) = (total_cpu_ms, total_rss) {
        println!(
            "  whole run (time -v, stand-ins included): cpu {c:>6} ms   largest rss {r:>7} KiB"
        );
        if c > 0 {
            println!(
                "  ratio daemon/whole-run cpu: {:.2}",
                own_cpu as f64 / c as f64
            );
        }
    }
    assert!(own_rss > 0);
}
