//! Loading profile files: strict YAML, `extends:` (deep merge, later wins, lists replace,
//! cycles refused) and an index from every key path to its place in the file that set it.
//!
//! serde_yaml's `Value` forgets positions, so each file is also read with yaml-rust2's marked
//! event parser; the merged index follows the same merge rules as the values, so an error found
//! after merging (or while resolving) still points at the exact line in the right file.

// ProfileError carries the source text for its snippet; it is built once per failed run, so
// its size on the (cold) error path does not matter.

use crate::diag::{Pos, ProfileError, SourceFile};
use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

pub type KeyPath = Vec<Seg>;

pub fn display_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

pub fn key_path(parts: &[&str]) -> KeyPath {
    parts.iter().map(|p| Seg::Key(p.to_string())).collect()
}

/// Where a node is: its key (for mapping entries) and its value.
#[derive(Debug, Clone, Copy)]
pub struct Located {
    pub key: Option<Pos>,
    pub value: Pos,
    pub is_map: bool,
}

/// All files of a profile and the merged position index.
#[derive(Debug, Default)]
pub struct Sources {
    pub files: Vec<SourceFile>,
    pub index: BTreeMap<KeyPath, Located>,
}

impl Sources {
    /// The nearest known place for `path` (walking up to an ancestor when the key is absent,
    /// e.g. for a missing field), preferring the key's position.
    pub fn locate(&self, path: &[Seg], prefer_key: bool) -> Pos {
        let mut p = path.to_vec();
        loop {
            if let Some(loc) = self.index.get(&p) {
                // A mapping's own start mark is unhelpful; its key is where the reader looks.
                return match (prefer_key || loc.is_map, loc.key) {
                    (true, Some(k)) => k,
                    _ => loc.value,
                };
            }
            if p.pop().is_none() {
                return Pos {
                    file: 0,
                    line: 1,
                    col: 1,
                };
            }
        }
    }

    pub fn error(
        &self,
        path: &[Seg],
        prefer_key: bool,
        message: impl Into<String>,
    ) -> ProfileError {
        let pos = self.locate(path, prefer_key);
        ProfileError::at(
            &self.files[pos.file],
            pos.line,
            pos.col,
            display_path(path),
            message,
        )
    }

    /// The file that set `path` (secrets given as `{file: ...}` are relative to its directory).
    pub fn file_of(&self, path: &[Seg]) -> &SourceFile {
        &self.files[self.locate(path, false).file]
    }
}

/// Profiles are small; refusing big files early keeps hostile input (YAML bombs, huge
/// strings) from costing memory and time.
pub const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// Reads at most `limit` bytes; a larger file is an error saying so.
pub fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut data)?;
    if data.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("file is larger than {limit} bytes"),
        ));
    }
    Ok(data)
}

