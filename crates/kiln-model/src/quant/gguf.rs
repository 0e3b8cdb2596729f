//! GGUF files (in progress).

use std::path::Path;

use kiln_core::Result;

use crate::{LoadOptions, LoadedModel};

/// Loads a GGUF file as a model.
pub fn load_gguf(path: &Path, _options: &LoadOptions) -> Result<LoadedModel> {
    Err(kiln_core::Error::ModelNotFound(format!(
        "{}: GGUF loading is not written yet",
        path.display()
    )))
}
