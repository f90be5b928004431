//! The one download path against a real HTTP server (kiln_qemu::mirror on 127.0.0.1) with
//! injected faults. Every case ends with a verified file at the final cache path, or a refusal
//! with no file there (and no stale `.partial` when its content was wrong).

use kiln_firstboot::download::{sha256_file, CrossCheck, DownloadError, FetchPolicy, Fetcher};
use kiln_firstboot::engine::is_transient;
use kiln_firstboot::fs::Root;
use kiln_firstboot::retry::Backoff;
use kiln_plan::{Artifact, Artifacts, Digest, Pin, Sha256, Sha512, Url};
use kiln_qemu::mirror::{Fault, Mirror};
use kiln_testkit::PassedCase;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Setup {
    _tmp: tempfile::TempDir,
    root: Root,
    mirror: Mirror,
    data: Vec<u8>,
    artifact: Artifact,
}

const PATH: &str = "k3s/v1.32.4+k3s1/k3s";

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("mirror");
    std::fs::create_dir_all(served.join("k3s/v1.32.4+k3s1")).unwrap();
    // 300 KiB: several reads, so faults land mid-body.
    let data: Vec<u8> = (0..300 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    std::fs::write(served.join(PATH), &data).unwrap();
    let mirror = Mirror::start(&served).unwrap();
    let url = Url::parse(&mirror.url())
        .unwrap()
        .join("k3s/v1.32.4%2Bk3s1/k3s")
        .unwrap();
    let artifact = Artifact {
        name: "k3s".into(),
        url,
        pin: Pin::new(Sha256::digest(&data), None),
    };
    let root = Root::new(tmp.path().join("root"));
    Setup {
        _tmp: tmp,
        root,
        mirror,
        data,
        artifact,
    }
}

fn policy() -> FetchPolicy {
    FetchPolicy {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_millis(800),
        backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(100)),
        default_deadline: Duration::from_secs(20),
    }
}

fn fetcher(s: &Setup, artifacts: Artifacts) -> Fetcher {
    Fetcher::with_policy(&s.root, &artifacts, policy())
}

fn online() -> Artifacts {
    Artifacts {
        air_gap: false,
        local_dir: None,
        ca_bundle: None,
    }
}

fn final_path(s: &Setup) -> PathBuf {
    s.root
        .path("/var/lib/kiln/cache")
        .join(s.artifact.pin.digest.to_hex())
}

fn partial(p: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", p.display()))
}

fn assert_verified(s: &Setup, got: &Path) {
    assert_eq!(got, final_path(s));
    assert_eq!(std::fs::read(got).unwrap(), s.data);
    assert!(!partial(got).exists());
}

fn assert_nothing_final(s: &Setup) {
    assert!(!final_path(s).exists(), "a file reached the final path");
}

#[test]
fn five_hundreds_then_success_ends_verified() {
    let _case = PassedCase::new("mirror-faults", "five_hundreds_then_success_ends_verified");
    let s = setup();
    s.mirror.fault(
        PATH,
        [Fault::Status(503), Fault::Status(500), Fault::Status(429)],
    );
    let got = fetcher(&s, online()).fetch(&s.artifact).unwrap();
    assert_verified(&s, &got);
    assert_eq!(s.mirror.hits(PATH), 4);
}

#[test]
fn persistent_503_gives_up_at_the_deadline_as_transient() {
    let _case = PassedCase::new(
        "mirror-faults",
        "persistent_503_gives_up_at_the_deadline_as_transient",
    );
    let s = setup();
    s.mirror.fault_always(PATH, Fault::Status(503));
    let f = fetcher(&s, online());
    f.set_deadline(Some(Instant::now() + Duration::from_millis(600)));
    let e = f.fetch(&s.artifact).unwrap_err();
    assert!(is_transient(&e), "{e:#}");
    assert!(format!("{e:#}").contains("503"), "{e:#}");
    assert!(s.mirror.hits(PATH) >= 2);
    assert_nothing_final(&s);
}

#[test]
fn hang_is_cut_by_the_read_timeout_and_the_deadline() {
    let _case = PassedCase::new(
        "mirror-faults",
        "hang_is_cut_by_the_read_timeout_and_the_deadline",
    );
    let s = setup();
    s.mirror.fault_always(PATH, Fault::Hang);
    let f = fetcher(&s, online());
    let t0 = Instant::now();
    f.set_deadline(Some(t0 + Duration::from_secs(3)));
    let e = f.fetch(&s.artifact).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert!(is_transient(&e), "{e:#}");
    assert_nothing_final(&s);
}

