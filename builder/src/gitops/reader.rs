//! The document reader: what Argo CD's repo-server gets out of one manifest file, with line
//! numbers. A checkout is input kiln did not write, so everything here is bounded (file size,
//! nesting, alias expansion) and never panics (`tests/fuzz/fuzz_targets/gitops_reader.rs`).
//!
//! YAML is split into documents the way Kubernetes' `YAMLReader` (apimachinery v0.34, used by
//! Argo CD v3.4.7) splits it: at every line that starts with `---`; anything but a comment after
//! the `---` is an error ("invalid Yaml document separator"). Each document is then parsed on
//! its own with yaml-rust2's event parser, and plain scalars are resolved as go-yaml v2 (YAML
//! 1.1, what `sigs.k8s.io/yaml` uses) resolves them: `yes`/`on`/`off` are booleans, `010` is
//! octal, `~` is null. Merge keys (`<<`) and aliases are expanded.

use serde_json::{Map, Number, Value};
use std::collections::BTreeMap;
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Deeper than this is refused (go-yaml refuses deep nesting too).
pub const MAX_DEPTH: usize = 256;
/// Nodes per document, aliases expanded (a "billion laughs" file stops here).
pub const MAX_NODES: usize = 200_000;

/// One decoded document: its value and the line of every node, by JSON pointer.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    /// First line of the document's content (1-based, in the file).
    pub line: usize,
    pub value: Value,
    pub lines: BTreeMap<String, usize>,
}

impl Doc {
    /// The line of the node at `pointer`, or of its nearest ancestor that has one.
    pub fn line_of(&self, pointer: &str) -> usize {
        let mut p = pointer.to_string();
        loop {
            if let Some(l) = self.lines.get(&p) {
                return *l;
            }
            match p.rfind('/') {
                Some(i) => p.truncate(i),
                None => return self.line,
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocError {
    pub line: usize,
    pub message: String,
}

/// What a document of the stream turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// Empty or comments only (`null`): Argo CD skips it.
    Empty,
    Value(Doc),
    /// Not parseable; nothing after it is read.
    Error(DocError),
}

/// Splits YAML text into `(first line, chunk)` like apimachinery's `YAMLReader`; an invalid
/// separator ends the stream with an error.
pub fn split_yaml(text: &str) -> (Vec<(usize, String)>, Option<DocError>) {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut start = 1;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let lineno = n + 1;
        if let Some(rest) = line.strip_prefix("---") {
            let rest = rest.trim();
            if !rest.is_empty() && !rest.starts_with('#') {
                if !buf.is_empty() {
                    out.push((start, std::mem::take(&mut buf)));
                }
                return (
                    out,
                    Some(DocError {
                        line: lineno,
                        message: format!("invalid Yaml document separator: {rest}"),
                    }),
                );
            }
            if !buf.is_empty() {
                out.push((start, std::mem::take(&mut buf)));
                start = lineno + 1;
                continue;
            }
            // A leading separator stays in the (empty) buffer, as in apimachinery.
            start = lineno;
        }
        if buf.is_empty() && !line.starts_with("---") {
            start = lineno;
        }
        buf.push_str(line);
    }
    if !buf.is_empty() {
        out.push((start, buf));
    }
    (out, None)
}

/// Every document of a YAML file, in order, stopping after the first error.
pub fn read_yaml(text: &str) -> Vec<Item> {
    let (chunks, sep_error) = split_yaml(text);
    let mut items = Vec::new();
    for (start, chunk) in chunks {
        let item = parse_chunk(&chunk, start);
        let stop = matches!(item, Item::Error(_));
        items.push(item);
        if stop {
            return items;
        }
    }
    if let Some(e) = sep_error {
        items.push(Item::Error(e));
    }
    items
}

/// A `.json` file: Argo CD decodes one JSON value and refuses more than one.
pub fn read_json(text: &str) -> Vec<Item> {
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let first = match stream.next() {
        None => {
            return vec![Item::Error(DocError {
                line: 1,
                message: "unexpected end of JSON input".into(),
            })]
        }
        Some(Err(e)) => {
            return vec![Item::Error(DocError {
                line: e.line().max(1),
                message: e.to_string(),
            })]
        }
        Some(Ok(v)) => v,
    };
    let offset = stream.byte_offset();
    let mut items = vec![Item::Value(json_doc(text, first))];
    if stream.next().is_some() {
        let line = text[..offset].matches('\n').count() + 1;
        items.push(Item::Error(DocError {
            line,
            message: "Found multiple objects. Only single objects are allowed in JSON files."
                .into(),
        }));
    }
    items
}

/// Lines for a JSON value: JSON is YAML, so the YAML reader finds them; when it cannot, every
/// node is on the document's first line.
fn json_doc(text: &str, value: Value) -> Doc {
    let start = text
        .lines()
        .position(|l| !l.trim().is_empty())
        .map_or(1, |i| i + 1);
    let lines = match parse_chunk(text, 1) {
        Item::Value(d) => d.lines,
        _ => BTreeMap::new(),
    };
    Doc {
        line: start,
        value,
        lines,
    }
}

/// Lines of `text` as YAML counts them (`\n`, `\r\n` and a lone `\r` each end one), at least 1.
fn yaml_line_count(text: &str) -> usize {
    let b = text.as_bytes();
    let breaks = b
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c == b'\n' || (c == b'\r' && b.get(i + 1) != Some(&b'\n')))
        .count();
    let open_last = !matches!(b.last(), Some(b'\n' | b'\r') | None);
    (breaks + usize::from(open_last)).max(1)
}

/// Parses one document (its text starts at file line `start`).
pub fn parse_chunk(chunk: &str, start: usize) -> Item {
    let mut b = Builder {
        parser: Parser::new_from_str(chunk),
        offset: start - 1,
        anchors: BTreeMap::new(),
        nodes: 0,
        lines: BTreeMap::new(),
    };
    // The parser places an empty node that ends the text (`- !tag` on the last line) just past
    // the final line break: such a node is reported on the chunk's last line.
    let last = start - 1 + yaml_line_count(chunk);
    match b.document() {
        Ok(None) => Item::Empty,
        Ok(Some((value, line))) => Item::Value(Doc {
            line: line.min(last),
            value,
            lines: b.lines.into_iter().map(|(p, l)| (p, l.min(last))).collect(),
        }),
        Err(e) => Item::Error(e),
    }
}

struct Builder<'a> {
    parser: Parser<std::str::Chars<'a>>,
    offset: usize,
    anchors: BTreeMap<usize, Value>,
    nodes: usize,
    lines: BTreeMap<String, usize>,
}

