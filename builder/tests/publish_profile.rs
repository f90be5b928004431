//! `kiln publish` end to end against Azurite: the reference profile's bundle is uploaded and the
//! url-mode payload carries its signed URL and sha256, stays within kiln's 8 KiB goal, and passes
//! the real `cloud-init schema`.

mod publish_support;

use azure_core::time::OffsetDateTime;
use kiln::publish::{self, Outcome, RetrySettings};
use kiln::render;
use kiln_plan::Sha256;
use publish_support::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn reference_profile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/ameciclo.yaml")
}

fn publish_reference(account: &kiln::publish::StorageAccount) -> publish::Published {
    let daemon = kiln::elf::tiny_static_elf();
    let expiry = publish::expiry::parse("30d", OffsetDateTime::now_utc()).unwrap();
    let pb = indicatif::ProgressBar::hidden();
    let profile = reference_profile();
    publish::publish_profile(&publish::Request {
        profile: &profile,
        daemon: &daemon,
        epoch: 0,
        env: &kiln::resolve::process_env,
        account,
        container: "kiln",
        expiry,
        retry: RetrySettings::default(),
        progress: &pb,
    })
    .unwrap_or_else(|e| panic!("publish failed: {e}"))
}

fn user_data(p: &publish::Published) -> String {
    String::from_utf8(p.rendered.file(render::USER_DATA).to_vec()).unwrap()
}

#[test]
fn reference_profile_publishes_a_small_url_mode_payload_that_fetches_the_verified_bundle() {
    let Some(bin) = azurite_or_skip("reference_profile_publish") else {
        return;
    };
    let azurite = Azurite::start(&bin);
    let account = azurite.account();
    let p = publish_reference(&account);
    assert_eq!(p.bundle.outcome, Outcome::Uploaded);

    let custom_data = p.rendered.file(render::CUSTOM_DATA);
    eprintln!("url-mode custom_data.gz: {} bytes", custom_data.len());
    assert!(
        custom_data.len() <= 8 * 1024,
        "{} bytes > 8 KiB",
        custom_data.len()
    );

    // The payload pins the uploaded bundle and names its signed blob URL.
    let ud = user_data(&p);
    let bundle = p.rendered.file(render::BUNDLE);
    assert_eq!(Sha256::digest(bundle), p.bundle.sha256);
    assert!(ud.contains(&p.bundle.sha256.to_hex()), "pin in user-data");
    let url = p.rendered.bundle_url.as_ref().unwrap();
    assert_eq!(url, &p.bundle.read_url);
    assert!(
        ud.contains(&render::sh_quote(url.as_str())),
        "signed URL in the bootstrap"
    );
    assert!(!ud.contains("bundle_b64") && ud.len() < 64 * 1024);

    // Fetch it the way the bootstrap does.
    let (code, body) = curl(url.as_str());
    assert_eq!(code, 200);
    assert_eq!(Sha256::digest(&body), p.bundle.sha256);

    // Re-publishing: nothing uploaded, byte-identical payload.
    let again = publish_reference(&account);
    assert_eq!(again.bundle.outcome, Outcome::AlreadyPresent);
    assert_eq!(again.rendered.file(render::CUSTOM_DATA), custom_data);

    cloud_init_schema(&ud);
}

fn cloud_init_schema(user_data: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("user-data");
    std::fs::write(&f, user_data).unwrap();
    match Command::new("cloud-init")
        .args(["schema", "-c"])
        .arg(&f)
        .output()
    {
        Ok(o) => assert!(
            o.status.success(),
            "cloud-init schema -c: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(_) if std::env::var_os("KILN_REQUIRE_AZURITE").is_some() => {
            panic!("cloud-init is not installed (apt-get install cloud-init)")
        }
        Err(_) => eprintln!("SKIPPED cloud-init schema: cloud-init not installed"),
    }
}

#[test]
fn credentials_come_from_the_environment_and_a_mismatched_account_is_refused() {
    // Pure: no service needed. (Process env is shared by tests: only this test touches it.)
    let cs = connection_string_for("http://127.0.0.1:9/devstoreaccount1");
    std::env::set_var(kiln::publish::account::ENV_CONNECTION_STRING, &cs);
    let a = kiln::publish::StorageAccount::from_env(None).unwrap();
    assert_eq!(a.name, ACCOUNT);
    let err = kiln::publish::StorageAccount::from_env(Some("other")).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    std::env::remove_var(kiln::publish::account::ENV_CONNECTION_STRING);
}