/// Loads `path` and everything it extends; returns the merged document (without `extends`).
pub fn load(path: &Path) -> Result<(Value, Sources), ProfileError> {
    let mut sources = Sources::default();
    let text = read_limited(path, MAX_PROFILE_BYTES).map_err(|e| {
        let f = SourceFile {
            path: path.to_path_buf(),
            text: String::new(),
        };
        ProfileError::at(&f, 1, 1, "", format!("cannot read profile: {e}"))
    })?;
    let mut chain = Vec::new();
    let (value, index) = load_file(path.to_path_buf(), text, &mut sources, &mut chain)?;
    sources.index = index;
    Ok((value, sources))
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn load_file(
    path: PathBuf,
    bytes: Vec<u8>,
    sources: &mut Sources,
    chain: &mut Vec<PathBuf>,
) -> Result<(Value, BTreeMap<KeyPath, Located>), ProfileError> {
    let file_id = sources.files.len();
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let good = String::from_utf8_lossy(good).into_owned();
            let line = good.matches('\n').count() + 1;
            let col = good.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            let f = SourceFile { path, text: good };
            return Err(ProfileError::at(
                &f,
                line,
                col,
                "",
                "profile is not valid UTF-8",
            ));
        }
    };
    sources.files.push(SourceFile {
        path: path.clone(),
        text: text.clone(),
    });
    chain.push(canonical(&path));

    let file_index = index_file(&text, file_id).map_err(|(line, col, key, msg)| {
        ProfileError::at(&sources.files[file_id], line, col, key, msg)
    })?;
    let value: Value = if text.trim().is_empty() {
        Value::Mapping(Mapping::new())
    } else {
        serde_yaml::from_str(&text).map_err(|e| {
            let (line, col) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            // The key whose value contains the error: the last node starting before it.
            let key = file_index
                .iter()
                .filter(|(_, l)| (l.value.line, l.value.col) <= (line, col))
                .max_by_key(|(_, l)| (l.value.line, l.value.col))
                .map(|(k, _)| display_path(k))
                .unwrap_or_default();
            ProfileError::at(
                &sources.files[file_id],
                line,
                col,
                key,
                format!("invalid YAML: {msg}"),
            )
        })?
    };
    let mut map = match value {
        Value::Mapping(m) => m,
        other => {
            return Err(ProfileError::at(
                &sources.files[file_id],
                1,
                1,
                "",
                format!("a profile is a YAML mapping, found {}", kind(&other)),
            ))
        }
    };

    // Bases first, in the order listed; this file last (later wins).
    let mut merged = Value::Mapping(Mapping::new());
    let mut merged_index: BTreeMap<KeyPath, Located> = BTreeMap::new();
    if let Some(ext) = map.remove("extends") {
        let entries: Vec<(KeyPath, String)> = match ext {
            Value::String(s) => vec![(key_path(&["extends"]), s)],
            Value::Sequence(items) => {
                let mut out = Vec::new();
                for (i, item) in items.into_iter().enumerate() {
                    let p = vec![Seg::Key("extends".into()), Seg::Index(i)];
                    match item {
                        Value::String(s) => out.push((p, s)),
                        other => {
                            let pos = locate_in(&file_index, &p);
                            return Err(ProfileError::at(
                                &sources.files[file_id],
                                pos.line,
                                pos.col,
                                display_path(&p),
                                format!("extends entries are file paths, found {}", kind(&other)),
                            ));
                        }
                    }
                }
                out
            }
            other => {
                let p = key_path(&["extends"]);
                let pos = locate_in(&file_index, &p);
                return Err(ProfileError::at(
                    &sources.files[file_id],
                    pos.line,
                    pos.col,
                    "extends",
                    format!(
                        "extends is a file path or a list of them, found {}",
                        kind(&other)
                    ),
                ));
            }
        };
        let dir = sources.files[file_id].dir().to_path_buf();
        for (p, rel) in entries {
            let base_path = dir.join(&rel);
            let pos = locate_in(&file_index, &p);
            let here = &sources.files[file_id];
            let canon = canonical(&base_path);
            if let Some(start) = chain.iter().position(|c| *c == canon) {
                let names: Vec<String> = chain[start..]
                    .iter()
                    .chain(std::iter::once(&canon))
                    .map(|c| {
                        c.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    })
                    .collect();
                return Err(ProfileError::at(
                    here,
                    pos.line,
                    pos.col,
                    display_path(&p),
                    format!("extends cycle: {}", names.join(" → ")),
                ));
            }
            let bytes = read_limited(&base_path, MAX_PROFILE_BYTES).map_err(|e| {
                ProfileError::at(
                    here,
                    pos.line,
                    pos.col,
                    display_path(&p),
                    format!("cannot read base profile {}: {e}", base_path.display()),
                )
            })?;
            let (base_value, base_index) = load_file(base_path, bytes, sources, chain)?;
            merge_value(&mut merged, base_value);
            merge_index(&mut merged_index, base_index);
        }
    }
    let own_index: BTreeMap<KeyPath, Located> = file_index
        .into_iter()
        .filter(|(k, _)| k.first() != Some(&Seg::Key("extends".into())))
        .collect();
    merge_value(&mut merged, Value::Mapping(map));
    merge_index(&mut merged_index, own_index);
    chain.pop();
    Ok((merged, merged_index))
}