type R<T> = Result<T, DocError>;

impl Builder<'_> {
    fn err(&self, m: Marker, message: impl Into<String>) -> DocError {
        DocError {
            line: m.line() + self.offset,
            message: message.into(),
        }
    }

    fn next(&mut self) -> R<(Event, Marker)> {
        let offset = self.offset;
        self.parser.next_token().map_err(|e| DocError {
            line: e.marker().line() + offset,
            message: e.info().to_string(),
        })
    }

    /// The first document of the chunk (a chunk holds one; `...` ends it early).
    fn document(&mut self) -> R<Option<(Value, usize)>> {
        loop {
            let (ev, m) = self.next()?;
            match ev {
                Event::StreamStart | Event::Nothing => {}
                Event::StreamEnd => return Ok(None),
                Event::DocumentStart => {
                    let (ev, m) = self.next()?;
                    if matches!(ev, Event::DocumentEnd) {
                        return Ok(None);
                    }
                    let line = m.line() + self.offset;
                    let v = self.node(ev, m, String::new(), 0)?;
                    return Ok(if v.is_null() { None } else { Some((v, line)) });
                }
                other => return Err(self.err(m, format!("unexpected {other:?}"))),
            }
        }
    }

    fn count(&mut self, m: Marker) -> R<()> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(self.err(m, format!("more than {MAX_NODES} nodes (aliases expanded)")));
        }
        Ok(())
    }

    fn node(&mut self, ev: Event, m: Marker, ptr: String, depth: usize) -> R<Value> {
        if depth > MAX_DEPTH {
            return Err(self.err(m, format!("nested deeper than {MAX_DEPTH}")));
        }
        self.count(m)?;
        self.lines
            .entry(ptr.clone())
            .or_insert(m.line() + self.offset);
        let (v, anchor) = match ev {
            Event::Scalar(s, style, anchor, tag) => (
                scalar(&s, style, tag.as_ref().map(|t| t.suffix.as_str())),
                anchor,
            ),
            Event::Alias(id) => {
                let v = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| self.err(m, "unknown anchor"))?;
                let size = weight(&v);
                self.nodes += size;
                if self.nodes > MAX_NODES {
                    return Err(
                        self.err(m, format!("more than {MAX_NODES} nodes (aliases expanded)"))
                    );
                }
                (v, 0)
            }
            Event::SequenceStart(anchor, _) => (self.sequence(ptr, depth)?, anchor),
            Event::MappingStart(anchor, _) => (self.mapping(m, ptr, depth)?, anchor),
            other => return Err(self.err(m, format!("unexpected {other:?}"))),
        };
        if anchor > 0 {
            self.anchors.insert(anchor, v.clone());
        }
        Ok(v)
    }

    fn sequence(&mut self, ptr: String, depth: usize) -> R<Value> {
        let mut out = Vec::new();
        loop {
            let (ev, m) = self.next()?;
            if matches!(ev, Event::SequenceEnd) {
                return Ok(Value::Array(out));
            }
            let child = format!("{ptr}/{}", out.len());
            out.push(self.node(ev, m, child, depth + 1)?);
        }
    }

    fn mapping(&mut self, start: Marker, ptr: String, depth: usize) -> R<Value> {
        let mut out = Map::new();
        // Merge keys (`<<`) fill in keys the mapping does not set itself.
        let mut merged: Vec<Map<String, Value>> = Vec::new();
        loop {
            let (ev, m) = self.next()?;
            if matches!(ev, Event::MappingEnd) {
                break;
            }
            let is_merge =
                matches!(&ev, Event::Scalar(s, TScalarStyle::Plain, _, None) if s == "<<");
            let key_value = self.node(ev, m, format!("{ptr}/\u{0}key"), depth + 1)?;
            self.lines.remove(&format!("{ptr}/\u{0}key"));
            let key = match key_string(&key_value) {
                Some(k) => k,
                None => return Err(self.err(m, "a mapping key must be a scalar")),
            };
            let (ev, vm) = self.next()?;
            let child = format!("{ptr}/{}", escape(&key));
            let value = self.node(ev, vm, child.clone(), depth + 1)?;
            if is_merge {
                self.lines.remove(&child);
                match value {
                    Value::Object(o) => merged.push(o),
                    Value::Array(list) if list.iter().all(Value::is_object) => {
                        merged.extend(list.into_iter().filter_map(|v| match v {
                            Value::Object(o) => Some(o),
                            _ => None,
                        }))
                    }
                    _ => {
                        return Err(self.err(
                            vm,
                            "map merge requires map or sequence of maps as the value",
                        ))
                    }
                }
                continue;
            }
            // Keys line up with their own line, so a finding about a field points at it.
            self.lines.insert(child, m.line() + self.offset);
            out.insert(key, value);
        }
        for o in merged {
            for (k, v) in o {
                out.entry(k).or_insert(v);
            }
        }
        let _ = start;
        Ok(Value::Object(out))
    }
}

