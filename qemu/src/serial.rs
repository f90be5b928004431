//! Follows the guest's serial log and turns it into a timeline: kernel, initrd, systemd,
//! cloud-init stages and the daemon's one-line milestones (`kiln: step k3s done in 12.3s`).
//! Times are host seconds since QEMU started, taken when the line arrives (QEMU writes the
//! serial file unbuffered, and the follower polls every 100 ms).

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use kiln_plan::StepState;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Event {
    /// `Linux version ...`: the kernel is running.
    Kernel,
    /// `Run /init as init process`: the initrd takes over.
    Initrd,
    /// systemd prints `Welcome to ...` when it starts on the real root.
    Systemd,
    /// `Cloud-init v. X running 'init-local'|'init'|'modules:config'|'modules:final'`.
    CloudInitStage { stage: String },
    /// `Cloud-init v. X finished at ...`.
    CloudInitFinished,
    /// `kiln: step ID started`.
    StepStarted { step: String },
    /// `kiln: step ID done in 1.2s`.
    StepDone { step: String, seconds: Option<f64> },
    /// `kiln: step ID skipped ...` (its check found the state already there).
    StepSkipped { step: String },
    /// A server step on a K3s agent: nothing to do.
    StepNotApplicable { step: String },
    /// `kiln: step ID failed: ERROR`.
    StepFailed { step: String, error: String },
    /// `kiln: all steps done`.
    AllDone,
    /// `kiln: refusing to run: ...` (bad plan, tampered bundle) or `kiln: daemon error: ...`.
    DaemonFailed { error: String },
    /// `kiln: status {json}`: the daemon's final status, if it prints one.
    Status { json: serde_json::Value },
    /// Any other `kiln: ...` line (kept: it is the daemon talking).
    Daemon { text: String },
    /// A `login:` prompt on the serial getty: boot finished from systemd's point of view.
    LoginPrompt,
    /// Kernel panic or an emergency shell: the boot is dead.
    Fatal { text: String },
}

impl Event {
    pub fn label(&self) -> String {
        match self {
            Event::Kernel => "kernel started".into(),
            Event::Initrd => "initrd".into(),
            Event::Systemd => "systemd started".into(),
            Event::CloudInitStage { stage } => format!("cloud-init {stage}"),
            Event::CloudInitFinished => "cloud-init finished".into(),
            Event::StepStarted { step } => format!("step {step} started"),
            Event::StepDone {
                step,
                seconds: Some(s),
            } => format!("step {step} done ({s:.1}s in daemon)"),
            Event::StepDone {
                step,
                seconds: None,
            } => format!("step {step} done"),
            Event::StepSkipped { step } => format!("step {step} skipped"),
            Event::StepNotApplicable { step } => format!("step {step} not applicable"),
            Event::StepFailed { step, error } => format!("step {step} FAILED: {error}"),
            Event::AllDone => "daemon: all steps done".into(),
            Event::DaemonFailed { error } => format!("daemon FAILED: {error}"),
            Event::Status { .. } => "daemon status".into(),
            Event::Daemon { text } => format!("daemon: {text}"),
            Event::LoginPrompt => "login prompt".into(),
            Event::Fatal { text } => format!("FATAL: {text}"),
        }
    }
}

/// Strips terminal escapes and carriage returns that systemd and getty put on the console.
fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c == '\r' || (c.is_control() && c != '\t') {
            continue;
        }
        out.push(c);
    }
    out
}

/// Parses one console line. Milestones may be preceded by a kernel timestamp or a syslog
/// prefix, so they are found anywhere in the line.
pub fn parse_line(raw: &str) -> Option<Event> {
    let line = clean(raw);
    if let Some(i) = line.find("kiln: ") {
        return Some(parse_daemon(line[i + 6..].trim()));
    }
    if line.contains("Linux version ") && line.contains("(") {
        return Some(Event::Kernel);
    }
    if line.contains("Run /init as init process") {
        return Some(Event::Initrd);
    }
    if line.contains("Welcome to ") && (line.contains("Debian") || line.contains("Ubuntu")) {
        return Some(Event::Systemd);
    }
    if let Some(i) = line.find("Cloud-init v. ") {
        let rest = &line[i..];
        if let Some(j) = rest.find(" running '") {
            let stage = rest[j + 10..].split('\'').next().unwrap_or("").to_string();
            return Some(Event::CloudInitStage { stage });
        }
        if rest.contains(" finished at ") {
            return Some(Event::CloudInitFinished);
        }
    }
    if line.trim_end().ends_with("login:") {
        return Some(Event::LoginPrompt);
    }
    if line.contains("Kernel panic - not syncing") || line.contains("You are in emergency mode") {
        return Some(Event::Fatal {
            text: line.trim().to_string(),
        });
    }
    None
}

