//! `kiln publish` against a real Azurite on 127.0.0.1: content-addressed upload, skip by hash,
//! download through the signed URL exactly as the bootstrap does (curl), expiry and read-only
//! scope enforced by the service, and transient/hard faults.

mod publish_support;

use azure_core::time::{Duration, OffsetDateTime};
use kiln::publish::{self, Outcome, RetrySettings, StorageAccount};
use kiln_plan::Sha256;
use publish_support::*;

const CONTAINER: &str = "kiln-bundles";

fn quick_retry() -> RetrySettings {
    RetrySettings {
        max_retries: 4,
        initial_delay: std::time::Duration::from_millis(50),
        max_total: std::time::Duration::from_secs(20),
        try_timeout: std::time::Duration::from_secs(10),
    }
}

fn publish(
    account: &StorageAccount,
    data: &[u8],
    retry: RetrySettings,
) -> anyhow::Result<publish::PublishedBundle> {
    publish_with(account, data, retry, &indicatif::ProgressBar::hidden())
}

fn publish_with(
    account: &StorageAccount,
    data: &[u8],
    retry: RetrySettings,
    pb: &indicatif::ProgressBar,
) -> anyhow::Result<publish::PublishedBundle> {
    // Day-rounded, as `kiln publish --expires 2d` computes it: republishing gives the same URL.
    let expiry = publish::expiry::parse("2d", OffsetDateTime::now_utc())?;
    publish::block_on(publish::publish_bundle(
        account, CONTAINER, data, expiry, retry, pb,
    ))?
}

#[test]
fn upload_then_republish_is_skipped_by_hash_and_curl_gets_the_same_bytes() {
    let Some(bin) = azurite_or_skip("upload_then_republish") else {
        return;
    };
    let azurite = Azurite::start(&bin);
    let account = azurite.account();
    // > one block, so the multi-block path and the block list are exercised.
    let data = bytes(publish::upload::BLOCK_SIZE + 123_457, 7);
    let sha = Sha256::digest(&data);

    let first = publish(&account, &data, quick_retry()).unwrap();
    assert_eq!(first.outcome, Outcome::Uploaded);
    assert_eq!(first.sha256, sha);
    assert_eq!(first.blob_name, format!("bundle-{sha}.tar.gz"));
    assert_eq!(
        first.blob_url.as_str(),
        format!("{}/{CONTAINER}/bundle-{sha}.tar.gz", azurite.endpoint())
    );

    let again = publish(&account, &data, quick_retry()).unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyPresent);
    assert_eq!(
        again.read_url, first.read_url,
        "same expiry → same payload URL"
    );

    let (code, body) = curl(first.read_url.as_str());
    assert_eq!(code, 200);
    assert_eq!(Sha256::digest(&body), sha);

    // Without the token the private container refuses anonymous reads.
    let (code, _) = curl(first.blob_url.as_str());
    assert!(
        code == 404 || code == 403 || code == 401,
        "anonymous read got {code}"
    );
}

#[test]
fn a_blob_with_the_right_name_but_wrong_bytes_is_replaced_and_verified() {
    let Some(bin) = azurite_or_skip("wrong_bytes_replaced") else {
        return;
    };
    let azurite = Azurite::start(&bin);
    let account = azurite.account();
    let data = bytes(10_000, 11);
    let sha = Sha256::digest(&data);
    // Plant different content under the content-addressed name (an interrupted or tampered upload).
    let client = account.container_client(CONTAINER, quick_retry()).unwrap();
    publish::block_on(async {
        publish::upload::ensure_container(&client).await.unwrap();
        publish::upload::upload_verified(
            &client,
            &publish::bundle_blob_name(&sha),
            b"not the bundle",
            "application/gzip",
            &indicatif::ProgressBar::hidden(),
        )
        .await
        .unwrap();
    })
    .unwrap();

    let p = publish(&account, &data, quick_retry()).unwrap();
    assert_eq!(p.outcome, Outcome::Replaced);
    let (code, body) = curl(p.read_url.as_str());
    assert_eq!(code, 200);
    assert_eq!(Sha256::digest(&body), sha);
}

