//! Option groups several subcommands share, flattened into each (`#[command(flatten)]`), so a
//! flag is declared, documented and parsed in one place.

use std::path::{Path, PathBuf};

use anyhow::Result;
use kiln_qemu::harness::Session;
use kiln_qemu::image;

/// Where the static daemon comes from: `kiln build`, `bake`, `bench`, `publish`, `qemu`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DaemonOpts {
    /// The static kiln-firstboot binary to ship (default: next to kiln, or built from this
    /// source checkout on first use).
    #[arg(long)]
    pub firstboot: Option<PathBuf>,
}

impl DaemonOpts {
    /// The daemon to bundle: `--firstboot`, else found or built as `kiln build` does.
    pub fn find(&self) -> Result<PathBuf> {
        crate::daemon_build::find_daemon(self.firstboot.as_deref())
    }
}

/// The guest machine and what it may reach: `kiln qemu run|test` and `kiln bake`.
#[derive(Debug, Clone, clap::Args)]
pub struct MachineOpts {
    /// `debian-12-test` (built and cached) or the path of a cloud image (e.g. Ubuntu 22.04's .img).
    #[arg(long, default_value = image::DEBIAN_12_TEST)]
    pub image: String,
    /// Serve this directory as the artifact mirror the guest sees at http://10.0.2.100/.
    #[arg(long)]
    pub mirror: Option<PathBuf>,
    #[arg(long, default_value_t = 2048)]
    pub memory_mib: u32,
    #[arg(long, default_value_t = 2)]
    pub smp: u32,
    /// Grow the guest disk to this size first (cloud images ship small disks), e.g. 10G.
    #[arg(long)]
    pub disk_size: Option<String>,
    /// Let the guest reach the internet (upstream artifact URLs with a real cloud image).
    /// Without it the guest reaches only the mirror.
    #[arg(long)]
    pub open_net: bool,
}

impl MachineOpts {
    /// A session on `img` with these machine settings.
    pub fn session(
        &self,
        img: image::BaseImage,
        choice: kiln_qemu::accel::AccelChoice,
        outdir: &Path,
        seed: Option<PathBuf>,
    ) -> Result<Session> {
        let mut s = Session::new(img, choice, outdir, seed, self.disk_size.as_deref())?;
        s.memory_mib = self.memory_mib;
        s.smp = self.smp;
        s.open_net = self.open_net;
        Ok(s)
    }
}
