//! Running external programs (`systemctl`, `k3s kubectl`, `tailscale`): stdout back, or an
//! error carrying the program's stderr. Secret arguments and stdin are passed through
//! [`Secret`] and appear as `<redacted>` in every message; their values are also scrubbed from
//! the captured output quoted in errors.

use crate::retry::Transient;
use anyhow::{Context, Result};
use kiln_plan::Secret;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

enum Arg {
    Plain(OsString),
    Secret(Secret),
}

enum Input {
    None,
    Bytes(Vec<u8>),
    Secret(Secret),
}

/// A command line to run. Cheap to build, run with [`Cmd::run`] or [`Cmd::output`].
pub struct Cmd {
    program: OsString,
    args: Vec<Arg>,
    env: Vec<(OsString, OsString)>,
    stdin: Input,
    timeout: Option<Duration>,
}

/// What a finished program produced.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Longest stderr excerpt quoted in an error.
const STDERR_QUOTE: usize = 2000;

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            stdin: Input::None,
            timeout: Some(Duration::from_secs(300)),
        }
    }
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.args.push(Arg::Plain(a.as_ref().to_owned()));
        self
    }
    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self.args.push(Arg::Plain(a.as_ref().to_owned()));
        }
        self
    }
    /// An argument whose value must never be shown (prefer [`Cmd::stdin_secret`] where the
    /// program allows it: arguments are visible in /proc to every user).
    pub fn secret_arg(mut self, s: &Secret) -> Cmd {
        self.args.push(Arg::Secret(s.clone()));
        self
    }
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Cmd {
        self.env
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Input::Bytes(data.into());
        self
    }
    pub fn stdin_secret(mut self, s: &Secret) -> Cmd {
        self.stdin = Input::Secret(s.clone());
        self
    }
    /// Kill the program after `d` (default 300 s); running out of time is a [`Transient`] error.
    pub fn timeout(mut self, d: Duration) -> Cmd {
        self.timeout = Some(d);
        self
    }
    /// Timeout at an instant (e.g. the step's deadline), at least one second from now.
    pub fn deadline(self, at: Instant) -> Cmd {
        let d = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        self.timeout(d)
    }

    /// The command line for messages: secret arguments as `<redacted>`.
    pub fn display(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            s.push(' ');
            match a {
                Arg::Plain(p) => s.push_str(&p.to_string_lossy()),
                Arg::Secret(_) => s.push_str("<redacted>"),
            }
        }
        s
    }

    fn secrets(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .args
            .iter()
            .filter_map(|a| match a {
                Arg::Secret(s) => Some(s.expose()),
                Arg::Plain(_) => None,
            })
            .collect();
        if let Input::Secret(s) = &self.stdin {
            v.push(s.expose());
        }
        v.retain(|s| !s.is_empty());
        v
    }

    fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in self.secrets() {
            out = out.replace(s, "<redacted>");
        }
        out
    }

    /// Runs to completion; any exit status is returned (only failing to start, or a timeout,
    /// is an error). Output is scrubbed of this command's secrets.
    pub fn output(&self) -> Result<Output> {
        let shown = self.display();
        let mut c = Command::new(&self.program);
        for a in &self.args {
            match a {
                Arg::Plain(p) => c.arg(p),
                Arg::Secret(s) => c.arg(s.expose()),
            };
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.stdin(match self.stdin {
            Input::None => Stdio::null(),
            _ => Stdio::piped(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .with_context(|| format!("starting `{}`", self.program.to_string_lossy()))?;
        let input: Option<Vec<u8>> = match &self.stdin {
            Input::None => None,
            Input::Bytes(b) => Some(b.clone()),
            Input::Secret(s) => Some(s.expose().as_bytes().to_vec()),
        };
        let writer = match (input, child.stdin.take()) {
            (Some(data), Some(mut pipe)) => Some(std::thread::spawn(move || {
                // A program that exits without reading its stdin gives EPIPE; that's its call.
                let _ = pipe.write_all(&data);
            })),
            _ => None,
        };
        let out_reader = spawn_reader(child.stdout.take());
        let err_reader = spawn_reader(child.stderr.take());
        let status = match wait_until(&mut child, self.timeout.map(|d| Instant::now() + d)) {
            Some(st) => st,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(anyhow::Error::new(Transient(format!(
                    "`{shown}` did not finish within {:?}; killed",
                    self.timeout.unwrap_or_default()
                ))));
            }
        };
        if let Some(w) = writer {
            let _ = w.join();
        }
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        Ok(Output {
            status,
            stdout: self.scrub(&stdout),
            stderr: self.scrub(&stderr),
        })
    }

    /// Runs to completion and returns stdout; a non-zero exit is an error quoting stderr.
    pub fn run(&self) -> Result<String> {
        let out = self.output()?;
        if !out.status.success() {
            anyhow::bail!(
                "`{}` failed ({}): {}",
                self.display(),
                out.status,
                quote(&out.stderr, &out.stdout)
            );
        }
        Ok(out.stdout)
    }
}

fn quote(stderr: &str, stdout: &str) -> String {
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let t = text.trim();
    if t.is_empty() {
        return "no output".into();
    }
    if t.len() <= STDERR_QUOTE {
        return t.to_string();
    }
    // Keep the tail: the reason is usually at the end.
    let mut start = t.len() - STDERR_QUOTE;
    while !t.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &t[start..])
}

fn spawn_reader<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn wait_until(child: &mut Child, deadline: Option<Instant>) -> Option<ExitStatus> {
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return child.wait().ok(),
        }
        if let Some(d) = deadline {
            if Instant::now() >= d {
                return None;
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// `program args...` → stdout, or an error with its stderr.
pub fn run<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Result<String> {
    Cmd::new(program).args(args).run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_returns_stdout() {
        assert_eq!(run("sh", &["-c", "echo hi"]).unwrap(), "hi\n");
    }

    #[test]
    fn failure_quotes_stderr_and_status() {
        let e = run("sh", &["-c", "echo boom >&2; exit 3"]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("boom") && msg.contains("exit status: 3"),
            "{msg}"
        );
    }

    #[test]
    fn secrets_never_appear_in_errors_or_output() {
        let s = Secret::new("canary-4242");
        let e = Cmd::new("sh")
            .arg("-c")
            .arg("echo \"$1\" >&2; cat >&2; exit 1")
            .arg("sh")
            .secret_arg(&s)
            .stdin_secret(&s)
            .run()
            .unwrap_err();
        let msg = format!("{e:#} {e:?}");
        assert!(!msg.contains("canary-4242"), "{msg}");
        assert!(msg.contains("<redacted>"), "{msg}");
    }

    #[test]
    fn stdin_reaches_the_program() {
        let out = Cmd::new("cat").stdin("abc").run().unwrap();
        assert_eq!(out, "abc");
    }

    #[test]
    fn timeout_kills_and_is_transient() {
        let t0 = Instant::now();
        let e = Cmd::new("sleep")
            .arg("5")
            .timeout(Duration::from_millis(200))
            .run()
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert!(crate::engine::is_transient(&e), "{e:#}");
    }

    #[test]
    fn missing_program_is_a_permanent_error_naming_it() {
        let e = run("/nonexistent/kiln-prog", &["x"]).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/kiln-prog"));
        assert!(!crate::engine::is_transient(&e));
    }
}