#[test]
fn the_signed_url_is_read_only_single_blob_and_expires() {
    let Some(bin) = azurite_or_skip("sas_scope_and_expiry") else {
        return;
    };
    let azurite = Azurite::start(&bin);
    let account = azurite.account();
    let data = bytes(5_000, 3);
    let p = publish(&account, &data, quick_retry()).unwrap();

    // Expired: same blob, same key, expiry a minute ago → the service says 403.
    let expired = account
        .read_sas_url(
            CONTAINER,
            &p.blob_name,
            OffsetDateTime::now_utc() - Duration::minutes(1),
        )
        .unwrap();
    let (code, body) = curl(expired.as_str());
    assert_eq!(code, 403, "expired SAS: {}", String::from_utf8_lossy(&body));

    // A signature made with another key is refused (Azurite really checks signatures).
    let other_key = StorageAccount::new(
        ACCOUNT,
        azure_core::credentials::Secret::new(azure_core::base64::encode([7u8; 64])),
        url::Url::parse(&azurite.endpoint()).unwrap(),
    )
    .unwrap();
    let forged = other_key
        .read_sas_url(CONTAINER, &p.blob_name, p.expiry)
        .unwrap();
    assert_eq!(curl(forged.as_str()).0, 403);

    // The token is scoped to its blob: reusing its query on a sibling name is refused.
    let mut sibling = p.read_url.clone();
    sibling.set_path(&format!("/{ACCOUNT}/{CONTAINER}/bundle-other.tar.gz"));
    assert_eq!(curl(sibling.as_str()).0, 403);

    // And it is read-only: a PUT with it is refused and the blob is unchanged.
    let o = std::process::Command::new("curl")
        .args([
            "-sS",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args([
            "-X",
            "PUT",
            "-H",
            "x-ms-blob-type: BlockBlob",
            "--data-binary",
            "evil",
        ])
        .arg(p.read_url.as_str())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "403");
    let (code, body) = curl(p.read_url.as_str());
    assert_eq!(code, 200);
    assert_eq!(body, data);
}

#[test]
fn a_burst_of_503s_is_retried_and_the_upload_still_verifies() {
    let Some(bin) = azurite_or_skip("503_burst_retried") else {
        return;
    };
    let azurite = Azurite::start(&bin);
    let proxy = FaultProxy::start(azurite.port, 3);
    let account =
        StorageAccount::from_connection_string(&connection_string_for(&proxy.endpoint())).unwrap();
    let data = bytes(20_000, 5);
    let p = publish(&account, &data, quick_retry()).unwrap();
    assert_eq!(p.outcome, Outcome::Uploaded);
    assert_eq!(
        proxy.served_503.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
    // Verified straight against Azurite, not through the proxy.
    let direct = azurite
        .account()
        .read_sas_url(CONTAINER, &p.blob_name, p.expiry)
        .unwrap();
    let (code, body) = curl(direct.as_str());
    assert_eq!((code, Sha256::digest(&body)), (200, p.sha256));
}

#[test]
fn endless_503s_fail_with_a_clear_error_after_bounded_retries() {
    let Some(bin) = azurite_or_skip("endless_503") else {
        return;
    };
    let azurite = Azurite::start(&bin);
    let proxy = FaultProxy::start(azurite.port, usize::MAX);
    let account =
        StorageAccount::from_connection_string(&connection_string_for(&proxy.endpoint())).unwrap();
    let err = publish(&account, &bytes(1000, 1), quick_retry()).unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("reported: {msg}");
    assert!(
        msg.contains(&proxy.endpoint()),
        "error names the endpoint: {msg}"
    );
    assert!(
        msg.contains("HTTP 503 Service Unavailable (ServerBusy)"),
        "error names the status: {msg}"
    );
    assert_eq!(
        proxy.served_503.load(std::sync::atomic::Ordering::SeqCst),
        1 + quick_retry().max_retries as usize
    );
}

#[test]
fn azurite_killed_mid_upload_is_reported_then_a_rerun_completes() {
    let Some(bin) = azurite_or_skip("azurite_killed_mid_upload") else {
        return;
    };
    let mut azurite = Azurite::start(&bin);
    let account = azurite.account();
    let data = bytes(6 * publish::upload::BLOCK_SIZE, 22);

    // SIGKILL Azurite as soon as the first block has been accepted.
    let pb = indicatif::ProgressBar::hidden();
    let (watch, pid) = (pb.clone(), azurite.pid());
    let killer = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        while watch.position() == 0 {
            if t0.elapsed() > std::time::Duration::from_secs(60) {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    });
    let t = std::time::Instant::now();
    let err = publish_with(&account, &data, quick_retry(), &pb).unwrap_err();
    assert!(killer.join().unwrap(), "azurite was killed after block 1");
    let msg = format!("{err:#}");
    eprintln!("reported: {msg}");
    assert!(msg.contains(&azurite.endpoint()), "names the blob: {msg}");
    assert!(
        msg.contains("could not reach the storage endpoint"),
        "{msg}"
    );
    assert!(
        msg.contains("staging block") || msg.contains("committing") || msg.contains("reading back"),
        "says which step failed: {msg}"
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(60), "bounded");

    // Restarted on the same workspace, a rerun converges to the verified blob.
    azurite.stop();
    azurite.restart();
    let p = publish(&account, &data, quick_retry()).unwrap();
    assert!(matches!(
        p.outcome,
        Outcome::Uploaded | Outcome::AlreadyPresent | Outcome::Replaced
    ));
    let (code, body) = curl(p.read_url.as_str());
    assert_eq!((code, Sha256::digest(&body)), (200, p.sha256));
}

#[test]
fn azurite_down_before_the_run_is_reported_with_the_endpoint() {
    let Some(bin) = azurite_or_skip("azurite_down") else {
        return;
    };
    let mut azurite = Azurite::start(&bin);
    let account = azurite.account();
    azurite.stop();
    let err = publish(&account, &bytes(4_000, 22), quick_retry()).unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("reported: {msg}");
    assert!(
        msg.contains(&format!(
            "creating container {}/{CONTAINER}",
            azurite.endpoint()
        )),
        "{msg}"
    );
    assert!(
        msg.contains("could not reach the storage endpoint"),
        "{msg}"
    );
}

#[test]
fn the_payload_url_can_name_another_endpoint_and_the_token_still_works_there() {
    let Some(bin) = azurite_or_skip("download_endpoint") else {
        return;
    };
    let azurite = Azurite::start(&bin);
    // Another address for the same service (as a QEMU guest's guestfwd address would be).
    let relay = FaultProxy::start(azurite.port, 0);
    let account = azurite
        .account()
        .with_download_endpoint(url::Url::parse(&relay.endpoint()).unwrap())
        .unwrap();
    let data = bytes(9_000, 9);
    let p = publish(&account, &data, quick_retry()).unwrap();
    assert!(
        p.read_url
            .as_str()
            .starts_with(&format!("{}/{CONTAINER}/bundle-", relay.endpoint())),
        "{}",
        p.read_url
    );
    assert!(p.blob_url.as_str().starts_with(&azurite.endpoint()));
    let before = relay.forwarded.load(std::sync::atomic::Ordering::SeqCst);
    let (code, body) = curl(p.read_url.as_str());
    assert_eq!((code, Sha256::digest(&body)), (200, p.sha256));
    assert!(relay.forwarded.load(std::sync::atomic::Ordering::SeqCst) > before);
}

#[test]
fn a_server_that_never_answers_times_out_per_try_and_is_reported() {
    // No Azurite needed: the hung front end is a local socket.
    let hang = HangServer::start();
    let account =
        StorageAccount::from_connection_string(&connection_string_for(&hang.endpoint())).unwrap();
    let retry = RetrySettings {
        try_timeout: std::time::Duration::from_millis(700),
        max_retries: 2,
        ..quick_retry()
    };
    let t = std::time::Instant::now();
    let err = publish(&account, &bytes(100, 1), retry).unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("reported: {msg}");
    assert!(msg.contains("no response within 0.7 s"), "{msg}");
    assert!(msg.contains(&hang.endpoint()), "{msg}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(hang.accepted(), 3, "one try plus two retries");
}

#[test]
fn a_wrong_account_key_is_reported_as_403_with_a_hint_and_not_retried() {
    let Some(bin) = azurite_or_skip("wrong_key") else {
        return;
    };
    let azurite = Azurite::start(&bin);
    let wrong_key = azure_core::base64::encode([42u8; 64]);
    let account = StorageAccount::new(
        ACCOUNT,
        azure_core::credentials::Secret::new(wrong_key.clone()),
        url::Url::parse(&azurite.endpoint()).unwrap(),
    )
    .unwrap();
    let t = std::time::Instant::now();
    let err = publish(&account, &bytes(100, 2), quick_retry()).unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("reported: {msg}");
    assert!(msg.contains("HTTP 403 Forbidden"), "{msg}");
    assert!(msg.contains("check the account key"), "{msg}");
    assert!(!msg.contains(&wrong_key), "the key is never printed: {msg}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "403 is not retried"
    );
}

/// A real fixed VHD made by `qemu-img` (what `kiln bake` produces), mostly zeros.
fn fixed_vhd(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let raw = dir.join("disk.raw");
    let mut data = vec![0u8; 6 * 1024 * 1024];
    data[..300_000].copy_from_slice(&bytes(300_000, 77));
    let tail = data.len() - 1000;
    data[tail..].copy_from_slice(&bytes(1000, 78));
    std::fs::write(&raw, &data).unwrap();
    let vhd = dir.join("disk.vhd");
    let ok = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed,force_size",
        ])
        .arg(&raw)
        .arg(&vhd)
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(vhd)
}

#[test]
fn a_fixed_vhd_becomes_a_verified_page_blob_and_republish_is_skipped() {
    let Some(bin) = azurite_or_skip("vhd_page_blob") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(vhd) = fixed_vhd(dir.path()) else {
        eprintln!("SKIPPED vhd_page_blob: qemu-img not available");
        return;
    };
    let azurite = Azurite::start(&bin);
    let account = azurite.account();
    let sha = publish::vhd::hash_file(&vhd).unwrap();
    let pb = indicatif::ProgressBar::hidden();
    let up = |pb: &indicatif::ProgressBar| {
        publish::block_on(publish::publish_vhd(
            &account,
            CONTAINER,
            &vhd,
            quick_retry(),
            pb,
        ))
        .unwrap()
        .unwrap()
    };
    let first = up(&pb);
    assert_eq!(first.outcome, Outcome::Uploaded);
    assert_eq!(first.sha256, sha);
    assert_eq!(first.size, std::fs::metadata(&vhd).unwrap().len());
    assert_eq!(pb.position(), first.size, "progress covered the whole file");
    assert!(first.blob_name.starts_with("images/disk-") && first.blob_name.ends_with(".vhd"));

    // What Azure would import: every byte, zeros included, as the file has them.
    let url = account
        .read_sas_url(
            CONTAINER,
            &first.blob_name,
            OffsetDateTime::now_utc() + Duration::hours(2),
        )
        .unwrap();
    let (code, body) = curl(url.as_str());
    assert_eq!(code, 200);
    assert_eq!(Sha256::digest(&body), sha);

    assert_eq!(
        up(&indicatif::ProgressBar::hidden()).outcome,
        Outcome::AlreadyPresent
    );
}
