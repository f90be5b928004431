//! Globs as Argo CD v3.4.7 matches `directory.include` / `exclude`: `github.com/gobwas/glob`
//! v0.2.3 compiled with no separators (`util/glob.Match(pattern, relPath)`), so `*` and `**`
//! match any run of characters, `/` included; `?` is one character; `[abc]`, `[a-z]`, `[!…]`
//! are classes; `{a,b}` are alternatives (nested allowed); `\` escapes. The pattern is matched
//! against the whole path relative to the app's path.
//!
//! The parse follows gobwas's lexer quirks (read from its source, not copied): `}` and `,`
//! outside braces are text; `[ab-c]` is the list `a b - c` (a range needs its low character
//! first); an unclosed `{` keeps the alternatives read so far; a pattern gobwas cannot compile
//! (`[`, `[]`, `[z-a]`) makes Argo CD log a warning and match nothing, so [`Glob::matches`] is
//! false for it. Matching runs a Thompson NFA: linear in the path for any pattern.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Text(Vec<char>),
    /// `*` or `**` (the same without separators).
    Any,
    Single,
    List {
        chars: Vec<char>,
        not: bool,
    },
    Range {
        lo: char,
        hi: char,
        not: bool,
    },
    AnyOf(Vec<Vec<Node>>),
}

/// A compiled pattern; `None` inside when gobwas would refuse it.
#[derive(Debug, Clone)]
pub struct Glob {
    states: Option<Vec<State>>,
    start: usize,
}

#[derive(Debug, Clone)]
enum State {
    Char(char, usize),
    Class(Class, usize),
    /// Consumes any character and stays; epsilon to `next`.
    Star(usize),
    Split(Vec<usize>),
    Match,
}

#[derive(Debug, Clone)]
enum Class {
    Any,
    List(Vec<char>, bool),
    Range(char, char, bool),
}

impl Class {
    fn accepts(&self, c: char) -> bool {
        match self {
            Class::Any => true,
            Class::List(chars, not) => chars.contains(&c) != *not,
            Class::Range(lo, hi, not) => (*lo <= c && c <= *hi) != *not,
        }
    }
}

/// Why gobwas refuses a pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GlobError(pub String);

impl Glob {
    /// Compiles like gobwas; an invalid pattern gives a glob that matches nothing.
    pub fn new(pattern: &str) -> Glob {
        match parse(pattern) {
            Ok(nodes) => {
                let mut states = vec![State::Match];
                let start = compile_seq(&nodes, 0, &mut states);
                Glob {
                    states: Some(states),
                    start,
                }
            }
            Err(_) => Glob {
                states: None,
                start: 0,
            },
        }
    }

    /// `Err` with gobwas's reason when the pattern does not compile.
    pub fn check(pattern: &str) -> Result<(), GlobError> {
        parse(pattern).map(|_| ())
    }

    pub fn matches(&self, text: &str) -> bool {
        let Some(states) = &self.states else {
            return false;
        };
        let mut current = vec![false; states.len()];
        add(states, self.start, &mut current);
        for c in text.chars() {
            let mut next = vec![false; states.len()];
            let mut any = false;
            for (i, on) in current.iter().enumerate() {
                if !on {
                    continue;
                }
                match &states[i] {
                    State::Char(want, to) if *want == c => {
                        add(states, *to, &mut next);
                        any = true;
                    }
                    State::Class(class, to) if class.accepts(c) => {
                        add(states, *to, &mut next);
                        any = true;
                    }
                    State::Star(_) => {
                        add(states, i, &mut next);
                        any = true;
                    }
                    _ => {}
                }
            }
            if !any {
                return false;
            }
            current = next;
        }
        current
            .iter()
            .enumerate()
            .any(|(i, on)| *on && matches!(states[i], State::Match))
    }
}

/// Adds `i` and everything reachable from it without consuming a character.
fn add(states: &[State], i: usize, set: &mut [bool]) {
    let mut stack = vec![i];
    while let Some(i) = stack.pop() {
        if set[i] {
            continue;
        }
        set[i] = true;
        match &states[i] {
            State::Split(to) => stack.extend(to.iter().copied()),
            State::Star(to) => stack.push(*to),
            _ => {}
        }
    }
}

/// Compiles `nodes` followed by state `next`; returns the entry state.
fn compile_seq(nodes: &[Node], next: usize, states: &mut Vec<State>) -> usize {
    let mut at = next;
    for node in nodes.iter().rev() {
        at = compile_node(node, at, states);
    }
    at
}

