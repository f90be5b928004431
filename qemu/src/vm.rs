//! One QEMU process: a throw-away qcow2 overlay over a base image, the NoCloud seed as a
//! read-only virtio disk, user-mode networking that can reach only the loopback mirror,
//! serial console to a file, QMP on a unix socket.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::accel::Accel;
use crate::image::{BaseImage, Boot};
use crate::qmp::Qmp;

/// The address guests use for the artifact mirror (`profiles/qemu-local.yaml`: http://10.0.2.100/).
pub const GUEST_MIRROR_ADDR: &str = "10.0.2.100";

/// Joins one guest connection (stdin/stdout, as slirp's `guestfwd=...-cmd:` hands it over) to
/// 127.0.0.1:PORT. Loopback only, by construction.
pub const RELAY_PY: &str = r#"import os, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while True:
        b = os.read(0, 65536)
        if not b:
            break
        s.sendall(b)
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=up, daemon=True).start()
while True:
    b = s.recv(65536)
    if not b:
        break
    os.write(1, b)
"#;

/// A guest TCP address forwarded to a port on the host's 127.0.0.1 (never anywhere else).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFwd {
    pub guest_addr: std::net::Ipv4Addr,
    pub guest_port: u16,
    pub host_port: u16,
}

impl std::str::FromStr for GuestFwd {
    type Err = anyhow::Error;
    /// `GUEST_IP:GUEST_PORT=HOST_PORT`, e.g. `10.0.2.101:80=41234` (the host side is loopback).
    fn from_str(s: &str) -> Result<Self> {
        let parse = || -> Option<GuestFwd> {
            let (guest, host) = s.split_once('=')?;
            let (ip, port) = guest.split_once(':')?;
            Some(GuestFwd {
                guest_addr: ip.parse().ok()?,
                guest_port: port.parse().ok()?,
                host_port: host.parse().ok()?,
            })
        };
        parse().with_context(|| {
            format!("guestfwd {s:?}: expected GUEST_IP:GUEST_PORT=LOOPBACK_PORT, e.g. 10.0.2.101:80=41234")
        })
    }
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub memory_mib: u32,
    pub smp: u32,
    /// The per-VM disk (a qcow2 overlay made by [`create_overlay`]).
    pub disk: PathBuf,
    pub boot: Boot,
    /// NoCloud seed (vfat `CIDATA`), attached as a second read-only virtio disk.
    pub seed: Option<PathBuf>,
    /// Loopback port the guest's `10.0.2.100:80` is forwarded to.
    pub mirror_port: Option<u16>,
    /// More guest services on loopback (e.g. a test's API stand-in), same relay as the mirror.
    pub extra_guestfwds: Vec<GuestFwd>,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
    /// QEMU's own stderr.
    pub qemu_log: PathBuf,
    /// Guest-initiated reboots end QEMU (the harness decides whether to boot again).
    /// Off for QMP `system_reset` fault injection, which `-no-reboot` would turn into an exit.
    pub no_reboot: bool,
    /// Lift `restrict=on` (a real cloud image fetching upstream artifacts; never in tests).
    pub open_net: bool,
    /// A QEMU guest agent port, served on this unix socket (the chaos test drives the guest
    /// through it; images without qemu-guest-agent simply never answer).
    pub qga_socket: Option<PathBuf>,
}

impl VmConfig {
    /// Defaults from the issue: 2 vCPU, 2 GiB.
    pub fn new(accel: Accel, disk: PathBuf, boot: Boot, workdir: &Path) -> Self {
        VmConfig {
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel,
            memory_mib: 2048,
            smp: 2,
            disk,
            boot,
            seed: None,
            mirror_port: None,
            extra_guestfwds: Vec::new(),
            serial_log: workdir.join("serial.log"),
            qmp_socket: workdir.join("qmp.sock"),
            qemu_log: workdir.join("qemu.log"),
            no_reboot: true,
            open_net: false,
            qga_socket: None,
        }
    }

    /// Where [`RELAY_PY`] is written for this VM (no commas or spaces: it sits inside -netdev).
    pub fn relay_script(&self) -> PathBuf {
        self.serial_log.with_file_name("guestfwd-relay.py")
    }

