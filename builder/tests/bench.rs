//! `kiln bench` runs end to end and prints its ratio (no timing is asserted: the figures are
//! for reading, measured against cloud-localds in the same run).

mod common;

use std::process::Command;

#[test]
fn kiln_bench_times_kiln_build_against_cloud_localds_and_prints_the_ratio() {
    let have = Command::new("sh")
        .arg("-c")
        .arg("command -v cloud-localds")
        .output()
        .unwrap()
        .status
        .success();
    assert!(
        have,
        "cloud-localds is not installed (Debian package cloud-image-utils; run .ci/install-deps)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let daemon = common::fake_daemon(tmp.path());
    let o = Command::new(common::kiln_bin())
        .args(["bench", "--runs", "3", "--firstboot"])
        .arg(&daemon)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("ratio cloud-localds / kiln build, cold:"), "{out}");
    assert!(out.contains("ratio cloud-localds / kiln build, warm:"), "{out}");
    assert!(out.contains("outputs identical with and without the cache: yes"), "{out}");
    assert!(out.contains("profiles/ameciclo.yaml"), "{out}");
    println!("{out}");
}
