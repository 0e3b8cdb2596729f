//! The one error type of the library crates. Messages name the file, key or tensor at fault and,
//! for shapes, what was expected versus what was found.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    /// A config file parsed but one of its keys holds something kiln cannot use.
    #[error("{}: key `{key}`: {message}", path.display())]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },

    #[error("{0}")]
    ModelNotFound(String),

    #[error("{}: tensor `{name}`: expected shape {expected:?}, found {found:?}", file.display())]
    TensorShape {
        file: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor `{name}` not found in {location}")]
    MissingTensor { name: String, location: String },

    #[error("{}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("adapter {}: {message}", path.display())]
    Adapter { path: PathBuf, message: String },

    #[error("{0}")]
    InvalidInput(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn config(path: impl Into<PathBuf>, key: &str, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}
