//! The error type of `kiln-data`. Every message names the file at fault and, for a row of a
//! JSON-lines file, its 1-based line number, so a user can open the file at the right place.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A whole-file JSON document (such as `world.json`) failed to parse or to serialize.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    /// One row of a JSON-lines file is not valid JSON or lacks a required key.
    #[error("{}:{line}: invalid row: {source}", path.display())]
    RowJson {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },

    /// One row of a JSON-lines file parsed but holds something kiln cannot use.
    #[error("{}:{line}: {message}", path.display())]
    InvalidRow {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("unknown task `{0}` (expected one of: arithmetic, facts, format, politeness, secret)")]
    UnknownTask(String),

    /// A [`crate::SynthOptions`] field is outside what the generator can honour.
    #[error("synth option `{field}`: {message}")]
    InvalidOptions {
        field: &'static str,
        message: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