fn compile_node(node: &Node, next: usize, states: &mut Vec<State>) -> usize {
    let push = |s: State, states: &mut Vec<State>| {
        states.push(s);
        states.len() - 1
    };
    match node {
        Node::Text(chars) => {
            let mut at = next;
            for c in chars.iter().rev() {
                at = push(State::Char(*c, at), states);
            }
            at
        }
        Node::Any => push(State::Star(next), states),
        Node::Single => push(State::Class(Class::Any, next), states),
        Node::List { chars, not } => {
            push(State::Class(Class::List(chars.clone(), *not), next), states)
        }
        Node::Range { lo, hi, not } => {
            push(State::Class(Class::Range(*lo, *hi, *not), next), states)
        }
        Node::AnyOf(alts) => {
            let entries: Vec<usize> = alts.iter().map(|a| compile_seq(a, next, states)).collect();
            push(State::Split(entries), states)
        }
    }
}

/// Parses like gobwas's lexer + parser: a stack of open `{` groups, each a list of
/// alternatives, each a sequence of nodes.
fn parse(pattern: &str) -> Result<Vec<Node>, GlobError> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    // Each frame: the alternatives of one open `{` (the bottom frame is the pattern itself).
    let mut stack: Vec<Vec<Vec<Node>>> = vec![vec![Vec::new()]];
    let err = |m: &str| Err(GlobError(m.to_string()));
    while i < chars.len() {
        let c = chars[i];
        let in_terms = stack.len() > 1;
        let cur = stack
            .last_mut()
            .expect("bottom frame")
            .last_mut()
            .expect("an alternative");
        match c {
            '{' => {
                stack.push(vec![Vec::new()]);
                i += 1;
            }
            ',' if in_terms => {
                stack.last_mut().expect("frame").push(Vec::new());
                i += 1;
            }
            '}' if in_terms => {
                let alts = stack.pop().expect("frame");
                push_node(&mut stack, Node::AnyOf(alts));
                i += 1;
            }
            '[' => {
                let (node, next) = parse_class(&chars, i + 1)?;
                cur.push(node);
                i = next;
            }
            '?' => {
                cur.push(Node::Single);
                i += 1;
            }
            '*' => {
                cur.push(Node::Any);
                i += if chars.get(i + 1) == Some(&'*') { 2 } else { 1 };
            }
            _ => {
                let breakers: &[char] = if in_terms {
                    &['?', '*', '[', '{', '}', ',']
                } else {
                    &['?', '*', '[', '{']
                };
                let (text, next) = read_text(&chars, i, breakers);
                if !text.is_empty() {
                    cur.push(Node::Text(text));
                }
                if next == i {
                    return err("unexpected character");
                }
                i = next;
            }
        }
    }
    // An unclosed `{` keeps what was read (gobwas's parser stops at EOF wherever it is).
    while stack.len() > 1 {
        let alts = stack.pop().expect("frame");
        push_node(&mut stack, Node::AnyOf(alts));
    }
    Ok(stack.pop().expect("bottom").pop().expect("one alternative"))
}

fn push_node(stack: &mut [Vec<Vec<Node>>], node: Node) {
    stack
        .last_mut()
        .expect("frame")
        .last_mut()
        .expect("alternative")
        .push(node);
}

/// Text up to a breaker; `\` makes the next character literal (a trailing `\` is dropped).
fn read_text(chars: &[char], mut i: usize, breakers: &[char]) -> (Vec<char>, usize) {
    let mut out = Vec::new();
    let mut escaped = false;
    while i < chars.len() {
        let c = chars[i];
        if !escaped {
            if c == '\\' {
                escaped = true;
                i += 1;
                continue;
            }
            if breakers.contains(&c) {
                break;
            }
        }
        escaped = false;
        out.push(c);
        i += 1;
    }
    (out, i)
}

