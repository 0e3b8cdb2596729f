//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, keys
//! `base_model.model.<module path>.lora_A.weight` (`[r, in]`) and `.lora_B.weight` (`[out, r]`),
//! read ([`LoraAdapter::load`]) and written ([`LoraAdapter::save`]) the way PEFT 0.21's
//! `PeftModel.from_pretrained` / `save_pretrained` do.
//!
//! Targeting follows PEFT's `check_target_module_exists`: a list entry matches a module whose
//! path equals it or ends with `.entry`; a string is a regex that must match the whole path;
//! `"all-linear"` means every linear layer but the output head. `rank_pattern` and `alpha_pattern`
//! override `r` and `lora_alpha` per module the same way PEFT does.
//!
//! `modules_to_save` (whole modules trained and saved beside the LoRA weights, typically
//! `lm_head` or `embed_tokens`) follow PEFT's `_set_trainable`: an entry selects every module whose
//! path ends with it. Their weights are stored as `base_model.model.<module>.<param>` (PEFT strips
//! the `modules_to_save.default` infix on save) and replace the base model's weights when the
//! model is built ([`LoraAdapter::overlay`]), since they are the module's weights, not an update.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kiln_core::{Error, Result, SafetensorsWeights};
use serde::Deserialize;
use serde_json::Value;

use crate::linear::LoraLayer;
use crate::transformer::CausalLm;

const KEY_PREFIX: &str = "base_model.model.";

/// `target_modules` as PEFT accepts it.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names matched against the end of each module path.
    Names(Vec<String>),
    /// A regex that must match the whole module path.
    Regex(String),
    /// Every linear layer except the output head.
    AllLinear,
}

#[derive(Debug, Clone, Deserialize)]
struct RawLoraConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    #[serde(default)]
    lora_alpha: Option<f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    target_modules: Option<Value>,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default)]
    rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

/// The PEFT version written into saved configs: the one kiln's adapter format is checked against.
pub const PEFT_VERSION: &str = "0.21.2";

/// A validated LoRA configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    pub lora_dropout: f64,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Modules trained in full and saved whole beside the LoRA weights (PEFT's
    /// `modules_to_save`): an entry selects every module whose path ends with it.
    pub modules_to_save: Vec<String>,
    pub base_model_name_or_path: Option<String>,
}

