//! The stand-in artifacts' pins: the mirror script is deterministic, and the pins committed in
//! tests/standins/pins.json and profiles/qemu-local.yaml are the ones it produces (a changed
//! stand-in without updated pins would only fail much later, inside a VM).

mod steps_common;

use serde_json::Value;
use std::fs;
use steps_common::*;

#[test]
fn mirror_is_deterministic_and_committed_pins_match_the_standins() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let pins_a = make_mirror(a.path());
    let pins_b = make_mirror(b.path());
    assert_eq!(pins_a, pins_b, "make-mirror.py is not deterministic");
    for key in ["k3s", "k3s-checksums", "tailscale", "argocd"] {
        let rel = pins_a[key]["path"].as_str().unwrap();
        assert_eq!(
            fs::read(a.path().join(rel)).unwrap(),
            fs::read(b.path().join(rel)).unwrap(),
            "{rel}"
        );
    }
    let committed: Value =
        serde_json::from_str(&fs::read_to_string(standins_dir().join("pins.json")).unwrap())
            .unwrap();
    assert_eq!(
        pins_a, committed,
        "tests/standins/pins.json is stale: run `python3 tests/standins/make-mirror.py DIR` and \
         copy DIR/pins.json (and the k3s sha512/tailscale sha256 and sizes into profiles/qemu-local.yaml)"
    );
    // The release checksum file lists the stand-in binary exactly as install.sh greps it.
    let sums = fs::read_to_string(
        a.path()
            .join(pins_a["k3s-checksums"]["path"].as_str().unwrap()),
    )
    .unwrap();
    assert_eq!(
        kiln_firstboot::k3s::checksum_for_k3s(&sums)
            .unwrap()
            .to_hex(),
        pins_a["k3s"]["sha256"].as_str().unwrap()
    );
    // The Argo CD manifest served is upstream's, byte for byte: its pin is the real one.
    assert_eq!(
        pins_a["argocd"]["sha256"],
        "11016889371e4b1e3754b7ba2494b36ab1111338bd2362d499abe3ff2f63c906"
    );

    // profiles/qemu-local.yaml boots against this mirror, so it must pin these artifacts.
    let profile = fs::read_to_string(repo_dir().join("profiles/qemu-local.yaml")).unwrap();
    let base = fs::read_to_string(repo_dir().join("profiles/ameciclo.yaml")).unwrap();
    // K3s by sha512 and size (as the reference profile pins the real binary), Tailscale by sha256.
    for (key, algo) in [("k3s", "sha512"), ("tailscale", "sha256")] {
        let pin = format!("digest: \"{algo}:{}\"", pins_a[key][algo].as_str().unwrap());
        let size = format!("size: {}\n", pins_a[key]["size"]);
        assert!(
            profile.contains(&pin) && profile.contains(&size),
            "profiles/qemu-local.yaml does not pin the {key} stand-in ({pin}, {size})"
        );
    }
    let argocd = pins_a["argocd"]["sha256"].as_str().unwrap();
    assert!(
        profile.contains(argocd) || base.contains(argocd),
        "neither qemu-local.yaml nor ameciclo.yaml pins the Argo CD manifest {argocd}"
    );
}
