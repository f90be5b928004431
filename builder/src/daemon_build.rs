//! The static daemon from kiln's own source checkout: `kiln build` on a fresh clone works with
//! no other command run first. When kiln runs from the checkout it was compiled in (its
//! compile-time `CARGO_MANIFEST_DIR` still holds the workspace) and the static
//! `kiln-firstboot` is missing or older than its sources, kiln runs the same build as
//! `cargo firstboot-static` (the alias in `.cargo/config.toml`, so there is one definition of
//! the static build) into the target directory kiln itself was built in, showing cargo's
//! progress, and uses the result. A kiln installed without its sources only looks for the
//! daemon, as before; `--firstboot PATH` always wins.
//!
//! Why not a build script that builds and embeds the daemon: a nested cargo inside the build of
//! the same workspace waits on the build-directory lock its parent holds (or needs a second
//! target dir and a second copy of every dependency), and clippy, `cargo test` and every
//! `cargo check` of the builder would pay for a release build of the daemon.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context, Result};

/// The target triple and profile `cargo firstboot-static` builds for.
pub const STATIC_TRIPLE_DIR: &str = "x86_64-unknown-linux-gnu/release";
const DAEMON: &str = "kiln-firstboot";
/// What the static daemon is built from, relative to the workspace.
const DAEMON_SOURCES: &[&str] = &[
    "firstboot/src",
    "firstboot/Cargo.toml",
    "firstboot/plan/src",
    "firstboot/plan/Cargo.toml",
    "Cargo.lock",
    "Cargo.toml",
    ".cargo/config.toml",
];

/// A kiln source checkout with a target directory to build the daemon in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    pub workspace: PathBuf,
    pub target_dir: PathBuf,
}

impl Checkout {
    /// The checkout this kiln was compiled from, if it is still there and whole; the target
    /// directory is the one holding the running executable when that is a cargo target dir.
    pub fn of_this_build() -> Option<Checkout> {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()?
            .to_path_buf();
        let exe = std::env::current_exe().ok()?;
        let env_target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from);
        Checkout::at(&workspace, &exe, env_target)
    }

    /// `workspace` if it holds the workspace manifest, the daemon's crate and the cargo alias.
    /// The target dir: the one `exe` was built into (`<dir>/{release,debug}/kiln`, `<dir>`
    /// tagged by cargo's CACHEDIR.TAG), else `env_target` (CARGO_TARGET_DIR), else
    /// `<workspace>/target`.
    pub fn at(workspace: &Path, exe: &Path, env_target: Option<PathBuf>) -> Option<Checkout> {
        let whole = ["Cargo.toml", "firstboot/Cargo.toml", ".cargo/config.toml"]
            .iter()
            .all(|f| workspace.join(f).is_file());
        if !whole {
            return None;
        }
        let from_exe = exe
            .parent()
            .and_then(Path::parent)
            .filter(|d| d.join("CACHEDIR.TAG").is_file())
            .map(Path::to_path_buf);
        let target_dir = from_exe
            .or(env_target)
            .unwrap_or_else(|| workspace.join("target"));
        Some(Checkout {
            workspace: workspace.to_path_buf(),
            target_dir,
        })
    }

    /// Where `cargo firstboot-static` puts the daemon in this target dir.
    pub fn daemon_path(&self) -> PathBuf {
        self.target_dir.join(STATIC_TRIPLE_DIR).join(DAEMON)
    }

    /// True when `daemon` is missing or older than a source it is built from (the daemon's and
    /// the plan crate's sources and manifests, the lock file, the workspace manifest with the
    /// release profile, the cargo config that defines the static build). Tests are not sources.
    pub fn is_stale(&self, daemon: &Path) -> bool {
        let Ok(built) = daemon.metadata().and_then(|m| m.modified()) else {
            return true;
        };
        let mut newest = SystemTime::UNIX_EPOCH;
        for p in DAEMON_SOURCES {
            newest_mtime(&self.workspace.join(p), &mut newest);
        }
        newest > built
    }

    /// The static build, as `cargo firstboot-static` with this target dir. RUSTFLAGS from the
    /// environment would replace the alias's `+crt-static` (cargo takes the environment
    /// first), so they are not passed on.
    pub fn command(&self) -> Command {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut c = Command::new(cargo);
        c.current_dir(&self.workspace)
            .arg("firstboot-static")
            .arg("--target-dir")
            .arg(&self.target_dir)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR");
        c
    }

    /// Runs [`Checkout::command`] with cargo's progress on stderr; the daemon's path after.
    pub fn build(&self) -> Result<PathBuf> {
        let started = Instant::now();
        eprintln!(
            "kiln: building the static kiln-firstboot from {} (cargo firstboot-static --target-dir {}); \
             once per checkout, a few minutes the first time",
            self.workspace.display(),
            self.target_dir.display()
        );
        let status = self
            .command()
            .status()
            .context("running cargo (is it on PATH?) for the static kiln-firstboot build")?;
        if !status.success() {
            bail!(
                "the static kiln-firstboot build failed ({status}); its errors are above. \
                 Run `cargo firstboot-static` in {} to retry, or pass --firstboot PATH",
                self.workspace.display()
            );
        }
        let path = self.daemon_path();
        if !path.is_file() {
            bail!(
                "cargo firstboot-static succeeded but left no {}",
                path.display()
            );
        }
        // cargo leaves an up-to-date binary alone when only files that do not reach it changed
        // (a comment in Cargo.toml, a new builder dependency): mark it checked, so the next run
        // does not ask cargo again.
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(SystemTime::now()))
            .with_context(|| format!("marking {} as up to date", path.display()))?;
        eprintln!(
            "kiln: built {} in {:.0}s",
            path.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(path)
    }
}

