//! Recipe configs: one YAML mapping with Hugging Face key names, `--set key=value` overrides
//! (dotted keys reach into nested mappings), and unknown keys rejected by name.

use std::path::Path;

use kiln_core::{Error, Result};
use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};

/// Reads `path`, applies `overrides` (`key=value`, the value parsed as YAML), and deserializes.
pub fn load<T: DeserializeOwned>(path: &Path, overrides: &[String]) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut doc: Value = serde_yaml_ng::from_str(&text)
        .map_err(|e| Error::InvalidInput(format!("{}: invalid YAML: {e}", path.display())))?;
    if doc.is_null() {
        doc = Value::Mapping(Mapping::new());
    }
    if !doc.is_mapping() {
        return Err(Error::InvalidInput(format!(
            "{}: expected a mapping of config keys at the top level",
            path.display()
        )));
    }
    for item in overrides {
        apply_override(&mut doc, item)?;
    }
    serde_yaml_ng::from_value(doc)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
}

fn apply_override(doc: &mut Value, item: &str) -> Result<()> {
    let (key, raw) = item
        .split_once('=')
        .ok_or_else(|| Error::InvalidInput(format!("--set {item}: expected key=value")))?;
    let value: Value = serde_yaml_ng::from_str(raw)
        .map_err(|e| Error::InvalidInput(format!("--set {item}: invalid value: {e}")))?;
    let mut node = doc;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let Value::Mapping(map) = node else {
            return Err(Error::InvalidInput(format!(
                "--set {item}: `{}` is not a mapping",
                parts[..i].join(".")
            )));
        };
        let k = Value::String((*part).to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map
            .entry(k)
            .or_insert_with(|| Value::Mapping(Mapping::new()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        lr: f64,
        #[serde(default)]
        nested: Option<Inner>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        r: usize,
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(f.path(), text).expect("write");
        f
    }

    #[test]
    fn overrides_and_unknown_keys() {
        let f = write("lr: 0.1\nnested:\n  r: 4\n");
        let c: Cfg = load(f.path(), &["lr=0.5".into(), "nested.r=8".into()]).expect("loads");
        assert_eq!(
            c,
            Cfg {
                lr: 0.5,
                nested: Some(Inner { r: 8 })
            }
        );
        let f = write("lr: 0.1\nlearning_rte: 3\n");
        let e = load::<Cfg>(f.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("learning_rte"), "{e}");
        let e = load::<Cfg>(f.path(), &["lr".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key=value"), "{e}");
    }
}