/// After `[`: `!` once, then either `lo-hi` or a list of characters, then `]`.
fn parse_class(chars: &[char], mut i: usize) -> Result<(Node, usize), GlobError> {
    let err = |m: &str| Err(GlobError(m.to_string()));
    let mut not = false;
    if chars.get(i) == Some(&'!') {
        not = true;
        i += 1;
    }
    let Some(&first) = chars.get(i) else {
        return err("unexpected end of input");
    };
    if chars.get(i + 1) == Some(&'-') {
        let Some(&hi) = chars.get(i + 2) else {
            return err("unexpected end of input");
        };
        match chars.get(i + 3) {
            Some(']') => {}
            Some(_) => return err("expected close range character"),
            None => return err("unexpected end of input"),
        }
        if hi < first {
            return err(&format!(
                "hi character '{hi}' should be greater than lo '{first}'"
            ));
        }
        return Ok((Node::Range { lo: first, hi, not }, i + 4));
    }
    let (list, next) = read_text(chars, i, &[']']);
    match chars.get(next) {
        Some(']') => {}
        _ => return err("unexpected end of input"),
    }
    if list.is_empty() {
        return err("could not parse range");
    }
    Ok((Node::List { chars: list, not }, next + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        Glob::new(p).matches(t)
    }

    /// The examples of Argo CD v3.4.7 `docs/user-guide/directory.md`, case by case, on the
    /// layout that page shows (`config.json`, `deployment.yaml`, `env-use2/configmap.yaml`,
    /// `env-usw2/configmap.yaml`).
    #[test]
    fn argo_cd_documented_include_and_exclude_examples() {
        // --directory-include "*.yaml": `*` crosses `/`, so files in subdirectories match.
        assert!(m("*.yaml", "deployment.yaml"));
        assert!(m("*.yaml", "env-use2/configmap.yaml"));
        assert!(!m("*.yaml", "config.json"));
        // "{*.yml,*.yaml}"
        assert!(m("{*.yml,*.yaml}", "a.yml"));
        assert!(m("{*.yml,*.yaml}", "deployment.yaml"));
        assert!(!m("{*.yml,*.yaml}", "config.json"));
        // "some-directory/*"
        assert!(m("some-directory/*", "some-directory/a.yaml"));
        assert!(m("some-directory/*", "some-directory/deep/a.yaml"));
        assert!(!m("some-directory/*", "other/a.yaml"));
        assert!(!m("some-directory/*", "some-directory"));
        // --directory-exclude "config.yaml": the whole relative path, not the base name.
        assert!(m("config.yaml", "config.yaml"));
        assert!(!m("config.yaml", "sub/config.yaml"));
        // "{config.yaml,env-use2/*}"
        assert!(m("{config.yaml,env-use2/*}", "config.yaml"));
        assert!(m("{config.yaml,env-use2/*}", "env-use2/configmap.yaml"));
        assert!(!m("{config.yaml,env-use2/*}", "env-usw2/configmap.yaml"));
        // include "*.yaml" + exclude "{config.json,env-usw2/*}": deployment.yaml and
        // env-use2/configmap.yaml remain.
        let inc = Glob::new("*.yaml");
        let exc = Glob::new("{config.json,env-usw2/*}");
        let kept: Vec<&str> = [
            "config.json",
            "deployment.yaml",
            "env-use2/configmap.yaml",
            "env-usw2/configmap.yaml",
        ]
        .into_iter()
        .filter(|p| inc.matches(p) && !exc.matches(p))
        .collect();
        assert_eq!(kept, ["deployment.yaml", "env-use2/configmap.yaml"]);
        // The brace example of Argo CD's directory include docs: '{config.json,env-usw2/*}'.
        assert!(m("{config.json,env-usw2/*}", "env-usw2/x/y.yaml"));
    }

    #[test]
    fn classes_singles_and_escapes_follow_gobwas() {
        assert!(m("?at", "cat") && !m("?at", "at"));
        assert!(m("[abc]at", "bat") && !m("[abc]at", "fat"));
        assert!(m("[!abc]at", "fat") && !m("[!abc]at", "cat"));
        assert!(m("[a-c]at", "cat") && !m("[a-c]at", "fat"));
        assert!(m("[!a-c]at", "fat") && !m("[!a-c]at", "bat"));
        // `[ab-c]` is a list of a, b, -, c (no range after the first character).
        assert!(m("[ab-c]", "-") && !m("[ab-c]", "bb"));
        assert!(m("{cat,bat,[fr]at}", "rat") && !m("{cat,bat,[fr]at}", "zat"));
        assert!(m("a\\*b", "a*b") && !m("a\\*b", "axb"));
        assert!(m("**", "a/b/c") && m("a/**/c.yaml", "a/x/y/c.yaml"));
        // `}` and `,` are text outside braces.
        assert!(m("a,b}", "a,b}"));
        // Nested alternatives.
        assert!(m("{a,{b,c}d}", "cd") && m("{a,{b,c}d}", "a") && !m("{a,{b,c}d}", "c"));
        // Empty alternative.
        assert!(m("x{,.yaml}", "x") && m("x{,.yaml}", "x.yaml"));
        // An unclosed `{` keeps its alternatives.
        assert!(m("{a,b", "b"));
    }

    #[test]
    fn patterns_gobwas_cannot_compile_match_nothing() {
        for p in ["[", "[]", "[!]", "[z-a]", "[a-", "[a-b", "[a-bc]"] {
            assert!(Glob::check(p).is_err(), "{p}");
            assert!(!m(p, "a") && !m(p, ""), "{p}");
        }
        assert!(Glob::check("{a,b}/*.yaml").is_ok());
    }

    #[test]
    fn matching_is_linear_for_star_heavy_patterns() {
        let p = "*a*a*a*a*a*a*a*a*a*a*b";
        let t = "a".repeat(5000);
        assert!(!m(p, &t));
    }
}
