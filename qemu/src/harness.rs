//! Boots a seed on an image, follows it to a verdict, and reads the guest back: the engine of
//! `kiln qemu run|test` and of the end-to-end tests.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::accel::AccelChoice;
use crate::image::{BaseImage, Boot};
use crate::inspect::{GuestDisk, GuestStat};
use crate::serial::{Event, Follower, Timeline};
use crate::vm::{create_overlay, GuestFwd, Vm, VmConfig};

fn follower_time(e: Option<&crate::serial::TimedEvent>) -> String {
    e.map_or_else(|| "-".into(), |e| format!("{:.1} s", e.at))
}

/// What the harness needs from the loopback artifact mirror.
pub trait MirrorLog {
    fn port(&self) -> u16;
    /// Every request served so far, one line each (method, path, status), oldest first.
    fn requests(&self) -> Vec<String>;
}

impl MirrorLog for crate::mirror::Mirror {
    fn port(&self) -> u16 {
        crate::mirror::Mirror::port(self)
    }
    fn requests(&self) -> Vec<String> {
        crate::mirror::Mirror::requests(self)
            .into_iter()
            .map(|r| format!("{} /{} {}", r.method, r.path, r.status))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WaitFor {
    /// `kiln: all steps done` (or a failed step).
    DaemonDone,
    /// cloud-init's `finished` line: the floor run with a payload that does nothing.
    CloudInitFinished,
    /// Nothing: run until the guest powers off or the deadline (`kiln qemu run`).
    PowerOff,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    AllDone,
    CloudInitFinished,
    StepFailed { step: String, error: String },
    Fatal { text: String },
    Deadline { seconds: u64 },
    QemuExited { status: String, stderr: String },
}

impl Outcome {
    pub fn is_success(&self, wait_for: WaitFor) -> bool {
        matches!(
            (self, wait_for),
            (Outcome::AllDone, WaitFor::DaemonDone)
                | (Outcome::CloudInitFinished, WaitFor::CloudInitFinished)
                | (Outcome::QemuExited { .. }, WaitFor::PowerOff)
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    pub boot: u32,
    pub outcome: Outcome,
    pub timeline: Timeline,
    /// Host seconds from QEMU start to the verdict.
    pub seconds: f64,
    /// Host wall clock at QEMU start (Unix seconds): puts the timeline on the same clock as
    /// host-side logs (e.g. a test's API stand-in).
    pub started_unix: f64,
    /// Mirror requests made during this boot.
    pub mirror_requests: Vec<String>,
    pub guest: Option<GuestReport>,
}

/// What the harness read from the powered-off guest disk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestReport {
    /// `/var/lib/cloud/data/status.json` and `result.json` (what `cloud-init status` reports).
    pub cloud_init_done: bool,
    pub cloud_init_errors: Vec<String>,
    /// Files copied to `<outdir>/boot-N/guest/<path>`.
    pub copied: Vec<String>,
    /// Mode/owner of sensitive paths (contents of secrets are never copied).
    pub stats: std::collections::BTreeMap<String, Option<GuestStat>>,
}

/// Guest files copied out after each boot: the persistent records of cloud-init and kiln.
pub const COPIED_FILES: &[&str] = &[
    "/var/lib/cloud/data/status.json",
    "/var/lib/cloud/data/result.json",
    "/var/log/cloud-init-output.log",
    "/var/log/cloud-init.log",
    kiln_plan::paths::PLAN,
    kiln_plan::paths::JOURNAL,
    kiln_plan::paths::K3S_CONFIG,
];
/// Directories whose files are copied too.
pub const COPIED_DIRS: &[&str] = &[kiln_plan::paths::K3S_MANIFESTS];
/// Paths whose mode and owner are recorded (secrets: never their contents).
pub const STAT_DIRS: &[&str] = &[kiln_plan::paths::SECRETS_DIR];
pub const STAT_FILES: &[&str] = &[
    kiln_plan::paths::DAEMON_BIN,
    kiln_plan::paths::K3S_BIN,
    kiln_plan::paths::TAILSCALE_BIN,
    kiln_plan::paths::PLAN,
];

pub struct Session {
    pub image: BaseImage,
    pub accel: AccelChoice,
    pub outdir: PathBuf,
    pub overlay: PathBuf,
    pub seed: Option<PathBuf>,
    pub memory_mib: u32,
    pub smp: u32,
    pub no_reboot: bool,
    pub open_net: bool,
    /// Guest addresses forwarded to loopback ports besides the mirror (see [`VmConfig`]).
    pub extra_guestfwds: Vec<GuestFwd>,
    /// Copy the serial console to stderr as it arrives.
    pub echo: bool,
    pub boots: u32,
}

impl Session {
    /// Prepares `outdir` and a fresh overlay of `image` in it.
    pub fn new(
        image: BaseImage,
        accel: AccelChoice,
        outdir: &Path,
        seed: Option<PathBuf>,
        overlay_size: Option<&str>,
    ) -> Result<Self> {
        fs::create_dir_all(outdir).with_context(|| format!("creating {}", outdir.display()))?;
        let overlay = outdir.join("disk.qcow2");
        let _ = fs::remove_file(&overlay);
        create_overlay(&image, &overlay, overlay_size)?;
        Ok(Session {
            image,
            accel,
            outdir: outdir.to_path_buf(),
            overlay,
            seed,
            memory_mib: 2048,
            smp: 2,
            no_reboot: true,
            open_net: false,
            extra_guestfwds: Vec::new(),
            echo: false,
            boots: 0,
        })
    }

    pub fn vm_config(&self, bootdir: &Path, mirror_port: Option<u16>) -> VmConfig {
        let mut cfg = VmConfig::new(
            self.accel.accel,
            self.overlay.clone(),
            self.image.boot.clone(),
            bootdir,
        );
        cfg.seed = self.seed.clone();
        cfg.mirror_port = mirror_port;
        cfg.memory_mib = self.memory_mib;
        cfg.smp = self.smp;
        cfg.no_reboot = self.no_reboot;
        cfg.open_net = self.open_net;
        cfg.extra_guestfwds = self.extra_guestfwds.clone();
        cfg
    }

    /// One boot of the session's disk (the first boot, or a reboot of the same disk).
    pub fn boot(
        &mut self,
        wait_for: WaitFor,
        deadline: Duration,
        mirror: Option<&dyn MirrorLog>,
    ) -> Result<BootReport> {
        self.boots += 1;
        let n = self.boots;
        let bootdir = self.outdir.join(format!("boot-{n}"));
        fs::create_dir_all(&bootdir).with_context(|| format!("creating {}", bootdir.display()))?;
        let requests_before = mirror.map(|m| m.requests().len()).unwrap_or(0);
        let started_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut vm = Vm::start(self.vm_config(&bootdir, mirror.map(|m| m.port())))?;
        let echo: Option<Box<dyn std::io::Write + Send>> = if self.echo {
            Some(Box::new(std::io::stderr()))
        } else {
            None
        };
        let mut follower = Follower::open(&vm.config.serial_log, vm.started, echo)?;
        let outcome = follow(&mut vm, &mut follower, wait_for, deadline)?;
        let seconds = vm.started.elapsed().as_secs_f64();
        // Give the guest time to flush and power off cleanly so the disk is consistent for the
        // reader and for a second boot (TCG shutdowns take a while).
        vm.shutdown(Duration::from_secs(120))?;
        let _ = follower.poll();
        let mirror_requests = mirror
            .map(|m| m.requests().split_off(requests_before))
            .unwrap_or_default();
        let guest = match self.read_guest(&bootdir) {
            Ok(g) => Some(g),
            // The test image must always be readable; a cloud image with an unusual layout
            // only loses the read-back.
            Err(e) if matches!(self.image.boot, Boot::Firmware) => {
                eprintln!("kiln qemu: not reading the guest disk: {e:#}");
                None
            }
            Err(e) => return Err(e.context(format!("reading the guest disk after boot {n}"))),
        };
        // Every VM test's log shows each boot's cost (CI's timing table lists the files).
        eprintln!(
            "kiln qemu: boot {n}: wall {seconds:.1} s; power-on -> daemon done {}; -> cloud-init finished {}",
            follower_time(follower.events.iter().find(|e| matches!(e.event, Event::AllDone))),
            follower_time(
                follower
                    .events
                    .iter()
                    .find(|e| matches!(e.event, Event::CloudInitFinished))
            ),
        );
        let report = BootReport {
            boot: n,
            outcome,
            timeline: Timeline {
                events: follower.events,
            },
            seconds,
            started_unix,
            mirror_requests,
            guest,
        };
        fs::write(
            bootdir.join("report.json"),
            serde_json::to_vec_pretty(&report)?,
        )?;
        Ok(report)
    }

    fn read_guest(&self, bootdir: &Path) -> Result<GuestReport> {
        let raw = bootdir.join("disk.raw");
        let disk = GuestDisk::from_overlay(&self.overlay, &raw)?;
        let guest_dir = bootdir.join("guest");
        let mut report = GuestReport::default();
        let mut files: Vec<String> = COPIED_FILES.iter().map(|s| s.to_string()).collect();
        for dir in COPIED_DIRS {
            for name in disk.list(dir)?.unwrap_or_default() {
                files.push(format!("{dir}/{name}"));
            }
        }
        for path in files {
            if let Some(st) = disk.stat(&path)? {
                if st.kind != "regular" {
                    continue;
                }
                let data = disk.read(&path)?.unwrap_or_default();
                let dest = guest_dir.join(path.trim_start_matches('/'));
                fs::create_dir_all(dest.parent().unwrap())?;
                fs::write(&dest, data).with_context(|| format!("writing {}", dest.display()))?;
                report.copied.push(path);
            }
        }
        for dir in STAT_DIRS {
            report.stats.insert(dir.to_string(), disk.stat(dir)?);
            for name in disk.list(dir)?.unwrap_or_default() {
                let p = format!("{dir}/{name}");
                report.stats.insert(p.clone(), disk.stat(&p)?);
            }
        }
        for f in STAT_FILES {
            report.stats.insert(f.to_string(), disk.stat(f)?);
        }
        let status = disk.read("/var/lib/cloud/data/status.json")?;
        let result = disk.read("/var/lib/cloud/data/result.json")?;
        let (done, errors) = cloud_init_verdict(status.as_deref(), result.as_deref());
        report.cloud_init_done = done;
        report.cloud_init_errors = errors;
        fs::write(
            bootdir.join("guest-stat.json"),
            serde_json::to_vec_pretty(&report.stats)?,
        )?;
        Ok(report)
    }
}

/// What `cloud-init status --format json` derives from its persistent records: done when no
/// stage is running and modules-final finished; errors from every stage and from result.json.
pub fn cloud_init_verdict(status: Option<&[u8]>, result: Option<&[u8]>) -> (bool, Vec<String>) {
    let mut errors = Vec::new();
    let parse =
        |b: Option<&[u8]>| b.and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok());
    let Some(status) = parse(status) else {
        return (false, vec!["no /var/lib/cloud/data/status.json".into()]);
    };
    let v1 = &status["v1"];
    for stage in ["init-local", "init", "modules-config", "modules-final"] {
        if let Some(errs) = v1[stage]["errors"].as_array() {
            errors.extend(errs.iter().map(|e| {
                format!(
                    "{stage}: {}",
                    e.as_str().map(str::to_string).unwrap_or(e.to_string())
                )
            }));
        }
    }
    let done = v1["stage"].is_null() && !v1["modules-final"]["finished"].is_null();
    match parse(result) {
        Some(r) => {
            if let Some(errs) = r["v1"]["errors"].as_array() {
                errors.extend(errs.iter().map(|e| format!("result: {e}")));
            }
        }
        None if done => errors.push("no /var/lib/cloud/data/result.json".into()),
        None => {}
    }
    errors.dedup();
    (done, errors)
}

fn follow(
    vm: &mut Vm,
    follower: &mut Follower,
    wait_for: WaitFor,
    deadline: Duration,
) -> Result<Outcome> {
    let until = vm.started + deadline;
    loop {
        for e in follower.poll()? {
            match (&e.event, wait_for) {
                (Event::AllDone, WaitFor::DaemonDone) => {
                    // On a reboot the daemon (ordered after cloud-init.service) can finish
                    // before cloud-init's config and final stages; the boot is judged when both
                    // are done, so keep following until cloud-init says so (or the deadline).
                    if !follower
                        .events
                        .iter()
                        .any(|e| matches!(e.event, Event::CloudInitFinished))
                    {
                        wait_for_cloud_init(vm, follower, until)?;
                    }
                    linger(vm, follower, Duration::from_secs(3))?;
                    return Ok(Outcome::AllDone);
                }
                (Event::StepFailed { step, error }, WaitFor::DaemonDone) => {
                    // Let the daemon's final lines (status, exit) reach the log.
                    linger(vm, follower, Duration::from_secs(5))?;
                    return Ok(Outcome::StepFailed {
                        step: step.clone(),
                        error: error.clone(),
                    });
                }
                (Event::DaemonFailed { error }, WaitFor::DaemonDone) => {
                    linger(vm, follower, Duration::from_secs(3))?;
                    return Ok(Outcome::StepFailed {
                        step: "(daemon)".into(),
                        error: error.clone(),
                    });
                }
                (Event::CloudInitFinished, WaitFor::CloudInitFinished) => {
                    return Ok(Outcome::CloudInitFinished)
                }
                (Event::Fatal { text }, _) => return Ok(Outcome::Fatal { text: text.clone() }),
                _ => {}
            }
        }
        if let Some(status) = vm.try_wait()? {
            let _ = follower.poll();
            return Ok(Outcome::QemuExited {
                status: status.to_string(),
                stderr: vm.qemu_stderr(),
            });
        }
        if Instant::now() >= until {
            return Ok(Outcome::Deadline {
                seconds: deadline.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_cloud_init(vm: &mut Vm, follower: &mut Follower, until: Instant) -> Result<()> {
    while Instant::now() < until && vm.try_wait()?.is_none() {
        if follower
            .poll()?
            .iter()
            .any(|e| matches!(e.event, Event::CloudInitFinished))
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn linger(vm: &mut Vm, follower: &mut Follower, d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until && vm.try_wait()?.is_none() {
        follower.poll()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    follower.poll()?;
    Ok(())
}

/// Timeline of a boot next to a floor boot: the figures the issue asks for.
pub fn render_comparison(run: &BootReport, floor: Option<&BootReport>) -> String {
    let mut s = run.timeline.render(&format!(
        "boot {} timeline (host seconds since QEMU start)",
        run.boot
    ));
    if let Some(done) = run.timeline.all_done_at() {
        s.push_str(&format!("  daemon done at {done:.1}s"));
        if let Some(ci) = run.timeline.cloud_init_finished_at() {
            s.push_str(&format!(" (cloud-init finished at {ci:.1}s)"));
        }
        s.push('\n');
        if let Some(floor_done) = floor.and_then(|f| f.timeline.cloud_init_finished_at()) {
            s.push_str(&format!(
                "  floor (same image, empty payload): cloud-init finished at {floor_done:.1}s -> daemon done = floor + {:.1}s\n",
                done - floor_done
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_init_verdict_reads_the_persistent_status() {
        let status = br#"{"v1":{"datasource":"DataSourceNoCloud","init":{"errors":[],"finished":10.0,"start":5.0},
            "init-local":{"errors":[],"finished":4.0,"start":3.0},"modules-config":{"errors":[],"finished":12.0,"start":11.0},
            "modules-final":{"errors":[],"finished":20.0,"start":13.0},"stage":null}}"#;
        let result = br#"{"v1":{"datasource":"DataSourceNoCloud","errors":[]}}"#;
        assert_eq!(
            cloud_init_verdict(Some(status), Some(result)),
            (true, vec![])
        );
        let failing = br#"{"v1":{"init":{"errors":["('locale', ProcessExecutionError())"]},"modules-final":{"finished":null},"stage":"modules-final"}}"#;
        let (done, errs) = cloud_init_verdict(Some(failing), None);
        assert!(!done);
        assert_eq!(
            errs,
            vec!["init: ('locale', ProcessExecutionError())".to_string()]
        );
        assert!(!cloud_init_verdict(None, None).0);
    }

    #[test]
    fn only_the_awaited_outcome_is_success() {
        assert!(Outcome::AllDone.is_success(WaitFor::DaemonDone));
        assert!(!Outcome::CloudInitFinished.is_success(WaitFor::DaemonDone));
        assert!(!Outcome::StepFailed {
            step: "k3s".into(),
            error: "x".into()
        }
        .is_success(WaitFor::DaemonDone));
        assert!(!Outcome::Deadline { seconds: 1 }.is_success(WaitFor::CloudInitFinished));
    }
}