fn weight(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(weight).sum::<usize>(),
        Value::Object(o) => 1 + o.values().map(weight).sum::<usize>(),
        _ => 1,
    }
}

/// RFC 6901 escaping, as jsonschema writes instance paths.
pub fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// `sigs.k8s.io/yaml` turns non-string keys into their JSON text; maps and lists as keys fail.
fn key_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => Some("null".into()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// go-yaml v2 resolution of a scalar (YAML 1.1); quoted and block scalars are strings.
fn scalar(s: &str, style: TScalarStyle, tag: Option<&str>) -> Value {
    match tag {
        Some("str") => return Value::String(s.into()),
        Some("null") => return Value::Null,
        Some("bool") | Some("int") | Some("float") => return plain(s),
        _ => {}
    }
    if style != TScalarStyle::Plain {
        return Value::String(s.into());
    }
    plain(s)
}

fn plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            return Value::Bool(true)
        }
        "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            return Value::Bool(false)
        }
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => {
            // JSON has no infinities: sigs.k8s.io/yaml fails on them; a string is the nearest.
            return Value::String(s.into());
        }
        _ => {}
    }
    if let Some(i) = int(s) {
        return Value::Number(i.into());
    }
    if is_float(s) {
        if let Some(n) = s
            .replace('_', "")
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
        {
            return Value::Number(n);
        }
    }
    Value::String(s.into())
}

