//! The QEMU end-to-end once in **url** mode (issue 7): `kiln publish` uploads the bundle to a
//! loopback Azurite and writes a payload whose bootstrap fetches it by its signed blob URL at the
//! guest's address for the host (`http://10.0.2.100/devstoreaccount1/…`, reached only through
//! guestfwd), checks the sha256 and starts the real static daemon, which then installs the
//! K3s stand-in and the real Tailscale tarball from the loopback mirror and runs every step;
//! the real tailscaled joins a real Headscale on the host's loopback (guestfwd 10.0.2.102).
//!
//! Behind KILN_VM_TESTS=1 (and KILN_FIRSTBOOT = the static daemon), like the inline e2e.

mod publish_support;

use azure_core::time::OffsetDateTime;
use kiln::publish::{self, RetrySettings};
use kiln::render;
use kiln_qemu::harness::{MirrorLog, Outcome, Session, WaitFor};
use kiln_qemu::{accel, image, mirror::Mirror};
use kiln_testkit::gotools;
use kiln_testkit::{make_tailnet_mirror, vm_tests, Tailnet};
use publish_support::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The guest's single way out (guestfwd → this port) in front of two loopback services: requests
/// for the storage account's path go to Azurite, everything else to the artifact mirror. Routing
/// is per connection, on its first request line (curl in the bootstrap opens one per download).
struct Router {
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl Router {
    fn start(azurite_port: u16, mirror_port: u16) -> Router {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let l = l.clone();
                std::thread::spawn(move || route(conn, azurite_port, mirror_port, &l));
            }
        });
        Router { port, log }
    }
}

fn route(mut client: TcpStream, azurite: u16, mirror: u16, log: &Mutex<Vec<String>>) {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        match client.read(&mut b) {
            Ok(1) => line.push(b[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&line).trim().to_string();
    let to_azurite = text
        .split_whitespace()
        .nth(1)
        .is_some_and(|p| p.starts_with(&format!("/{ACCOUNT}/")));
    // Never log the SAS token, even a test one.
    let shown = text.split('?').next().unwrap_or("").to_string();
    log.lock().unwrap().push(format!(
        "{shown} -> {}",
        if to_azurite { "azurite" } else { "mirror" }
    ));
    let Ok(mut upstream) =
        TcpStream::connect(("127.0.0.1", if to_azurite { azurite } else { mirror }))
    else {
        return;
    };
    if upstream.write_all(&line).is_err() {
        return;
    }
    let (mut c_r, mut u_w) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_r, &mut u_w);
        let _ = u_w.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut upstream, &mut client);
    let _ = client.shutdown(Shutdown::Write);
    let _ = t.join();
}

impl MirrorLog for Router {
    fn port(&self) -> u16 {
        self.port
    }
    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

#[test]
fn url_mode_vm_fetches_the_bundle_from_azurite_and_provisions_the_node() {
    let Some(firstboot) = vm_tests("url-mode VM e2e") else {
        return;
    };
    let Some(azurite_bin) = azurite_or_skip("url_mode_vm_e2e") else {
        return;
    };
    let daemon = kiln::elf::load_daemon(Path::new(&firstboot)).unwrap();
    let work = tempfile::Builder::new()
        .prefix("kiln-publish-e2e")
        .tempdir_in("/var/tmp")
        .unwrap();
    let w = work.path();

    // Loopback services: the stand-in artifact mirror and Azurite, behind one router.
    let tools = gotools::find("url_mode_vm_e2e").expect("required with KILN_VM_TESTS=1");
    let mirror_dir = w.join("mirror");
    let pins = make_tailnet_mirror(&mirror_dir, &tools);
    let tailnet = Tailnet::start(&tools);
    let tailnet_profile = tailnet.profile("profiles/qemu-local.yaml", w, "qemu-tailnet", &pins);
    let mirror = Mirror::start(&mirror_dir).unwrap();
    let azurite = Azurite::start(&azurite_bin);
    let router = Router::start(azurite.port, mirror.port());

    // qemu-local in url delivery: uploaded at 127.0.0.1:<azurite>, fetched by the guest at
    // 10.0.2.100 (the same blob, the same token).
    let profile = w.join("qemu-url.yaml");
    std::fs::write(
        &profile,
        format!(
            "extends: {}\nartifacts:\n  delivery: url\n  bundle-base-url: http://10.0.2.100/{ACCOUNT}/kiln/\n",
            tailnet_profile.display()
        ),
    )
    .unwrap();
    let account = azurite
        .account()
        .with_download_endpoint(url::Url::parse(&format!("http://10.0.2.100/{ACCOUNT}")).unwrap())
        .unwrap();
    let pb = indicatif::ProgressBar::hidden();
    let published = publish::publish_profile(&publish::Request {
        profile: &profile,
        daemon: &daemon,
        epoch: 0,
        env: &kiln::resolve::process_env,
        account: &account,
        container: "kiln",
        expiry: publish::expiry::parse("2d", OffsetDateTime::now_utc()).unwrap(),
        retry: RetrySettings::default(),
        progress: &pb,
    })
    .unwrap_or_else(|e| panic!("publish: {e}"));
    let custom_data = published.rendered.file(render::CUSTOM_DATA);
    assert!(
        custom_data.len() <= 8 * 1024,
        "url-mode payload {} bytes",
        custom_data.len()
    );
    let seed = w.join("seed.img");
    std::fs::write(&seed, published.rendered.file(render::SEED)).unwrap();

    let img = image::ensure_test_image(&image::cache_root()).expect("test image");
    let choice = accel::choose(
        Path::new("qemu-system-x86_64"),
        w,
        img.probe_kernel().as_deref(),
    )
    .unwrap();
    eprintln!("accelerator: {} ({})", choice.accel, choice.reason);
    let out = w.join("out");
    let mut session = Session::new(img, choice, &out, Some(seed), None).unwrap();
    session.extra_guestfwds = vec![tailnet.guestfwd().parse().unwrap()];
    let report = session
        .boot(
            WaitFor::DaemonDone,
            Duration::from_secs(1500),
            Some(&router),
        )
        .unwrap();
    eprintln!("{}", report.timeline.render("url-mode boot"));
    for r in &report.mirror_requests {
        eprintln!("  {r}");
    }
    assert_eq!(
        report.outcome,
        Outcome::AllDone,
        "serial log: {}",
        out.join("boot-1/serial.log").display()
    );

    // The bundle came from Azurite by its content-addressed blob name, once.
    let bundle_get = format!(
        "GET /{ACCOUNT}/kiln/bundle-{}.tar.gz -> azurite",
        published.bundle.sha256
    );
    let hits = report
        .mirror_requests
        .iter()
        .filter(|r| r.starts_with(&bundle_get))
        .count();
    assert_eq!(hits, 1, "{:?}", report.mirror_requests);
    // And the artifacts from the mirror, as in inline mode.
    assert!(report
        .mirror_requests
        .iter()
        .any(|r| r.contains("/k3s/") && r.ends_with("-> mirror")));

    let guest = report.guest.expect("guest report");
    assert!(guest.cloud_init_done, "{:?}", guest.cloud_init_errors);
    assert!(
        guest.cloud_init_errors.is_empty(),
        "{:?}",
        guest.cloud_init_errors
    );
}
