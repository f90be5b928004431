//! The POSIX bootstrap, run for real with /bin/sh against a scratch root: node paths are
//! rewritten under a temp dir and `systemctl` is a recording stand-in first on PATH, as are
//! `blkid`/`mount`/`umount` for seed delivery (they "mount" the files of the rendered seed.img,
//! read back with kiln's own FAT reader). In the VM the same script runs unmodified against the
//! real CIDATA volume; see the QEMU end-to-end test.

mod common;

use kiln::pipeline;
use kiln::render::Rendered;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NODE_DIRS: [&str; 5] = [
    "/etc/kiln",
    "/var/lib/kiln",
    "/var/lib/cloud",
    "/usr/local/sbin",
    "/etc/systemd/system",
];
const INSTANCE_ID: &str = "iid-bootstrap-test";

struct Node {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bin: PathBuf,
}

impl Node {
    fn new() -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        for d in NODE_DIRS {
            std::fs::create_dir_all(root.join(&d[1..])).unwrap();
        }
        std::fs::create_dir_all(root.join("etc/kiln/secrets")).unwrap();
        std::fs::create_dir_all(root.join("var/lib/cloud/data")).unwrap();
        std::fs::write(
            root.join("var/lib/cloud/data/instance-id"),
            format!("{INSTANCE_ID}\n"),
        )
        .unwrap();
        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let log = tmp.path().join("systemctl.log");
        let fake = bin.join("systemctl");
        std::fs::write(
            &fake,
            format!("#!/bin/sh\necho \"$*\" >> {}\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Seed volume stand-ins: blkid finds one CIDATA device, mount copies the seed's files.
        let seed = tmp.path().join("seed-files");
        for (name, body) in [
            ("blkid", "#!/bin/sh\n[ -d {seed} ] || exit 2\necho /dev/fake-cidata\n".to_string()),
            (
                "mount",
                "#!/bin/sh\n[ \"$1 $2 $3\" = \"-o ro /dev/fake-cidata\" ] || exit 32\ncp {seed}/* \"$4\"/\n".to_string(),
            ),
            ("umount", "#!/bin/sh\nrm -f \"$1\"/*\n".to_string()),
        ] {
            let f = bin.join(name);
            std::fs::write(&f, body.replace("{seed}", &seed.display().to_string())).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Node {
            _tmp: tmp,
            root,
            bin,
        }
    }

    fn path(&self, node_path: &str) -> PathBuf {
        self.root.join(&node_path[1..])
    }

    /// What cloud-init's write_files would have written before runcmd.
    fn write_files(&self, r: &Rendered) {
        let ud: serde_yaml::Value = serde_yaml::from_slice(r.file("user-data")).unwrap();
        for f in ud["write_files"].as_sequence().unwrap() {
            let path = f["path"].as_str().unwrap();
            let content = f["content"].as_str().unwrap();
            let data = match f["encoding"].as_str() {
                Some("b64") => {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD
                        .decode(content)
                        .unwrap()
                }
                _ => content.as_bytes().to_vec(),
            };
            let p = self.path(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
        }
    }

    /// Attaches the rendered seed.img: its files become what the `mount` stand-in serves.
    fn attach_seed(&self, r: &Rendered) {
        let img = r.file("seed.img");
        let dir = self.bin.parent().unwrap().join("seed-files");
        std::fs::create_dir_all(&dir).unwrap();
        for name in kiln::seed::list(img).unwrap() {
            std::fs::write(dir.join(&name), kiln::seed::read_file(img, &name).unwrap()).unwrap();
        }
    }

    fn seed_file(&self, name: &str) -> PathBuf {
        self.bin.parent().unwrap().join("seed-files").join(name)
    }

    fn run(&self, r: &Rendered) -> Output {
        self.sh(&r.bootstrap)
    }

    /// The payload's bootcmd (what cloud-init runs early on every boot).
    fn bootcmd(&self, r: &Rendered) -> Output {
        let ud: serde_yaml::Value = serde_yaml::from_slice(r.file("user-data")).unwrap();
        let cmd = &ud["bootcmd"][0];
        assert_eq!((cmd[0].as_str(), cmd[1].as_str()), (Some("sh"), Some("-c")));
        self.sh(cmd[2].as_str().unwrap())
    }

    fn sh(&self, script: &str) -> Output {
        let mut script = script.to_string();
        for d in NODE_DIRS {
            script = script.replace(d, &format!("{}{d}", self.root.display()));
        }
        let path = format!("{}:{}", self.bin.display(), std::env::var("PATH").unwrap());
        Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .env("PATH", path)
            .output()
            .unwrap()
    }

    fn systemctl_calls(&self) -> String {
        std::fs::read_to_string(self.bin.parent().unwrap().join("systemctl.log"))
            .unwrap_or_default()
    }
}

fn render(profile: &Path) -> Rendered {
    let daemon = kiln::elf::tiny_static_elf();
    pipeline::build(profile, &daemon, 0, &common::no_env)
        .map_err(|e| e.to_string())
        .unwrap()
        .1
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bootstrap_scripts_are_valid_posix_sh() {
    for name in ["ameciclo.yaml", "qemu-local.yaml"] {
        let r = render(&common::repo().join("profiles").join(name));
        let o = Command::new("/bin/sh")
            .arg("-n")
            .arg("-c")
            .arg(&r.bootstrap)
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", stderr(&o));
    }
}

#[test]
fn seed_bootstrap_copies_the_bundle_from_the_seed_volume_verifies_installs_and_starts() {
    let r = render(&common::repo().join("profiles/qemu-local.yaml"));
    let node = Node::new();
    node.write_files(&r);
    node.attach_seed(&r);
    let o = node.run(&r);
    assert!(o.status.success(), "{}", stderr(&o));
    let daemon = node.path(kiln_plan::paths::DAEMON_BIN);
    assert_eq!(
        std::fs::read(&daemon).unwrap(),
        kiln::elf::tiny_static_elf()
    );
    assert_eq!(
        std::fs::metadata(&daemon).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_to_string(node.path(kiln_plan::paths::UNIT)).unwrap(),
        kiln::render::UNIT
    );
    assert!(node.path("/var/lib/kiln/bundle/plan.json").is_file());
    assert_eq!(
        node.systemctl_calls(),
        "daemon-reload\nenable kiln-firstboot.service\nstart --no-block kiln-firstboot.service\n"
    );
    let secrets = std::fs::metadata(node.path(kiln_plan::paths::SECRETS_DIR)).unwrap();
    assert_eq!(secrets.permissions().mode() & 0o777, 0o700);
    assert!(stderr(&o).contains(&format!("bundle verified: sha256 {}", r.bundle_sha256)));
    assert!(stderr(&o).contains("from the seed volume /dev/fake-cidata"));
    assert_eq!(
        std::fs::read(node.path(kiln_plan::paths::BUNDLE_TARBALL)).unwrap(),
        r.file("bundle.tar.gz")
    );
}

#[test]
fn a_tampered_seed_bundle_is_refused_before_anything_is_installed() {
    let r = render(&common::repo().join("profiles/qemu-local.yaml"));
    let node = Node::new();
    node.write_files(&r);
    node.attach_seed(&r);
    let on_seed = node.seed_file("bundle.tar.gz");
    let mut data = std::fs::read(&on_seed).unwrap();
    let n = data.len();
    data[n / 2] ^= 0x01;
    std::fs::write(&on_seed, data).unwrap();
    let o = node.run(&r);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("bundle sha256 mismatch"),
        "{}",
        stderr(&o)
    );
    assert!(!node.path(kiln_plan::paths::DAEMON_BIN).exists());
    assert!(!node.path(kiln_plan::paths::BUNDLE_TARBALL).exists());
    assert_eq!(node.systemctl_calls(), "");
}

#[test]
fn a_seed_bootstrap_without_a_seed_volume_names_what_is_missing() {
    let r = render(&common::repo().join("profiles/qemu-local.yaml"));
    let node = Node::new();
    node.write_files(&r);
    let o = node.run(&r);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no CIDATA seed volume found"),
        "{}",
        stderr(&o)
    );
    assert!(!node.path(kiln_plan::paths::DAEMON_BIN).exists());
}

#[test]
fn a_plan_that_differs_from_the_bundle_is_refused() {
    let r = render(&common::repo().join("profiles/qemu-local.yaml"));
    let node = Node::new();
    node.write_files(&r);
    node.attach_seed(&r);
    let plan = node.path(kiln_plan::paths::PLAN);
    let text = std::fs::read_to_string(&plan)
        .unwrap()
        .replace("ameciclo-k3s", "someone-else");
    std::fs::write(&plan, text).unwrap();
    let o = node.run(&r);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("plan.json differs"), "{}", stderr(&o));
    assert!(!node.path(kiln_plan::paths::DAEMON_BIN).exists());
}

/// Serves `body` for every request on 127.0.0.1 (the only address tests may use); counts requests.
fn serve(body: Vec<u8>, requests: usize) -> (u16, std::thread::JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let mut n = 0;
        for stream in listener.incoming().take(requests) {
            let mut s = stream.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(&body).unwrap();
            n += 1;
        }
        n
    });
    (port, h)
}

