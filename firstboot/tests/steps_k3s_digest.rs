//! The K3s binary must match both the plan's own pin (sha512 and size, as the reference
//! profile pins the real binary) and the sha256 the release publishes in its
//! `sha256sum-amd64.txt`; the daemon computes both while streaming. Against the loopback
//! mirror: either one disagreeing refuses the binary and installs nothing; both agreeing installs it.

mod steps_common;

use kiln_plan::{Pin, Sha256, Sha512};
use serde_json::Value;
use std::fs;
use steps_common::*;

const SUMS: &str = "k3s/v1.32.4+k3s1/sha256sum-amd64.txt";

fn sha512_pin(pins: &Value) -> Pin {
    Pin::new(
        pins["k3s"]["sha512"]
            .as_str()
            .unwrap()
            .parse::<Sha512>()
            .unwrap(),
        Some(pins["k3s"]["size"].as_u64().unwrap()),
    )
}

/// The stand-in's pins, read the way `setup` will (its mirror is made from the same script).
fn standin_pins() -> Value {
    serde_json::from_str(&fs::read_to_string(standins_dir().join("pins.json")).unwrap()).unwrap()
}

fn k3s_failure(node: &TestNode) -> (Value, String) {
    let out = node.run_daemon();
    assert!(!out.status.success());
    let st = status(&node.root);
    let k3s = st["steps"][0].clone();
    assert_eq!(k3s["id"], "k3s");
    assert_eq!(k3s["state"], "failed", "{st}");
    assert_eq!(
        k3s["attempts"], 1,
        "a digest disagreement is permanent: {st}"
    );
    let err = k3s["last-error"].as_str().unwrap().to_string();
    assert!(!node.p("/usr/local/bin/k3s").exists(), "nothing installed");
    assert!(argv_of(&node.log(), "k3s").is_empty(), "k3s must never run");
    // Nothing verified reached the cache either.
    let cache = node.p("/var/lib/kiln/cache");
    let kept: Vec<_> = fs::read_dir(&cache)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "cache holds {kept:?}");
    (st, err)
}

#[test]
fn k3s_matching_its_sha512_but_not_the_release_sums_is_refused() {
    let pins = standin_pins();
    let pin = sha512_pin(&pins);
    let (node, mirror, pins, _plan) = setup(|plan, dir| {
        plan.k3s.binary.pin = pin;
        // The release's checksum file names other bytes.
        fs::write(dir.join(SUMS), format!("{}  k3s\n", "cd".repeat(32))).unwrap();
    });
    let (_, err) = k3s_failure(&node);
    assert!(
        err.contains("sha256sum-amd64.txt")
            && err.contains(&"cd".repeat(32))
            && err.contains(pins["k3s"]["sha256"].as_str().unwrap()),
        "names the publication and both values: {err}"
    );
    // A sha512 pin cannot be compared with the sums before the bytes are there: one download.
    assert_eq!(mirror.hits(pins["k3s"]["path"].as_str().unwrap()), 1);
}

#[test]
fn k3s_matching_the_release_sums_but_not_its_sha512_is_refused() {
    let pins = standin_pins();
    let mut pin = sha512_pin(&pins);
    pin.digest = Sha512::digest(b"some other k3s").into();
    let (node, _mirror, _pins, _plan) = setup(|plan, _| plan.k3s.binary.pin = pin);
    let (_, err) = k3s_failure(&node);
    assert!(
        err.contains("sha512 mismatch")
            && err.contains(&Sha512::digest(b"some other k3s").to_hex()),
        "{err}"
    );
}

#[test]
fn k3s_matching_its_sha512_and_size_and_the_release_sums_is_installed() {
    let pins = standin_pins();
    let pin = sha512_pin(&pins);
    let (node, _mirror, pins, _plan) = setup(|plan, _| plan.k3s.binary.pin = pin);
    let out = node.run_daemon();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let bin = fs::read(node.p("/usr/local/bin/k3s")).unwrap();
    assert_eq!(
        Sha256::digest(&bin).to_hex(),
        pins["k3s"]["sha256"].as_str().unwrap()
    );
    assert_eq!(bin.len() as u64, pins["k3s"]["size"].as_u64().unwrap());
    // The cache names it by the pinned sha512.
    assert!(node
        .p(&format!(
            "/var/lib/kiln/cache/{}",
            pins["k3s"]["sha512"].as_str().unwrap()
        ))
        .is_file());
}

#[test]
fn k3s_with_a_wrong_pinned_size_is_refused() {
    let pins = standin_pins();
    let mut pin = sha512_pin(&pins);
    pin.size = Some(pin.size.unwrap() - 1);
    let (node, _mirror, _pins, _plan) = setup(|plan, _| plan.k3s.binary.pin = pin);
    let (_, err) = k3s_failure(&node);
    assert!(err.contains("size mismatch"), "{err}");
}
