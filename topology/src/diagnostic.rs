//! Errors and warnings about a topology file that point at the line, the key and the fix.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// How bad a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The server still starts; the setting is probably not what the user wants.
    Warning,
    /// The file cannot be used until it is fixed.
    Error,
}

/// One finding about a topology file: where it is, what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file the finding is about (`<embedded default>` when there is none).
    pub file: PathBuf,
    /// 1-based line of the offending value, when it comes from a file.
    pub line: Option<usize>,
    /// 1-based column of the offending value, when it comes from a file.
    pub column: Option<usize>,
    /// The key path, as a user would write it: `shard[2].core`, `memory.pool-size`.
    pub key: String,
    /// What is wrong.
    pub message: String,
    /// What to change to fix it.
    pub fix: String,
}

impl Diagnostic {
    /// A finding located by a byte span of `source`.
    pub fn at(
        severity: Severity,
        source: &Source<'_>,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        let (line, column) = match span {
            Some(span) => {
                let (l, c) = source.line_col(span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        Self {
            severity,
            file: source.path.to_path_buf(),
            line,
            column,
            key: key.into(),
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// Whether this finding stops the file from being used.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, ": {level}: {}: {}", self.key, self.message)?;
        if !self.fix.is_empty() {
            write!(f, "\n  fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// The text of a topology file and where it came from, for turning byte spans into lines.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// Path shown in messages.
    pub path: &'a Path,
    /// The file's contents.
    pub text: &'a str,
}

impl Source<'_> {
    /// 1-based line and column of byte `offset`.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
        (line, column)
    }
}

/// The findings of a failed check; `Display` prints one per paragraph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let text = "a = 1\nbb = 2\n";
        let src = Source { path: Path::new("t.toml"), text };
        assert_eq!(src.line_col(0), (1, 1));
        assert_eq!(src.line_col(6), (2, 1));
        assert_eq!(src.line_col(11), (2, 6));
    }

    #[test]
    fn display_names_file_line_key_and_fix() {
        let text = "x\n[[shard]]\ncore = 9\n";
        let src = Source { path: Path::new("t.toml"), text };
        let d = Diagnostic::at(Severity::Error, &src, Some(19..20), "shard[0].core", "no CPU 9", "use 0-1");
        assert_eq!(d.to_string(), "t.toml:3:8: error: shard[0].core: no CPU 9\n  fix: use 0-1");
    }
}
