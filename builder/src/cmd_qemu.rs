//! `kiln qemu`: boot a profile's payload in a local VM.
//!
//! `run` is interactive (serial console on the terminal until the guest powers off);
//! `test` is headless with a deadline, follows the daemon's serial milestones, prints a
//! timeline, saves the serial log and what it read back from the guest disk, and exits 0 only
//! when every step is done. The VM machinery lives in `kiln_qemu`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_qemu::accel::{self, AccelChoice};
use kiln_qemu::harness::{render_comparison, BootReport, MirrorLog, Outcome, Session, WaitFor};
use kiln_qemu::image::{self, BaseImage};
use kiln_qemu::mirror::Mirror;
use kiln_qemu::serial::Event;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: QemuCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum QemuCommand {
    /// Boot a profile's payload with the serial console on the terminal, until the guest powers off.
    Run(VmArgs),
    /// Boot headless, follow the daemon's milestones and print the timeline; exit 0 only when every step is done.
    Test(TestArgs),
    /// Build (once per machine) and print the path of a base image (`debian-12-test`).
    Image {
        #[arg(default_value = image::DEBIAN_12_TEST)]
        name: String,
    },
    /// Print which accelerator kiln would use (KVM only when a guest really runs under it) and why.
    Accel,
}

#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Profile to build the seed from.
    #[arg(required_unless_present = "seed")]
    pub profile: Option<PathBuf>,
    #[command(flatten)]
    pub machine: crate::opts::MachineOpts,
    #[command(flatten)]
    pub daemon: crate::opts::DaemonOpts,
    /// Boot this NoCloud seed instead of building one from the profile.
    #[arg(long)]
    pub seed: Option<PathBuf>,
    /// Output directory: build outputs, overlay disk, serial logs, report.
    #[arg(short = 'o', long, default_value = "out/qemu")]
    pub outdir: PathBuf,
    /// Forward one more guest address to a loopback port, `GUEST_IP:GUEST_PORT=LOOPBACK_PORT`
    /// (e.g. `10.0.2.101:80=41234` for a test's Tailscale API stand-in). Repeatable.
    #[arg(long = "guestfwd", value_name = "GUEST_IP:PORT=LOOPBACK_PORT")]
    pub guestfwds: Vec<kiln_qemu::vm::GuestFwd>,
    /// Boot the seed with this cloud-init instance id instead of the built one; the
    /// user-data stays byte-identical (a re-created VM with the same payload: a rebuild).
    #[arg(long)]
    pub instance_id: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Give up after this many seconds per boot (TCG boots take 70-180 s here).
    #[arg(long, default_value_t = 900)]
    pub deadline: u64,
    /// Boot the same disk this many times; boots after the first must skip every step and
    /// download nothing.
    #[arg(long, default_value_t = 1)]
    pub boots: u32,
    /// First boot the same image with an empty payload and report the daemon's time over it.
    #[arg(long)]
    pub floor: bool,
}

pub fn run(args: Args) -> ExitCode {
    let result = match args.command {
        QemuCommand::Run(a) => cmd_run(a),
        QemuCommand::Test(a) => cmd_test(a),
        QemuCommand::Image { name } => cmd_image(&name),
        QemuCommand::Accel => cmd_accel(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln qemu: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_image(name: &str) -> Result<ExitCode> {
    if name != image::DEBIAN_12_TEST {
        bail!(
            "unknown image {name:?}: kiln builds only {}",
            image::DEBIAN_12_TEST
        );
    }
    let img = image::ensure_test_image(&image::cache_root())?;
    println!("{}", img.disk.parent().unwrap_or(Path::new("/")).display());
    Ok(ExitCode::SUCCESS)
}

fn qemu_bin() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}

fn choose_accel(img: &BaseImage, workdir: &Path) -> Result<AccelChoice> {
    let choice = accel::choose(&qemu_bin(), workdir, img.probe_kernel().as_deref())?;
    eprintln!(
        "kiln qemu: accelerator {} ({})",
        choice.accel, choice.reason
    );
    Ok(choice)
}

fn cmd_accel() -> Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let test_image = image::load_test_image(&image::test_image_dir(&image::cache_root())).ok();
    let kernel = test_image.as_ref().and_then(BaseImage::probe_kernel);
    let choice = accel::choose(&qemu_bin(), dir.path(), kernel.as_deref())?;
    println!("{} ({})", choice.accel, choice.reason);
    Ok(ExitCode::SUCCESS)
}

/// The seed to boot: built by [`build_seed`], or `--seed`; with `--instance-id`, a copy with
/// that instance id (the same user-data bytes) under `<outdir>/seed/`.
fn boot_seed(vm: &VmArgs) -> Result<PathBuf> {
    let seed = build_seed(vm)?;
    let Some(id) = &vm.instance_id else {
        return Ok(seed);
    };
    let img = std::fs::read(&seed).with_context(|| format!("reading {}", seed.display()))?;
    let epoch = crate::render::source_date_epoch()?;
    let again = crate::seed::with_instance_id(&img, id, epoch)
        .with_context(|| format!("re-making {} with instance id {id}", seed.display()))?;
    let dir = vm.outdir.join("seed");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join("seed.img");
    std::fs::write(&out, again).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "kiln qemu: seed {} with instance id {id} (same user-data as {})",
        out.display(),
        seed.display()
    );
    Ok(out)
}

