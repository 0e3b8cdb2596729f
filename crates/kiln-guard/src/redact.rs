//! Redaction of what [`crate::pii`] found: masking, typed placeholders, hashing.
//!
//! Placeholders (`<EMAIL_1>`, `<CREDIT_CARD_2>`) are the default because a model can still
//! reason about them ("reply to <EMAIL_1>") and because they can be put back: the per-request
//! [`Vault`] remembers which original each placeholder stands for, so the gateway restores the
//! caller's own values in the reply and nothing raw ever reaches the upstream model. A vault
//! lives for one request and is dropped with it; it is never shared between callers.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::pii::{PiiDetector, PiiKind, PiiMatch};

/// How a detected value is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedactMode {
    /// `*` for every character; cards, IBANs and phones keep their last four.
    Mask,
    /// A numbered placeholder from the request's [`Vault`], restorable in the reply.
    #[default]
    Replace,
    /// `<EMAIL:` and the first 12 hex digits of the value's SHA-256: stable across requests,
    /// so logs can be correlated without holding the value.
    Hash,
    /// Like `Replace`; the caller refuses the request, but nothing raw survives even then.
    Block,
}

/// One request's placeholders: the same value always gets the same placeholder within it, so
/// a reply that repeats `<EMAIL_1>` can be restored for the caller.
#[derive(Debug, Clone, Default)]
pub struct Vault {
    /// (label, original) → placeholder.
    issued: HashMap<(String, String), String>,
    /// placeholder → original.
    originals: HashMap<String, String>,
    /// How many placeholders each label has issued.
    counters: HashMap<String, usize>,
}

impl Vault {
    pub fn new() -> Self {
        Vault::default()
    }

    /// `<EMAIL_1>`, `<EMAIL_2>`, `<CREDIT_CARD_1>` …: numbered per kind label in order of first
    /// appearance; the same original → the same placeholder.
    pub fn placeholder(&mut self, kind: &PiiKind, original: &str) -> String {
        let label = kind.label();
        let key = (label, original.to_owned());
        if let Some(placeholder) = self.issued.get(&key) {
            return placeholder.clone();
        }
        let counter = self.counters.entry(key.0.clone()).or_insert(0);
        *counter += 1;
        let placeholder = format!("<{}_{}>", key.0, counter);
        self.originals
            .insert(placeholder.clone(), original.to_owned());
        self.issued.insert(key, placeholder.clone());
        placeholder
    }

    /// Replaces every placeholder this vault issued with its original.
    ///
    /// One left-to-right pass: an original that itself looks like a placeholder is not
    /// expanded again, and `<EMAIL_1>` is never confused with `<EMAIL_11>`.
    pub fn restore(&self, text: &str) -> String {
        if self.originals.is_empty() {
            return text.to_owned();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(open) = rest.find('<') {
            out.push_str(&rest[..open]);
            let tail = &rest[open..];
            let original = tail
                .find('>')
                .and_then(|close| self.originals.get(&tail[..=close]).map(|o| (close, o)));
            match original {
                Some((close, original)) => {
                    out.push_str(original);
                    rest = &tail[close + 1..];
                }
                None => {
                    out.push('<');
                    rest = &tail[1..];
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// How many distinct values have a placeholder.
    pub fn len(&self) -> usize {
        self.originals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.originals.is_empty()
    }
}

/// Applies `mode` to `matches` (as returned by [`PiiDetector::detect`] on `text`):
/// Replace → the vault's placeholder; Mask → every char replaced by '*' except the last 4
/// chars for CreditCard, Iban and Phone (separators kept as they are) — all chars for other
/// kinds; Hash → `<EMAIL:` + the first 12 hex digits of SHA-256(value) + `>`; Block → like
/// Replace (the caller refuses the request; nothing raw must survive even then).
///
/// Matches out of order or overlapping are tolerated (the union of their spans is rewritten);
/// offsets off a char boundary are widened to the enclosing chars.
pub fn redact(text: &str, matches: &[PiiMatch], mode: RedactMode, vault: &mut Vault) -> String {
    let mut spans: Vec<&PiiMatch> = matches.iter().collect();
    spans.sort_by_key(|m| (m.start, std::cmp::Reverse(m.end)));
    let mut out = String::with_capacity(text.len());
    let mut cursor = 0;
    for m in spans {
        let start = floor_boundary(text, m.start);
        let end = ceil_boundary(text, m.end);
        if end <= cursor || start >= end {
            continue;
        }
        let from = start.max(cursor);
        out.push_str(&text[cursor..from]);
        let value = &text[start..end];
        match mode {
            RedactMode::Replace | RedactMode::Block => {
                out.push_str(&vault.placeholder(&m.kind, value));
            }
            RedactMode::Hash => out.push_str(&hashed(&m.kind, value)),
            // Overlap: only the part not yet written is masked, so lengths stay aligned.
            RedactMode::Mask => out.push_str(&mask(&m.kind, &text[from..end])),
        }
        cursor = end;
    }
    out.push_str(&text[cursor..]);
    out
}

impl PiiDetector {
    /// detect + redact in one call: (redacted text, matches on the original text).
    pub fn redact(
        &self,
        text: &str,
        mode: RedactMode,
        vault: &mut Vault,
    ) -> (String, Vec<PiiMatch>) {
        let matches = self.detect(text);
        let redacted = redact(text, &matches, mode, vault);
        (redacted, matches)
    }
}

fn mask(kind: &PiiKind, value: &str) -> String {
    let keep_last = match kind {
        PiiKind::CreditCard | PiiKind::Iban | PiiKind::Phone => 4,
        _ => 0,
    };
    if keep_last == 0 {
        return "*".repeat(value.chars().count());
    }
    let significant = value.chars().filter(|c| c.is_alphanumeric()).count();
    let mut seen = 0;
    value
        .chars()
        .map(|c| {
            if !c.is_alphanumeric() {
                return c;
            }
            seen += 1;
            if seen > significant.saturating_sub(keep_last) {
                c
            } else {
                '*'
            }
        })
        .collect()
}

fn hashed(kind: &PiiKind, value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("<{}:{hex}>", kind.label())
}

fn floor_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_keeps_separators_and_the_last_four_of_a_card() {
        assert_eq!(
            mask(&PiiKind::CreditCard, "4111-1111-1111-1234"),
            "****-****-****-1234"
        );
        assert_eq!(mask(&PiiKind::Email, "a@b.io"), "******");
    }

    #[test]
    fn restore_does_not_confuse_placeholder_prefixes() {
        let mut vault = Vault::new();
        let mut last = String::new();
        for i in 0..11 {
            last = vault.placeholder(&PiiKind::Email, &format!("u{i}@x.io"));
        }
        assert_eq!(last, "<EMAIL_11>");
        assert_eq!(
            vault.restore("<EMAIL_1> <EMAIL_11> <EMAIL_99>"),
            "u0@x.io u10@x.io <EMAIL_99>"
        );
    }

    #[test]
    fn offsets_inside_a_char_are_widened() {
        let text = "é@x";
        let m = PiiMatch {
            kind: PiiKind::Email,
            start: 1,
            end: 3,
            rule: "email".into(),
        };
        assert_eq!(
            redact(text, &[m], RedactMode::Mask, &mut Vault::new()),
            "**x"
        );
    }
}