fn parse_daemon(rest: &str) -> Event {
    if rest == "all steps done" || rest.starts_with("all steps done") {
        return Event::AllDone;
    }
    for prefix in ["refusing to run:", "daemon error:"] {
        if rest.starts_with(prefix) {
            return Event::DaemonFailed {
                error: rest.to_string(),
            };
        }
    }
    if let Some(json) = rest.strip_prefix("status ") {
        if let Ok(json) = serde_json::from_str(json) {
            return Event::Status { json };
        }
    }
    if let Some(step_rest) = rest.strip_prefix("step ") {
        let mut parts = step_rest.splitn(2, ' ');
        let step = parts.next().unwrap_or("").to_string();
        let what = parts.next().unwrap_or("").trim();
        if let Some(err) = what.strip_prefix("failed") {
            let error = err.trim_start_matches(':').trim().to_string();
            return Event::StepFailed { step, error };
        }
        if let Some(d) = what.strip_prefix("done") {
            let seconds = d
                .trim()
                .strip_prefix("in ")
                .and_then(|s| s.trim_end_matches('s').parse::<f64>().ok());
            return Event::StepDone { step, seconds };
        }
        if what.starts_with("skipped") {
            return Event::StepSkipped { step };
        }
        if what.starts_with("not applicable") {
            return Event::StepNotApplicable { step };
        }
        if what.starts_with("start") || what.starts_with("running") {
            return Event::StepStarted { step };
        }
    }
    Event::Daemon {
        text: rest.to_string(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TimedEvent {
    /// Host seconds since QEMU started.
    pub at: f64,
    #[serde(flatten)]
    pub event: Event,
}

/// Incremental reader of a growing serial log.
pub struct Follower {
    file: File,
    partial: Vec<u8>,
    started: Instant,
    echo: Option<Box<dyn Write + Send>>,
    pub events: Vec<TimedEvent>,
}

impl Follower {
    pub fn open(
        path: &Path,
        started: Instant,
        echo: Option<Box<dyn Write + Send>>,
    ) -> Result<Self> {
        let file =
            File::open(path).with_context(|| format!("opening serial log {}", path.display()))?;
        Ok(Follower {
            file,
            partial: Vec::new(),
            started,
            echo,
            events: Vec::new(),
        })
    }

    /// Reads what arrived since the last call; returns the new events.
    pub fn poll(&mut self) -> Result<Vec<TimedEvent>> {
        let mut buf = Vec::new();
        self.file
            .read_to_end(&mut buf)
            .context("reading serial log")?;
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(echo) = self.echo.as_mut() {
            let _ = echo.write_all(&buf);
            let _ = echo.flush();
        }
        self.partial.extend_from_slice(&buf);
        let at = self.started.elapsed().as_secs_f64();
        let mut new = Vec::new();
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            if let Some(event) = parse_line(&String::from_utf8_lossy(&line)) {
                new.push(TimedEvent { at, event });
            }
        }
        self.events.extend(new.iter().cloned());
        Ok(new)
    }
}

/// The events of one boot, in order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeline {
    pub events: Vec<TimedEvent>,
}

impl Timeline {
    pub fn first(&self, pred: impl Fn(&Event) -> bool) -> Option<f64> {
        self.events.iter().find(|e| pred(&e.event)).map(|e| e.at)
    }

    pub fn all_done_at(&self) -> Option<f64> {
        self.first(|e| matches!(e, Event::AllDone))
    }

    pub fn cloud_init_finished_at(&self) -> Option<f64> {
        self.first(|e| matches!(e, Event::CloudInitFinished))
    }

    pub fn failures(&self) -> Vec<(String, String)> {
        self.events
            .iter()
            .filter_map(|e| match &e.event {
                Event::StepFailed { step, error } => Some((step.clone(), error.clone())),
                _ => None,
            })
            .collect()
    }

    /// Steps reported done and skipped, by id (last report wins).
    pub fn step_outcomes(&self) -> Vec<(String, StepState)> {
        let mut out: Vec<(String, StepState)> = Vec::new();
        for e in &self.events {
            let (step, what) = match &e.event {
                Event::StepDone { step, .. } => (step, StepState::Done),
                Event::StepSkipped { step } => (step, StepState::Skipped),
                Event::StepFailed { step, .. } => (step, StepState::Failed),
                _ => continue,
            };
            out.retain(|(s, _)| s != step);
            out.push((step.clone(), what));
        }
        out
    }

    /// A table: time since QEMU start, time since the previous row, what happened.
    pub fn render(&self, title: &str) -> String {
        let mut s = format!("{title}\n  {:>8}  {:>8}  event\n", "at", "+delta");
        let mut prev = 0.0;
        for e in &self.events {
            if matches!(e.event, Event::Status { .. } | Event::Daemon { .. }) {
                continue;
            }
            s.push_str(&format!(
                "  {:>7.1}s  {:>7.1}s  {}\n",
                e.at,
                e.at - prev,
                e.event.label()
            ));
            prev = e.at;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_milestones_are_parsed_with_prefixes() {
        assert_eq!(
            parse_line("[   42.1] kiln-firstboot[311]: kiln: step k3s done in 12.3s\r\n"),
            Some(Event::StepDone {
                step: "k3s".into(),
                seconds: Some(12.3)
            })
        );
        assert_eq!(
            parse_line("kiln: step k3s failed: checksum mismatch for http://10.0.2.100/k3s/v1.32.4%2Bk3s1/k3s"),
            Some(Event::StepFailed {
                step: "k3s".into(),
                error: "checksum mismatch for http://10.0.2.100/k3s/v1.32.4%2Bk3s1/k3s".into()
            })
        );
        assert_eq!(
            parse_line("kiln: step argocd skipped (check passed)"),
            Some(Event::StepSkipped {
                step: "argocd".into()
            })
        );
        assert_eq!(
            parse_line("kiln: all steps done in 31.0s"),
            Some(Event::AllDone)
        );
        assert_eq!(
            parse_line("kiln: step k3s attempt 1 failed, retrying in 2.0s: HTTP 503"),
            Some(Event::Daemon {
                text: "step k3s attempt 1 failed, retrying in 2.0s: HTTP 503".into()
            })
        );
        assert_eq!(
            parse_line("kiln: step argocd skipped (already in place, verified) in 0.3s"),
            Some(Event::StepSkipped {
                step: "argocd".into()
            })
        );
        assert!(matches!(
            parse_line("kiln: refusing to run: bundle sha256 mismatch"),
            Some(Event::DaemonFailed { .. })
        ));
        assert!(matches!(
            parse_line("kiln: status {\"steps\":[]}"),
            Some(Event::Status { .. })
        ));
    }

    #[test]
    fn boot_stages_are_recognised() {
        assert_eq!(
            parse_line(
                "[    0.000000] Linux version 6.1.0-41-amd64 (debian-kernel@lists.debian.org)"
            ),
            Some(Event::Kernel)
        );
        assert_eq!(
            parse_line("[    1.2] Run /init as init process"),
            Some(Event::Initrd)
        );
        assert_eq!(
            parse_line("\x1b[0;1;39mWelcome to \x1b[0;1;31mDebian GNU/Linux 12 (bookworm)\x1b[0m!"),
            Some(Event::Systemd)
        );
        assert_eq!(
            parse_line("[   30.1] cloud-init[251]: Cloud-init v. 22.4.2 running 'modules:final' at Mon, 30 Nov 2026 05:00:00 +0000. Up 70.1 seconds."),
            Some(Event::CloudInitStage { stage: "modules:final".into() })
        );
        assert_eq!(parse_line("cloud-init[300]: Cloud-init v. 22.4.2 finished at Mon, 30 Nov 2026. Datasource DataSourceNoCloud.  Up 80.2 seconds"), Some(Event::CloudInitFinished));
        assert_eq!(parse_line("kiln-test login: "), Some(Event::LoginPrompt));
        assert_eq!(parse_line("just noise"), None);
    }

    #[test]
    fn follower_reads_lines_as_they_grow_and_keeps_partial_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial.log");
        std::fs::write(&p, b"").unwrap();
        let mut f = Follower::open(&p, Instant::now(), None).unwrap();
        let mut w = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        w.write_all(b"kiln: step k3s do").unwrap();
        assert!(f.poll().unwrap().is_empty());
        w.write_all(b"ne in 1.0s\nkiln: all steps done\n").unwrap();
        let ev: Vec<Event> = f.poll().unwrap().into_iter().map(|e| e.event).collect();
        assert_eq!(
            ev,
            vec![
                Event::StepDone {
                    step: "k3s".into(),
                    seconds: Some(1.0)
                },
                Event::AllDone
            ]
        );
        let tl = Timeline {
            events: f.events.clone(),
        };
        assert_eq!(
            tl.step_outcomes(),
            vec![("k3s".to_string(), StepState::Done)]
        );
        assert!(tl.render("t").contains("daemon: all steps done"));
    }
}
