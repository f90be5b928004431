//! The builder's profile front end: bytes → `kiln::profile::load` (UTF-8 check, size limit,
//! YAML with positions, `extends`, strict serde) → `kiln::resolve::resolve` (defaults, pins,
//! secrets → the typed plan). Input is written to `profile.yaml` in a private directory that
//! also holds the corpus's `base.yaml` and its fake secret files, so seeds that extend the base
//! reach the resolver.
//! Properties: never panics; every error has a 1-based line:col inside the file and renders
//! as a miette report; every resolved plan survives the daemon's parser unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("kiln-fuzz-profile-{}", std::process::id()));
        std::fs::create_dir_all(d.join("secrets")).unwrap();
        std::fs::write(
            d.join("base.yaml"),
            include_str!("../../profiles/good/base.yaml"),
        )
        .unwrap();
        std::fs::write(d.join("secrets/auth-key"), "tskey-auth-fuzz\n").unwrap();
        std::fs::write(d.join("secrets/oauth-secret"), "tskey-client-fuzz\n").unwrap();
        d
    })
}

fn env(name: &str) -> Option<String> {
    (name.len() % 2 == 0).then(|| format!("fuzz-{name}"))
}

fn check_position(e: &kiln::diag::ProfileError, text: &[u8]) {
    assert!(
        e.line >= 1 && e.col >= 1,
        "position {}:{} in {e}",
        e.line,
        e.col
    );
    if e.file.file_name().is_some_and(|n| n == "profile.yaml") {
        // YAML line breaks: \n, \r\n and a lone \r (found by this target: positions follow YAML).
        let lone_cr = text
            .windows(2)
            .filter(|w| w[0] == b'\r' && w[1] != b'\n')
            .count()
            + usize::from(text.last() == Some(&b'\r'));
        let lines = text.iter().filter(|b| **b == b'\n').count() + lone_cr + 1;
        assert!(
            e.line <= lines + 1,
            "line {} past the end ({lines}): {e}",
            e.line
        );
    }
    let one = e.to_string();
    assert!(one.contains(&format!(":{}:{}: ", e.line, e.col)), "{one}");
    let mut out = String::new();
    miette::GraphicalReportHandler::new()
        .render_report(&mut out, e)
        .expect("report renders");
}

fuzz_target!(|data: &[u8]| {
    let path = dir().join("profile.yaml");
    std::fs::write(&path, data).unwrap();
    let loaded = match kiln::profile::load(&path) {
        Ok(l) => l,
        Err(e) => return check_position(&e, data),
    };
    match kiln::resolve::resolve(&loaded, &env) {
        Ok(r) => {
            let bytes = r.plan.to_json();
            let back = kiln_plan::Plan::from_json(&bytes).expect("the daemon parses the plan");
            assert_eq!(back, r.plan);
        }
        Err(e) => check_position(&e, data),
    }
});
