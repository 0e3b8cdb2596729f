//! A single token's text and exact bytes, for log-prob listings (`token`, `bytes`).
//!
//! Decoding one token alone is lossy: a byte-level BPE token may hold part of a UTF-8 character,
//! and SentencePiece decoders drop a leading space. So the bytes are read from the vocabulary
//! entry itself: GPT-2's byte-to-character map inverted for byte-level vocabularies, `▁` and
//! `<0xNN>` for SentencePiece ones; anything else falls back to decoding the token alone.

use kiln_core::Tokenizer;

/// How the vocabulary spells bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSpelling {
    /// GPT-2's byte-level alphabet (`Ġ` for a space).
    ByteLevel,
    /// SentencePiece: `▁` for a space, `<0xNN>` byte-fallback tokens.
    Metaspace,
    /// Decode each token on its own.
    Other,
}

impl TokenSpelling {
    /// Reads the tokenizer's decoder type.
    pub fn detect(tokenizer: &Tokenizer) -> Self {
        let decoder = tokenizer
            .inner()
            .get_decoder()
            .and_then(|d| serde_json::to_value(d).ok())
            .unwrap_or_default();
        let types = decoder_types(&decoder);
        if types.iter().any(|t| t == "ByteLevel") {
            Self::ByteLevel
        } else if types
            .iter()
            .any(|t| t == "Metaspace" || t == "ByteFallback")
        {
            Self::Metaspace
        } else {
            Self::Other
        }
    }

    /// The bytes token `id` stands for.
    pub fn bytes(self, tokenizer: &Tokenizer, id: u32) -> Vec<u8> {
        let piece = tokenizer.inner().id_to_token(id);
        let spelled = piece.as_deref().and_then(|piece| match self {
            Self::ByteLevel => byte_level_bytes(piece),
            Self::Metaspace => Some(metaspace_bytes(piece)),
            Self::Other => None,
        });
        spelled.unwrap_or_else(|| {
            tokenizer
                .decode(&[id], false)
                .unwrap_or_default()
                .into_bytes()
        })
    }

    /// The token's text: its bytes, with U+FFFD for a partial character.
    pub fn text(self, tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
        let bytes = self.bytes(tokenizer, id);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }
}

/// The `type` of a decoder and of every decoder in a `Sequence`.
fn decoder_types(decoder: &serde_json::Value) -> Vec<String> {
    let mut types: Vec<String> = decoder
        .get("type")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .into_iter()
        .collect();
    if let Some(inner) = decoder.get("decoders").and_then(|d| d.as_array()) {
        types.extend(inner.iter().flat_map(decoder_types));
    }
    types
}

/// GPT-2's `bytes_to_unicode`, inverted: printable Latin-1 bytes stand for themselves, the rest
/// are shifted to U+0100 and up in byte order. `None` for a character outside the alphabet (an
/// added token written in plain text).
fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    piece.chars().map(byte_of_char).collect()
}

fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let code = c as u32;
    if code < 0x100 {
        return printable(code).then_some(code as u8);
    }
    // The n-th non-printable byte (in byte order) is spelled U+0100 + n.
    let n = code - 0x100;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .map(|b| b as u8)
}

fn metaspace_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|s| s.strip_suffix('>'))
        && hex.len() == 2
        && let Ok(b) = u8::from_str_radix(hex, 16)
    {
        return vec![b];
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_round_trips() {
        assert_eq!(byte_level_bytes("Ġthe"), Some(b" the".to_vec()));
        assert_eq!(byte_level_bytes("Ċ"), Some(b"\n".to_vec()));
        // "é" is two bytes, spelled as their Latin-1 characters.
        assert_eq!(byte_level_bytes("Ã©"), Some("é".as_bytes().to_vec()));
        assert_eq!(byte_level_bytes("a b"), None);
    }

    #[test]
    fn metaspace_spells_spaces_and_byte_fallback() {
        assert_eq!(metaspace_bytes("\u{2581}the"), b" the");
        assert_eq!(metaspace_bytes("<0x0A>"), b"\n");
    }

    #[test]
    fn fixture_tokenizer_is_byte_level() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf/llama");
        let tok = Tokenizer::from_dir(&dir).expect("fixture tokenizer");
        let spelling = TokenSpelling::detect(&tok);
        assert_eq!(spelling, TokenSpelling::ByteLevel);
        // Special tokens are spelled in printable ASCII and come back as their text.
        assert_eq!(spelling.text(&tok, 3).0, "<|im_end|>");
    }
}