impl LoraConfig {
    /// A config with PEFT's defaults for everything but rank, alpha and targets: no dropout, no
    /// rsLoRA, no per-module patterns, no `modules_to_save`.
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Self {
        Self {
            r,
            lora_alpha,
            use_rslora: false,
            target_modules,
            lora_dropout: 0.0,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: Vec::new(),
            base_model_name_or_path: None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawLoraConfig = kiln_core::read_json(path)?;
        let err = |key: &str, msg: String| Error::config(path, key, msg);
        if let Some(t) = raw.peft_type.as_ref().filter(|t| *t != "LORA") {
            return Err(err(
                "peft_type",
                format!("`{t}` is not supported (kiln reads LORA adapters)"),
            ));
        }
        if raw.use_dora {
            return Err(err(
                "use_dora",
                "DoRA adapters are not supported yet".into(),
            ));
        }
        if raw.fan_in_fan_out {
            return Err(err(
                "fan_in_fan_out",
                "true is for GPT-2 style Conv1D layers, which kiln's models do not have".into(),
            ));
        }
        if raw.r == 0 {
            return Err(err("r", "must be greater than 0".into()));
        }
        let target_modules = match raw.target_modules {
            Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(Value::String(s)) => TargetModules::Regex(s),
            Some(Value::Array(items)) => TargetModules::Names(
                items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            err(
                                "target_modules",
                                format!("expected module names, found {v}"),
                            )
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            other => {
                return Err(err(
                    "target_modules",
                    format!(
                        "expected a list of module names, a regex or \"all-linear\", found {}",
                        other.unwrap_or(Value::Null)
                    ),
                ));
            }
        };
        Ok(Self {
            r: raw.r,
            lora_alpha: raw.lora_alpha.unwrap_or(8.0),
            use_rslora: raw.use_rslora,
            target_modules,
            lora_dropout: raw.lora_dropout,
            rank_pattern: raw.rank_pattern,
            alpha_pattern: raw.alpha_pattern,
            modules_to_save: raw.modules_to_save.unwrap_or_default(),
            base_model_name_or_path: raw.base_model_name_or_path,
        })
    }

    /// The `adapter_config.json` PEFT writes for this config (keys in PEFT's order), which
    /// `PeftModel.from_pretrained` reads back: a LoRA for a causal LM, no bias, no DoRA, in
    /// inference mode. `"all-linear"` is written as is here; [`LoraAdapter::from_model`] resolves
    /// it to the paths of the modules it matched, as PEFT does when it wraps a model.
    pub fn to_adapter_config_json(&self) -> Value {
        let target_modules = match &self.target_modules {
            TargetModules::Names(names) => Value::from(names.clone()),
            TargetModules::Regex(re) => Value::from(re.clone()),
            TargetModules::AllLinear => Value::from("all-linear"),
        };
        let modules_to_save = if self.modules_to_save.is_empty() {
            Value::Null
        } else {
            Value::from(self.modules_to_save.clone())
        };
        let alpha_pattern: serde_json::Map<String, Value> = self
            .alpha_pattern
            .iter()
            .map(|(k, &v)| (k.clone(), json_number(v)))
            .collect();
        serde_json::json!({
            "alpha_pattern": alpha_pattern,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": json_number(self.lora_alpha),
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": modules_to_save,
            "peft_type": "LORA",
            "peft_version": PEFT_VERSION,
            "r": self.r,
            "rank_pattern": self.rank_pattern,
            "revision": null,
            "target_modules": target_modules,
            "target_parameters": null,
            "task_type": "CAUSAL_LM",
            "trainable_token_indices": null,
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }

    /// Whether PEFT would keep a trained copy of the module at `path` (`modules_to_save`).
    pub fn saves_module(&self, path: &str) -> bool {
        self.modules_to_save
            .iter()
            .any(|m| path.ends_with(m.as_str()))
    }

    /// Checks that every name in a `target_modules` list matches one of the model's linear
    /// `paths`; the error names the entry and the module names the model has.
    pub fn check_targets<'a>(
        &self,
        paths: impl Iterator<Item = &'a str> + Clone,
    ) -> std::result::Result<(), String> {
        let TargetModules::Names(names) = &self.target_modules else {
            return Ok(());
        };
        match names
            .iter()
            .find(|name| !paths.clone().any(|path| suffix_match(path, name)))
        {
            Some(name) => {
                let available: BTreeSet<&str> =
                    paths.map(|p| p.rsplit('.').next().unwrap_or(p)).collect();
                Err(format!(
                    "`{name}` matches no module of the model (its linear modules are {})",
                    available.into_iter().collect::<Vec<_>>().join(", ")
                ))
            }
            None => Ok(()),
        }
    }

    /// Whether PEFT would wrap the module at `path`.
    pub fn targets(&self, path: &str) -> bool {
        match &self.target_modules {
            TargetModules::AllLinear => path != "lm_head",
            TargetModules::Names(names) => names.iter().any(|n| suffix_match(path, n)),
            TargetModules::Regex(re) => regex_full_match(re, path),
        }
    }

    /// The rank of the module at `path`: `r`, or its `rank_pattern` entry.
    pub fn rank_for(&self, path: &str) -> usize {
        pattern_value(&self.rank_pattern, path).unwrap_or(self.r)
    }

    /// The LoRA scale of the module at `path`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale_for(&self, path: &str) -> f64 {
        let r = pattern_value(&self.rank_pattern, path).unwrap_or(self.r) as f64;
        let alpha = pattern_value(&self.alpha_pattern, path).unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// Whole numbers as JSON integers (PEFT writes `"lora_alpha": 16`), others as floats.
fn json_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// The module holding the weight `name` (`lm_head.weight` → `lm_head`) and its ancestors, the
/// paths PEFT's `modules_to_save` matching sees.
fn module_paths(name: &str) -> impl Iterator<Item = &str> {
    name.rmatch_indices('.').map(move |(i, _)| &name[..i])
}

fn suffix_match(path: &str, name: &str) -> bool {
    path == name || path.ends_with(&format!(".{name}"))
}

fn regex_full_match(pattern: &str, path: &str) -> bool {
    regex::Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|re| re.is_match(path))
}

/// PEFT's `get_pattern_key`: a pattern key applies to a module whose path ends with it.
fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, path: &str) -> Option<T> {
    patterns.iter().find_map(|(key, &value)| {
        let matches =
            regex::Regex::new(&format!("(^|.*\\.){key}$")).is_ok_and(|re| re.is_match(path));
        matches.then_some(value)
    })
}

/// An adapter: its config, the A/B pair of every module it adapts, and the full weights of its
/// `modules_to_save`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Where it was loaded from (empty for an adapter taken from a model in memory).
    pub dir: PathBuf,
    pub config: LoraConfig,
    /// Module path (`model.layers.0.self_attn.q_proj`) → (A, B).
    pub modules: BTreeMap<String, (Tensor, Tensor)>,
    /// `modules_to_save` weights by their name in the base checkpoint (`lm_head.weight`): they
    /// replace the base model's weights of that name.
    pub saved_modules: BTreeMap<String, Tensor>,
}

impl LoraAdapter {
    /// Reads a PEFT adapter directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let adapter_err = |message: String| Error::Adapter {
            path: dir.to_path_buf(),
            message,
        };
        let config_path = dir.join("adapter_config.json");
        if !config_path.is_file() {
            return Err(adapter_err("missing adapter_config.json".into()));
        }
        let config = LoraConfig::from_file(&config_path)?;
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.is_file() {
            let hint = if dir.join("adapter_model.bin").exists() {
                " (adapter_model.bin is not read: save with safe_serialization=True)"
            } else {
                ""
            };
            return Err(adapter_err(format!(
                "missing adapter_model.safetensors{hint}"
            )));
        }
        let weights = SafetensorsWeights::open(std::slice::from_ref(&weights_path))?;

