//! `kiln bench`: `kiln build` of the reference profile against Debian's `cloud-localds` making
//! only the NoCloud seed, timed in the same run on the same machine; prints the ratio.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Profile to build (default: the reference profile, profiles/ameciclo.yaml).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Static kiln-firstboot to bundle (default: found like `kiln build` does).
    #[arg(long)]
    pub firstboot: Option<PathBuf>,
    /// Timed runs of each side (after one warm-up run each).
    #[arg(long, default_value_t = 15)]
    pub runs: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time_cmd(mut make: impl FnMut() -> Command, runs: usize, what: &str) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(runs);
    for i in 0..=runs {
        let mut cmd = make();
        let start = Instant::now();
        let o = cmd.output().with_context(|| format!("cannot run {what}"))?;
        let took = start.elapsed();
        if !o.status.success() {
            bail!(
                "{what} failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        if i > 0 {
            out.push(took);
        }
    }
    Ok(out)
}

pub fn run(a: &Args) -> Result<()> {
    let profile = match &a.profile {
        Some(p) => p.clone(),
        None => crate::cli::repo_path("profiles/ameciclo.yaml")?,
    };
    let runs = a.runs.max(3);
    let exe = std::env::current_exe().context("locating kiln")?;
    let daemon = crate::elf::find_daemon(a.firstboot.as_deref())?;
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("out");
    let kiln = time_cmd(
        || {
            let mut c = Command::new(&exe);
            c.arg("build")
                .arg(&profile)
                .arg("-o")
                .arg(&out)
                .arg("--firstboot")
                .arg(&daemon);
            c
        },
        runs,
        "kiln build",
    )?;
    // The same build with a 132-byte static stand-in for the daemon: everything kiln renders
    // (cloud-config, schemas, seed, bundle, build.json) minus compressing the real daemon.
    let tiny = tmp.path().join("tiny-firstboot");
    std::fs::write(&tiny, crate::elf::tiny_static_elf())?;
    let out_tiny = tmp.path().join("out-tiny");
    let kiln_tiny = time_cmd(
        || {
            let mut c = Command::new(&exe);
            c.arg("build")
                .arg(&profile)
                .arg("-o")
                .arg(&out_tiny)
                .arg("--firstboot")
                .arg(&tiny);
            c
        },
        runs,
        "kiln build (stand-in daemon)",
    )?;
    let (ud, md) = (out.join("user-data"), out.join("meta-data"));
    let seed = tmp.path().join("localds-seed.img");
    which("cloud-localds")?;
    let localds = time_cmd(
        || {
            let mut c = Command::new("cloud-localds");
            c.arg(&seed).arg(&ud).arg(&md);
            c
        },
        runs,
        "cloud-localds",
    )?;
    let (k, kt, l) = (median(kiln), median(kiln_tiny), median(localds));
    let daemon_size = std::fs::metadata(&daemon).map(|m| m.len()).unwrap_or(0);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("kiln bench: {runs} runs each, medians (same machine, same run)");
    println!("  kiln build {}:", profile.display());
    println!(
        "    all outputs, bundle with the {daemon_size}-byte daemon          {:>9.2} ms",
        ms(k)
    );
    println!(
        "    all outputs, bundle with a 132-byte stand-in daemon    {:>9.2} ms",
        ms(kt)
    );
    println!(
        "  cloud-localds, seed.img only (kiln's user-data/meta-data) {:>9.2} ms",
        ms(l)
    );
    println!(
        "  ratio cloud-localds / kiln build:                        {:>6.1}x (goal >= 10x)",
        ms(l) / ms(k)
    );
    println!(
        "  ratio without compressing the daemon (stand-in):         {:>6.1}x",
        ms(l) / ms(kt)
    );
    Ok(())
}

fn which(cmd: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = Path::new(&dir).join(cmd);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{cmd} not found on PATH (Debian package cloud-image-utils; .ci/install-deps installs it)"
    )
}
