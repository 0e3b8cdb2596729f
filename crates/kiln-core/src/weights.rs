//! Memory-mapped safetensors weights, single-file or sharded, behind candle's `VarBuilder`.
//!
//! Model code asks for `vb.pp("self_attn").get((out, in), "q_proj.weight")`; this backend finds
//! the shard holding the tensor, checks its shape and converts its dtype. Errors name the file,
//! the tensor and both shapes, which is what a user with a broken checkpoint needs to see.
//!
//! Individual tensors can be overridden in memory ([`SafetensorsWeights::set_override`]): that
//! is how an adapter's `modules_to_save` weights replace the base model's before it is built.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// One or more safetensors files, memory-mapped, with an index from tensor name to file.
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    index: HashMap<String, usize>,
    /// Tensors served instead of the files' (same name, same shape).
    overrides: HashMap<String, Tensor>,
}

impl std::fmt::Debug for SafetensorsWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsWeights")
            .field(
                "files",
                &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .field("overrides", &self.overrides.len())
            .finish()
    }
}

impl SafetensorsWeights {
    /// Maps each file. A tensor name present in two files is an error.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let mapped = map_file(path)?;
            for (name, _) in mapped.tensors() {
                if let Some(prev) = index.insert(name.clone(), i) {
                    let prev: &PathBuf = &paths[prev];
                    return Err(Error::InvalidInput(format!(
                        "tensor `{name}` appears in both {} and {}",
                        prev.display(),
                        path.display()
                    )));
                }
            }
            files.push((path.clone(), mapped));
        }
        Ok(Self {
            files,
            index,
            overrides: HashMap::new(),
        })
    }

    /// Serves `tensor` instead of the stored tensor `name`, which must exist with the same shape
    /// (errors name the file holding it and both shapes). Converted to the requested dtype and
    /// device when loaded, like any stored tensor.
    pub fn set_override(&mut self, name: &str, tensor: Tensor) -> Result<()> {
        let stored = self.shape_of(name).ok_or_else(|| self.missing(name))?;
        if tensor.dims() != stored.as_slice() {
            return Err(Error::TensorShape {
                file: self
                    .file_of(name)
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
                name: name.to_string(),
                expected: stored,
                found: tensor.dims().to_vec(),
            });
        }
        self.overrides.insert(name.to_string(), tensor);
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The file a tensor lives in.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.files[i].0.as_path())
    }

    /// On-disk shape of a tensor.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let &i = self.index.get(name)?;
        self.files[i].1.get(name).ok().map(|v| v.shape().to_vec())
    }

    /// Loads a tensor as stored, converted to `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        if let Some(tensor) = self.overrides.get(name) {
            return Ok(tensor.to_device(device)?.to_dtype(dtype)?);
        }
        let &i = self.index.get(name).ok_or_else(|| self.missing(name))?;
        let (path, mapped) = &self.files[i];
        let tensor = mapped.load(name, device).map_err(|e| {
            Error::InvalidInput(format!("{}: tensor `{name}`: {e}", path.display()))
        })?;
        Ok(tensor.to_dtype(dtype)?)
    }

    /// Loads a tensor and checks its shape.
    pub fn load_shaped(
        &self,
        name: &str,
        shape: &Shape,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let tensor = self.load(name, dtype, device)?;
        if tensor.dims() != shape.dims() {
            return Err(Error::TensorShape {
                file: self
                    .file_of(name)
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
                name: name.to_string(),
                expected: shape.dims().to_vec(),
                found: tensor.dims().to_vec(),
            });
        }
        Ok(tensor)
    }

    fn missing(&self, name: &str) -> Error {
        let location = match self.files.as_slice() {
            [(only, _)] => only.display().to_string(),
            files => format!(
                "any of {} shards ({})",
                files.len(),
                files
                    .first()
                    .and_then(|(p, _)| p.parent())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        };
        Error::MissingTensor {
            name: name.to_string(),
            location,
        }
    }

    /// A `VarBuilder` reading from these weights.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<MmapedSafetensors> {
    if !path.is_file() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    // SAFETY: the mapping is read-only; like every memory-mapped loader (transformers included)
    // we rely on the file not being truncated by another process while the model is loaded.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
        Error::InvalidInput(format!(
            "{}: not a valid safetensors file: {e}",
            path.display()
        ))
    })
}

fn to_candle(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl candle_nn::var_builder::SimpleBackend for SafetensorsWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load_shaped(name, &s, dtype, dev).map_err(to_candle)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev).map_err(to_candle)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}
