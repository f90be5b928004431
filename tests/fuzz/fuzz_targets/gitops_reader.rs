//! `kiln gitops check`'s reader of a GitOps checkout, input kiln did not write: multi-document
//! YAML (split like apimachinery, YAML 1.1 scalars, anchors, merge keys), JSON files, and the
//! include/exclude globs (first line: a pattern, second line: a path).
//! Properties: never panics, never hangs (nesting and alias expansion are bounded); every
//! line number names a line of the input; a pattern gobwas refuses matches nothing.
#![no_main]

use kiln::gitops::glob::Glob;
use kiln::gitops::reader::{read_json, read_yaml, Item};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // YAML line breaks: \n, \r\n and a lone \r (as for the profile reader: positions follow
    // YAML; found by this target).
    let lone_cr = data
        .windows(2)
        .filter(|w| w[0] == b'\r' && w[1] != b'\n')
        .count()
        + usize::from(data.last() == Some(&b'\r'));
    let lines = text.split_inclusive('\n').count().max(1) + lone_cr;
    for items in [read_yaml(&text), read_json(&text)] {
        for item in items {
            match item {
                Item::Empty => {}
                Item::Error(e) => assert!(e.line >= 1 && e.line <= lines + 1, "error line {} of {lines}", e.line),
                Item::Value(d) => {
                    assert!(d.line >= 1 && d.line <= lines, "doc line {} of {lines}", d.line);
                    for (p, l) in &d.lines {
                        assert!(*l >= 1 && *l <= lines, "{p}: line {l} of {lines}");
                    }
                }
            }
        }
    }
    let mut it = text.lines();
    if let (Some(pattern), Some(path)) = (it.next(), it.next()) {
        let g = Glob::new(pattern);
        let m = g.matches(path);
        if Glob::check(pattern).is_err() {
            assert!(!m, "an invalid pattern matched");
        }
    }
});
