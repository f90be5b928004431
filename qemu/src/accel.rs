//! Accelerator choice: KVM only when a guest really runs under it, TCG otherwise.
//!
//! `/dev/kvm` existing proves nothing: on the CI machines it is a nested PVM variant where
//! `-cpu host` aborts on an MSR assertion. So the probe boots a 60-byte multiboot guest that
//! writes `kiln-probe-ok` to the serial port and exits QEMU through `isa-debug-exit`; only a
//! run that prints the marker and exits with the guest's code counts.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The exit status QEMU reports when the probe guest writes 0x10 to isa-debug-exit: (0x10 << 1) | 1.
const PROBE_EXIT: i32 = 33;
const PROBE_MARKER: &str = "kiln-probe-ok";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// QEMU arguments for this accelerator (accel, cpu, machine, smp).
    pub fn qemu_args(self, smp: u32) -> Vec<String> {
        let mut args: Vec<String> = match self {
            Accel::Kvm => vec!["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()],
            // thread=multi gives each vCPU its own host thread; a large translation cache
            // avoids re-translating the kernel and Python over and over.
            Accel::Tcg => vec![
                "-accel".into(),
                "tcg,thread=multi,tb-size=256".into(),
                "-cpu".into(),
                "qemu64".into(),
            ],
        };
        args.extend([
            "-machine".into(),
            "q35".into(),
            "-smp".into(),
            smp.to_string(),
        ]);
        args
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl std::str::FromStr for Accel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => anyhow::bail!("unknown accelerator {other:?} (expected kvm or tcg)"),
        }
    }
}

/// Why an accelerator was chosen; printed so a slow run explains itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// The probe guest: a multiboot (a.out kludge) image loaded at 1 MiB. QEMU enters it in 32-bit
/// protected mode; it writes the marker to COM1 and then 0x10 to port 0xf4.
pub fn probe_kernel() -> Vec<u8> {
    const LOAD: u32 = 0x0010_0000;
    const MAGIC: u32 = 0x1BAD_B002;
    const FLAGS: u32 = 0x0001_0000; // addresses in the header are valid
    let mut code: Vec<u8> = Vec::new();
    code.extend([0x66, 0xBA, 0xF8, 0x03]); // mov dx, 0x3f8
    for b in PROBE_MARKER.bytes().chain(*b"\n") {
        code.extend([0xB0, b, 0xEE]); // mov al, b ; out dx, al
    }
    code.extend([0x66, 0xBA, 0xF4, 0x00]); // mov dx, 0xf4
    code.extend([0xB0, 0x10, 0xEE]); // mov al, 0x10 ; out dx, al
    code.extend([0xF4, 0xEB, 0xFD]); // hlt ; jmp hlt
    let header = [
        MAGIC,
        FLAGS,
        0u32.wrapping_sub(MAGIC).wrapping_sub(FLAGS),
        LOAD,      // header_addr
        LOAD,      // load_addr
        0,         // load_end_addr: whole file
        0,         // bss_end_addr: none
        LOAD + 32, // entry: right after this header
    ];
    let mut image: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    image.extend(code);
    image
}