/// Where the daemon comes from: `--firstboot PATH`, else [`locate`] (next
/// to `kiln`, the source checkout's static build, built on first use, or the static build
/// directory beside kiln's own).
pub fn find_daemon(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("cannot locate the running kiln executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let checkout = Checkout::of_this_build();
    locate(dir, checkout.as_ref(), &|c| c.build())
}

/// The daemon lookup (without `--firstboot`), in order:
/// 1. a static `kiln-firstboot` next to `kiln` (a packaged install);
/// 2. in a source checkout: its static build, run through `build` first when it is missing or
///    older than its sources;
/// 3. the static build directory beside kiln's own (`<exe_dir>/../x86_64-unknown-linux-gnu/release`).
pub fn locate(
    exe_dir: &Path,
    checkout: Option<&Checkout>,
    build: &dyn Fn(&Checkout) -> Result<PathBuf>,
) -> Result<PathBuf> {
    let beside = exe_dir.join(DAEMON);
    if crate::elf::is_static_file(&beside) {
        return Ok(beside);
    }
    if let Some(c) = checkout {
        let p = c.daemon_path();
        if !c.is_stale(&p) && crate::elf::is_static_file(&p) {
            return Ok(p);
        }
        return build(c);
    }
    let built = exe_dir.join("..").join(STATIC_TRIPLE_DIR).join(DAEMON);
    if crate::elf::is_static_file(&built) {
        return Ok(built);
    }
    bail!(
        "no static kiln-firstboot found (tried {}, {}) and this kiln runs outside its source \
         checkout, so it cannot build one; build it with `cargo firstboot-static` in a kiln \
         checkout or pass --firstboot PATH",
        beside.display(),
        built.display()
    )
}

fn newest_mtime(p: &Path, newest: &mut SystemTime) {
    let Ok(meta) = p.symlink_metadata() else {
        return;
    };
    if meta.is_dir() {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            newest_mtime(&e.path(), newest);
        }
    } else if let Ok(m) = meta.modified() {
        *newest = (*newest).max(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn workspace(dir: &Path) {
        for f in [
            "Cargo.toml",
            "Cargo.lock",
            "firstboot/Cargo.toml",
            ".cargo/config.toml",
        ] {
            let p = dir.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, "").unwrap();
        }
    }

    #[test]
    fn a_checkout_needs_the_workspace_the_daemon_crate_and_the_alias() {
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("bin/kiln");
        assert_eq!(Checkout::at(d.path(), &exe, None), None);
        workspace(d.path());
        fs::remove_file(d.path().join(".cargo/config.toml")).unwrap();
        assert_eq!(Checkout::at(d.path(), &exe, None), None);
    }

    #[test]
    fn the_target_dir_is_the_one_kiln_was_built_in_else_cargo_target_dir_else_target() {
        let d = tempfile::tempdir().unwrap();
        workspace(d.path());
        let tgt = d.path().join("elsewhere/tgt");
        fs::create_dir_all(tgt.join("release")).unwrap();
        fs::write(
            tgt.join("CACHEDIR.TAG"),
            "Signature: 8a477f597d28d172789f06886806bc55",
        )
        .unwrap();
        let c = Checkout::at(d.path(), &tgt.join("release/kiln"), Some("/env".into())).unwrap();
        assert_eq!(c.target_dir, tgt);
        assert_eq!(
            c.daemon_path(),
            tgt.join("x86_64-unknown-linux-gnu/release/kiln-firstboot")
        );
        // Not in a cargo target dir (installed, or a test binary in target/debug/deps).
        let other = d.path().join("bin/kiln");
        let c = Checkout::at(d.path(), &other, Some("/env".into())).unwrap();
        assert_eq!(c.target_dir, PathBuf::from("/env"));
        let c = Checkout::at(d.path(), &other, None).unwrap();
        assert_eq!(c.target_dir, d.path().join("target"));
    }

    #[test]
    fn a_daemon_older_than_a_source_file_is_stale() {
        let d = tempfile::tempdir().unwrap();
        workspace(d.path());
        let src = d.path().join("firstboot/src/main.rs");
        fs::create_dir_all(src.parent().unwrap()).unwrap();
        fs::write(&src, "fn main() {}").unwrap();
        let c = Checkout::at(d.path(), Path::new("/nowhere/kiln"), None).unwrap();
        let daemon = c.daemon_path();
        assert!(c.is_stale(&daemon), "a missing daemon is stale");
        fs::create_dir_all(daemon.parent().unwrap()).unwrap();
        fs::write(&daemon, b"x").unwrap();
        let now = SystemTime::now();
        let set = |p: &Path, t: SystemTime| {
            fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap()
        };
        for f in [
            "Cargo.toml",
            "Cargo.lock",
            "firstboot/Cargo.toml",
            ".cargo/config.toml",
        ] {
            set(&d.path().join(f), now - std::time::Duration::from_secs(60));
        }
        set(&src, now - std::time::Duration::from_secs(60));
        set(&daemon, now);
        assert!(!c.is_stale(&daemon));
        let test = d.path().join("firstboot/tests/t.rs");
        fs::create_dir_all(test.parent().unwrap()).unwrap();
        fs::write(&test, "").unwrap();
        set(&test, now + std::time::Duration::from_secs(5));
        assert!(!c.is_stale(&daemon), "a test is not a source of the binary");
        set(&src, now + std::time::Duration::from_secs(5));
        assert!(
            c.is_stale(&daemon),
            "an edited daemon source makes it stale"
        );
    }

    #[test]
    fn the_build_command_is_the_alias_with_the_target_dir_and_without_rustflags() {
        let c = Checkout {
            workspace: "/src/kiln".into(),
            target_dir: "/src/kiln/target".into(),
        };
        let cmd = c.command();
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(
            args,
            ["firstboot-static", "--target-dir", "/src/kiln/target"]
        );
        assert_eq!(cmd.get_current_dir(), Some(Path::new("/src/kiln")));
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert!(removed.contains(&"RUSTFLAGS".to_string()), "{removed:?}");
    }

    fn static_at(p: &Path) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, crate::elf::tiny_static_elf()).unwrap();
    }

    /// A build that does what cargo firstboot-static does to the file system, and counts.
    fn counting_build(calls: &std::cell::Cell<u32>) -> impl Fn(&Checkout) -> Result<PathBuf> + '_ {
        move |c: &Checkout| {
            calls.set(calls.get() + 1);
            static_at(&c.daemon_path());
            Ok(c.daemon_path())
        }
    }

    #[test]
    fn a_fresh_checkout_builds_the_daemon_once_then_reuses_it_until_a_source_changes() {
        let d = tempfile::tempdir().unwrap();
        workspace(d.path());
        let src = d.path().join("firstboot/src/main.rs");
        fs::create_dir_all(src.parent().unwrap()).unwrap();
        fs::write(&src, "fn main() {}").unwrap();
        let exe_dir = d.path().join("target/release");
        fs::create_dir_all(&exe_dir).unwrap();
        fs::write(d.path().join("target/CACHEDIR.TAG"), "").unwrap();
        let c = Checkout::at(d.path(), &exe_dir.join("kiln"), None).unwrap();
        let calls = std::cell::Cell::new(0);
        let build = counting_build(&calls);

        let p = locate(&exe_dir, Some(&c), &build).unwrap();
        assert_eq!(p, c.daemon_path());
        assert_eq!(calls.get(), 1, "nothing there: built");
        assert_eq!(locate(&exe_dir, Some(&c), &build).unwrap(), p);
        assert_eq!(calls.get(), 1, "fresh: reused");
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        fs::File::options()
            .write(true)
            .open(&src)
            .unwrap()
            .set_modified(later)
            .unwrap();
        locate(&exe_dir, Some(&c), &build).unwrap();
        assert_eq!(calls.get(), 2, "a daemon source changed: rebuilt");

        // A dynamic daemon in the checkout's spot is rebuilt too, never shipped.
        fs::write(c.daemon_path(), b"\x7fELF not static").unwrap();
        locate(&exe_dir, Some(&c), &build).unwrap();
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn a_static_daemon_beside_kiln_wins_and_outside_a_checkout_nothing_is_built() {
        let d = tempfile::tempdir().unwrap();
        let exe_dir = d.path().join("bin");
        let calls = std::cell::Cell::new(0);
        let build = counting_build(&calls);
        let err = locate(&exe_dir, None, &build).unwrap_err().to_string();
        assert!(err.contains("no static kiln-firstboot found"), "{err}");
        assert!(err.contains("--firstboot PATH"), "{err}");
        // The static build directory beside kiln's own.
        let built = exe_dir.join("..").join(STATIC_TRIPLE_DIR).join(DAEMON);
        static_at(&built);
        assert_eq!(locate(&exe_dir, None, &build).unwrap(), built);
        // A packaged daemon next to kiln comes first, even in a checkout.
        static_at(&exe_dir.join(DAEMON));
        workspace(d.path());
        let c = Checkout::at(d.path(), &exe_dir.join("kiln"), None).unwrap();
        assert_eq!(
            locate(&exe_dir, Some(&c), &build).unwrap(),
            exe_dir.join(DAEMON)
        );
        assert_eq!(calls.get(), 0);
    }

    #[test]
    fn a_failed_build_is_the_error() {
        let d = tempfile::tempdir().unwrap();
        workspace(d.path());
        let c = Checkout::at(d.path(), &d.path().join("bin/kiln"), None).unwrap();
        let failing =
            |_: &Checkout| -> Result<PathBuf> { bail!("the static kiln-firstboot build failed") };
        let err = locate(&d.path().join("bin"), Some(&c), &failing).unwrap_err();
        assert!(err.to_string().contains("build failed"), "{err}");
    }
}
