//! The bad-profile corpus: every file under tests/profiles/bad/ must fail with its expected
//! `file:line:col: key: message` (in `<name>.expected`), and `kiln build` must write nothing.

mod common;

use kiln::pipeline::{self, BuildError};
use std::path::{Path, PathBuf};
use std::process::Command;

fn corpus() -> Vec<PathBuf> {
    let dir = common::repo().join("tests/profiles/bad");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

struct Expected {
    file: String,
    line: usize,
    col: usize,
    key: String,
    message: String,
}

fn expected(profile: &Path) -> Expected {
    let path = profile.with_extension("expected");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let line = text.lines().next().unwrap();
    let (file, rest) = line.split_once(':').unwrap();
    let (l, rest) = rest.split_once(':').unwrap();
    let (c, rest) = rest.split_once(": ").unwrap();
    let (key, message) = rest.split_once(": ").unwrap();
    Expected {
        file: file.into(),
        line: l.parse().unwrap(),
        col: c.parse().unwrap(),
        key: if key == "-" {
            String::new()
        } else {
            key.into()
        },
        message: message.into(),
    }
}

#[test]
fn corpus_has_at_least_twenty_bad_profiles_each_with_an_expected_message() {
    let all = corpus();
    assert!(all.len() >= 20, "only {} bad profiles", all.len());
    for p in &all {
        assert!(
            p.with_extension("expected").is_file(),
            "{} has no .expected",
            p.display()
        );
    }
}

#[test]
fn every_bad_profile_fails_with_file_line_col_and_key() {
    let daemon = kiln::elf::tiny_static_elf();
    let mut failures = Vec::new();
    for p in corpus() {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let err = match pipeline::build(&p, &daemon, 0, &common::no_env) {
            Ok(_) => {
                failures.push(format!("{name}: built without error"));
                continue;
            }
            Err(BuildError::Other(e)) => {
                failures.push(format!("{name}: not a profile error: {e:#}"));
                continue;
            }
            Err(BuildError::Profile(e)) => e,
        };
        let got_file = err.file.file_name().unwrap().to_string_lossy().into_owned();
        let one_line = format!(
            "{got_file}:{}:{}: {}: {}",
            err.line,
            err.col,
            if err.key.is_empty() { "-" } else { &err.key },
            err.message
        );
        if std::env::var_os("KILN_PRINT_CORPUS").is_some() {
            println!("{name} => {one_line}");
            continue;
        }
        let x = expected(&p);
        if got_file != x.file
            || err.line != x.line
            || err.col != x.col
            || err.key != x.key
            || !err.message.contains(&x.message)
        {
            failures.push(format!(
                "{name}:\n  expected {}:{}:{}: {}: …{}…\n  got      {one_line}",
                x.file, x.line, x.col, x.key, x.message
            ));
        }
        // The one-line form starts with the location, as editors and CI logs expect.
        assert!(err
            .to_string()
            .contains(&format!(":{}:{}: ", err.line, err.col)));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if std::env::var_os("KILN_PRINT_CORPUS").is_none() {
        let total = corpus().len();
        kiln_testkit::record_reliability(
            "bad-profiles",
            &serde_json::json!({"cases": total, "refused_with_file_line_col": total}),
        );
    }
}

#[test]
fn kiln_build_of_a_bad_profile_exits_2_names_the_place_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = common::fake_daemon(tmp.path());
    for p in corpus() {
        let out = tmp.path().join("out");
        let o = Command::new(common::kiln_bin())
            .arg("build")
            .arg(&p)
            .arg("-o")
            .arg(&out)
            .arg("--firstboot")
            .arg(&daemon)
            .env_remove("KILN_TEST_DEFINITELY_UNSET_VAR")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        let x = expected(&p);
        assert_eq!(o.status.code(), Some(2), "{}: {stderr}", p.display());
        assert!(
            stderr.contains(&format!("{}:{}:{}", x.file, x.line, x.col)),
            "{}: stderr lacks {}:{}:{}:\n{stderr}",
            p.display(),
            x.file,
            x.line,
            x.col
        );
        assert!(
            !out.exists(),
            "{}: output directory was created",
            p.display()
        );
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            1,
            "{}: stray files {leftovers:?}",
            p.display()
        );
    }
}

#[test]
fn an_existing_output_directory_is_left_untouched_on_error() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = common::fake_daemon(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("user-data"), "previous build").unwrap();
    let bad = common::repo().join("tests/profiles/bad/unknown-nested-key.yaml");
    let o = Command::new(common::kiln_bin())
        .arg("build")
        .arg(&bad)
        .arg("-o")
        .arg(&out)
        .arg("--firstboot")
        .arg(&daemon)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        std::fs::read_to_string(out.join("user-data")).unwrap(),
        "previous build"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}
