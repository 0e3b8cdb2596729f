//! Chat templates rendered the way transformers' `apply_chat_template` renders them.
//!
//! transformers compiles templates in a Jinja2 sandbox with `trim_blocks` and `lstrip_blocks`
//! on, the `loopcontrols` extension, a `raise_exception` global and Python string methods
//! available on values; minijinja with `pycompat` covers the same ground. The context holds
//! `messages`, `add_generation_prompt` and every special token (`bos_token`, `eos_token`, ...).

use std::collections::BTreeMap;

use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::{Error, Result};

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Context<'a, M: Serialize> {
    messages: &'a M,
    add_generation_prompt: bool,
    #[serde(flatten)]
    special_tokens: &'a BTreeMap<String, String>,
}

impl ChatTemplate {
    /// Compiles `source`. `special_tokens` maps names such as `bos_token` to their text.
    pub fn new(source: &str, special_tokens: BTreeMap<String, String>) -> Result<Self> {
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(
            syntax
                .build()
                .map_err(|e| Error::ChatTemplate(e.to_string()))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| Error::ChatTemplate(format!("does not compile: {e}")))?;
        Ok(Self {
            env,
            special_tokens,
        })
    }

    /// Renders `messages` (a list of `{"role", "content", ...}` objects).
    pub fn render<M: Serialize>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let ctx = Context {
            messages,
            add_generation_prompt,
            special_tokens: &self.special_tokens,
        };
        template.render(Value::from(Serde(&ctx))).map_err(|e| {
            // `raise_exception` messages come from the template author: show them as they are.
            let detail = e
                .detail()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            Error::ChatTemplate(match e.kind() {
                ErrorKind::InvalidOperation => detail,
                _ => format!("rendering failed: {e}"),
            })
        })
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers replaces Jinja's HTML-escaping `tojson` with `json.dumps(x, ensure_ascii=False,
/// indent=indent, sort_keys=sort_keys)`: `", "` and `": "` separators, nothing escaped but what
/// JSON requires, insertion order kept. Tool-calling templates print arguments with it, so the
/// bytes must match.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_python_json(&json, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    sort_keys: bool,
    level: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if items.is_empty() => out.push_str("[]"),
        J::Object(map) if map.is_empty() => out.push_str("{}"),
        J::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_python_json(item, indent, sort_keys, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(map) => {
            let mut entries: Vec<(&String, &J)> = map.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&J::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, sort_keys, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// `strftime_now(format)`, which Llama 3 templates call for the current date (UTC).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_utc(secs, &format)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

fn format_utc(secs: i64, format: &str) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tokens() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("bos_token".to_string(), "<s>".to_string()),
            ("eos_token".to_string(), "</s>".to_string()),
        ])
    }

    #[test]
    fn trims_blocks_like_transformers() {
        let src = "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'user' %}\n[U]{{ m.content.strip() }}\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, tokens()).expect("compiles");
        let out = t
            .render(&json!([{"role": "user", "content": "  hi "}]), false)
            .expect("renders");
        assert_eq!(out, "<s>[U]hi\n");
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}";
        let t = ChatTemplate::new(src, tokens()).expect("compiles");
        let err = t
            .render(&json!([{"role": "assistant", "content": "x"}]), true)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("Conversation must start with user"),
            "{err}"
        );
    }

    #[test]
    fn tojson_writes_like_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ messages | tojson }}|{{ messages | tojson(indent=2) }}",
            tokens(),
        )
        .expect("compiles");
        let out = t
            .render(&json!({"b": [1, 2.5, null], "a": "<é>", "e": {}}), false)
            .expect("renders");
        assert_eq!(
            out,
            "{\"b\": [1, 2.5, null], \"a\": \"<é>\", \"e\": {}}|{\n  \"b\": [\n    1,\n    2.5,\n    null\n  ],\n  \"a\": \"<é>\",\n  \"e\": {}\n}"
        );
    }

    #[test]
    fn formats_dates() {
        // 2024-07-26 13:05:09 UTC
        assert_eq!(
            format_utc(1_722_085_509 - 86_400, "%d %b %Y %H:%M:%S"),
            "26 Jul 2024 13:05:09"
        );
        assert_eq!(format_utc(0, "%Y-%m-%d %B"), "1970-01-01 January");
    }
}