#[test]
fn hang_mid_body_resumes_with_range_from_the_bytes_received() {
    let _case = PassedCase::new(
        "mirror-faults",
        "hang_mid_body_resumes_with_range_from_the_bytes_received",
    );
    let s = setup();
    s.mirror.fault(PATH, [Fault::HangAfter(100 * 1024)]);
    let got = fetcher(&s, online()).fetch(&s.artifact).unwrap();
    assert_verified(&s, &got);
    let reqs = s.mirror.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=102400-"));
    assert_eq!(reqs[1].status, 206);
}

#[test]
fn truncated_body_is_resumed_and_verified() {
    let _case = PassedCase::new("mirror-faults", "truncated_body_is_resumed_and_verified");
    let s = setup();
    s.mirror.fault(PATH, [Fault::Truncate(123_456)]);
    let got = fetcher(&s, online()).fetch(&s.artifact).unwrap();
    assert_verified(&s, &got);
    let reqs = s.mirror.requests();
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=123456-"));
}

#[test]
fn server_ignoring_range_restarts_from_zero() {
    let _case = PassedCase::new("mirror-faults", "server_ignoring_range_restarts_from_zero");
    let s = setup();
    s.mirror
        .fault(PATH, [Fault::Truncate(50_000), Fault::IgnoreRange]);
    let got = fetcher(&s, online()).fetch(&s.artifact).unwrap();
    assert_verified(&s, &got);
    let reqs = s.mirror.requests();
    assert_eq!(reqs[1].status, 200, "{reqs:?}");
}

