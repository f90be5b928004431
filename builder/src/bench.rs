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

/// Runs each command once untimed (warm-up: page cache, the member cache), then `runs` rounds
/// of all of them in turn, so that a change in the machine's load hits every side alike.
type Timed<'a> = (&'a str, &'a mut dyn FnMut() -> Command);

fn time_rounds(cmds: &mut [Timed], runs: usize) -> Result<Vec<Vec<Duration>>> {
    let mut out = vec![Vec::with_capacity(runs); cmds.len()];
    for round in 0..=runs {
        for (i, (what, make)) in cmds.iter_mut().enumerate() {
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
            if round > 0 {
                out[i].push(took);
            }
        }
    }
    Ok(out)
}

pub fn run(a: &Args) -> Result<()> {
    let profile = match &a.profile {
        Some(p) => p.clone(),
        None => repo_path("profiles/ameciclo.yaml")?,
    };
    let runs = a.runs.max(3);
    let exe = std::env::current_exe().context("locating kiln")?;
    let daemon = a.daemon.find()?;
    which("cloud-localds")?;
    let tmp = tempfile::tempdir()?;
    // Cold: --no-cache, every bundle member compressed and the schemas checked. Warm: members
    // and the schema verdict from a cache this run fills (its own directory, so the user's
    // cache is neither used nor touched).
    let cache = tmp.path().join("cache");
    let build = |out: &Path, no_cache: bool| {
        let mut c = Command::new(&exe);
        c.arg("build")
            .arg(&profile)
            .arg("-o")
            .arg(out)
            .arg("--firstboot")
            .arg(&daemon)
            .env("KILN_CACHE_DIR", &cache);
        if no_cache {
            c.arg("--no-cache");
        }
        c
    };
    let (out_cold, out_warm) = (tmp.path().join("out-cold"), tmp.path().join("out-warm"));
    // cloud-localds gets kiln's own user-data and meta-data (same bytes cached or not, checked
    // below), from a build made before the timing starts.
    let inputs = tmp.path().join("inputs");
    let o = build(&inputs, true)
        .output()
        .context("cannot run kiln build")?;
    if !o.status.success() {
        bail!("kiln build failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let (ud, md) = (
        inputs.join(crate::render::USER_DATA),
        inputs.join(crate::render::META_DATA),
    );
    let seed = tmp.path().join("localds-seed.img");
    let mut cold = || build(&out_cold, true);
    let mut warm = || build(&out_warm, false);
    let mut localds = || {
        let mut c = Command::new("cloud-localds");
        c.arg("-f").arg("vfat").arg(&seed).arg(&ud).arg(&md);
        c
    };
    // The floor of any `kiln` run: starting the process (the same binary, doing nothing).
    let mut start_only = || {
        let mut c = Command::new(&exe);
        c.arg("--version");
        c
    };
    let times = time_rounds(
        &mut [
            ("kiln build --no-cache", &mut cold),
            ("kiln build (warm cache)", &mut warm),
            ("cloud-localds -f vfat", &mut localds),
            ("kiln --version", &mut start_only),
        ],
        runs,
    )?;
    for name in crate::render::OUTPUTS {
        let (a, b, c) = (out_warm.join(name), out_cold.join(name), inputs.join(name));
        let (a, b, c) = (std::fs::read(&a)?, std::fs::read(&b)?, std::fs::read(&c)?);
        if a != b || b != c {
            bail!("{name} differs between the cached and the uncached builds");
        }
    }
    let [c, w, l, floor] = [0, 1, 2, 3].map(|i| median(times[i].clone()));
    let daemon_size = std::fs::metadata(&daemon).map(|m| m.len()).unwrap_or(0);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("kiln bench: {runs} interleaved rounds, medians of wall time (same machine, same run, same inputs)");
    println!(
        "  kiln build {} (bundle with the {daemon_size}-byte daemon):",
        profile.display()
    );
    println!(
        "    cold (--no-cache: every member compressed, schemas checked) {:>9.2} ms",
        ms(c)
    );
    println!(
        "    warm (members and schema verdict from the cache)          {:>9.2} ms",
        ms(w)
    );
    println!(
        "  cloud-localds -f vfat, seed.img only (kiln's user-data)     {:>9.2} ms",
        ms(l)
    );
    println!(
        "  ratio cloud-localds / kiln build, cold:                     {:>6.1}x",
        ms(l) / ms(c)
    );
    println!(
        "  ratio cloud-localds / kiln build, warm:                     {:>6.1}x (goal >= 10x)",
        ms(l) / ms(w)
    );
    println!(
        "  floor: kiln --version (process start, nothing built)       {:>9.2} ms = {:.1}x",
        ms(floor),
        ms(l) / ms(floor)
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

/// A path inside the source checkout kiln was built from (the default profile).
fn repo_path(rel: &str) -> Result<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    p.canonicalize()
        .with_context(|| format!("cannot find {}", p.display()))
}
