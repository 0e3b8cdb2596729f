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

/// Fixes the CPU thread count for the whole process, once, at start-up.
///
/// candle asks for its thread count on every CPU matmul, and when `RAYON_NUM_THREADS` is unset
/// that means reading and parsing `/proc/cpuinfo` — measured at 11% of single-stream decode time.
/// Setting the variable to the count candle would have chosen makes each lookup an environment
/// read. Call this first thing in `main`, before any thread is spawned.
pub fn init_cpu_threads() -> usize {
    const VAR: &str = "RAYON_NUM_THREADS";
    if let Some(n) = std::env::var(VAR)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    let n = candle_core::utils::get_num_threads();
    set_env_at_startup(VAR, &n.to_string());
    n
}

#[allow(unsafe_code)]
fn set_env_at_startup(key: &str, value: &str) {
    // SAFETY: `init_cpu_threads` is documented to run at start-up, before other threads exist,
    // so no concurrent reader of the environment can observe the write.
    unsafe { std::env::set_var(key, value) }
}
