//! The cache key: which requests may share a reply.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Request fields that change how the reply travels or is filed, not what it says. Everything
/// else in the body (model, messages/prompt, every sampling parameter, tools, response format,
/// and fields this list does not know yet) is part of the key: an unknown field costs a miss,
/// never a wrong hit.
const NOT_IN_KEY: &[&str] = &["stream", "stream_options", "user", "store", "metadata"];

/// Bumped when the key derivation changes, so old entries are never read under a new meaning.
const KEY_VERSION: &str = "kiln-cache-v1";

/// The cache key of a request body, or `None` when it must not be cached.
///
/// The key is the SHA-256 (lower-case hex) of the tenant and the body minus [`NOT_IN_KEY`],
/// canonicalized: object keys sorted, numbers written one way (`0` and `0.0` are the same
/// temperature), so neither key order nor number spelling splits an entry.
///
/// Only deterministic requests are cacheable: `temperature` 0, or a fixed `seed`. An absent
/// temperature means the OpenAI default of 1, which samples. `cache_sampled` lifts that rule.
/// A body that is not a JSON object is never cacheable.
pub fn cache_key(tenant: &str, body: &Value, cache_sampled: bool) -> Option<String> {
    let request = body.as_object()?;
    if !cache_sampled && !is_deterministic(request) {
        return None;
    }
    let mut text = String::with_capacity(256);
    text.push_str(KEY_VERSION);
    text.push('\n');
    write_canonical(&mut text, &Value::String(tenant.to_string()));
    text.push('\n');
    write_object(
        &mut text,
        request
            .iter()
            .filter(|(k, _)| !NOT_IN_KEY.contains(&k.as_str())),
    );
    Some(hex(&Sha256::digest(text.as_bytes())))
}

/// Temperature 0 or a fixed seed.
fn is_deterministic(request: &serde_json::Map<String, Value>) -> bool {
    if matches!(request.get("seed"), Some(Value::Number(_))) {
        return true;
    }
    match request.get("temperature") {
        Some(Value::Number(t)) => t.as_f64() == Some(0.0),
        // Absent or null: the default temperature, 1.
        _ => false,
    }
}

/// JSON with object keys sorted and integral numbers written as integers.
fn write_canonical(out: &mut String, value: &Value) {
    use std::fmt::Write as _;
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => {
            // Serializing a scalar `Value` cannot fail.
            out.push_str(&value.to_string());
        }
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else if let Some(f) = n.as_f64() {
                if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
                    let _ = write!(out, "{}", f as i64);
                } else {
                    let _ = write!(out, "{f:?}");
                }
            } else {
                out.push_str(&n.to_string());
            }
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => write_object(out, map.iter()),
    }
}

/// An object's fields in key order.
fn write_object<'a>(out: &mut String, fields: impl Iterator<Item = (&'a String, &'a Value)>) {
    let mut fields: Vec<(&String, &Value)> = fields.collect();
    fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (k, v)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_canonical(out, &Value::String(k.clone()));
        out.push(':');
        write_canonical(out, v);
    }
    out.push('}');
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_form_sorts_keys_and_unifies_numbers() {
        let mut a = String::new();
        write_canonical(&mut a, &json!({"b": [1.0, {"y": 2, "x": 0.5}], "a": null}));
        assert_eq!(a, r#"{"a":null,"b":[1,{"x":0.5,"y":2}]}"#);
    }

    #[test]
    fn negative_zero_temperature_is_deterministic() {
        let body = json!({"model": "m", "temperature": -0.0});
        assert!(cache_key("t", &body, false).is_some());
    }
}
