//! kiln's foundation: everything a stage needs to read a model as the Hugging Face ecosystem
//! writes it, before any tensor math happens.
//!
//! The design follows one rule: *raw at the edge, resolved inside*. `config.json`,
//! `tokenizer_config.json` and friends drift between library versions (transformers 5 renamed
//! `rope_theta`/`rope_scaling` to `rope_parameters` and `torch_dtype` to `dtype`), so each file is
//! parsed once into a permissive raw struct and then resolved into a validated type with no
//! `Option`s left that the model code would have to second-guess. Every error names the file and
//! the key or tensor at fault, so a user can fix their checkpoint without reading our source.

pub mod chat;
pub mod config;
pub mod error;
pub mod model_dir;
pub mod tokenizer;
pub mod weights;

pub use chat::ChatTemplate;
pub use config::{Architecture, GenerationConfig, ModelConfig, RopeConfig, RopeScaling};
pub use error::{Error, Result};
pub use model_dir::ModelDir;
pub use tokenizer::Tokenizer;
pub use weights::SafetensorsWeights;

/// Reads and parses a JSON file, naming the file in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
