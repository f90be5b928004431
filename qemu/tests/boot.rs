//! Boots the Debian 12 test image with a plain cloud-config seed (made by Debian's
//! `cloud-localds`, independent of kiln's builder) and proves the VM plumbing on its own:
//! real cloud-init finishes without errors, the guest reaches the loopback server through
//! guestfwd for several connections (and nothing else), milestones on the serial console are
//! timed, and the powered-off disk is read back. Runs only with KILN_VM_TESTS=1.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_qemu::accel;
use kiln_qemu::harness::{MirrorLog, Session, WaitFor};
use kiln_qemu::image;
use kiln_qemu::serial::Event;

/// A loopback HTTP server answering every GET with a fixed body; records request lines.
struct EchoServer {
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl EchoServer {
    fn start(body: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                let _ = reader.read_line(&mut request);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                l.lock().unwrap().push(request.trim().to_string());
                let mut s = stream;
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        EchoServer { port, log }
    }
}

impl MirrorLog for EchoServer {
    fn port(&self) -> u16 {
        self.port
    }
    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

#[test]
fn test_image_boots_cloud_init_reaches_loopback_server_and_disk_is_readable() {
    if std::env::var("KILN_VM_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set KILN_VM_TESTS=1 to boot VMs (.ci/run does)");
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("kiln-boot-test")
        .tempdir_in("/var/tmp")
        .unwrap();
    let img = image::ensure_test_image(&image::cache_root()).expect("test image");
    let choice = accel::choose(
        std::path::Path::new("qemu-system-x86_64"),
        work.path(),
        img.probe_kernel().as_deref(),
    )
    .unwrap();
    eprintln!("accelerator: {} ({})", choice.accel, choice.reason);

    let seed_dir = work.path().join("seed");
    std::fs::create_dir_all(&seed_dir).unwrap();
    // Three separate connections: guestfwd must serve each one, not just the first.
    std::fs::write(
        seed_dir.join("user-data"),
        "#cloud-config\nruncmd:\n  - [sh, -c, 'for i in 1 2 3; do echo \"kiln: probe $i $(curl -sS -m 20 http://10.0.2.100/hello-$i)\" > /dev/console; done; curl -sS -m 5 http://10.0.2.2/ || echo \"kiln: probe host-blocked\" > /dev/console']\n",
    )
    .unwrap();
    std::fs::write(
        seed_dir.join("meta-data"),
        "instance-id: boot-test\nlocal-hostname: boot-test\n",
    )
    .unwrap();
    let seed = work.path().join("seed.img");
    let st = Command::new("cloud-localds")
        .arg(&seed)
        .arg(seed_dir.join("user-data"))
        .arg(seed_dir.join("meta-data"))
        .status()
        .expect("cloud-localds (cloud-image-utils)");
    assert!(st.success());

    let server = EchoServer::start("pong");
    let out = work.path().join("out");
    let mut session = Session::new(img, choice, &out, Some(seed), None).unwrap();
    let report = session
        .boot(
            WaitFor::CloudInitFinished,
            Duration::from_secs(900),
            Some(&server),
        )
        .unwrap();
    eprintln!("{}", report.timeline.render("boot timeline"));
    assert_eq!(
        report.outcome,
        kiln_qemu::harness::Outcome::CloudInitFinished,
        "serial log: {}",
        out.join("boot-1/serial.log").display()
    );

    let probes: Vec<String> = report
        .timeline
        .events
        .iter()
        .filter_map(|e| match &e.event {
            Event::Daemon { text } if text.starts_with("probe") => Some(text.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        probes,
        vec![
            "probe 1 pong",
            "probe 2 pong",
            "probe 3 pong",
            "probe host-blocked"
        ]
    );
    assert_eq!(
        server.requests(),
        vec![
            "GET /hello-1 HTTP/1.1",
            "GET /hello-2 HTTP/1.1",
            "GET /hello-3 HTTP/1.1"
        ]
    );
    assert_eq!(report.mirror_requests.len(), 3);

    // The timeline saw every stage, in boot order.
    let order: Vec<f64> = [
        report.timeline.first(|e| matches!(e, Event::Kernel)),
        report.timeline.first(|e| matches!(e, Event::Systemd)),
        report
            .timeline
            .first(|e| matches!(e, Event::CloudInitStage { stage } if stage == "init-local")),
        report
            .timeline
            .first(|e| matches!(e, Event::CloudInitStage { stage } if stage == "modules:final")),
        report.timeline.cloud_init_finished_at(),
    ]
    .into_iter()
    .map(|t| t.expect("stage missing from timeline"))
    .collect();
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "stages out of order: {order:?}"
    );

    // Read back from the powered-off disk: cloud-init's own records say done, no errors.
    let guest = report.guest.expect("guest report");
    assert!(
        guest.cloud_init_done,
        "cloud-init not done: {:?}",
        guest.cloud_init_errors
    );
    assert!(
        guest.cloud_init_errors.is_empty(),
        "cloud-init errors: {:?}",
        guest.cloud_init_errors
    );
    let output_log =
        std::fs::read_to_string(out.join("boot-1/guest/var/log/cloud-init-output.log")).unwrap();
    assert!(
        output_log.contains("Cloud-init v. 22.4.2 finished"),
        "{output_log}"
    );
}
