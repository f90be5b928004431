//! Output of `kiln gitops check`: a text report for people, or JSON (`--format json`).

use super::check::{AppStatus, Report};
use std::fmt::Write as _;

/// `file:line: class: reason` then the fix, then the Applications and what was not rendered.
pub fn text(r: &Report, checkout: &str) -> String {
    let mut o = String::new();
    for f in &r.findings {
        let at = match f.line {
            Some(l) => format!("{}:{l}", f.file),
            None => f.file.clone(),
        };
        let class = serde_json::to_value(f.class)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(o, "{at}: {class}: {} [Application {}]", f.reason, f.app);
        let _ = writeln!(o, "    fix: {}", f.fix);
    }
    let _ = writeln!(o, "applications:");
    for a in &r.applications {
        let what = match a.status {
            AppStatus::Checked => format!("checked: {} files, {} objects", a.files, a.objects),
            AppStatus::NotRenderedHere => "not rendered here".into(),
            AppStatus::OtherRepository => format!("other repository {}, not checked", a.repo),
        };
        let path = if a.path.is_empty() {
            String::new()
        } else {
            format!(" path {}", a.path)
        };
        let _ = writeln!(
            o,
            "  {} ({}{path}, from {}): {what}",
            a.name, a.source, a.defined_in
        );
    }
    for j in &r.jsonnet {
        let _ = writeln!(o, "  not rendered here: {j} (jsonnet)");
    }
    for i in &r.ignored {
        let _ = writeln!(o, "  ignored by Argo CD (not a manifest): {i}");
    }
    let n = r.findings.len();
    let _ = writeln!(
        o,
        "kiln gitops check: {} in {checkout}",
        match n {
            0 => "clean".to_string(),
            1 => "1 finding".to_string(),
            n => format!("{n} findings"),
        }
    );
    o
}

pub fn json(r: &Report) -> String {
    let mut s = serde_json::to_string_pretty(r).expect("report serializes");
    s.push('\n');
    s
}