        let mut halves: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        let mut saved_modules = BTreeMap::new();
        for name in weights.names() {
            let Some((module, is_a)) = parse_key(name) else {
                let saved = name
                    .strip_prefix(KEY_PREFIX)
                    .filter(|rest| module_paths(rest).any(|p| config.saves_module(p)));
                let Some(weight_name) = saved else {
                    let listed = if config.modules_to_save.is_empty() {
                        "lists none".to_string()
                    } else {
                        format!("lists {:?}", config.modules_to_save)
                    };
                    return Err(adapter_err(format!(
                        "{}: tensor `{name}` is neither a LoRA weight (`{KEY_PREFIX}<module>.lora_A.weight` or `.lora_B.weight`) nor a weight of a module in modules_to_save (adapter_config.json {listed})",
                        weights_path.display()
                    )));
                };
                saved_modules.insert(weight_name.to_string(), weights.load(name, dtype, device)?);
                continue;
            };
            let tensor = weights.load(name, dtype, device)?;
            let entry = halves.entry(module.to_string()).or_default();
            if is_a {
                entry.0 = Some(tensor);
            } else {
                entry.1 = Some(tensor);
            }
        }
        let mut modules = BTreeMap::new();
        for (module, pair) in halves {
            match pair {
                (Some(a), Some(b)) => {
                    modules.insert(module, (a, b));
                }
                (a, _) => {
                    let missing = if a.is_none() { "lora_A" } else { "lora_B" };
                    return Err(adapter_err(format!(
                        "{}: module `{module}` has no {missing} weight",
                        weights_path.display()
                    )));
                }
            }
        }
        if modules.is_empty() {
            return Err(adapter_err(format!(
                "{} holds no LoRA weights",
                weights_path.display()
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            modules,
            saved_modules,
        })
    }

    /// Attaches the LoRA updates to `model`, unmerged. Every adapted module must exist in the
    /// model with the shapes the adapter expects, and every `target_modules` name must match
    /// something. `modules_to_save` weights are not applied here: they are base weights, put in
    /// place while the model is built ([`LoraAdapter::overlay`], as `LoadedModel::load` does).
    pub fn apply(&self, model: &mut CausalLm) -> Result<()> {
        let err = |message: String| Error::Adapter {
            path: self.dir.clone(),
            message,
        };
        let mut linears: BTreeMap<String, &mut crate::linear::Linear> =
            model.linears_mut().into_iter().collect();
        self.config
            .check_targets(linears.keys().map(String::as_str))
            .map_err(|m| err(format!("target_modules entry {m}")))?;
        for (module, (a, b)) in &self.modules {
            let linear = linears.get_mut(module).ok_or_else(|| {
                err(format!(
                    "adapter weights target `{module}`, which does not exist in the model"
                ))
            })?;
            let r = a.dim(0)?;
            let (in_f, out_f) = (linear.in_features(), linear.out_features());
            let check = |which: &str, t: &Tensor, expected: [usize; 2]| {
                if t.dims() != expected {
                    Err(Error::TensorShape {
                        file: self.dir.join("adapter_model.safetensors"),
                        name: format!("{KEY_PREFIX}{module}.{which}.weight"),
                        expected: expected.to_vec(),
                        found: t.dims().to_vec(),
                    })
                } else {
                    Ok(())
                }
            };
            check("lora_A", a, [r, in_f])?;
            check("lora_B", b, [out_f, r])?;
            linear.set_lora(LoraLayer::new(
                a.clone(),
                b.clone(),
                self.config.scale_for(module),
            ))?;
        }
        Ok(())
    }

    /// Puts the `modules_to_save` weights in place of the base model's in `weights`, before the
    /// model is built from them. Each must replace a tensor the checkpoint has, with its shape.
    pub fn overlay(&self, weights: &mut SafetensorsWeights) -> Result<()> {
        let file = self.dir.join("adapter_model.safetensors");
        for (name, tensor) in &self.saved_modules {
            let Some(expected) = weights.shape_of(name) else {
                return Err(Error::Adapter {
                    path: self.dir.clone(),
                    message: format!(
                        "{}: modules_to_save weight `{KEY_PREFIX}{name}` replaces `{name}`, which the base model's weights do not have",
                        file.display()
                    ),
                });
            };
            if tensor.dims() != expected.as_slice() {
                return Err(Error::TensorShape {
                    file,
                    name: format!("{KEY_PREFIX}{name}"),
                    expected,
                    found: tensor.dims().to_vec(),
                });
            }
            weights.set_override(name, tensor.clone())?;
        }
        Ok(())
    }

    /// The adapter a model carries: the A/B pair of every linear layer with a LoRA update, and
    /// the current weights of every module `config.modules_to_save` selects, copied (later
    /// changes to the model do not reach the adapter). The model's LoRA layers must be exactly
    /// the ones `config` targets, with its ranks and scales, or PEFT would load something else;
    /// `"all-linear"` is resolved to the paths of the modules it matched, as PEFT saves it.
    pub fn from_model(model: &CausalLm, mut config: LoraConfig) -> Result<Self> {
        let err = |message: String| Error::InvalidInput(format!("taking the adapter: {message}"));
        let mut modules = BTreeMap::new();
        for (path, linear) in model.linears() {
            let targeted = config.targets(&path);
            let Some(lora) = linear.lora() else {
                if targeted {
                    return Err(err(format!(
                        "`{path}` is matched by target_modules but carries no LoRA update"
                    )));
                }
                continue;
            };
            if !targeted {
                return Err(err(format!(
                    "`{path}` carries a LoRA update that target_modules does not match, so PEFT would not load it"
                )));
            }
            let r = lora.a.dim(0)?;
            let expected_r = config.rank_for(&path);
            if r != expected_r {
                return Err(err(format!(
                    "`{path}` has a rank-{r} LoRA update; the config gives it rank {expected_r}"
                )));
            }
            let scale = config.scale_for(&path);
            if (lora.scale - scale).abs() > 1e-9 * scale.abs().max(1.0) {
                return Err(err(format!(
                    "`{path}` has LoRA scale {}; the config gives it {scale} (lora_alpha / r{})",
                    lora.scale,
                    if config.use_rslora {
                        " with rsLoRA"
                    } else {
                        ""
                    }
                )));
            }
            modules.insert(path, (lora.a.detach().copy()?, lora.b.detach().copy()?));
        }
        if modules.is_empty() {
            return Err(err("the model carries no LoRA update".into()));
        }
        if config.target_modules == TargetModules::AllLinear {
            // PEFT 0.21's `_maybe_include_all_linear_layers` replaces "all-linear" by the full
            // paths of the layers it wrapped, and that list is what `save_pretrained` writes.
            config.target_modules = TargetModules::Names(modules.keys().cloned().collect());
        }
        let mut saved_modules = BTreeMap::new();
        if !config.modules_to_save.is_empty() {
            let state = model.state_dict()?;
            for entry in &config.modules_to_save {
                let mut found = false;
                for (name, tensor) in &state {
                    if module_paths(name).any(|p| p.ends_with(entry.as_str())) {
                        found = true;
                        saved_modules.insert(name.clone(), tensor.detach().copy()?);
                    }
                }
                if !found {
                    let tied = if model.config().tie_word_embeddings && entry.contains("lm_head") {
                        " (the LM head is tied to the embedding: save `embed_tokens`)"
                    } else {
                        ""
                    };
                    return Err(err(format!(
                        "modules_to_save entry `{entry}` matches no module of the model{tied}"
                    )));
                }
            }
        }
        Ok(Self {
            dir: PathBuf::new(),
            config,
            modules,
            saved_modules,
        })
    }

    /// Writes the adapter as PEFT's `save_pretrained` does, weights in f32: see
    /// [`LoraAdapter::save_as`].
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_as(dir, DType::F32)
    }

