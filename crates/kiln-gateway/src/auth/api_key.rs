//! API keys, kept only as SHA-256 digests and compared in constant time.
//!
//! A presented key is hashed, and the digest is compared with *every* configured digest using
//! `subtle` (no early exit, the match selected with a conditional assignment), so the time a
//! lookup takes depends on the number of keys only — not on which key matched or how many bytes
//! of it were right. Keys in clear (`key:`, for development) are hashed when the config is loaded
//! and never kept.

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::Principal;
use crate::config::ApiKeyConfig;

/// The configured keys: one digest and one principal each.
pub(crate) struct ApiKeys {
    entries: Vec<Entry>,
}

struct Entry {
    digest: [u8; 32],
    principal: Principal,
}

impl ApiKeys {
    /// Hashes clear keys, decodes `key_sha256`s, and refuses empty, malformed or duplicate keys
    /// (naming `auth.api_keys[i]`).
    pub(crate) fn new(keys: &[ApiKeyConfig]) -> anyhow::Result<Self> {
        let mut entries: Vec<Entry> = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let digest = match (&k.key, &k.key_sha256) {
                (Some(key), None) if key.is_empty() => {
                    bail!("auth.api_keys[{i}].key: the key is empty")
                }
                (Some(key), None) => sha256(key.as_bytes()),
                (None, Some(hex)) => {
                    decode_hex32(hex).with_context(|| format!("auth.api_keys[{i}].key_sha256"))?
                }
                _ => bail!("auth.api_keys[{i}]: give exactly one of `key` and `key_sha256`"),
            };
            if k.tenant.is_empty() {
                bail!("auth.api_keys[{i}].tenant: must not be empty");
            }
            if let Some(j) = entries.iter().position(|e| e.digest == digest) {
                bail!("auth.api_keys[{i}]: the same key as auth.api_keys[{j}]");
            }
            entries.push(Entry {
                digest,
                principal: Principal {
                    tenant: k.tenant.clone(),
                    key_id: key_id(&digest),
                    models: k.models.clone(),
                    rpm: k.rpm,
                    tpm: k.tpm,
                    max_concurrent: k.max_concurrent,
                    no_train: k.no_train,
                    scopes: Vec::new(),
                },
            });
        }
        Ok(Self { entries })
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The principal of `presented`, if it is a configured key. Constant time in the key.
    pub(crate) fn lookup(&self, presented: &str) -> Option<&Principal> {
        let digest = sha256(presented.as_bytes());
        // 0 = no match, i + 1 = entry i. Every entry is compared; none is skipped.
        let mut found: u64 = 0;
        for (i, entry) in self.entries.iter().enumerate() {
            let candidate = i as u64 + 1;
            found.conditional_assign(&candidate, entry.digest.ct_eq(&digest));
        }
        let index = usize::try_from(found).ok()?.checked_sub(1)?;
        self.entries.get(index).map(|e| &e.principal)
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `key:` and the first 16 hex digits of the key's SHA-256: stable, and useless to an attacker.
fn key_id(digest: &[u8; 32]) -> String {
    let mut id = String::with_capacity(4 + 16);
    id.push_str("key:");
    for b in &digest[..8] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// 64 hex digits (either case) into 32 bytes.
fn decode_hex32(hex: &str) -> anyhow::Result<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        bail!(
            "expected 64 hex digits (sha256sum of the key), found {} characters",
            hex.len()
        );
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => out[i] = (hi * 16 + lo) as u8,
            _ => bail!("expected 64 hex digits (sha256sum of the key), found a non-hex character"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn cfg(key: Option<&str>, sha: Option<&str>, tenant: &str) -> ApiKeyConfig {
        ApiKeyConfig {
            key: key.map(str::to_string),
            key_sha256: sha.map(str::to_string),
            tenant: tenant.into(),
            models: vec!["*".into()],
            rpm: Some(5),
            tpm: None,
            max_concurrent: None,
            no_train: true,
        }
    }

    #[test]
    fn clear_and_hashed_keys_are_found_and_others_are_not() {
        let digest = sha256(b"sk-hashed");
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let keys = ApiKeys::new(&[
            cfg(Some("sk-clear"), None, "a"),
            cfg(None, Some(&hex.to_uppercase()), "b"),
        ])
        .unwrap();
        assert_eq!(keys.lookup("sk-clear").unwrap().tenant, "a");
        let b = keys.lookup("sk-hashed").unwrap();
        assert_eq!(b.tenant, "b");
        assert_eq!(b.key_id, format!("key:{}", &hex[..16]));
        assert!(b.no_train && b.rpm == Some(5));
        assert!(keys.lookup("sk-clea").is_none());
        assert!(keys.lookup("").is_none());
    }

    #[test]
    fn bad_keys_are_refused_naming_the_entry() {
        let err = ApiKeys::new(&[cfg(Some("k"), None, "a"), cfg(Some("k"), None, "b")])
            .err()
            .unwrap();
        assert!(err.to_string().contains("auth.api_keys[1]"), "{err}");
        let err = ApiKeys::new(&[cfg(None, Some("abc"), "a")]).err().unwrap();
        assert!(
            format!("{err:#}").contains("auth.api_keys[0].key_sha256"),
            "{err:#}"
        );
        let err = ApiKeys::new(&[cfg(Some(""), None, "a")]).err().unwrap();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