fn url_profile(dir: &Path, port: u16) -> PathBuf {
    let base = common::repo().join("tests/profiles/good/base.yaml");
    let p = dir.join("url.yaml");
    std::fs::write(
        &p,
        format!(
            "extends: {}\nartifacts:\n  delivery: url\n  bundle-base-url: http://127.0.0.1:{port}/kiln/\n",
            base.display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn url_bootstrap_downloads_verifies_and_installs() {
    let tmp = tempfile::tempdir().unwrap();
    // Render once to learn the bundle, then serve it on the port the profile names.
    let listener_port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = render(&url_profile(tmp.path(), listener_port));
    let url = r.bundle_url.clone().unwrap();
    assert_eq!(
        url.path(),
        format!("/kiln/bundle-{}.tar.gz", r.bundle_sha256)
    );
    let (port, server) = serve(r.file("bundle.tar.gz").to_vec(), 1);
    let r = render(&url_profile(tmp.path(), port));
    let node = Node::new();
    node.write_files(&r);
    let o = node.run(&r);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(server.join().unwrap(), 1);
    assert!(node.path(kiln_plan::paths::DAEMON_BIN).is_file());
    assert!(!node.path("/var/lib/kiln/bundle.tar.gz.partial").exists());
    // Run again (e.g. `cloud-init single`): the verified bundle is reused, nothing downloaded.
    let o = node.run(&r);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("already present and verified"));
}

#[test]
fn url_bootstrap_refuses_a_corrupted_download_and_keeps_no_partial_file() {
    let tmp = tempfile::tempdir().unwrap();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r0 = render(&url_profile(tmp.path(), port));
    let mut corrupt = r0.file("bundle.tar.gz").to_vec();
    corrupt[10] ^= 0xff;
    let (port, server) = serve(corrupt, 1);
    let r = render(&url_profile(tmp.path(), port));
    let node = Node::new();
    node.write_files(&r);
    let o = node.run(&r);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("bundle sha256 mismatch"),
        "{}",
        stderr(&o)
    );
    assert!(!node.path("/var/lib/kiln/bundle.tar.gz.partial").exists());
    assert!(!node.path("/var/lib/kiln/bundle.tar.gz").exists());
    assert!(!node.path(kiln_plan::paths::DAEMON_BIN).exists());
    server.join().unwrap();
}

#[test]
fn an_interrupted_first_boot_reruns_write_files_and_the_bootstrap_until_it_is_done() {
    let r = render(&common::repo().join("profiles/qemu-local.yaml"));
    let node = Node::new();
    let sem = node.path("/var/lib/cloud/instance/sem");
    let sems = ["config_write_files", "config_runcmd", "config_scripts_user"];
    let mark = |names: &[&str]| {
        std::fs::create_dir_all(&sem).unwrap();
        for n in names {
            std::fs::write(sem.join(n), "1: 0\n").unwrap();
        }
    };
    let present = || -> Vec<bool> { sems.iter().map(|n| sem.join(n).exists()).collect() };

    // The very first boot: nothing has run yet, nothing to forget.
    let o = node.bootcmd(&r);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!sem.exists());

    // A reset after write_files (and maybe runcmd) but before the bootstrap finished.
    mark(&sems);
    std::fs::write(sem.join("config_ssh"), "1: 0\n").unwrap();
    let o = node.bootcmd(&r);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
    assert_eq!(present(), [false, false, false]);
    assert!(
        sem.join("config_ssh").exists(),
        "other modules are left alone"
    );

    // The rerun bootstrap finishes and records the instance: later boots change nothing.
    node.write_files(&r);
    node.attach_seed(&r);
    let o = node.run(&r);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(node.path(kiln_plan::paths::BOOTSTRAP_DONE)).unwrap(),
        format!("{INSTANCE_ID}\n")
    );
    mark(&sems);
    let o = node.bootcmd(&r);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(present(), [true, true, true]);

    // A new instance on the same disk (its own sems) is not mistaken for a finished one.
    std::fs::write(
        node.path("/var/lib/cloud/data/instance-id"),
        "iid-another-instance\n",
    )
    .unwrap();
    let o = node.bootcmd(&r);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(present(), [false, false, false]);
}
