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
    #[command(flatten)]
    pub daemon: crate::opts::DaemonOpts,
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
    let daemon = a.daemon.find()?;
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("out");
    // Cold: every bundle member compressed again. Warm: the members come from a member cache
    // this run filled (its own directory, so the user's cache is neither used nor touched).
    let cache = tmp.path().join("cache");
    let build = |out: &Path, daemon: &Path, no_cache: bool| {
        let mut c = Command::new(&exe);
        c.arg("build")
            .arg(&profile)
            .arg("-o")
            .arg(out)
            .arg("--firstboot")
            .arg(daemon)
            .env("KILN_CACHE_DIR", &cache);
        if no_cache {
            c.arg("--no-cache");
        }
        c
    };
    let out_cold = tmp.path().join("out-cold");
    let cold = time_cmd(
        || build(&out_cold, &daemon, true),
        runs,
        "kiln build --no-cache",
    )?;
    let warm = time_cmd(
        || build(&out, &daemon, false),
        runs,
        "kiln build (warm cache)",
    )?;
    for name in [
        crate::render::BUNDLE,
        crate::render::SEED,
        crate::render::USER_DATA,
    ] {
        let (a, b) = (out.join(name), out_cold.join(name));
        if std::fs::read(&a)? != std::fs::read(&b)? {
            bail!("{name} differs between the cached and the uncached build");
        }
    }
    let (ud, md) = (out.join("user-data"), out.join("meta-data"));
    let seed = tmp.path().join("localds-seed.img");
    which("cloud-localds")?;
    let localds = time_cmd(
        || {
            let mut c = Command::new("cloud-localds");
            c.arg("-f").arg("vfat").arg(&seed).arg(&ud).arg(&md);
            c
        },
        runs,
        "cloud-localds -f vfat",
    )?;
    let (c, w, l) = (median(cold), median(warm), median(localds));
    let daemon_size = std::fs::metadata(&daemon).map(|m| m.len()).unwrap_or(0);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("kiln bench: {runs} runs each, medians (same machine, same run, same inputs)");
    println!(
        "  kiln build {} (bundle with the {daemon_size}-byte daemon):",
        profile.display()
    );
    println!(
        "    cold (--no-cache: every bundle member compressed)       {:>9.2} ms",
        ms(c)
    );
    println!(
        "    warm (compressed members from the member cache)         {:>9.2} ms",
        ms(w)
    );
    println!(
        "  cloud-localds -f vfat, seed.img only (kiln's user-data)   {:>9.2} ms",
        ms(l)
    );
    println!(
        "  ratio cloud-localds / kiln build, cold:                   {:>6.1}x",
        ms(l) / ms(c)
    );
    println!(
        "  ratio cloud-localds / kiln build, warm:                   {:>6.1}x (goal >= 10x)",
        ms(l) / ms(w)
    );
    println!("  outputs identical with and without the cache: yes");
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