#[test]
fn flipped_byte_is_refused_permanently_and_nothing_is_kept() {
    let _case = PassedCase::new(
        "mirror-faults",
        "flipped_byte_is_refused_permanently_and_nothing_is_kept",
    );
    let s = setup();
    s.mirror.fault_always(PATH, Fault::FlipByte(77_777));
    let t0 = Instant::now();
    let e = fetcher(&s, online()).fetch(&s.artifact).unwrap_err();
    assert!(!is_transient(&e), "{e:#}");
    match e.downcast_ref::<DownloadError>() {
        Some(DownloadError::ChecksumMismatch {
            expected, actual, ..
        }) => {
            assert_eq!(**expected, s.artifact.pin.digest);
            assert_ne!(actual, expected);
        }
        other => panic!("expected ChecksumMismatch, got {other:?} / {e:#}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_nothing_final(&s);
    assert!(!partial(&final_path(&s)).exists());
    assert_eq!(s.mirror.hits(PATH), 1, "a checksum mismatch is not retried");
}

#[test]
fn flipped_byte_once_then_good_content_on_a_later_run() {
    let _case = PassedCase::new(
        "mirror-faults",
        "flipped_byte_once_then_good_content_on_a_later_run",
    );
    let s = setup();
    s.mirror.fault(PATH, [Fault::FlipByte(5)]);
    let f = fetcher(&s, online());
    assert!(f.fetch(&s.artifact).is_err());
    assert_nothing_final(&s);
    let got = f.fetch(&s.artifact).unwrap();
    assert_verified(&s, &got);
}

#[test]
fn content_length_too_large_resumes_then_verifies() {
    let _case = PassedCase::new(
        "mirror-faults",
        "content_length_too_large_resumes_then_verifies",
    );
    let s = setup();
    s.mirror
        .fault(PATH, [Fault::WrongLength(s.data.len() as u64 + 1000)]);
    let got = fetcher(&s, online()).fetch(&s.artifact).unwrap();
    assert_verified(&s, &got);
}

#[test]
fn content_length_too_small_is_refused() {
    let _case = PassedCase::new("mirror-faults", "content_length_too_small_is_refused");
    let s = setup();
    s.mirror
        .fault_always(PATH, Fault::WrongLength(s.data.len() as u64 - 10));
    let e = fetcher(&s, online()).fetch(&s.artifact).unwrap_err();
    assert!(
        matches!(
            e.downcast_ref::<DownloadError>(),
            Some(DownloadError::ChecksumMismatch { .. })
        ),
        "{e:#}"
    );
    assert_nothing_final(&s);
}

#[test]
fn not_found_fails_at_once_naming_the_url() {
    let _case = PassedCase::new("mirror-faults", "not_found_fails_at_once_naming_the_url");
    let s = setup();
    s.mirror.fault_always(PATH, Fault::NotFound);
    let t0 = Instant::now();
    let e = fetcher(&s, online()).fetch(&s.artifact).unwrap_err();
    assert!(!is_transient(&e));
    let msg = format!("{e:#}");
    assert!(msg.contains("404") && msg.contains("k3s"), "{msg}");
    assert_eq!(s.mirror.hits(PATH), 1);
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_nothing_final(&s);
}

#[test]
fn cache_hit_is_rehashed_and_a_corrupt_cache_file_is_replaced() {
    let _case = PassedCase::new(
        "mirror-faults",
        "cache_hit_is_rehashed_and_a_corrupt_cache_file_is_replaced",
    );
    let s = setup();
    let f = fetcher(&s, online());
    let p = f.fetch(&s.artifact).unwrap();
    assert_eq!(s.mirror.hits(PATH), 1);
    f.fetch(&s.artifact).unwrap();
    assert_eq!(s.mirror.hits(PATH), 1, "cache hit downloads nothing");
    std::fs::write(&p, b"corrupted").unwrap();
    let p2 = f.fetch(&s.artifact).unwrap();
    assert_verified(&s, &p2);
    assert_eq!(s.mirror.hits(PATH), 2);
}

#[test]
fn air_gap_uses_the_local_dir_and_never_the_network() {
    let _case = PassedCase::new(
        "mirror-faults",
        "air_gap_uses_the_local_dir_and_never_the_network",
    );
    let s = setup();
    let local = s.root.path("/opt/kiln-artifacts");
    std::fs::create_dir_all(&local).unwrap();
    let gapped = Artifacts {
        air_gap: true,
        local_dir: Some("/opt/kiln-artifacts".into()),
        ca_bundle: None,
    };
    let e = fetcher(&s, gapped.clone()).fetch(&s.artifact).unwrap_err();
    assert!(
        matches!(
            e.downcast_ref::<DownloadError>(),
            Some(DownloadError::AirGap { .. })
        ),
        "{e:#}"
    );
    // A wrong local copy is refused, not used.
    std::fs::write(local.join("k3s"), b"not k3s").unwrap();
    assert!(fetcher(&s, gapped.clone()).fetch(&s.artifact).is_err());
    assert_nothing_final(&s);
    std::fs::write(local.join("k3s"), &s.data).unwrap();
    let got = fetcher(&s, gapped).fetch(&s.artifact).unwrap();
    assert_verified(&s, &got);
    assert_eq!(s.mirror.hits(PATH), 0);
}

#[test]
fn install_writes_once_and_then_leaves_the_file_alone() {
    let _case = PassedCase::new(
        "mirror-faults",
        "install_writes_once_and_then_leaves_the_file_alone",
    );
    let s = setup();
    let f = fetcher(&s, online());
    assert!(f.install(&s.artifact, "/usr/local/bin/k3s", 0o755).unwrap());
    let target = s.root.path("/usr/local/bin/k3s");
    assert_eq!(
        Digest::Sha256(sha256_file(&target).unwrap()),
        s.artifact.pin.digest
    );
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(&target).unwrap().ino();
    assert!(!f.install(&s.artifact, "/usr/local/bin/k3s", 0o755).unwrap());
    assert_eq!(std::fs::metadata(&target).unwrap().ino(), ino);
    assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o7777, 0o755);
}

#[test]
fn fetch_text_reads_small_unpinned_files() {
    let _case = PassedCase::new("mirror-faults", "fetch_text_reads_small_unpinned_files");
    let s = setup();
    let sums = format!("{}  k3s\n", s.artifact.pin.digest.to_hex());
    std::fs::write(
        s.mirror.dir().join("k3s/v1.32.4+k3s1/sha256sum-amd64.txt"),
        &sums,
    )
    .unwrap();
    s.mirror
        .fault("k3s/v1.32.4+k3s1/sha256sum-amd64.txt", [Fault::Status(502)]);
    let url = Url::parse(&s.mirror.url())
        .unwrap()
        .join("k3s/v1.32.4%2Bk3s1/sha256sum-amd64.txt")
        .unwrap();
    assert_eq!(fetcher(&s, online()).fetch_text(&url).unwrap(), sums);
}

#[test]
fn urls_in_errors_never_show_query_strings() {
    let _case = PassedCase::new("mirror-faults", "urls_in_errors_never_show_query_strings");
    let s = setup();
    let mut a = s.artifact.clone();
    a.url.set_query(Some("sig=SECRETSAS"));
    s.mirror.fault_always(PATH, Fault::NotFound);
    let e = fetcher(&s, online()).fetch(&a).unwrap_err();
    let msg = format!("{e:#} {e:?}");
    assert!(!msg.contains("SECRETSAS"), "{msg}");
}

#[test]
fn a_sha512_pin_with_its_size_verifies_and_names_the_cache_file_by_its_hex() {
    let _case = PassedCase::new(
        "mirror-faults",
        "a_sha512_pin_with_its_size_verifies_and_names_the_cache_file_by_its_hex",
    );
    let s = setup();
    let mut a = s.artifact.clone();
    a.pin = Pin::new(Sha512::digest(&s.data), Some(s.data.len() as u64));
    let got = fetcher(&s, online()).fetch(&a).unwrap();
    assert_eq!(got.file_name().unwrap().len(), 128);
    assert_eq!(std::fs::read(&got).unwrap(), s.data);
}

#[test]
fn a_wrong_sha512_is_refused_and_nothing_is_kept() {
    let _case = PassedCase::new(
        "mirror-faults",
        "a_wrong_sha512_is_refused_and_nothing_is_kept",
    );
    let s = setup();
    let mut a = s.artifact.clone();
    a.pin = Pin::new(Sha512::digest(b"other bytes"), None);
    let e = fetcher(&s, online()).fetch(&a).unwrap_err();
    assert!(format!("{e:#}").contains("sha512 mismatch"), "{e:#}");
    assert!(!is_transient(&e));
    let cache = s.root.path("/var/lib/kiln/cache");
    assert_eq!(std::fs::read_dir(cache).unwrap().count(), 0);
}

#[test]
fn a_longer_announced_length_than_the_pinned_size_is_refused_before_the_body() {
    let _case = PassedCase::new(
        "mirror-faults",
        "a_longer_announced_length_than_the_pinned_size_is_refused_before_the_body",
    );
    let s = setup();
    let mut a = s.artifact.clone();
    a.pin.size = Some(s.data.len() as u64 - 1);
    // The body never comes: only the headers can have decided.
    s.mirror.fault_always(PATH, Fault::HangAfter(0));
    let t0 = Instant::now();
    let e = fetcher(&s, online()).fetch(&a).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    match e.downcast_ref::<DownloadError>() {
        Some(DownloadError::SizeMismatch {
            expected,
            actual,
            what,
            ..
        }) => {
            assert_eq!(*expected, s.data.len() as u64 - 1);
            assert_eq!(*actual, s.data.len() as u64);
            assert_eq!(*what, "announced length");
        }
        other => panic!("expected SizeMismatch, got {other:?} / {e:#}"),
    }
    assert!(!is_transient(&e));
    assert_eq!(s.mirror.hits(PATH), 1, "a size mismatch is not retried");
}

#[test]
fn a_stream_without_length_is_cut_off_as_soon_as_it_passes_the_pinned_size() {
    let _case = PassedCase::new(
        "mirror-faults",
        "a_stream_without_length_is_cut_off_as_soon_as_it_passes_the_pinned_size",
    );
    use std::io::{Read as _, Write as _};
    // A server that sends no Content-Length and more bytes than pinned, then keeps the
    // connection open: the client must stop on its own, not wait for the end.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut req = [0u8; 4096];
        let _ = c.read(&mut req);
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let _ = c.write_all(&vec![7u8; 256 * 1024]);
        std::thread::sleep(Duration::from_secs(5));
    });
    let s = setup();
    let mut a = s.artifact.clone();
    a.url = Url::parse(&format!("http://127.0.0.1:{port}/k3s")).unwrap();
    a.pin = Pin::new(Sha256::digest(&[7u8; 1000]), Some(1000));
    let t0 = Instant::now();
    let e = fetcher(&s, online()).fetch(&a).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(
        matches!(
            e.downcast_ref::<DownloadError>(),
            Some(DownloadError::SizeMismatch {
                what: "body",
                expected: 1000,
                ..
            })
        ),
        "{e:#}"
    );
    drop(server);
}

#[test]
fn a_cross_check_that_disagrees_refuses_bytes_that_match_the_pin() {
    let _case = PassedCase::new(
        "mirror-faults",
        "a_cross_check_that_disagrees_refuses_bytes_that_match_the_pin",
    );
    let s = setup();
    let f = fetcher(&s, online());
    let wrong = CrossCheck {
        source: "sha256sum-amd64.txt".into(),
        sha256: Sha256::digest(b"not the binary"),
    };
    let e = f
        .install_checked(&s.artifact, Some(&wrong), "/usr/local/bin/k3s", 0o755)
        .unwrap_err();
    assert!(
        matches!(
            e.downcast_ref::<DownloadError>(),
            Some(DownloadError::CrossCheckMismatch { .. })
        ),
        "{e:#}"
    );
    assert!(!s.root.path("/usr/local/bin/k3s").exists());
    assert_nothing_final(&s);
    let right = CrossCheck {
        source: "sha256sum-amd64.txt".into(),
        sha256: Sha256::digest(&s.data),
    };
    assert!(f
        .install_checked(&s.artifact, Some(&right), "/usr/local/bin/k3s", 0o755)
        .unwrap());
}
