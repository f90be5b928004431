//! The house rules that can be checked mechanically: no import cycle between the modules of a
//! product crate (docs/architecture.md). A module's imports are the `crate::<module>` paths in
//! its files outside `#[cfg(test)]`; a cycle is a strongly connected group of two or more.
//! The cycles that remain from before the rule are listed, so a new one fails the test and
//! removing a listed one shows here as a list to shorten.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Cycles not yet taken apart (issue "The house"); each inner list sorted.
const KNOWN: &[(&str, &[&str])] = &[
    (
        "builder/src",
        &[
            "keyvault",
            "profile",
            "resolve",
            "resolve_gitops",
            "resolve_role",
        ],
    ),
    ("firstboot/src", &["k3s", "k3s_agent", "tailscale"]),
];

const CRATES: &[&str] = &[
    "builder/src",
    "firstboot/src",
    "firstboot/plan/src",
    "qemu/src",
    "testkit/src",
];

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The top-level module a file under `src` belongs to (`gitops/check.rs` → `gitops`).
fn top_module(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

/// `crate::a`, `crate::a::b` and `crate::{a, b::c}` in `text` (up to `#[cfg(test)]`).
fn imports(text: &str) -> BTreeSet<String> {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().unwrap_or("");
            for item in group.split(',') {
                let m = item.trim().split("::").next().unwrap_or("").trim();
                if !m.is_empty() && m != "self" {
                    out.insert(m.to_string());
                }
            }
        } else {
            let m: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !m.is_empty() {
                out.insert(m);
            }
        }
    }
    out
}

fn walk(dir: &Path, base: &Path, graph: &mut Graph) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            walk(&p, base, graph);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let Some(module) = top_module(p.strip_prefix(base).unwrap()) else {
                continue;
            };
            let deps = imports(&std::fs::read_to_string(&p).unwrap());
            let node = graph.entry(module.clone()).or_default();
            node.extend(deps.into_iter().filter(|d| *d != module));
        }
    }
}

/// Strongly connected groups of two or more modules (Tarjan), each sorted.
fn cycles(graph: &Graph) -> BTreeSet<Vec<String>> {
    struct T<'g> {
        g: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        out: BTreeSet<Vec<String>>,
    }
    fn visit<'g>(t: &mut T<'g>, v: &'g str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        for w in t.g[v].iter().filter(|w| t.g.contains_key(w.as_str())) {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                t.low.entry(v).and_modify(|l| *l = (*l).min(lw));
            } else if t.stack.contains(&w) {
                let iw = t.index[w];
                t.low.entry(v).and_modify(|l| *l = (*l).min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut group = Vec::new();
            while let Some(w) = t.stack.pop() {
                group.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if group.len() > 1 {
                group.sort();
                t.out.insert(group);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: BTreeSet::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn no_product_crate_gains_a_module_import_cycle() {
    let repo = kiln_testkit::repo();
    for krate in CRATES {
        let mut graph = Graph::new();
        walk(&repo.join(krate), &repo.join(krate), &mut graph);
        assert!(graph.len() > 3, "{krate}: read no modules");
        let found = cycles(&graph);
        let known: BTreeSet<Vec<String>> = KNOWN
            .iter()
            .filter(|(k, _)| k == krate)
            .map(|(_, c)| c.iter().map(|s| s.to_string()).collect())
            .collect();
        assert_eq!(
            found, known,
            "{krate}: module import cycles differ from the known list (a new cycle, or a known one gone: update KNOWN)"
        );
    }
}

#[test]
fn the_cycle_finder_finds_a_planted_cycle_and_ignores_a_chain() {
    let g: Graph = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    let want: BTreeSet<Vec<String>> = [vec!["a".into(), "b".into(), "c".into()]].into();
    assert_eq!(cycles(&g), want);
    assert_eq!(
        imports("use crate::{fs::Root, retry::Backoff};\nlet x = crate::k3s::UNIT;\n#[cfg(test)]\nuse crate::z;"),
        ["fs", "k3s", "retry"].into_iter().map(String::from).collect()
    );
}
