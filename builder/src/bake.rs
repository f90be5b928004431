//! `kiln bake PROFILE --image BASE -o DIR`: a base image with the node's artifacts already in
//! it. The profile is built as `kiln build` does; BASE boots once under QEMU (a copy-on-write
//! overlay) with a bake seed whose cloud-config puts the verified bundle where the bootstrap
//! looks for it, installs kiln-firstboot and its unit (not enabled), runs
//! `kiln-firstboot stage` (every pinned artifact into the verified cache, through the daemon's
//! one download path), then `cloud-init clean --logs` (and the Azure agent's deprovision when
//! present), removes the bake VM's identity (machine-id emptied, SSH host keys, dbus id, credential
//! secret: docs/bake.md "Instance-neutral images") and powers off. The disk becomes `DIR/<name>.qcow2` (standalone) and
//! `DIR/<name>.vhd` (fixed VHD, 1 MiB-aligned, what Azure accepts), listed with their sizes and
//! sha256 in `DIR/build.json`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_plan::{paths, Sha256};
use kiln_qemu::accel;
use kiln_qemu::harness::Session;
use kiln_qemu::image::{self, BaseImage, Boot};
use kiln_qemu::mirror::Mirror;
use kiln_qemu::serial::{Event, Follower};
use kiln_qemu::vm::Vm;

use crate::pipeline::{self, BuildError};
use crate::render;
use crate::{elf, resolve, seed, validate};

pub const USER_DATA_TEMPLATE: &str = include_str!("../templates/bake-user-data.tera");
pub const SCRIPT_TEMPLATE: &str = include_str!("../templates/bake.sh.tera");
pub const FINISH_TEMPLATE: &str = include_str!("../templates/bake-finish.sh.tera");

/// Where the bake cloud-config writes its scripts: tmpfs, so nothing of the bake's own
/// machinery stays in the image.
const BAKE_PATH: &str = "/run/kiln-bake/bake.sh";
const FINISH_PATH: &str = "/run/kiln-bake/finish.sh";
/// The bundle's name on the bake seed (next to user-data and meta-data).
use crate::render::SEED_BUNDLE;
const MIB: u64 = 1 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node profile whose artifacts go into the image.
    pub profile: PathBuf,
    #[command(flatten)]
    pub machine: crate::opts::MachineOpts,
    /// Output directory: <name>.qcow2, <name>.vhd, build.json, the profile's build in build/,
    /// the bake VM's serial log in vm/.
    #[arg(short = 'o', long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub daemon: crate::opts::DaemonOpts,
    /// Give up on the bake boot after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub deadline: u64,
    /// File name of the outputs (default: the node's hostname).
    #[arg(long)]
    pub name: Option<String>,
}

/// One stage of the bake, for progress lines and error messages.
struct Stages {
    n: usize,
    total: usize,
    started: Instant,
}

impl Stages {
    fn next(&mut self, what: &str) {
        self.n += 1;
        eprintln!(
            "kiln bake: [{}/{}] {what} ({:.0}s)",
            self.n,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
    }
}

pub fn run(a: &Args) -> Result<(), BuildError> {
    let started = Instant::now();
    let mut st = Stages {
        n: 0,
        total: 6,
        started,
    };

    st.next(&format!("build {}", a.profile.display()));
    let epoch = render::source_date_epoch()?;
    pipeline::resolve(&a.profile, &resolve::process_env)?;
    let daemon_path = a.daemon.find()?;
    let daemon = elf::load_daemon(&daemon_path)?;
    let (_, rendered) = pipeline::build(&a.profile, &daemon, epoch, &resolve::process_env)?;
    fs::create_dir_all(&a.out)
        .with_context(|| format!("stage build: creating {}", a.out.display()))?;
    let build_dir = a.out.join("build");
    pipeline::write_outputs(&build_dir, &rendered)
        .with_context(|| format!("stage build: writing {}", build_dir.display()))?;
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| rendered.plan.node.hostname.clone());
    if name.is_empty() || name.contains(['/', ' ', ',']) {
        return Err(
            anyhow::anyhow!("--name {name:?}: a plain file name without spaces or commas").into(),
        );
    }