    /// Writes `adapter_config.json`, `adapter_model.safetensors` (tensors in `dtype`, keys
    /// `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` and
    /// `base_model.model.<weight name>` for `modules_to_save`) and a `README.md` model card into
    /// `dir`, created if needed. An adapter already there is replaced; its config is removed
    /// first and the new one written last, so an interrupted save leaves a directory that fails
    /// to load (no `adapter_config.json`), never a mix of two adapters.
    pub fn save_as(&self, dir: &Path, dtype: DType) -> Result<()> {
        let config_path = dir.join("adapter_config.json");
        std::fs::create_dir_all(dir).map_err(crate::save::io_err(dir))?;
        if config_path.exists() {
            std::fs::remove_file(&config_path).map_err(crate::save::io_err(&config_path))?;
        }
        let mut tensors = Vec::with_capacity(2 * self.modules.len() + self.saved_modules.len());
        for (module, (a, b)) in &self.modules {
            tensors.push((
                format!("{KEY_PREFIX}{module}.lora_A.weight"),
                a.to_dtype(dtype)?,
            ));
            tensors.push((
                format!("{KEY_PREFIX}{module}.lora_B.weight"),
                b.to_dtype(dtype)?,
            ));
        }
        for (name, t) in &self.saved_modules {
            tensors.push((format!("{KEY_PREFIX}{name}"), t.to_dtype(dtype)?));
        }
        crate::save::write_safetensors(&dir.join("adapter_model.safetensors"), tensors)?;
        crate::save::write_atomic(&dir.join("README.md"), self.model_card().as_bytes())?;
        crate::save::write_json(&config_path, &self.config.to_adapter_config_json())
    }

