//! Lenient decoders for payloads hidden in text: base64 (standard or URL-safe alphabet, padding
//! optional) and hex. Shared by the injection scanner (which scans what they decode) and the
//! canary check (which looks for the token in it).

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};

/// The standard alphabet, padding optional.
const ENGINE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes a base64 run in either alphabet; `None` when it is not base64.
pub(crate) fn decode_base64(run: &str) -> Option<Vec<u8>> {
    // The URL-safe alphabet differs in two characters; map them to the standard ones.
    let mut standard: String = run
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    // A length of 1 mod 4 cannot be base64; the run probably swallowed a neighbour.
    if standard.len() % 4 == 1 {
        standard.pop();
    }
    ENGINE.decode(standard.as_bytes()).ok()
}

/// Decodes hex digits (an even number of them); `None` when they are not.
pub(crate) fn decode_hex(digits: &str) -> Option<Vec<u8>> {
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .as_bytes()
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_alphabets_and_missing_padding_decode() {
        assert_eq!(decode_base64("aGk/Pz8=").as_deref(), Some(&b"hi???"[..]));
        assert_eq!(decode_base64("aGk_Pz8").as_deref(), Some(&b"hi???"[..]));
        assert_eq!(decode_base64("not base64!"), None);
        assert_eq!(decode_hex("6869").as_deref(), Some(&b"hi"[..]));
        assert_eq!(decode_hex("686"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