    st.next("bake seed");
    let vm_dir = a.out.join("vm");
    fs::create_dir_all(&vm_dir)
        .with_context(|| format!("stage bake seed: creating {}", vm_dir.display()))?;
    let bundle = rendered.file(render::BUNDLE);
    let user_data = user_data(&rendered.plan.node.hostname, &rendered.bundle_sha256)
        .context("stage bake seed: rendering the bake cloud-config")?;
    let meta_data = format!(
        "instance-id: kiln-bake-{}\nlocal-hostname: kiln-bake\n",
        &rendered.bundle_sha256.to_hex()[..16]
    );
    let seed_img = seed::build_files(
        &[
            ("meta-data", meta_data.as_bytes()),
            ("user-data", user_data.as_bytes()),
            (SEED_BUNDLE, bundle),
        ],
        epoch,
    )
    .context("stage bake seed")?;
    let seed_path = vm_dir.join("bake-seed.img");
    fs::write(&seed_path, &seed_img)
        .with_context(|| format!("stage bake seed: writing {}", seed_path.display()))?;
    fs::write(vm_dir.join("bake-user-data"), &user_data)
        .with_context(|| format!("stage bake seed: writing {}", vm_dir.display()))?;

    st.next(&format!("boot {} and stage the artifacts", a.machine.image));
    let img = image::resolve(&a.machine.image)
        .with_context(|| format!("stage boot: image {}", a.machine.image))?;
    let choice = accel::choose(
        Path::new("qemu-system-x86_64"),
        &vm_dir,
        img.probe_kernel().as_deref(),
    )
    .context("stage boot: choosing the accelerator")?;
    eprintln!(
        "kiln bake: accelerator {} ({})",
        choice.accel, choice.reason
    );
    let mirror = match &a.machine.mirror {
        None => None,
        Some(dir) => {
            if !dir.is_dir() {
                return Err(anyhow::anyhow!("--mirror {}: not a directory", dir.display()).into());
            }
            let m = Mirror::start(dir)
                .with_context(|| format!("starting the mirror for {}", dir.display()))?;
            eprintln!(
                "kiln bake: mirror {} on 127.0.0.1:{} (guest: http://10.0.2.100/)",
                dir.display(),
                m.port()
            );
            Some(m)
        }
    };
    let session = a
        .machine
        .session(
            img.clone(),
            choice.clone(),
            &vm_dir,
            Some(seed_path.clone()),
        )
        .context("stage boot: preparing the overlay")?;
    let boot = boot_to_poweroff(
        &session,
        mirror.as_ref().map(|m| m.port()),
        Duration::from_secs(a.deadline),
    )?;
    let mirror_requests: Vec<String> = mirror
        .as_ref()
        .map(|m| {
            m.requests()
                .into_iter()
                .map(|r| format!("{} /{} {}", r.method, r.path, r.status))
                .collect()
        })
        .unwrap_or_default();
    drop(mirror);
    eprintln!(
        "kiln bake: bake boot powered off after {:.0}s; staged: {}",
        boot.seconds,
        boot.staged
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    st.next(&format!("write {name}.qcow2"));
    let qcow2 = a.out.join(format!("{name}.qcow2"));
    qemu_img(&[
        "convert".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        session.overlay.as_os_str(),
        qcow2.as_os_str(),
    ])
    .with_context(|| {
        format!(
            "stage qcow2: flattening {} into {}",
            session.overlay.display(),
            qcow2.display()
        )
    })?;

    st.next(&format!("write {name}.vhd (fixed, 1 MiB-aligned)"));
    let vhd = a.out.join(format!("{name}.vhd"));
    let virtual_size = write_vhd(&session.overlay, &vhd, &a.out)
        .with_context(|| format!("stage vhd: writing {}", vhd.display()))?;
    // The overlay is over BASE and no longer needed: the outputs stand alone.
    let _ = fs::remove_file(&session.overlay);

    st.next("checksums and build.json");
    let mut outputs = serde_json::Map::new();
    // Both files at once: the host has cores to spare now that the VM is gone.
    let (qsha, vsha) = std::thread::scope(|sc| {
        let q = sc.spawn(|| sha256_file(&qcow2));
        let v = sha256_file(&vhd);
        (q.join().expect("hashing thread"), v)
    });
    let shas = [
        qsha.with_context(|| format!("stage checksums: {}", qcow2.display()))?,
        vsha.with_context(|| format!("stage checksums: {}", vhd.display()))?,
    ];
    for ((kind, path, format), sha) in [("qcow2", &qcow2, "qcow2"), ("vhd", &vhd, "vpc (fixed)")]
        .into_iter()
        .zip(shas)
    {
        let size = fs::metadata(path)
            .with_context(|| format!("stage checksums: {}", path.display()))?
            .len();
        outputs.insert(
            kind.into(),
            serde_json::json!({
                "file": file_name(path),
                "format": format,
                "size": size,
                "virtual-size": virtual_size,
                "sha256": sha.to_hex(),
            }),
        );
    }
    let boot_image = write_boot_files(&img, &name, &a.out)
        .with_context(|| format!("stage build.json: boot files in {}", a.out.display()))?;
    let doc = serde_json::json!({
        "kiln": env!("CARGO_PKG_VERSION"),
        "profile": a.profile.display().to_string(),
        "hostname": rendered.plan.node.hostname,
        "base-image": {
            "spec": a.machine.image,
            "disk": img.disk.display().to_string(),
            "boot": match img.boot { Boot::DirectKernel { .. } => "direct-kernel", Boot::Firmware => "firmware" },
        },
        "bundle": {"sha256": rendered.bundle_sha256.to_hex(), "path": paths::BUNDLE_TARBALL},
        "staged": boot.staged.iter().map(|s| serde_json::json!({
            "name": s.name, "step": s.step, "digest": format!("{}:{}", s.algorithm, s.hex), "size": s.size,
            "path": format!("{}/{}", paths::CACHE_DIR, s.hex),
        })).collect::<Vec<_>>(),
        "bake-boot": {
            "seconds": boot.seconds,
            "accel": choice,
            "mirror-requests": mirror_requests,
            "serial-log": boot.serial_log.strip_prefix(&a.out).unwrap_or(&boot.serial_log).display().to_string(),
        },
        "outputs": outputs,
        "boot-image": boot_image,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let build_json = a.out.join("build.json");
    let mut bytes = serde_json::to_vec_pretty(&doc).context("build.json")?;
    bytes.push(b'\n');
    fs::write(&build_json, bytes)
        .with_context(|| format!("stage build.json: writing {}", build_json.display()))?;

    println!(
        "kiln: baked {} into {} in {:.0}s",
        rendered.plan.node.hostname,
        a.out.display(),
        started.elapsed().as_secs_f64()
    );
    for (kind, o) in &outputs {
        println!(
            "  {:<6} {:<24} {:>12} bytes  sha256 {}",
            kind,
            o["file"].as_str().unwrap_or(""),
            o["size"],
            o["sha256"].as_str().unwrap_or("")
        );
    }
    for s in &boot.staged {
        println!("  staged {:<32} {}:{}", s.name, s.algorithm, s.hex);
    }
    Ok(())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn tera(template: &str, ctx: &tera::Context) -> Result<String> {
    tera::Tera::one_off(template, ctx, false).context("rendering a bake template")
}

/// The bake cloud-config (no secrets: it carries only paths and the bundle's pin).
pub fn user_data(hostname: &str, bundle_sha256: &Sha256) -> Result<String> {
    let mut ctx = tera::Context::new();
    ctx.insert("kiln_version", env!("CARGO_PKG_VERSION"));
    ctx.insert("hostname", hostname);
    ctx.insert("bake_path", BAKE_PATH);
    ctx.insert("finish_path", FINISH_PATH);
    ctx.insert("seed_bundle", SEED_BUNDLE);
    ctx.insert("bundle_tarball", paths::BUNDLE_TARBALL);
    ctx.insert("bundle_sha256", &bundle_sha256.to_hex());
    ctx.insert("state_dir", paths::STATE_DIR);
    ctx.insert("daemon", paths::DAEMON_BIN);
    ctx.insert("unit", paths::UNIT);
    let script = tera(SCRIPT_TEMPLATE, &ctx)?;
    let finish = tera(FINISH_TEMPLATE, &ctx)?;
    ctx.insert("bake_script", &crate::render::indent(&script, 6));
    ctx.insert("finish_script", &crate::render::indent(&finish, 6));
    let ud = tera(USER_DATA_TEMPLATE, &ctx)?;
    validate::cloud_config(&ud).context("the bake cloud-config fails the cloud-init schema")?;
    Ok(ud)
}

/// One artifact the guest reported staged (`kiln-stage: staged ...` on the console).
#[derive(Debug, Clone, PartialEq)]
pub struct StagedLine {
    pub name: String,
    pub step: String,
    /// `sha256` or `sha512`: the pin's algorithm (the cache file is named by `hex`).
    pub algorithm: String,
    pub hex: String,
    pub size: u64,
}

/// Parses `kiln-stage: staged NAME for STEP ALGORITHM HEX N bytes (SOURCE)`.
pub fn parse_staged(line: &str) -> Option<StagedLine> {
    let rest = &line[line.find("kiln-stage: staged ")? + "kiln-stage: staged ".len()..];
    let w: Vec<&str> = rest.split_whitespace().collect();
    if w.len() < 7 || w[1] != "for" || !matches!(w[3], "sha256" | "sha512") || w[6] != "bytes" {
        return None;
    }
    Some(StagedLine {
        name: w[0].into(),
        step: w[2].into(),
        algorithm: w[3].into(),
        hex: w[4].into(),
        size: w[5].parse().ok()?,
    })
}

pub struct BakeBoot {
    pub seconds: f64,
    pub staged: Vec<StagedLine>,
    pub serial_log: PathBuf,
}

/// The last `n` lines of the serial log, for error messages.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..]
        .iter()
        .map(|l| format!("    | {}", l.trim_end_matches('\r')))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Boots the session's disk with the bake seed and waits until the guest powers off (QEMU
/// exits), the bake script reports a failure, or the deadline passes. Success needs all of:
/// QEMU exited, the script said OK, cloud-init was cleaned, no stage failed.
pub fn boot_to_poweroff(
    session: &Session,
    mirror_port: Option<u16>,
    deadline: Duration,
) -> Result<BakeBoot> {
    let bootdir = session.outdir.join("boot-1");
    fs::create_dir_all(&bootdir).with_context(|| format!("creating {}", bootdir.display()))?;
    let cfg = session.vm_config(&bootdir, mirror_port);
    let serial_log = cfg.serial_log.clone();
    let mut vm = Vm::start(cfg).context("stage boot: starting QEMU")?;
    let mut follower = Follower::open(&serial_log, vm.started, None)?;
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.enable_steady_tick(Duration::from_millis(200));
    let until = vm.started + deadline;
    let mut seen = 0usize;
    let mut last = String::from("starting QEMU");
    let mut ok = false;
    let mut cleaned = false;
    let mut neutral = false;
    let mut staged: Vec<StagedLine> = Vec::new();
    let fail = |vm: &mut Vm, why: String| -> anyhow::Error {
        let _ = vm.kill();
        anyhow::anyhow!(
            "stage boot: {why}\n  serial log {} (last lines):\n{}",
            serial_log.display(),
            tail(&serial_log, 25)
        )
    };
    loop {
        for e in follower.poll()? {
            if let Event::Fatal { text } = &e.event {
                spinner.finish_and_clear();
                return Err(fail(&mut vm, format!("the guest died: {text}")));
            }
            last = e.event.label();
        }
        // The bake's own lines (`kiln-bake:`, `kiln-stage:`) are not daemon milestones: read
        // them from the log text.
        let text = String::from_utf8_lossy(&fs::read(&serial_log).unwrap_or_default()).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        for l in lines.iter().skip(seen) {
            if let Some(i) = l.find("kiln-bake: ") {
                let msg = l[i + "kiln-bake: ".len()..].trim_end();
                spinner.suspend(|| eprintln!("kiln bake: guest: {msg}"));
                last = msg.to_string();
                if msg.starts_with("FAILED") {
                    spinner.finish_and_clear();
                    return Err(fail(&mut vm, format!("the bake script failed: {msg}")));
                }
                if msg.starts_with("OK: staged") {
                    ok = true;
                }
                if msg.starts_with("cloud-init clean --logs done") {
                    cleaned = true;
                }
                if msg.starts_with("instance identity removed") {
                    neutral = true;
                }
            }
            if let Some(s) = parse_staged(l) {
                spinner.suspend(|| {
                    eprintln!(
                        "kiln bake: guest: staged {} {}:{}",
                        s.name, s.algorithm, s.hex
                    )
                });
                if !staged.iter().any(|x| x.name == s.name) {
                    staged.push(s);
                }
            }
        }
        // The last line may be incomplete; read it again next time.
        seen = lines
            .len()
            .saturating_sub(usize::from(!text.ends_with('\n')));
        if let Some(status) = vm.try_wait()? {
            spinner.finish_and_clear();
            let seconds = vm.started.elapsed().as_secs_f64();
            if !ok || !cleaned || !neutral {
                bail!(
                    "stage boot: QEMU exited ({status}) before the bake finished ({}): {}\n  serial log {} (last lines):\n{}",
                    if !ok {
                        "no OK from the bake script"
                    } else if !cleaned {
                        "cloud-init was not cleaned"
                    } else {
                        "the instance identity was not removed"
                    },
                    vm.qemu_stderr().trim(),
                    serial_log.display(),
                    tail(&serial_log, 25)
                );
            }
            return Ok(BakeBoot {
                seconds,
                staged,
                serial_log,
            });
        }
        if Instant::now() >= until {
            spinner.finish_and_clear();
            return Err(fail(
                &mut vm,
                format!(
                    "the guest did not power off within the {}s deadline (last: {last})",
                    deadline.as_secs()
                ),
            ));
        }
        spinner.set_message(format!(
            "bake boot {:.0}s: {last}",
            vm.started.elapsed().as_secs_f64()
        ));
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .context("running qemu-img")?;
    if !out.status.success() {
        bail!(
            "qemu-img {} failed: {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// `qemu-img info`'s virtual size of `path`.
pub fn virtual_size(path: &Path, format: &str) -> Result<u64> {
    let out = qemu_img(&[
        "info".as_ref(),
        "--output".as_ref(),
        "json".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        path.as_os_str(),
    ])?;
    let v: serde_json::Value = serde_json::from_slice(&out).context("qemu-img info output")?;
    v["virtual-size"]
        .as_u64()
        .with_context(|| format!("qemu-img info {}: no virtual-size", path.display()))
}

/// Virtual size rounded up to a whole MiB: Azure takes only fixed VHDs whose virtual size is a
/// multiple of 1 MiB.
pub fn aligned_size(size: u64) -> u64 {
    size.div_ceil(MIB) * MIB
}

/// Writes `src` (qcow2, any backing chain) as a fixed VHD of a 1 MiB-aligned virtual size,
/// through a raw copy when the size needs rounding up. Returns the virtual size.
pub fn write_vhd(src: &Path, vhd: &Path, tmpdir: &Path) -> Result<u64> {
    let size = virtual_size(src, "qcow2")?;
    let aligned = aligned_size(size);
    let partial = vhd.with_extension("vhd.partial");
    let _ = fs::remove_file(&partial);
    let (input, input_format, raw) = if aligned == size {
        (src.to_path_buf(), "qcow2", None)
    } else {
        let raw = tmpdir.join(".bake-resize.raw");
        let _ = fs::remove_file(&raw);
        qemu_img(&[
            "convert".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            src.as_os_str(),
            raw.as_os_str(),
        ])?;
        qemu_img(&[
            "resize".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            raw.as_os_str(),
            aligned.to_string().as_ref(),
        ])?;
        (raw.clone(), "raw", Some(raw))
    };
    let r = qemu_img(&[
        "convert".as_ref(),
        "-f".as_ref(),
        input_format.as_ref(),
        "-O".as_ref(),
        "vpc".as_ref(),
        "-o".as_ref(),
        "subformat=fixed,force_size".as_ref(),
        input.as_os_str(),
        partial.as_os_str(),
    ]);
    if let Some(raw) = raw {
        let _ = fs::remove_file(raw);
    }
    r?;
    // A fixed VHD is the raw disk plus a 512-byte footer; anything else would be refused.
    let len = fs::metadata(&partial)
        .with_context(|| format!("reading {}", partial.display()))?
        .len();
    if len != aligned + 512 {
        let _ = fs::remove_file(&partial);
        bail!(
            "{}: {len} bytes, expected {} (virtual size {aligned} + 512-byte footer)",
            partial.display(),
            aligned + 512
        );
    }
    fs::rename(&partial, vhd)
        .with_context(|| format!("renaming {} to {}", partial.display(), vhd.display()))?;
    Ok(aligned)
}

/// sha256 of a disk image. Images are gigabytes (a fixed VHD is its whole virtual size), so
/// coreutils' `sha256sum` (hardware SHA extensions) does it when present: sha2 in a debug build
/// takes minutes for 4 GiB. Falls back to sha2, streamed.
pub fn sha256_file(path: &Path) -> Result<Sha256> {
    if let Ok(out) = Command::new("sha256sum").arg("-b").arg(path).output() {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            let hex = text.split_whitespace().next().unwrap_or("");
            return hex
                .parse()
                .map_err(|e| anyhow::anyhow!("sha256sum {}: {e}", path.display()));
        }
    }
    crate::publish::vhd::hash_file(path)
}

/// A base booted by direct kernel (the test image has no bootloader) needs its kernel and
/// initrd to boot the baked disk too: they are copied next to it with an `image.json`, so
/// `kiln qemu test --image DIR` boots the baked image. Returns what was written (null for a
/// firmware-booted base, whose disk boots by itself).
fn write_boot_files(img: &BaseImage, name: &str, out: &Path) -> Result<serde_json::Value> {
    let Boot::DirectKernel {
        kernel,
        initrd,
        cmdline,
    } = &img.boot
    else {
        return Ok(serde_json::Value::Null);
    };
    let manifest_path = img
        .disk
        .parent()
        .map(|d| d.join("image.json"))
        .context("base image has no directory")?;
    let mut manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?,
    )
    .with_context(|| format!("parsing {}", manifest_path.display()))?;
    for (src, key) in [(kernel, "kernel"), (initrd, "initrd")] {
        let dst = out.join(file_name(src));
        fs::copy(src, &dst)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        manifest[key] = file_name(src).into();
    }
    manifest["name"] = name.into();
    manifest["disk"] = format!("{name}.qcow2").into();
    manifest["cmdline"] = cmdline.clone().into();
    let p = out.join("image.json");
    fs::write(&p, serde_json::to_vec_pretty(&manifest)?)
        .with_context(|| format!("writing {}", p.display()))?;
    Ok(serde_json::json!({
        "image-json": "image.json",
        "kernel": manifest["kernel"],
        "initrd": manifest["initrd"],
        "cmdline": cmdline,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_checksum_matches_sha2() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let data: Vec<u8> = (0..3_000_001u32).map(|i| (i % 253) as u8).collect();
        fs::write(&p, &data).unwrap();
        let want = Sha256::from_bytes(sha2::Sha256::digest(&data).into());
        assert_eq!(sha256_file(&p).unwrap(), want);
        assert!(sha256_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn sizes_round_up_to_whole_mebibytes() {
        assert_eq!(aligned_size(4 << 30), 4 << 30);
        assert_eq!(aligned_size((4 << 30) + 1), (4 << 30) + MIB);
        assert_eq!(aligned_size(MIB - 512), MIB);
        assert_eq!(aligned_size(0), 0);
    }

    #[test]
    fn staged_lines_are_parsed_from_the_console() {
        let s = parse_staged("[  80.1] kiln-stage: staged k3s for k3s sha256 123ae128c3eec7c47463d10d30ebec45a9adefee8837785b67905f868249520c 24112 bytes (fetched)\r").unwrap();
        assert_eq!(s.name, "k3s");
        assert_eq!(s.step, "k3s");
        assert_eq!(s.size, 24112);
        assert_eq!(s.algorithm, "sha256");
        assert!(s.hex.starts_with("123ae128"));
        assert!(parse_staged("kiln-stage: staged garbage").is_none());
        assert!(parse_staged("kiln: step k3s done").is_none());
    }

    #[test]
    fn bake_cloud_config_passes_the_schema_and_carries_no_user() {
        let sha = Sha256::digest(b"bundle");
        let ud = user_data("node1", &sha).unwrap();
        assert!(ud.starts_with("#cloud-config\n"));
        let doc: serde_yaml::Value = serde_yaml::from_str(&ud).unwrap();
        assert_eq!(doc["users"], serde_yaml::Value::String(String::new()));
        let files = doc["write_files"].as_sequence().unwrap();
        let script = files[0]["content"].as_str().unwrap();
        // The bundle lands where the bootstrap's url delivery looks first, checked by its pin.
        assert!(script.contains(&format!("tarball={}", paths::BUNDLE_TARBALL)));
        assert!(script.contains(&sha.to_hex()));
        assert!(script.contains("stage --plan"));
        assert!(
            !script.contains("systemctl enable"),
            "the unit must stay disabled"
        );
        let finish = files[1]["content"].as_str().unwrap();
        assert!(finish.contains("cloud-init clean --logs"));
        assert!(finish.contains("waagent -deprovision+user -force"));
        // Instance-neutral: machine-id truncated (never deleted), host keys and dbus id gone.
        assert!(finish.contains(": >/etc/machine-id"));
        assert!(!finish.contains("rm -f /etc/machine-id"));
        let commands: Vec<&str> = finish
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert!(
            !commands.iter().any(|l| l.contains("--machine-id")),
            "cloud-init 22.4's clean --machine-id deletes the file"
        );
        assert!(finish.contains("/etc/ssh/ssh_host_*"));
        assert!(finish.contains("/var/lib/dbus/machine-id"));
        assert!(finish.contains("systemctl poweroff"));
        // Both scripts are valid POSIX sh.
        for s in [script, finish] {
            let tmp = tempfile::NamedTempFile::new().unwrap();
            fs::write(tmp.path(), s).unwrap();
            let st = Command::new("sh")
                .arg("-n")
                .arg(tmp.path())
                .status()
                .unwrap();
            assert!(st.success(), "sh -n fails:\n{s}");
        }
    }

    #[test]
    fn vhd_is_fixed_and_aligned_even_from_an_odd_size() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("d.qcow2");
        // 3 MiB + 4 KiB: not a whole number of MiB.
        qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            q.as_os_str(),
            ((3 << 20) + 4096).to_string().as_ref(),
        ])
        .unwrap();
        let vhd = dir.path().join("d.vhd");
        let size = write_vhd(&q, &vhd, dir.path()).unwrap();
        assert_eq!(size, 4 << 20);
        assert_eq!(fs::metadata(&vhd).unwrap().len(), (4 << 20) + 512);
        // A fixed VHD has only a footer, so qemu-img's probe calls it raw; read it as vpc.
        let info = qemu_img(&[
            "info".as_ref(),
            "--output".as_ref(),
            "json".as_ref(),
            "-f".as_ref(),
            "vpc".as_ref(),
            vhd.as_os_str(),
        ])
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&info).unwrap();
        assert_eq!(v["format"], "vpc");
        assert_eq!(v["virtual-size"], 4 << 20);
        // The footer says "fixed" (disk type 2) and carries the "conectix" cookie.
        let bytes = fs::read(&vhd).unwrap();
        let footer = &bytes[bytes.len() - 512..];
        assert_eq!(&footer[..8], b"conectix");
        assert_eq!(u32::from_be_bytes(footer[60..64].try_into().unwrap()), 2);
        assert!(!dir.path().join(".bake-resize.raw").exists());
    }
}