    /// The full QEMU command line (also printed by `kiln qemu run --print-command`).
    pub fn args(&self) -> Vec<String> {
        let mut a = self.accel.qemu_args(self.smp);
        a.extend([
            "-m".into(),
            self.memory_mib.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
        ]);
        a.extend(["-rtc".into(), "base=utc".into()]);
        if self.no_reboot {
            a.push("-no-reboot".into());
        }
        // cache=unsafe: the overlay is throw-away and QEMU flushes it when it exits; guest
        // flushes stay cheap under TCG.
        a.extend([
            "-drive".into(),
            format!(
                "file={},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
                self.disk.display()
            ),
        ]);
        if let Some(seed) = &self.seed {
            a.extend([
                "-drive".into(),
                format!("file={},if=virtio,format=raw,readonly=on", seed.display()),
            ]);
        }
        // restrict=on: the guest can reach nothing but the guestfwd target below.
        // guestfwd to a `tcp:` chardev carries exactly one connection for the VM's lifetime
        // (measured: the second curl hangs), so each guest connection runs the relay instead,
        // which joins it to the loopback mirror.
        let mut netdev = format!(
            "user,id=n0,restrict={}",
            if self.open_net { "off" } else { "on" }
        );
        if let Some(port) = self.mirror_port {
            netdev.push_str(&format!(
                ",guestfwd=tcp:{GUEST_MIRROR_ADDR}:80-cmd:python3 {} {port}",
                self.relay_script().display()
            ));
        }
        for f in &self.extra_guestfwds {
            netdev.push_str(&format!(
                ",guestfwd=tcp:{}:{}-cmd:python3 {} {}",
                f.guest_addr,
                f.guest_port,
                self.relay_script().display(),
                f.host_port
            ));
        }
        a.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            "virtio-net-pci,netdev=n0".into(),
        ]);
        // Early boot (sshd keys, Python's hash seed) waits on entropy otherwise.
        a.extend(["-device".into(), "virtio-rng-pci".into()]);
        a.extend([
            "-chardev".into(),
            format!("file,id=ser0,path={}", self.serial_log.display()),
        ]);
        a.extend(["-serial".into(), "chardev:ser0".into()]);
        a.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", self.qmp_socket.display()),
        ]);
        if let Some(qga) = &self.qga_socket {
            a.extend([
                "-chardev".into(),
                format!("socket,path={},server=on,wait=off,id=qga0", qga.display()),
                "-device".into(),
                "virtio-serial".into(),
                "-device".into(),
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
            ]);
        }
        if let Boot::DirectKernel {
            kernel,
            initrd,
            cmdline,
        } = &self.boot
        {
            a.extend(["-kernel".into(), kernel.display().to_string()]);
            a.extend(["-initrd".into(), initrd.display().to_string()]);
            a.extend(["-append".into(), cmdline.clone()]);
        }
        a
    }
}

/// A throw-away copy-on-write disk over `base`; `size` grows it (e.g. "10G" for cloud images).
pub fn create_overlay(base: &BaseImage, overlay: &Path, size: Option<&str>) -> Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", &base.disk_format, "-b"])
        .arg(&base.disk)
        .arg(overlay);
    if let Some(size) = size {
        cmd.arg(size);
    }
    let out = cmd.output().context("running qemu-img create")?;
    if !out.status.success() {
        bail!(
            "qemu-img create {} over {}: {}",
            overlay.display(),
            base.disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub struct Vm {
    pub config: VmConfig,
    child: Child,
    pub started: Instant,
}

impl Vm {
    pub fn start(config: VmConfig) -> Result<Vm> {
        // The serial log is per boot: a stale one would feed old milestones to the follower.
        let _ = fs::remove_file(&config.serial_log);
        let _ = fs::remove_file(&config.qmp_socket);
        if let Some(qga) = &config.qga_socket {
            let _ = fs::remove_file(qga);
        }
        fs::write(&config.serial_log, b"")
            .with_context(|| format!("creating {}", config.serial_log.display()))?;
        if config.mirror_port.is_some() || !config.extra_guestfwds.is_empty() {
            let relay = config.relay_script();
            if relay.to_string_lossy().contains([',', ' ']) {
                bail!(
                    "{}: the VM's work directory must not contain commas or spaces",
                    relay.display()
                );
            }
            fs::write(&relay, RELAY_PY).with_context(|| format!("writing {}", relay.display()))?;
        }
        let stderr = fs::File::create(&config.qemu_log)
            .with_context(|| format!("creating {}", config.qemu_log.display()))?;
        let child = Command::new(&config.qemu)
            .args(config.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", config.qemu.display()))?;
        Ok(Vm {
            config,
            child,
            started: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn qmp(&self) -> Result<Qmp> {
        Qmp::connect(&self.config.qmp_socket, Duration::from_secs(10))
    }

    /// QEMU's stderr (why it refused to start, if it did).
    pub fn qemu_stderr(&self) -> String {
        fs::read_to_string(&self.config.qemu_log).unwrap_or_default()
    }

    /// Clean shutdown through the ACPI button, then `quit`, then SIGKILL.
    pub fn shutdown(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.child.try_wait()? {
            return Ok(s);
        }
        if let Ok(mut q) = self.qmp() {
            let _ = q.system_powerdown();
            if let Some(s) = self.wait_timeout(grace)? {
                return Ok(s);
            }
            let _ = q.quit();
            if let Some(s) = self.wait_timeout(Duration::from_secs(10))? {
                return Ok(s);
            }
        }
        self.kill()
    }

    pub fn kill(&mut self) -> Result<ExitStatus> {
        let _ = self.child.kill();
        Ok(self.child.wait()?)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_guestfwds_relay_to_loopback_ports_and_keep_the_network_restricted() {
        let dir = Path::new("/var/tmp/kiln-vm");
        let mut cfg = VmConfig::new(Accel::Tcg, dir.join("d.qcow2"), Boot::Firmware, dir);
        cfg.mirror_port = Some(8000);
        cfg.extra_guestfwds = vec!["10.0.2.101:80=9000".parse().unwrap()];
        let args = cfg.args();
        let netdev = &args[args.iter().position(|a| a == "-netdev").unwrap() + 1];
        assert_eq!(
            netdev,
            "user,id=n0,restrict=on\
             ,guestfwd=tcp:10.0.2.100:80-cmd:python3 /var/tmp/kiln-vm/guestfwd-relay.py 8000\
             ,guestfwd=tcp:10.0.2.101:80-cmd:python3 /var/tmp/kiln-vm/guestfwd-relay.py 9000"
        );
        for bad in [
            "10.0.2.101:80",
            "host:80=1",
            "10.0.2.101=9000",
            "10.0.2.101:80=x",
        ] {
            assert!(bad.parse::<GuestFwd>().is_err(), "{bad}");
        }
    }
}