fn locate_in(index: &BTreeMap<KeyPath, Located>, path: &[Seg]) -> Pos {
    index.get(path).map(|l| l.value).unwrap_or(Pos {
        file: 0,
        line: 1,
        col: 1,
    })
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Deep merge: mappings merge key by key, anything else (lists included) is replaced.
pub fn merge_value(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing)
                        if existing.is_mapping() && v.is_mapping() && !is_secret_ref(&v) =>
                    {
                        merge_value(existing, v)
                    }
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// `{env: NAME}` / `{file: path}` / `{azure-key-vault: ...}`: replaced as a whole by a later file, never merged (a base's
/// `file:` plus an override's `env:` would be two sources).
pub fn is_secret_ref(v: &Value) -> bool {
    v.as_mapping().is_some_and(|m| {
        m.len() == 1
            && m.keys()
                .all(|k| matches!(k.as_str(), Some("env" | "file" | "azure-key-vault")))
    })
}

fn index_is_secret_ref(index: &BTreeMap<KeyPath, Located>, path: &KeyPath) -> bool {
    let children: Vec<&KeyPath> = index
        .range(path.clone()..)
        .take_while(|(k, _)| k.starts_with(path))
        .filter(|(k, _)| k.len() == path.len() + 1)
        .map(|(k, _)| k)
        .collect();
    children.len() == 1
        && matches!(children[0].last(), Some(Seg::Key(k)) if matches!(k.as_str(), "env" | "file" | "azure-key-vault"))
}

fn merge_index(base: &mut BTreeMap<KeyPath, Located>, over: BTreeMap<KeyPath, Located>) {
    for (path, loc) in &over {
        let base_is_map = base.get(path).is_some_and(|l| l.is_map);
        if !(loc.is_map && base_is_map) || index_is_secret_ref(&over, path) {
            // Replaced wholesale: forget what the base said below this path.
            base.retain(|k, _| !(k.len() > path.len() && k.starts_with(path)));
        }
    }
    base.extend(over);
}

enum Frame {
    Map {
        path: KeyPath,
        pending_key: Option<(String, Marker)>,
    },
    Seq {
        path: KeyPath,
        next: usize,
    },
}

struct Indexer {
    file: usize,
    stack: Vec<Frame>,
    index: BTreeMap<KeyPath, Located>,
    /// First key that appears twice in one mapping.
    duplicate: Option<(KeyPath, Marker)>,
}

impl Indexer {
    fn pos(&self, m: Marker) -> Pos {
        Pos {
            file: self.file,
            line: m.line(),
            col: m.col() + 1,
        }
    }

    /// Where the next node goes: `None` if it is a mapping key.
    fn place(&mut self) -> Option<(KeyPath, Option<Marker>)> {
        match self.stack.last_mut() {
            None => Some((Vec::new(), None)),
            Some(Frame::Map { path, pending_key }) => match pending_key.take() {
                None => None,
                Some((k, m)) => {
                    let mut p = path.clone();
                    p.push(Seg::Key(k));
                    Some((p, Some(m)))
                }
            },
            Some(Frame::Seq { path, next }) => {
                let mut p = path.clone();
                p.push(Seg::Index(*next));
                *next += 1;
                Some((p, None))
            }
        }
    }

    fn node(&mut self, mark: Marker, key_text: Option<String>, is_map: bool) -> Option<KeyPath> {
        match self.place() {
            None => {
                if let Some(Frame::Map { pending_key, .. }) = self.stack.last_mut() {
                    *pending_key = Some((key_text.unwrap_or_else(|| "?".into()), mark));
                }
                None
            }
            Some((path, key)) => {
                let loc = Located {
                    key: key.map(|k| self.pos(k)),
                    value: self.pos(mark),
                    is_map,
                };
                if self.index.insert(path.clone(), loc).is_some() && self.duplicate.is_none() {
                    self.duplicate = Some((path.clone(), key.unwrap_or(mark)));
                }
                Some(path)
            }
        }
    }
}

impl MarkedEventReceiver for Indexer {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(s, ..) => {
                self.node(mark, Some(s), false);
            }
            Event::Alias(_) => {
                self.node(mark, None, false);
            }
            Event::MappingStart(..) => {
                // A mapping used as a key is unusual; index it under "?".
                let path = self
                    .node(mark, None, true)
                    .unwrap_or_else(|| vec![Seg::Key("?".into())]);
                self.stack.push(Frame::Map {
                    path,
                    pending_key: None,
                });
            }
            Event::SequenceStart(..) => {
                let path = self
                    .node(mark, None, false)
                    .unwrap_or_else(|| vec![Seg::Key("?".into())]);
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

/// Key path → position for one file; `Err((line, col, key, message))` on a YAML syntax error
/// or a duplicate key.
fn index_file(
    text: &str,
    file: usize,
) -> Result<BTreeMap<KeyPath, Located>, (usize, usize, String, String)> {
    let mut ix = Indexer {
        file,
        stack: Vec::new(),
        index: BTreeMap::new(),
        duplicate: None,
    };
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut ix, false) {
        let (line, col) = (e.marker().line(), e.marker().col() + 1);
        // The innermost key read before the error (indices after the first one dropped, so a
        // deeply nested value is still named readably).
        let key = ix
            .index
            .iter()
            .filter(|(_, l)| (l.value.line, l.value.col) <= (line, col))
            .max_by_key(|(_, l)| (l.value.line, l.value.col))
            .map(|(k, _)| {
                let cut = k
                    .iter()
                    .position(|s| matches!(s, Seg::Index(_)))
                    .map_or(k.len(), |i| i + 1);
                display_path(&k[..cut])
            })
            .unwrap_or_default();
        return Err((line, col, key, format!("invalid YAML: {}", e.info())));
    }
    if let Some((path, m)) = ix.duplicate {
        let key = display_path(&path);
        let last = match path.last() {
            Some(Seg::Key(k)) => k.clone(),
            _ => key.clone(),
        };
        return Err((
            m.line(),
            m.col() + 1,
            key,
            format!("duplicate key `{last}` (a key may appear once)"),
        ));
    }
    Ok(ix.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_points_at_keys_and_values() {
        let text = "node:\n  hostname: a\n  keys:\n    - x\n    - y\n";
        let ix = index_file(text, 0).unwrap();
        let h = &ix[&key_path(&["node", "hostname"])];
        assert_eq!((h.key.unwrap().line, h.key.unwrap().col), (2, 3));
        assert_eq!((h.value.line, h.value.col), (2, 13));
        let y = &ix[&vec![
            Seg::Key("node".into()),
            Seg::Key("keys".into()),
            Seg::Index(1),
        ]];
        assert_eq!((y.value.line, y.value.col), (5, 7));
    }
}
