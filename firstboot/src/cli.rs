//! Command line: `kiln-firstboot run` (what the unit starts), `kiln-firstboot status`, and
//! `kiln-firstboot stage` (what `kiln bake` runs inside the image it bakes).

use crate::engine::{self, Outcome, RunOptions};
use crate::fs::Root;
use crate::status::{RunState, Status};
use anyhow::Result;
use clap::{Parser, Subcommand};
use kiln_plan::StepId;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "kiln-firstboot",
    version,
    about = "Turns the kiln plan into a running node: K3s, Tailscale, Argo CD, GitOps"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run every step (skipping those already in place); exit 0 only when all are done.
    Run(RunArgs),
    /// Show the daemon's live status (from /run/kiln/status.json).
    Status(StatusArgs),
    /// Fetch every pinned artifact of the plan into the verified cache and exit (no step runs).
    Stage(StageArgs),
}

#[derive(clap::Args, Debug)]
pub struct StageArgs {
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Read the plan from PATH instead of /etc/kiln/plan.json under the root.
    #[arg(long, value_name = "PATH")]
    pub plan: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Treat DIR as the node's root filesystem (a mounted image, a test tree).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Apply STEP even if its check passes (repeatable).
    #[arg(long, value_name = "STEP")]
    pub force: Vec<StepId>,
    /// Read the plan from PATH instead of /etc/kiln/plan.json under the root.
    #[arg(long, value_name = "PATH")]
    pub plan: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Print the status JSON as it is.
    #[arg(long)]
    pub json: bool,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => run(a),
        Command::Stage(a) => stage(a),
        Command::Status(a) => match status(a) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("kiln-firstboot: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

fn init_tracing() {
    use tracing_subscriber::filter::LevelFilter;
    let level = std::env::var("KILN_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    // Plain text on stderr; journald adds time and unit.
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .try_init();
}

pub fn run(a: RunArgs) -> ExitCode {
    init_tracing();
    // reqwest is built without a default crypto provider (ring keeps the static binary small).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let root = Root::new(&a.root);
    let opts = RunOptions {
        force: a.force,
        plan_path: a.plan,
        ..RunOptions::default()
    };
    let steps = crate::all_steps();
    let missing: Vec<&str> = StepId::ALL
        .iter()
        .filter(|id| !steps.iter().any(|s| s.id() == **id))
        .map(|id| id.as_str())
        .collect();
    let ordered = steps.iter().map(|s| s.id()).eq(StepId::ALL
        .iter()
        .copied()
        .filter(|id| steps.iter().any(|s| s.id() == *id)));
    let mut stdout = std::io::stdout();
    let outcome = if !missing.is_empty() || !ordered {
        let error = format!(
            "this build of kiln-firstboot does not implement every step in order (missing: {})",
            missing.join(", ")
        );
        println!("kiln: refusing to run: {error}");
        let mut st = Status::new();
        st.state = RunState::Refused;
        st.last_error = Some(error.clone());
        let _ = st.write(&root);
        Outcome::Refused { error }
    } else {
        match engine::run(&root, &steps, &opts, &mut stdout) {
            Ok(o) => o,
            // Already reported (milestone, status) by the engine; restartable.
            Err(_) => return ExitCode::FAILURE,
        }
    };
    if outcome == Outcome::Done {
        // READY=1 only now: see docs/firstboot.md ("Why READY=1 is sent at the end").
        crate::systemd::notify_ready("all steps done");
        crate::systemd::notify_barrier(std::time::Duration::from_secs(5));
    }
    ExitCode::from(outcome.exit_code())
}

pub fn stage(a: StageArgs) -> ExitCode {
    init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let root = Root::new(&a.root);
    let plan = a.plan.unwrap_or_else(|| root.path(kiln_plan::paths::PLAN));
    match crate::stage::stage_plan(&root, &plan, &mut std::io::stdout()) {
        Ok(staged) => {
            println!("kiln-stage: {} artifact(s) in the cache", staged.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("kiln-stage: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

pub fn status(a: StatusArgs) -> Result<ExitCode> {
    let root = Root::new(&a.root);
    let st = Status::read(&root)?;
    if a.json {
        print!(
            "{}",
            String::from_utf8_lossy(&std::fs::read(Status::path(&root))?)
        );
    } else {
        print!("{}", st.render());
        if matches!(st.state, RunState::Starting | RunState::Running) && !pid_alive(st.pid) {
            println!(
                "note: pid {} is gone; the run was interrupted (systemd restarts it)",
                st.pid
            );
        }
    }
    Ok(match st.state {
        RunState::Done => ExitCode::SUCCESS,
        RunState::Starting | RunState::Running => ExitCode::from(3),
        RunState::Failed | RunState::Refused => ExitCode::from(1),
    })
}