/// Runs the probe guest under `accel`; Ok(()) only if it printed the marker and exited itself.
pub fn probe(qemu: &Path, accel: Accel, workdir: &Path, timeout: Duration) -> Result<()> {
    let kernel = workdir.join("kiln-probe.bin");
    std::fs::write(&kernel, probe_kernel())
        .with_context(|| format!("writing {}", kernel.display()))?;
    let mut cmd = Command::new(qemu);
    cmd.args(accel.qemu_args(1))
        .args(["-m", "64", "-nodefaults", "-display", "none", "-no-reboot"])
        .args([
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{accel} probe guest did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().map(|mut s| s.read_to_string(&mut out));
    child.stderr.take().map(|mut s| s.read_to_string(&mut err));
    if status.code() == Some(PROBE_EXIT) && out.contains(PROBE_MARKER) {
        Ok(())
    } else {
        let err = err.lines().last().unwrap_or("").to_string();
        anyhow::bail!("{accel} probe guest failed ({status}): {err}")
    }
}

/// Boots a real Linux kernel under `accel` with no root device: it must get through the whole
/// kernel init (where the nested-PVM `/dev/kvm` aborts or crawls) to the "VFS: Unable to mount
/// root" panic, which `panic=-1` + `-no-reboot` turn into a QEMU exit.
pub fn probe_linux(
    qemu: &Path,
    accel: Accel,
    kernel: &Path,
    timeout: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args(accel.qemu_args(1))
        .args([
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "{accel}: a Linux kernel did not boot to its root-mount panic within {timeout:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    child.stdout.take().map(|mut s| s.read_to_string(&mut out));
    if out.contains("Kernel panic - not syncing") {
        Ok(started.elapsed())
    } else {
        let mut err = String::new();
        child.stderr.take().map(|mut s| s.read_to_string(&mut err));
        let err = err.lines().last().unwrap_or("").to_string();
        anyhow::bail!(
            "{accel}: the Linux probe ended ({status}) before the kernel finished init: {err}"
        )
    }
}

/// KVM when `/dev/kvm` opens, the probe guest runs under it and (given a kernel) a Linux
/// kernel boots through its init quickly; TCG otherwise. `KILN_QEMU_ACCEL=tcg|kvm` forces a
/// choice (kvm still has to pass the probes).
pub fn choose(qemu: &Path, workdir: &Path, kernel: Option<&Path>) -> Result<AccelChoice> {
    let forced = match std::env::var("KILN_QEMU_ACCEL") {
        Ok(v) => Some(v.parse::<Accel>().context("KILN_QEMU_ACCEL")?),
        Err(_) => None,
    };
    if forced == Some(Accel::Tcg) {
        return Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "forced by KILN_QEMU_ACCEL=tcg".into(),
        });
    }
    let kvm = (|| -> Result<String> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .context("/dev/kvm unusable")?;
        probe(qemu, Accel::Kvm, workdir, Duration::from_secs(20))?;
        match kernel {
            Some(k) => {
                let took = probe_linux(qemu, Accel::Kvm, k, Duration::from_secs(15))?;
                Ok(format!(
                    "a Linux kernel booted under KVM in {:.1}s",
                    took.as_secs_f64()
                ))
            }
            None => Ok("KVM ran the probe guest (no kernel to try a Linux boot with)".into()),
        }
    })();
    match (kvm, forced) {
        (Ok(reason), _) => Ok(AccelChoice {
            accel: Accel::Kvm,
            reason,
        }),
        (Err(e), Some(Accel::Kvm)) => {
            Err(e.context("KILN_QEMU_ACCEL=kvm but KVM does not run a guest"))
        }
        (Err(e), _) => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: format!("KVM not usable: {e:#}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_kernel_has_a_valid_multiboot_header() {
        let k = probe_kernel();
        let word = |i: usize| u32::from_le_bytes(k[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(0), 0x1BAD_B002);
        assert_eq!(word(0).wrapping_add(word(1)).wrapping_add(word(2)), 0);
        assert_eq!(word(7), word(4) + 32, "entry follows the 32-byte header");
        assert!(
            k.len() < 8192,
            "multiboot header must sit in the first 8 KiB"
        );
    }

    /// The probe guest really executes: under TCG (always available) it prints and exits.
    #[test]
    fn probe_guest_runs_under_tcg() {
        if Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: qemu-system-x86_64 not installed (.ci/install-deps installs it)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        probe(
            Path::new("qemu-system-x86_64"),
            Accel::Tcg,
            dir.path(),
            Duration::from_secs(30),
        )
        .unwrap();
    }

    #[test]
    fn tcg_args_match_the_measured_configuration() {
        let args = Accel::Tcg.qemu_args(2).join(" ");
        assert_eq!(
            args,
            "-accel tcg,thread=multi,tb-size=256 -cpu qemu64 -machine q35 -smp 2"
        );
    }
}
