//! `kiln bake` up to the VM (the VM part is qemu/tests/baked.rs): profile errors come first,
//! with their position, before anything is written or booted; the bake seed carries the bake
//! cloud-config and the very bundle `kiln build` made; a failing stage is named with its file.

mod common;

use std::io::Read;
use std::process::Command;

fn bake(args: &[&str], dir: &std::path::Path) -> (i32, String) {
    let daemon = common::fake_daemon(dir);
    let out = Command::new(common::kiln_bin())
        .current_dir(common::repo())
        .arg("bake")
        .args(args)
        .arg("--firstboot")
        .arg(&daemon)
        .output()
        .unwrap();
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
fn a_bad_profile_fails_before_anything_is_built_or_booted() {
    let tmp = tempfile::tempdir().unwrap();
    let profile = tmp.path().join("bad.yaml");
    std::fs::write(
        &profile,
        format!(
            "extends: {}\nbogus-key: 1\n",
            common::repo().join("profiles/qemu-local.yaml").display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let (code, text) = bake(
        &[profile.to_str().unwrap(), "-o", out.to_str().unwrap()],
        tmp.path(),
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("bogus-key") && text.contains("bad.yaml"),
        "{text}"
    );
    assert!(!out.join("vm").exists(), "nothing may be booted");
}

#[test]
fn the_bake_seed_carries_the_built_bundle_and_a_missing_image_names_the_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let missing = tmp.path().join("no-such-base.img");
    let (code, text) = bake(
        &[
            "qemu/tests/profiles/qemu-local-url.yaml",
            "--image",
            missing.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("[1/6] build") && text.contains("[3/6] boot"),
        "{text}"
    );
    assert!(
        text.contains("stage boot") && text.contains("no-such-base.img"),
        "the error must name the stage and the file: {text}"
    );

    // The bake seed: CIDATA with meta-data, the bake cloud-config and the built bundle.
    let bundle = std::fs::read(out.join("build/bundle.tar.gz")).unwrap();
    let seed = std::fs::read(out.join("vm/bake-seed.img")).unwrap();
    let fs = fatfs::FileSystem::new(std::io::Cursor::new(seed), fatfs::FsOptions::new()).unwrap();
    assert_eq!(fs.volume_label(), "CIDATA");
    let read = |name: &str| {
        let mut v = Vec::new();
        fs.root_dir()
            .open_file(name)
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        v
    };
    assert_eq!(read("bundle.tar.gz"), bundle);
    let user_data = String::from_utf8(read("user-data")).unwrap();
    assert!(user_data.starts_with("#cloud-config\n"));
    assert!(user_data.contains(&common::sha256_hex(&bundle)));
    assert!(user_data.contains("kiln-firstboot stage") || user_data.contains(" stage --plan"));
    let meta = String::from_utf8(read("meta-data")).unwrap();
    assert!(meta.starts_with("instance-id: kiln-bake-"), "{meta}");
    // No secret reaches the bake seed (they belong to the node's own payload).
    for s in ["tailscale-auth-key", "tailscale-oauth-client-secret"] {
        let v = std::fs::read_to_string(common::repo().join("profiles/secrets.example").join(s))
            .unwrap();
        assert!(!user_data.contains(v.trim()), "{s} in the bake seed");
    }
}