/// Builds the seed with this same binary's `kiln build` (seed delivery comes from the profile).
fn build_seed(vm: &VmArgs) -> Result<PathBuf> {
    if let Some(seed) = &vm.seed {
        return Ok(seed.clone());
    }
    let profile = vm
        .profile
        .as_ref()
        .context("a profile or --seed is required")?;
    let build_dir = vm.outdir.join("build");
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("build").arg(profile).arg("-o").arg(&build_dir);
    if let Some(fb) = &vm.daemon.firstboot {
        cmd.arg("--firstboot").arg(fb);
    }
    let status = cmd.status().context("running kiln build")?;
    if !status.success() {
        bail!("kiln build {} failed ({status})", profile.display());
    }
    let seed = build_dir.join("seed.img");
    if !seed.is_file() {
        bail!("kiln build wrote no {}", seed.display());
    }
    Ok(seed)
}

fn start_mirror(vm: &VmArgs) -> Result<Option<Mirror>> {
    match &vm.machine.mirror {
        None => Ok(None),
        Some(dir) => {
            if !dir.is_dir() {
                bail!("--mirror {}: not a directory", dir.display());
            }
            let m = Mirror::start(dir)
                .with_context(|| format!("starting the mirror for {}", dir.display()))?;
            eprintln!(
                "kiln qemu: mirror {} on 127.0.0.1:{} (guest: http://10.0.2.100/)",
                dir.display(),
                m.port()
            );
            Ok(Some(m))
        }
    }
}

fn session(
    vm: &VmArgs,
    img: BaseImage,
    choice: AccelChoice,
    outdir: &Path,
    seed: Option<PathBuf>,
) -> Result<Session> {
    let mut s = vm.machine.session(img, choice, outdir, seed)?;
    s.extra_guestfwds = vm.guestfwds.clone();
    Ok(s)
}

fn cmd_run(vm: VmArgs) -> Result<ExitCode> {
    let seed = boot_seed(&vm)?;
    let img = image::resolve(&vm.machine.image)?;
    std::fs::create_dir_all(&vm.outdir)?;
    let choice = choose_accel(&img, &vm.outdir)?;
    let mirror = start_mirror(&vm)?;
    let mut s = session(&vm, img, choice, &vm.outdir, Some(seed))?;
    s.echo = true;
    eprintln!(
        "kiln qemu: booting; serial log {}/boot-1/serial.log, QMP {}/boot-1/qmp.sock (power off from the guest or with QMP system_powerdown)",
        vm.outdir.display(),
        vm.outdir.display()
    );
    let report = s.boot(
        WaitFor::PowerOff,
        Duration::from_secs(24 * 3600),
        mirror.as_ref().map(|m| m as &dyn MirrorLog),
    )?;
    println!("{}", render_comparison(&report, None));
    Ok(ExitCode::SUCCESS)
}

