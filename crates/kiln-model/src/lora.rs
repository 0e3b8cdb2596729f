//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, keys
//! `base_model.model.<module path>.lora_A.weight` (`[r, in]`) and `.lora_B.weight` (`[out, r]`).
//!
//! Targeting follows PEFT's `check_target_module_exists`: a list entry matches a module whose
//! path equals it or ends with `.entry`; a string is a regex that must match the whole path;
//! `"all-linear"` means every linear layer but the output head. `rank_pattern` and `alpha_pattern`
//! override `r` and `lora_alpha` per module the same way PEFT does.

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
    pub base_model_name_or_path: Option<String>,
}

impl LoraConfig {
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
        if let Some(m) = raw.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return Err(err(
                "modules_to_save",
                format!("{m:?}: adapters that replace whole modules are not supported yet"),
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
            base_model_name_or_path: raw.base_model_name_or_path,
        })
    }

    /// Whether PEFT would wrap the module at `path`.
    pub fn targets(&self, path: &str) -> bool {
        match &self.target_modules {
            TargetModules::AllLinear => path != "lm_head",
            TargetModules::Names(names) => names.iter().any(|n| suffix_match(path, n)),
            TargetModules::Regex(re) => regex_full_match(re, path),
        }
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

/// A loaded adapter: its config and the A/B pair of every module it adapts.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub dir: PathBuf,
    pub config: LoraConfig,
    /// Module path (`model.layers.0.self_attn.q_proj`) → (A, B).
    pub modules: BTreeMap<String, (Tensor, Tensor)>,
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
        for name in weights.names() {
            let (module, is_a) = parse_key(name).ok_or_else(|| {
                adapter_err(format!(
                    "{}: tensor `{name}` is not a LoRA weight (expected `{KEY_PREFIX}<module>.lora_A.weight` or `.lora_B.weight`)",
                    weights_path.display()
                ))
            })?;
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
        })
    }

    /// Attaches the adapter to `model`, unmerged. Every adapted module must exist in the model
    /// with the shapes the adapter expects, and every `target_modules` name must match something.
    pub fn apply(&self, model: &mut CausalLm) -> Result<()> {
        let err = |message: String| Error::Adapter {
            path: self.dir.clone(),
            message,
        };
        let mut linears: BTreeMap<String, &mut crate::linear::Linear> =
            model.linears_mut().into_iter().collect();
        if let TargetModules::Names(names) = &self.config.target_modules {
            for name in names {
                if !linears.keys().any(|path| suffix_match(path, name)) {
                    let available: BTreeSet<&str> = linears
                        .keys()
                        .map(|p| p.rsplit('.').next().unwrap_or(p))
                        .collect();
                    return Err(err(format!(
                        "target_modules entry `{name}` matches no module of the model (its linear modules are {})",
                        available.into_iter().collect::<Vec<_>>().join(", ")
                    )));
                }
            }
        }
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
            linear.set_lora(LoraLayer {
                a: a.clone(),
                b: b.clone(),
                scale: self.config.scale_for(module),
            })?;
        }
        Ok(())
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
            r: 8,
            lora_alpha: 16.0,
            use_rslora: false,
            target_modules: targets,
            lora_dropout: 0.0,
            rank_pattern: BTreeMap::from([("v_proj".to_string(), 4)]),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: None,
        }
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
