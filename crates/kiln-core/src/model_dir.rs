//! Where a model's files are: a local directory, or a hub id resolved in the local Hugging Face
//! cache. kiln never downloads; a hub id that is not cached is a clear error saying so.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{GenerationConfig, ModelConfig};
use crate::{Error, Result};

/// A model directory as transformers writes it.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
}

#[derive(Deserialize)]
struct SafetensorsIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

impl ModelDir {
    /// Resolves `spec`: an existing directory is used as is; otherwise `ORG/NAME` (optionally
    /// `ORG/NAME@REVISION`) is looked up in the Hugging Face cache.
    pub fn resolve(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self {
                root: path.to_path_buf(),
            });
        }
        if path.exists() {
            return Err(Error::ModelNotFound(format!(
                "{spec}: is a file; expected a model directory (config.json + *.safetensors) or a hub id"
            )));
        }
        let looks_like_hub_id = spec.split('/').count() == 2
            && !spec.starts_with('.')
            && !spec.starts_with('/')
            && !spec.contains('\\');
        if !looks_like_hub_id {
            return Err(Error::ModelNotFound(format!(
                "{spec}: no such directory (and not a hub id of the form ORG/NAME)"
            )));
        }
        Self::from_hf_cache(spec, &hf_cache_dir())
    }

    /// Looks `ORG/NAME[@REVISION]` up in a cache laid out as `models--ORG--NAME/snapshots/REV/`.
    pub fn from_hf_cache(spec: &str, cache: &Path) -> Result<Self> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (spec, "main"),
        };
        let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
        let not_cached = |why: String| {
            Error::ModelNotFound(format!(
                "model `{repo}` is not a local directory and {why}; kiln does not download models: \
                 fetch it first (e.g. `hf download {repo}`) or pass a directory"
            ))
        };
        if !repo_dir.is_dir() {
            return Err(not_cached(format!(
                "is not in the Hugging Face cache (looked for {})",
                repo_dir.display()
            )));
        }
        // A revision is either a ref name (refs/<name> holds the commit) or a commit hash.
        let ref_file = repo_dir.join("refs").join(revision);
        let commit = match std::fs::read_to_string(&ref_file) {
            Ok(hash) => hash.trim().to_string(),
            Err(_) => revision.to_string(),
        };
        let snapshot = repo_dir.join("snapshots").join(&commit);
        if snapshot.is_dir() {
            return Ok(Self { root: snapshot });
        }
        // No ref: accept the only snapshot there is.
        let snapshots: Vec<PathBuf> = std::fs::read_dir(repo_dir.join("snapshots"))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        match (revision, snapshots.as_slice()) {
            ("main", [only]) if only.is_dir() => Ok(Self { root: only.clone() }),
            _ => Err(not_cached(format!(
                "revision `{revision}` has no snapshot in {}",
                repo_dir.join("snapshots").display()
            ))),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Reads and resolves `config.json`.
    pub fn config(&self) -> Result<ModelConfig> {
        let path = self.file("config.json");
        if !path.is_file() {
            return Err(Error::ModelNotFound(format!(
                "{}: missing; a model directory needs config.json",
                path.display()
            )));
        }
        ModelConfig::from_file(&path)
    }

    /// `generation_config.json`, or the defaults when the file is absent.
    pub fn generation_config(&self) -> Result<GenerationConfig> {
        let path = self.file("generation_config.json");
        if path.is_file() {
            crate::read_json(&path)
        } else {
            Ok(GenerationConfig::default())
        }
    }

    /// The safetensors files holding the weights: the shards named by
    /// `model.safetensors.index.json`, or the single `model.safetensors`.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>> {
        let index = self.file("model.safetensors.index.json");
        if index.is_file() {
            let parsed: SafetensorsIndex = crate::read_json(&index)?;
            let shards: BTreeSet<&String> = parsed.weight_map.values().collect();
            let mut files = Vec::with_capacity(shards.len());
            for shard in shards {
                let path = self.file(shard);
                if !path.is_file() {
                    return Err(Error::ModelNotFound(format!(
                        "{}: shard `{shard}` listed in weight_map is missing",
                        index.display()
                    )));
                }
                files.push(path);
            }
            return Ok(files);
        }
        let single = self.file("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let has_bin = self.file("pytorch_model.bin").exists();
        Err(Error::ModelNotFound(format!(
            "{}: no model.safetensors or model.safetensors.index.json{}",
            self.root.display(),
            if has_bin {
                " (pytorch_model.bin is not read: convert it to safetensors)"
            } else {
                ""
            }
        )))
    }
}

/// The hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_ref_and_explicit_revision() {
        let cache = tempfile::tempdir().expect("tempdir");
        let repo = cache.path().join("models--acme--tiny");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).expect("mkdir");
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::write(repo.join("refs").join("main"), "abc123\n").expect("write");
        let dir = ModelDir::from_hf_cache("acme/tiny", cache.path()).expect("resolves");
        assert_eq!(dir.root(), snap);
        let dir = ModelDir::from_hf_cache("acme/tiny@abc123", cache.path()).expect("resolves");
        assert_eq!(dir.root(), snap);
    }

    #[test]
    fn missing_model_says_where_it_looked() {
        let cache = tempfile::tempdir().expect("tempdir");
        let err = ModelDir::from_hf_cache("acme/absent", cache.path()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("models--acme--absent") && msg.contains("does not download"),
            "{msg}"
        );
    }
}
