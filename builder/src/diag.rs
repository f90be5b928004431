//! Profile diagnostics: every error names `file:line:col` and the key path, and renders with
//! miette (source snippet + label) on the terminal.

use miette::{Diagnostic, NamedSource, SourceSpan};
use std::fmt;
use std::path::{Path, PathBuf};

/// A 1-based position in one source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub file: usize,
    pub line: usize,
    pub col: usize,
}

/// One loaded profile file (the top-level one or a base it extends).
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// As the user wrote it (joined with the including file's directory for bases).
    pub path: PathBuf,
    pub text: String,
}

impl SourceFile {
    pub fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    /// Byte offset of a 1-based line / 1-based (character) column.
    pub fn offset(&self, line: usize, col: usize) -> usize {
        let mut off = 0;
        for (i, l) in self.text.split_inclusive('\n').enumerate() {
            if i + 1 == line {
                let in_line: usize = l
                    .chars()
                    .take(col.saturating_sub(1))
                    .map(char::len_utf8)
                    .sum();
                return (off + in_line).min(self.text.len());
            }
            off += l.len();
        }
        self.text.len()
    }

    /// Length of the token starting at `offset` (to the end of the word / line), for the label.
    fn token_len(&self, offset: usize) -> usize {
        let rest = &self.text[offset.min(self.text.len())..];
        let line = rest.split('\n').next().unwrap_or("");
        let word = line.trim_end();
        let end = word
            .find(": ")
            .or_else(|| word.strip_suffix(':').map(|w| w.len()));
        end.unwrap_or(word.len()).max(1)
    }
}

/// Columns past this are labelled at the start of their line in the rendered snippet.
const MAX_LABEL_COL: usize = 4096;

/// A profile error with its place. `Display` is the one-line form used by tests and logs:
/// `profiles/x.yaml:3:5: node.hostname: message`.
#[derive(Debug, Diagnostic)]
pub struct ProfileError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    /// Dotted key path (`tailscale.operator.oauth-client-secret.env`); empty for document-level errors.
    pub key: String,
    pub message: String,
    #[source_code]
    src: NamedSource<String>,
    #[label("{label}")]
    span: SourceSpan,
    label: String,
    #[help]
    pub help: Option<String>,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.col)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ProfileError {}

impl ProfileError {
    pub fn at(
        file: &SourceFile,
        line: usize,
        col: usize,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let message = message.into();
        // miette pads up to the label with `{:width$}`, and Rust's formatter panics on widths
        // above u16::MAX: on a very long line, label the line's start (line:col stay exact).
        let offset = file.offset(line, if col > MAX_LABEL_COL { 1 } else { col });
        let len = file
            .token_len(offset)
            .min(file.text.len().saturating_sub(offset));
        ProfileError {
            file: file.path.clone(),
            line,
            col,
            key: key.into(),
            label: short_label(&message),
            message,
            src: NamedSource::new(file.path.display().to_string(), file.text.clone()),
            span: SourceSpan::new(offset.into(), len),
            help: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

fn short_label(message: &str) -> String {
    let first = message.split(['\n', ';']).next().unwrap_or(message);
    if first.len() > 80 {
        format!("{}…", &first[..first.floor_char_boundary_compat(77)])
    } else {
        first.to_string()
    }
}

trait FloorBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}
impl FloorBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while i > 0 && !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}