fn floor_seed(dir: &Path) -> Result<Option<PathBuf>> {
    // An empty cloud-config on the same kind of NoCloud volume: cloud-init does its usual work
    // and nothing else. Without cloud-localds the floor boots seedless (DataSourceNone).
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("user-data"), "#cloud-config\n{}\n")?;
    std::fs::write(
        dir.join("meta-data"),
        "instance-id: kiln-floor\nlocal-hostname: kiln-floor\n",
    )?;
    let seed = dir.join("seed.img");
    match Command::new("cloud-localds")
        .arg(&seed)
        .arg(dir.join("user-data"))
        .arg(dir.join("meta-data"))
        .status()
    {
        Ok(s) if s.success() => Ok(Some(seed)),
        _ => Ok(None),
    }
}

fn cmd_test(args: TestArgs) -> Result<ExitCode> {
    let vm = &args.vm;
    let seed = boot_seed(vm)?;
    let img = image::resolve(&vm.machine.image)?;
    std::fs::create_dir_all(&vm.outdir)?;
    let choice = choose_accel(&img, &vm.outdir)?;
    let mirror = start_mirror(vm)?;
    let mirror_log = mirror.as_ref().map(|m| m as &dyn MirrorLog);
    let deadline = Duration::from_secs(args.deadline);

    let floor = if args.floor {
        let floor_dir = vm.outdir.join("floor");
        let seed = floor_seed(&floor_dir.join("seed"))?;
        let mut s = session(vm, img.clone(), choice.clone(), &floor_dir, seed)?;
        eprintln!("kiln qemu: floor boot (same image, empty payload)");
        let r = s.boot(WaitFor::CloudInitFinished, deadline, None)?;
        println!("{}", r.timeline.render("floor timeline (empty payload)"));
        if r.outcome != Outcome::CloudInitFinished {
            bail!("the floor boot did not finish cloud-init: {:?}", r.outcome);
        }
        Some(r)
    } else {
        None
    };

    let mut s = session(vm, img, choice.clone(), &vm.outdir, Some(seed))?;
    let mut reports: Vec<BootReport> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for n in 1..=args.boots.max(1) {
        eprintln!(
            "kiln qemu: boot {n} of {} ({} deadline {}s)",
            args.boots.max(1),
            choice.accel,
            args.deadline
        );
        let r = s.boot(WaitFor::DaemonDone, deadline, mirror_log)?;
        println!("{}", render_comparison(&r, floor.as_ref()));
        failures.extend(verdict(&r, n).into_iter().map(|f| format!("boot {n}: {f}")));
        let stop = !matches!(r.outcome, Outcome::AllDone);
        reports.push(r);
        if stop {
            break;
        }
    }

    let summary = serde_json::json!({
        "accel": choice,
        "ok": failures.is_empty(),
        "failures": failures,
        "floor": floor,
        "boots": reports,
    });
    let report_path = vm.outdir.join("report.json");
    std::fs::write(&report_path, serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("writing {}", report_path.display()))?;
    if let Some(m) = &mirror {
        let log: Vec<String> = MirrorLog::requests(m);
        std::fs::write(vm.outdir.join("mirror-requests.log"), log.join("\n") + "\n")?;
    }
    println!(
        "kiln qemu: report {} (serial logs and guest files under {}/boot-N/)",
        report_path.display(),
        vm.outdir.display()
    );
    if failures.is_empty() {
        println!("kiln qemu: PASS: every step done");
        Ok(ExitCode::SUCCESS)
    } else {
        for f in &failures {
            println!("kiln qemu: FAIL: {f}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// Why a boot does not count as success (empty: it does).
fn verdict(r: &BootReport, boot: u32) -> Vec<String> {
    let mut f = Vec::new();
    match &r.outcome {
        Outcome::AllDone => {}
        Outcome::StepFailed { step, error } => {
            f.push(format!("the daemon's step {step} failed: {error}"))
        }
        Outcome::Deadline { seconds } => {
            let last = r
                .timeline
                .events
                .last()
                .map(|e| e.event.label())
                .unwrap_or_else(|| "nothing on the console".into());
            f.push(format!(
                "deadline of {seconds}s passed; last milestone: {last}"
            ))
        }
        Outcome::Fatal { text } => f.push(format!("the guest died: {text}")),
        Outcome::QemuExited { status, stderr } => f.push(format!(
            "QEMU exited ({status}) before the daemon finished: {}",
            stderr.trim()
        )),
        Outcome::CloudInitFinished => {
            f.push("cloud-init finished but the daemon never reported".into())
        }
    }
    for (step, error) in r.timeline.failures() {
        if !matches!(&r.outcome, Outcome::StepFailed { step: s, .. } if *s == step) {
            f.push(format!("the daemon reported step {step} failed: {error}"));
        }
    }
    if let Some(g) = &r.guest {
        if !g.cloud_init_done {
            f.push("cloud-init did not finish (per /var/lib/cloud/data/status.json)".into());
        }
        if !g.cloud_init_errors.is_empty() {
            f.push(format!(
                "cloud-init errors: {}",
                g.cloud_init_errors.join("; ")
            ));
        }
    }
    if boot > 1 && matches!(r.outcome, Outcome::AllDone) {
        let not_skipped: Vec<String> = r
            .timeline
            .step_outcomes()
            .into_iter()
            .filter(|(_, o)| *o != kiln_plan::StepState::Skipped)
            .map(|(s, o)| format!("{s} {}", o.as_str()))
            .collect();
        if !not_skipped.is_empty() {
            f.push(format!(
                "a reboot must skip every step, but: {}",
                not_skipped.join(", ")
            ));
        }
        if r.timeline
            .first(|e| matches!(e, Event::StepSkipped { .. }))
            .is_none()
        {
            f.push("a reboot reported no skipped steps".into());
        }
        if !r.mirror_requests.is_empty() {
            f.push(format!(
                "a reboot downloaded again: {}",
                r.mirror_requests.join(", ")
            ));
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_qemu::serial::{Event, TimedEvent, Timeline};

    fn boot(n: u32, events: Vec<Event>, outcome: Outcome, requests: &[&str]) -> BootReport {
        BootReport {
            boot: n,
            outcome,
            timeline: Timeline {
                events: events
                    .into_iter()
                    .map(|event| TimedEvent { at: 1.0, event })
                    .collect(),
            },
            seconds: 1.0,
            started_unix: 0.0,
            mirror_requests: requests.iter().map(|s| s.to_string()).collect(),
            guest: None,
        }
    }

    #[test]
    fn first_boot_with_every_step_done_passes() {
        let r = boot(
            1,
            vec![
                Event::StepDone {
                    step: "k3s".into(),
                    seconds: Some(1.0),
                },
                Event::AllDone,
            ],
            Outcome::AllDone,
            &["GET /k3s 200"],
        );
        assert!(verdict(&r, 1).is_empty());
    }

    #[test]
    fn failed_step_is_reported_with_the_daemons_error() {
        let err = "sha256 mismatch for http://10.0.2.100/k3s/v1.32.4%2Bk3s1/k3s: expected a, got b";
        let r = boot(
            1,
            vec![Event::StepFailed {
                step: "k3s".into(),
                error: err.into(),
            }],
            Outcome::StepFailed {
                step: "k3s".into(),
                error: err.into(),
            },
            &[],
        );
        let v = verdict(&r, 1);
        assert_eq!(v.len(), 1);
        assert!(
            v[0].contains("step k3s failed") && v[0].contains("sha256 mismatch"),
            "{v:?}"
        );
    }

    #[test]
    fn a_reboot_must_skip_every_step_and_download_nothing() {
        let skipped = vec![Event::StepSkipped { step: "k3s".into() }, Event::AllDone];
        assert!(verdict(&boot(2, skipped.clone(), Outcome::AllDone, &[]), 2).is_empty());
        let v = verdict(
            &boot(
                2,
                skipped,
                Outcome::AllDone,
                &["GET /k3s/v1.32.4+k3s1/k3s 200"],
            ),
            2,
        );
        assert!(v.iter().any(|f| f.contains("downloaded again")), "{v:?}");
        let redone = vec![
            Event::StepDone {
                step: "k3s".into(),
                seconds: None,
            },
            Event::AllDone,
        ];
        let v = verdict(&boot(2, redone, Outcome::AllDone, &[]), 2);
        assert!(
            v.iter().any(|f| f.contains("must skip every step")),
            "{v:?}"
        );
    }

    #[test]
    fn deadline_names_the_last_milestone() {
        let r = boot(
            1,
            vec![Event::CloudInitFinished],
            Outcome::Deadline { seconds: 60 },
            &[],
        );
        let v = verdict(&r, 1);
        assert!(
            v[0].contains("deadline of 60s") && v[0].contains("cloud-init finished"),
            "{v:?}"
        );
    }
}
