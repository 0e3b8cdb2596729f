//! Checkpoints that are written atomically and resume exactly.
//!
//! A checkpoint is a directory `checkpoint-STEP/` holding `model.safetensors` (the trainable
//! parameters by checkpoint name), `optimizer.safetensors` (the optimizer's state tensors),
//! `optimizer.json` (which optimizer wrote them, by its HF `optim` name) and
//! `trainer_state.json` (step counters, data position, seed, and whatever the recipe adds). It is
//! written into a temporary sibling, every file synced, then renamed into place: a crash at any
//! moment leaves either the previous checkpoint or the complete new one, never a torn one.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use kiln_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::optim::NamedVar;
use crate::optimizer::Optimizer;

const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const OPTIMIZER_META_FILE: &str = "optimizer.json";
/// The optimizer of checkpoints written before `optimizer.json` existed (kiln had only AdamW).
const LEGACY_OPTIMIZER: &str = "adamw_torch";
const STATE_FILE: &str = "trainer_state.json";
const PREFIX: &str = "checkpoint-";

/// Counters and positions a run needs to continue exactly where it stopped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub global_step: u64,
    /// Micro-batches consumed from the data stream.
    pub data_position: u64,
    pub seed: u64,
    /// Recipe-specific state (e.g. the best eval loss so far).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// `optimizer.json`: which optimizer's state `optimizer.safetensors` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OptimizerMeta {
    /// The HF `optim` name, e.g. `adamw_torch` or `paged_adamw_8bit`.
    optim: String,
}

/// A checkpoint on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Checkpoint {
    /// Writes a checkpoint for `state.global_step` under `output_dir`, atomically.
    pub fn save(
        output_dir: &Path,
        params: &[NamedVar],
        optimizer: &Optimizer,
        state: &TrainerState,
    ) -> Result<Self> {
        std::fs::create_dir_all(output_dir).map_err(io(output_dir))?;
        let name = format!("{PREFIX}{}", state.global_step);
        let final_dir = output_dir.join(&name);
        let tmp = output_dir.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;

        let model: HashMap<String, Tensor> = params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect();
        save_tensors(&model, &tmp.join(MODEL_FILE))?;
        let (opt_tensors, opt_step) = optimizer.state_tensors()?;
        if opt_step != state.global_step {
            return Err(Error::InvalidInput(format!(
                "checkpoint at step {} but the optimizer has taken {opt_step} steps",
                state.global_step
            )));
        }
        save_tensors(&opt_tensors, &tmp.join(OPTIMIZER_FILE))?;
        let meta = OptimizerMeta {
            optim: optimizer.name().to_string(),
        };
        write_json(&meta, &tmp.join(OPTIMIZER_META_FILE))?;
        write_json(state, &tmp.join(STATE_FILE))?;
        for file in [MODEL_FILE, OPTIMIZER_FILE, OPTIMIZER_META_FILE, STATE_FILE] {
            sync(&tmp.join(file))?;
        }

        // Replace an older checkpoint of the same step only once the new one is complete.
        if final_dir.exists() {
            let old = output_dir.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(&final_dir, &old).map_err(io(&final_dir))?;
            std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        } else {
            std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        }
        sync(output_dir)?;
        Ok(Self { dir: final_dir })
    }

    /// The checkpoint with the highest step under `output_dir`, if any (temporary directories of
    /// interrupted writes are ignored).
    pub fn latest(output_dir: &Path) -> Result<Option<Self>> {
        let Ok(entries) = std::fs::read_dir(output_dir) else {
            return Ok(None);
        };
        let mut best: Option<(u64, PathBuf)> = None;
        for entry in entries {
            let entry = entry.map_err(io(output_dir))?;
            let name = entry.file_name();
            let Some(step) = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            if entry.path().join(STATE_FILE).is_file()
                && best.as_ref().is_none_or(|(b, _)| step > *b)
            {
                best = Some((step, entry.path()));
            }
        }
        Ok(best.map(|(_, dir)| Self { dir }))
    }

    pub fn state(&self) -> Result<TrainerState> {
        kiln_core::read_json(&self.dir.join(STATE_FILE))
    }

    /// The HF `optim` name of the optimizer that wrote this checkpoint (`adamw_torch` for
    /// checkpoints from before kiln recorded it).
    pub fn optimizer_name(&self) -> Result<String> {
        let path = self.dir.join(OPTIMIZER_META_FILE);
        if !path.exists() {
            return Ok(LEGACY_OPTIMIZER.to_string());
        }
        let meta: OptimizerMeta = kiln_core::read_json(&path)?;
        Ok(meta.optim)
    }

    /// Restores parameter values and optimizer state; returns the trainer state. The checkpoint
    /// must have been written by an optimizer with the same state layout as `optimizer`
    /// (`adamw_8bit` and `paged_adamw_8bit` share one; aliases of `adamw_torch` too).
    pub fn restore(&self, params: &[NamedVar], optimizer: &mut Optimizer) -> Result<TrainerState> {
        let saved = self.optimizer_name()?;
        if Optimizer::state_kind_of(&saved) != Some(optimizer.state_kind()) {
            return Err(Error::InvalidInput(format!(
                "{}: the checkpoint holds `{saved}` optimizer state, but this run uses `{}`; resume with optim: {saved}, or start a fresh output_dir",
                self.dir.display(),
                optimizer.name()
            )));
        }
        let state = self.state()?;
        let model_path = self.dir.join(MODEL_FILE);
        let mut model = load_tensors(&model_path)?;
        for p in params {
            let t = model.remove(&p.name).ok_or_else(|| Error::MissingTensor {
                name: p.name.clone(),
                location: model_path.display().to_string(),
            })?;
            if t.dims() != p.var.dims() {
                return Err(Error::TensorShape {
                    file: model_path.clone(),
                    name: p.name.clone(),
                    expected: p.var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            p.var
                .set(&t.to_dtype(p.var.dtype())?.to_device(p.var.device())?)?;
        }
        let optimizer_state = load_tensors(&self.dir.join(OPTIMIZER_FILE))?;
        optimizer.load_state(optimizer_state, state.global_step)?;
        Ok(state)
    }
}

fn write_json(value: &impl Serialize, path: &Path) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, json).map_err(io(path))
}

fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| Error::InvalidInput(format!("{}: cannot write: {e}", path.display())))
}

fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::InvalidInput(format!(
            "{}: cannot read checkpoint tensors: {e}",
            path.display()
        ))
    })
}

fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}