fn int(s: &str) -> Option<i64> {
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let body = body.replace('_', "");
    if body.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(h) = body.strip_prefix("0x") {
        (h.to_string(), 16)
    } else if let Some(b) = body.strip_prefix("0b") {
        (b.to_string(), 2)
    } else if body.len() > 1 && body.starts_with('0') {
        (body[1..].to_string(), 8)
    } else {
        (body.clone(), 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i64::from_str_radix(&digits, radix).ok()?;
    Some(if neg { -v } else { v })
}

/// go-yaml v2's float syntax: `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`.
fn is_float(s: &str) -> bool {
    let digits = |x: &str| !x.is_empty() && x.chars().all(|c| c.is_ascii_digit());
    let b = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mant, exp) = match b.find(['e', 'E']) {
        Some(i) => (&b[..i], Some(&b[i + 1..])),
        None => (b, None),
    };
    if let Some(e) = exp {
        if !digits(e.strip_prefix(['-', '+']).unwrap_or(e)) {
            return false;
        }
    }
    match mant.split_once('.') {
        Some(("", frac)) => digits(frac),
        Some((int, frac)) => digits(int) && (frac.is_empty() || digits(frac)),
        None => digits(mant),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values(text: &str) -> Vec<Value> {
        read_yaml(text)
            .into_iter()
            .filter_map(|i| match i {
                Item::Value(d) => Some(d.value),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn documents_split_at_separator_lines_with_their_first_lines() {
        let t = "# head\n---\na: 1\n---\n\n# only a comment\n--- # trailing comment ok\nkind: X\nb:\n  c: [1, 2]\n";
        let items = read_yaml(t);
        // The comment before the first `---` is a document of its own (empty), as in
        // apimachinery's YAMLReader.
        assert_eq!(items.len(), 4, "{items:?}");
        assert_eq!(items[0], Item::Empty);
        let Item::Value(d) = &items[1] else { panic!() };
        assert_eq!((d.line, d.value.clone()), (3, json!({"a": 1})));
        assert_eq!(items[2], Item::Empty);
        let Item::Value(d) = &items[3] else { panic!() };
        assert_eq!(d.line, 8);
        assert_eq!(d.line_of("/b/c/1"), 10);
        assert_eq!(d.line_of("/b"), 9);
        assert_eq!(d.line_of("/nope/x"), 8);
    }

    #[test]
    fn a_bad_separator_or_bad_yaml_stops_the_stream() {
        let items = read_yaml("a: 1\n--- !tag\nb: 2\n");
        assert!(
            matches!(&items[1], Item::Error(e) if e.line == 2 && e.message.contains("separator")),
            "{items:?}"
        );
        let items = read_yaml("a: 1\n---\nb: [1\n---\nc: 3\n");
        assert_eq!(items.len(), 2);
        assert!(
            matches!(&items[1], Item::Error(e) if e.line >= 3),
            "{items:?}"
        );
    }

    #[test]
    fn plain_scalars_resolve_as_yaml_1_1() {
        let v = &values(
            "a: yes\nb: off\nc: 010\nd: 0x1f\ne: 1.5\nf: '1.5'\ng: ~\nh: 1_000\ni: v1\nj: 1e3\n",
        )[0];
        assert_eq!(
            *v,
            json!({"a": true, "b": false, "c": 8, "d": 31, "e": 1.5, "f": "1.5", "g": null, "h": 1000, "i": "v1", "j": 1000.0})
        );
    }

    #[test]
    fn anchors_and_merge_keys_expand_and_bombs_stop() {
        let v = &values("base: &b {x: 1, z: 2}\nother:\n  <<: *b\n  z: 3\n")[0];
        assert_eq!(v["other"], json!({"x": 1, "z": 3}));
        // go-yaml v2 reads the key `y` as the boolean true; sigs.k8s.io/yaml writes "true".
        assert_eq!(values("y: 1\n")[0], json!({"true": 1}));
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            bomb.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n", p = i - 1));
        }
        assert!(matches!(&read_yaml(&bomb)[0], Item::Error(e) if e.message.contains("nodes")));
        let deep = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));
        // Refused (by the parser's own limit or ours), never a stack overflow.
        assert!(matches!(&read_yaml(&deep)[0], Item::Error(_)));
    }

    #[test]
    fn json_files_hold_exactly_one_value() {
        let items = read_json("{\"kind\": \"ConfigMap\",\n \"metadata\": {\"name\": \"a\"}}\n");
        assert_eq!(items.len(), 1);
        let Item::Value(d) = &items[0] else { panic!() };
        assert_eq!(d.line_of("/metadata/name"), 2);
        let items = read_json("{}\n{}\n");
        assert!(matches!(&items[1], Item::Error(e) if e.message.contains("multiple")));
        assert!(matches!(&read_json("{\"a\": }")[0], Item::Error(_)));
    }
}