    /// A short model card in the shape PEFT writes (front matter naming the library and base).
    fn model_card(&self) -> String {
        let base = self.config.base_model_name_or_path.as_deref();
        let mut card = String::from("---\n");
        if let Some(base) = base {
            card.push_str(&format!("base_model: {base}\n"));
        }
        card.push_str("library_name: peft\npipeline_tag: text-generation\ntags:\n");
        if let Some(base) = base {
            card.push_str(&format!("- base_model:adapter:{base}\n"));
        }
        card.push_str("- lora\n- kiln\n---\n\n# LoRA adapter\n\n");
        card.push_str(&format!(
            "A LoRA adapter (r={}, lora_alpha={}) for {}, adapting {} modules{}. Saved by kiln in \
             PEFT's format: load it with `PeftModel.from_pretrained(base, this_dir)` or \
             `kiln generate --model BASE --adapter this_dir`.\n",
            self.config.r,
            self.config.lora_alpha,
            base.map_or("its base model".to_string(), |b| format!("`{b}`")),
            self.modules.len(),
            if self.config.modules_to_save.is_empty() {
                String::new()
            } else {
                format!(
                    ", with trained copies of {}",
                    self.config.modules_to_save.join(", ")
                )
            },
        ));
        card
    }
}

/// `base_model.model.X.lora_A.weight` → (`X`, true).
fn parse_key(name: &str) -> Option<(&str, bool)> {
    let rest = name.strip_prefix(KEY_PREFIX)?;
    if let Some(module) = rest.strip_suffix(".lora_A.weight") {
        Some((module, true))
    } else {
        rest.strip_suffix(".lora_B.weight").map(|m| (m, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(targets: TargetModules) -> LoraConfig {
        LoraConfig {
            rank_pattern: BTreeMap::from([("v_proj".to_string(), 4)]),
            ..LoraConfig::new(8, 16.0, targets)
        }
    }

    #[test]
    fn written_config_reads_back_equal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("adapter_config.json");
        for targets in [
            TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            TargetModules::Regex(r".*\.layers\.1\..*proj".into()),
            TargetModules::AllLinear,
        ] {
            let mut c = config(targets);
            c.lora_alpha = 12.5;
            c.use_rslora = true;
            c.lora_dropout = 0.05;
            c.alpha_pattern = BTreeMap::from([("o_proj".to_string(), 3.0)]);
            c.modules_to_save = vec!["lm_head".into()];
            c.base_model_name_or_path = Some("acme/tiny".into());
            let json = c.to_adapter_config_json();
            std::fs::write(&path, json.to_string()).expect("write");
            assert_eq!(LoraConfig::from_file(&path).expect("reads back"), c);
            assert_eq!(json["peft_type"], "LORA");
            assert_eq!(json["task_type"], "CAUSAL_LM");
            assert_eq!(json["alpha_pattern"]["o_proj"], 3);
        }
        // Whole alphas are written as integers, as PEFT writes them; no modules_to_save is null.
        let json = LoraConfig::new(4, 8.0, TargetModules::AllLinear).to_adapter_config_json();
        assert_eq!(json["lora_alpha"].to_string(), "8");
        assert_eq!(json["target_modules"], "all-linear");
        assert!(json["modules_to_save"].is_null());
    }

    #[test]
    fn modules_to_save_match_module_paths_by_suffix() {
        let mut c = config(TargetModules::AllLinear);
        let selected =
            |c: &LoraConfig, weight: &str| module_paths(weight).any(|p| c.saves_module(p));
        c.modules_to_save = vec!["lm_head".into(), "embed_tokens".into()];
        assert!(selected(&c, "lm_head.weight"));
        assert!(selected(&c, "model.embed_tokens.weight"));
        assert!(!selected(&c, "model.norm.weight"));
        assert!(!selected(&c, "model.layers.0.self_attn.q_proj.weight"));
        c.modules_to_save = vec!["layers.1.mlp".into()];
        assert!(c.saves_module("model.layers.1.mlp"));
        assert!(selected(&c, "model.layers.1.mlp.up_proj.weight"));
        assert!(!selected(&c, "model.layers.0.mlp.up_proj.weight"));
    }

    #[test]
    fn targeting_follows_peft() {
        let c = config(TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets("model.layers.0.self_attn.k_proj"));
        assert!(!c.targets("model.layers.0.self_attn.xq_proj"));
        let c = config(TargetModules::Regex(r".*\.layers\.1\..*proj".into()));
        assert!(
            c.targets("model.layers.1.mlp.up_proj") && !c.targets("model.layers.0.mlp.up_proj")
        );
        let c = config(TargetModules::AllLinear);
        assert!(c.targets("model.layers.3.mlp.down_proj") && !c.targets("lm_head"));
    }

    #[test]
    fn scale_uses_rank_pattern_and_rslora() {
        let mut c = config(TargetModules::AllLinear);
        assert_eq!(c.scale_for("model.layers.0.self_attn.q_proj"), 2.0);
        assert_eq!(c.scale_for("model.layers.0.self_attn.v_proj"), 4.0);
        c.use_rslora = true;
        assert!(
            (c.scale_for("model.layers.0.self_attn.q_proj") - 16.0 / 8f64.sqrt()).abs() < 1e-12
        );
    }
}
