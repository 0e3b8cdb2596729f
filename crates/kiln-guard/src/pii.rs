//! Detection of personal data and secrets in prompts, replies and exported datasets.
//!
//! The shape follows Presidio: a cheap pattern finds *candidates*, and Rust code then
//! *validates* them (Luhn and issuer prefixes for cards, mod-97 and per-country lengths for
//! IBANs, area/group/serial rules for SSNs, `std::net` parsing for IP addresses, Shannon
//! entropy for unknown tokens, context words for bare digit runs). Keeping validation out of
//! the regexes keeps them small enough for the regex crate's lazy DFA, and it is where the
//! false positives are cut: a 16-digit order number that fails Luhn is not a card, `1.2.3.4.5`
//! is a version and not an address, a date is not a phone number.
//!
//! Every regex is compiled once in [`PiiDetector::new`] and uses ASCII classes (`[0-9]`, never
//! `\d`) and ASCII word boundaries `(?-u:\b)`, so text with emoji or CJK never pushes the regex
//! crate onto its slow engines, and every reported offset lies on a char boundary (all built-in
//! matches begin and end on ASCII characters). Detectors whose trigger is absent from the text
//! (no `@`, no digit, no `-----BEGIN`, …) are skipped without running their regex.
//!
//! Decisions worth knowing:
//! - **Email** needs a dotted domain whose last label is ≥ 2 letters: `root@localhost` is not
//!   reported (it names no one reachable from outside), `a.b@mail.example.co.uk` is.
//! - **Phone** numbers are reported when written with a `+` country code, a parenthesised area
//!   code, the North-American `415-555-0132` shape (one separator kind throughout), or a
//!   national number beginning with `0` (`020 7946 0958`). Any other grouping, and a plain
//!   run of 10–11 digits, is reported only when a context word (phone, tel, call, mobile, cell,
//!   fax, whatsapp) precedes it within 24 bytes. Dates, versions, times, decimals, IPs and card
//!   numbers never qualify.
//! - **UsSsn** in the dashed or spaced form is reported on its own; a bare 9-digit run needs
//!   "ssn" or "social security" within 32 bytes before it.
//! - **IpAddress**: `::` alone, and IPv6-looking runs made only of 2-hex-digit groups
//!   (EUI-64/MAC-like `00:11:22:33:44:55:66:77`), are not reported.
//! - **High-entropy tokens** are runs of ≥ 24 characters from `[A-Za-z0-9+/=_-]` with both a
//!   letter and a digit and ≥ 4.2 bits/char. Hex strings (git SHAs, UUIDs — 17 symbols at most,
//!   ≈ 4.09 bits) can never reach that, hyphenated English has no digits, and neither is
//!   reported; random base64/base62 tokens of that length almost always are, except the
//!   payload of a `data:…;base64,` URI (inline content, not a credential).
//! - **IBAN** is recognised in upper case only, compact or in groups of four.
//! - **Email** local parts may carry Latin, Greek or Cyrillic letters (`jörg@beispiel.de`);
//!   domains are ASCII (an IDN is written in punycode on the wire).

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use regex::Regex;

/// What kind of personal data or secret a match is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum PiiKind {
    Email,
    Phone,
    CreditCard,
    Iban,
    UsSsn,
    IpAddress,
    Secret,
    /// A pattern from the configuration, by its name.
    Custom(String),
}

/// Config names of the built-in entities, in the order they are listed in errors.
const BUILTIN_NAMES: [&str; 7] = [
    "email",
    "phone",
    "credit_card",
    "iban",
    "us_ssn",
    "ip_address",
    "secret",
];

impl PiiKind {
    /// "EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "US_SSN", "IP_ADDRESS", "SECRET"; a custom
    /// pattern's name upper-cased ("EMPLOYEE_ID").
    pub fn label(&self) -> String {
        match self {
            PiiKind::Custom(name) => name.to_uppercase(),
            builtin => builtin.config_name().to_uppercase(),
        }
    }

    /// Parses config names: "email", "phone", "credit_card", "iban", "us_ssn", "ip_address",
    /// "secret" (case-insensitive). None otherwise.
    pub fn builtin(name: &str) -> Option<PiiKind> {
        let kind = match name.to_ascii_lowercase().as_str() {
            "email" => PiiKind::Email,
            "phone" => PiiKind::Phone,
            "credit_card" => PiiKind::CreditCard,
            "iban" => PiiKind::Iban,
            "us_ssn" => PiiKind::UsSsn,
            "ip_address" => PiiKind::IpAddress,
            "secret" => PiiKind::Secret,
            _ => return None,
        };
        Some(kind)
    }

    /// The snake_case config name; a custom pattern's own name.
    fn config_name(&self) -> &str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::CreditCard => "credit_card",
            PiiKind::Iban => "iban",
            PiiKind::UsSsn => "us_ssn",
            PiiKind::IpAddress => "ip_address",
            PiiKind::Secret => "secret",
            PiiKind::Custom(name) => name,
        }
    }

    /// Tie-break between overlapping matches of equal length: higher is more specific.
    fn specificity(&self) -> u8 {
        match self {
            PiiKind::Secret => 7,
            PiiKind::CreditCard => 6,
            PiiKind::Iban => 5,
            PiiKind::UsSsn => 4,
            PiiKind::Email => 3,
            PiiKind::IpAddress => 2,
            PiiKind::Phone => 1,
            PiiKind::Custom(_) => 0,
        }
    }
}

/// One detected value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PiiMatch {
    pub kind: PiiKind,
    /// Byte offsets into the scanned text (always on char boundaries).
    pub start: usize,
    pub end: usize,
    /// Which rule: for secrets "aws_access_key", "aws_secret_key", "gcp_api_key",
    /// "github_token", "slack_token", "stripe_key", "openai_key", "private_key", "jwt",
    /// "bearer_token", "high_entropy"; for others the kind in snake_case or the custom name.
    pub rule: String,
}

/// A user-defined entity: every match of `regex` is reported as `PiiKind::Custom(name)`.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CustomPattern {
    pub name: String,
    pub regex: String,
}

/// The `pii` section of a guardrails configuration, as written.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PiiOptions {
    /// Built-in entities to detect (config names above); default: all of them.
    #[serde(default = "all_entities")]
    pub entities: Vec<String>,
    #[serde(default)]
    pub custom: Vec<CustomPattern>,
    /// Exact values never reported (e.g. a public support address).
    #[serde(default)]
    pub allow: Vec<String>,
}

fn all_entities() -> Vec<String> {
    BUILTIN_NAMES
        .iter()
        .map(|name| (*name).to_owned())
        .collect()
}

impl Default for PiiOptions {
    fn default() -> Self {
        PiiOptions {
            entities: all_entities(),
            custom: Vec::new(),
            allow: Vec::new(),
        }
    }
}

/// Why a [`PiiOptions`] could not be turned into a detector.
#[derive(Debug, thiserror::Error)]
pub enum PiiError {
    #[error("pii.entities: unknown entity `{name}` (valid: {})", BUILTIN_NAMES.join(", "))]
    UnknownEntity { name: String },
    #[error("pii.custom: pattern `{name}` has an invalid regex: {source}")]
    InvalidRegex {
        name: String,
        #[source]
        source: regex::Error,
    },
    #[error("pii.custom: a pattern has an empty name")]
    EmptyCustomName,
    #[error(
        "pii.custom: pattern name `{name}` may only contain ASCII letters, digits, `_` and `-` \
         (it becomes a placeholder label)"
    )]
    InvalidCustomName { name: String },
}

/// The built-in patterns, compiled once; validation happens in Rust after a match.
#[derive(Debug, Clone)]
struct Builtins {
    email: Regex,
    phone: Regex,
    card: Regex,
    iban: Regex,
    ssn: Regex,
    ipv4: Regex,
    ipv6: Regex,
    /// Secrets recognised by a fixed prefix, each with its rule name.
    prefixed: Vec<(&'static str, Regex)>,
    aws_secret: Regex,
    private_key: Regex,
    jwt: Regex,
    bearer: Regex,
}

impl Builtins {
    fn compile() -> Result<Self, regex::Error> {
        // Local part, then a dotted domain ending in a TLD of >= 2 letters.
        let email = Regex::new(
            r"[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?-u:\b)",
        )?;
        // `+` and 7-15 digits; a plain run of 10-15 digits; or groups with an optional
        // country code and parenthesised area code. Which of these is a phone is decided in
        // `valid_phone`.
        let phone = Regex::new(concat!(
            r"\+[0-9]{7,15}(?-u:\b)",
            r"|(?-u:\b)[0-9]{10,15}(?-u:\b)",
            r"|(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{1,5}\)[ .-]?)?[0-9]{1,6}(?:[ .-][0-9]{1,6}){0,6}",
        ))?;
        let card = Regex::new(r"(?-u:\b)[0-9](?:[ -]?[0-9]){12,18}(?-u:\b)")?;
        let iban = Regex::new(r"(?-u:\b)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,32}")?;
        let ssn = Regex::new(
            r"(?-u:\b)(?:[0-9]{3}-[0-9]{2}-[0-9]{4}|[0-9]{3} [0-9]{2} [0-9]{4}|[0-9]{9})(?-u:\b)",
        )?;
        let ipv4 = Regex::new(r"(?-u:\b)[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}(?-u:\b)")?;
        let ipv6 = Regex::new(
            r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{0,4})(?:%[0-9A-Za-z]+)?",
        )?;
        let prefixed = vec![
            (
                "aws_access_key",
                Regex::new(r"(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}")?,
            ),
            ("gcp_api_key", Regex::new(r"AIza[0-9A-Za-z_-]{35}")?),
            (
                "github_token",
                Regex::new(r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,}")?,
            ),
            ("slack_token", Regex::new(r"xox[baprs]-[A-Za-z0-9-]{10,}")?),
            (
                "stripe_key",
                Regex::new(r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}")?,
            ),
            (
                "openai_key",
                Regex::new(r"sk-(?:proj-)?[A-Za-z0-9_-]{20,}")?,
            ),
        ];
        let aws_secret = Regex::new(
            r#"(?i:aws_secret_access_key|aws_secret_key|secret_access_key|secret)["']?[ \t]*[:=][ \t]*["']?([A-Za-z0-9/+]{40})"#,
        )?;
        let private_key = Regex::new(
            r"-----BEGIN ((?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?)-----",
        )?;
        let jwt = Regex::new(r"eyJ[A-Za-z0-9_-]{7,}\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")?;
        let bearer = Regex::new(
            r"(?i:(?-u:\b)bearer[ \t]+|(?-u:\b)(?:access_|refresh_|api_|auth_)?token=)([A-Za-z0-9._~+/=%-]{8,})",
        )?;
        Ok(Builtins {
            email,
            phone,
            card,
            iban,
            ssn,
            ipv4,
            ipv6,
            prefixed,
            aws_secret,
            private_key,
            jwt,
            bearer,
        })
    }
}

/// Compiled on first use and shared by every detector, so a per-request detector is cheap.
static BUILTINS: LazyLock<Result<Builtins, regex::Error>> = LazyLock::new(Builtins::compile);

/// Finds personal data and secrets in text; cheap to clone (the regexes are shared).
#[derive(Debug, Clone)]
pub struct PiiDetector {
    builtins: &'static Builtins,
    enabled: HashSet<PiiKind>,
    custom: Vec<(PiiKind, Regex)>,
    allow: HashSet<String>,
}

impl PiiDetector {
    /// Validates `options` and compiles every pattern.
    pub fn new(options: &PiiOptions) -> Result<Self, PiiError> {
        let mut enabled = HashSet::new();
        for name in &options.entities {
            let kind = PiiKind::builtin(name)
                .ok_or_else(|| PiiError::UnknownEntity { name: name.clone() })?;
            enabled.insert(kind);
        }
        let mut custom = Vec::with_capacity(options.custom.len());
        for pattern in &options.custom {
            if pattern.name.trim().is_empty() {
                return Err(PiiError::EmptyCustomName);
            }
            if !pattern
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(PiiError::InvalidCustomName {
                    name: pattern.name.clone(),
                });
            }
            let regex = Regex::new(&pattern.regex).map_err(|source| PiiError::InvalidRegex {
                name: pattern.name.clone(),
                source,
            })?;
            custom.push((PiiKind::Custom(pattern.name.clone()), regex));
        }
        // The built-in patterns are constants; a failure here is a bug caught by every test.
        let builtins = BUILTINS.as_ref().map_err(|source| PiiError::InvalidRegex {
            name: "<built-in>".to_owned(),
            source: source.clone(),
        })?;
        Ok(PiiDetector {
            builtins,
            enabled,
            custom,
            allow: options.allow.iter().cloned().collect(),
        })
    }

    /// Sorted by start, non-overlapping (on overlap keep the longer match; on a tie the more
    /// specific kind: Secret > CreditCard > Iban > UsSsn > Email > IpAddress > Phone > Custom).
    pub fn detect(&self, text: &str) -> Vec<PiiMatch> {
        let mut found = Vec::new();
        let bytes = text.as_bytes();
        let has_digit = bytes.iter().any(u8::is_ascii_digit);
        let on = |kind: &PiiKind| self.enabled.contains(kind);

        if on(&PiiKind::Email) && bytes.contains(&b'@') {
            self.find_emails(text, &mut found);
        }
        if has_digit {
            if on(&PiiKind::Phone) {
                self.find_phones(text, &mut found);
            }
            if on(&PiiKind::CreditCard) {
                self.find_cards(text, &mut found);
            }
            if on(&PiiKind::Iban) {
                self.find_ibans(text, &mut found);
            }
            if on(&PiiKind::UsSsn) {
                self.find_ssns(text, &mut found);
            }
            if on(&PiiKind::IpAddress) {
                self.find_ipv4(text, &mut found);
            }
        }
        if on(&PiiKind::IpAddress) && bytes.contains(&b':') {
            self.find_ipv6(text, &mut found);
        }
        if on(&PiiKind::Secret) {
            self.find_secrets(text, has_digit, &mut found);
        }
        for (kind, regex) in &self.custom {
            for m in regex.find_iter(text) {
                if !m.is_empty() {
                    found.push(new_match(
                        kind.clone(),
                        m.start(),
                        m.end(),
                        kind.config_name(),
                    ));
                }
            }
        }
        if !self.allow.is_empty() {
            found.retain(|m| !self.allow.contains(&text[m.start..m.end]));
        }
        resolve_overlaps(found)
    }

    /// Whether [`detect`](Self::detect) would report anything.
    pub fn contains_pii(&self, text: &str) -> bool {
        !self.detect(text).is_empty()
    }

    fn find_emails(&self, text: &str, out: &mut Vec<PiiMatch>) {
        for m in self.builtins.email.find_iter(text) {
            let value = m.as_str();
            let Some(at) = value.find('@') else { continue };
            // A leading run of dots belongs to the sentence, not to the address.
            let skip = value[..at].len() - value[..at].trim_start_matches('.').len();
            let local = &value[skip..at];
            if local.is_empty() || local.len() > 64 || local.ends_with('.') || local.contains("..")
            {
                continue;
            }
            // An internationalised local part (`jörg@…`): take its Latin, Greek and Cyrillic
            // letters too (not CJK, which is written without spaces: `メールjohn@…`).
            let mut start = m.start() + skip;
            if skip == 0 {
                for (i, c) in text[..start].char_indices().rev() {
                    let letter = c.is_alphanumeric() && u32::from(c) < 0x0530;
                    if !(letter || matches!(c, '.' | '_' | '-' | '+')) {
                        break;
                    }
                    start = i;
                }
            }
            out.push(new_match(PiiKind::Email, start, m.end(), "email"));
        }
    }

    fn find_phones(&self, text: &str, out: &mut Vec<PiiMatch>) {
        for m in self.builtins.phone.find_iter(text) {
            if valid_phone(text, m.start(), m.end()) {
                out.push(new_match(PiiKind::Phone, m.start(), m.end(), "phone"));
            }
        }
    }

    fn find_cards(&self, text: &str, out: &mut Vec<PiiMatch>) {
        for m in self.builtins.card.find_iter(text) {
            if let Some(len) = card_prefix_len(m.as_str()) {
                let end = m.start() + len;
                if embedded_in_number(text, m.start(), end) {
                    continue;
                }
                out.push(new_match(
                    PiiKind::CreditCard,
                    m.start(),
                    end,
                    "credit_card",
                ));
            }
        }
    }

    fn find_ibans(&self, text: &str, out: &mut Vec<PiiMatch>) {
        for m in self.builtins.iban.find_iter(text) {
            if let Some(len) = iban_prefix_len(m.as_str()) {
                let end = m.start() + len;
                if !is_word_byte(text.as_bytes().get(end).copied()) {
                    out.push(new_match(PiiKind::Iban, m.start(), end, "iban"));
                }
            }
        }
    }

    fn find_ssns(&self, text: &str, out: &mut Vec<PiiMatch>) {
        for m in self.builtins.ssn.find_iter(text) {
            let value = m.as_str();
            if embedded_in_number(text, m.start(), m.end()) {
                continue;
            }
            let digits: Vec<u8> = value.bytes().filter(u8::is_ascii_digit).collect();
            let bare = value.len() == 9;
            if valid_ssn(&digits)
                && (!bare || has_context(text, m.start(), 32, &["ssn", "social security"]))
            {
                out.push(new_match(PiiKind::UsSsn, m.start(), m.end(), "us_ssn"));
            }
        }
    }

    fn find_ipv4(&self, text: &str, out: &mut Vec<PiiMatch>) {
        let bytes = text.as_bytes();
        for m in self.builtins.ipv4.find_iter(text) {
            // Part of a longer dotted run (1.2.3.4.5) is a version or an OID.
            let before_dot = m.start() >= 2
                && bytes[m.start() - 1] == b'.'
                && bytes[m.start() - 2].is_ascii_digit();
            let after_dot = bytes.get(m.end()) == Some(&b'.')
                && bytes.get(m.end() + 1).is_some_and(u8::is_ascii_digit);
            if before_dot || after_dot || m.as_str().parse::<Ipv4Addr>().is_err() {
                continue;
            }
            out.push(new_match(
                PiiKind::IpAddress,
                m.start(),
                m.end(),
                "ip_address",
            ));
        }
    }

    fn find_ipv6(&self, text: &str, out: &mut Vec<PiiMatch>) {
        let bytes = text.as_bytes();
        for m in self.builtins.ipv6.find_iter(text) {
            let before = m.start().checked_sub(1).map(|i| bytes[i]);
            if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':') {
                continue;
            }
            if is_word_byte(bytes.get(m.end()).copied()) || bytes.get(m.end()) == Some(&b':') {
                continue;
            }
            let value = m.as_str();
            let address = value.split('%').next().unwrap_or(value);
            if valid_ipv6(address) {
                out.push(new_match(
                    PiiKind::IpAddress,
                    m.start(),
                    m.end(),
                    "ip_address",
                ));
            }
        }
    }

    fn find_secrets(&self, text: &str, has_digit: bool, out: &mut Vec<PiiMatch>) {
        let b = &self.builtins;
        let bytes = text.as_bytes();
        for (rule, regex) in &b.prefixed {
            for m in regex.find_iter(text) {
                // Cut out of a longer word or token: not this rule's (high_entropy may judge
                // the whole token).
                let before = m.start().checked_sub(1).map(|i| bytes[i]);
                let after = bytes.get(m.end()).copied();
                if before.is_some_and(|c| c.is_ascii_alphanumeric())
                    || after.is_some_and(|c| c.is_ascii_alphanumeric())
                {
                    continue;
                }
                if *rule == "openai_key" && !looks_random(&m.as_str()[3..]) {
                    continue;
                }
                out.push(new_match(PiiKind::Secret, m.start(), m.end(), rule));
            }
        }
        if has_digit {
            for caps in b.aws_secret.captures_iter(text) {
                let Some(key) = caps.get(1) else { continue };
                let next = bytes.get(key.end()).copied();
                if next.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'/' || c == b'+') {
                    continue;
                }
                if looks_random(key.as_str()) {
                    out.push(new_match(
                        PiiKind::Secret,
                        key.start(),
                        key.end(),
                        "aws_secret_key",
                    ));
                }
            }
        }
        if text.contains("-----BEGIN ") {
            let mut from = 0;
            while let Some(caps) = b.private_key.captures_at(text, from) {
                let (Some(whole), Some(label)) = (caps.get(0), caps.get(1)) else {
                    break;
                };
                let end_marker = format!("-----END {}-----", label.as_str());
                let end = text[whole.end()..]
                    .find(&end_marker)
                    .map_or(text.len(), |i| whole.end() + i + end_marker.len());
                out.push(new_match(
                    PiiKind::Secret,
                    whole.start(),
                    end,
                    "private_key",
                ));
                from = end;
            }
        }
        if text.contains("eyJ") {
            for m in b.jwt.find_iter(text) {
                let before = m.start().checked_sub(1).map(|i| bytes[i]);
                if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-') {
                    out.push(new_match(PiiKind::Secret, m.start(), m.end(), "jwt"));
                }
            }
        }
        if has_digit {
            for caps in b.bearer.captures_iter(text) {
                let Some(token) = caps.get(1) else { continue };
                let value = token.as_str().trim_end_matches('.');
                let has_letter = value.bytes().any(|c| c.is_ascii_alphabetic());
                let has_num = value.bytes().any(|c| c.is_ascii_digit());
                if value.len() >= 8 && has_letter && has_num {
                    let end = token.start() + value.len();
                    out.push(new_match(
                        PiiKind::Secret,
                        token.start(),
                        end,
                        "bearer_token",
                    ));
                }
            }
            find_high_entropy(text, out);
        }
    }
}

impl Default for PiiDetector {
    fn default() -> Self {
        PiiDetector::new(&PiiOptions::default()).unwrap_or_else(|e| {
            // Unreachable: the default options name only built-ins, whose patterns are
            // constants compiled by every test.
            panic!("kiln-guard: default PII detector: {e}")
        })
    }
}

fn new_match(kind: PiiKind, start: usize, end: usize, rule: &str) -> PiiMatch {
    PiiMatch {
        kind,
        start,
        end,
        rule: rule.to_owned(),
    }
}

/// Longest first, then the more specific kind, then the more specific rule; every candidate
/// overlapping an accepted one is dropped. Returned sorted by start.
fn resolve_overlaps(mut found: Vec<PiiMatch>) -> Vec<PiiMatch> {
    if found.len() <= 1 {
        return found;
    }
    found.sort_by(|a, b| {
        (b.end - b.start)
            .cmp(&(a.end - a.start))
            .then(b.kind.specificity().cmp(&a.kind.specificity()))
            .then(rule_rank(&a.rule).cmp(&rule_rank(&b.rule)))
            .then(a.start.cmp(&b.start))
    });
    let mut kept: Vec<PiiMatch> = Vec::with_capacity(found.len());
    for m in found {
        if kept.iter().all(|k| m.end <= k.start || k.end <= m.start) {
            kept.push(m);
        }
    }
    kept.sort_by_key(|m| m.start);
    kept
}

/// Generic secret rules lose ties against the named ones.
fn rule_rank(rule: &str) -> u8 {
    match rule {
        "high_entropy" => 2,
        "bearer_token" => 1,
        _ => 0,
    }
}

fn is_word_byte(b: Option<u8>) -> bool {
    b.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'_' | b'-')
}

/// Whether `text[start..end]` continues a longer number: `.`, `-` or `/` glued to a digit on
/// either side (`2024-415-555-0132`, `1.4111…`).
fn embedded_in_number(text: &str, start: usize, end: usize) -> bool {
    let bytes = text.as_bytes();
    let joins = |c: u8| matches!(c, b'.' | b'-' | b'/' | b':' | b',');
    let before = start >= 2 && joins(bytes[start - 1]) && bytes[start - 2].is_ascii_digit();
    let after = bytes.get(end).is_some_and(|&c| joins(c))
        && bytes.get(end + 1).is_some_and(u8::is_ascii_digit);
    before || after
}

/// Whether one of `words` starts a word within `window` bytes before `start`
/// (case-insensitive; "telephone", "called" and "cellphone" count, "hotel" does not).
fn has_context(text: &str, start: usize, window: usize, words: &[&str]) -> bool {
    let mut from = start.saturating_sub(window);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    let lower = text[from..start].to_ascii_lowercase();
    let bytes = lower.as_bytes();
    words.iter().any(|word| {
        lower.match_indices(word).any(|(i, _)| {
            // At the window's edge the word may be cut; only a letter before it disqualifies.
            i == 0 || !bytes[i - 1].is_ascii_alphabetic()
        })
    })
}

const PHONE_CONTEXT: [&str; 7] = ["phone", "tel", "call", "mobile", "cell", "fax", "whatsapp"];

/// Decides whether a phone candidate (see the module docs for the rules) is a phone number.
fn valid_phone(text: &str, start: usize, end: usize) -> bool {
    let bytes = text.as_bytes();
    let value = &text[start..end];
    let before = start.checked_sub(1).map(|i| bytes[i]);
    if is_word_byte(before) || before == Some(b'+') || embedded_in_number(text, start, end) {
        return false;
    }
    if is_word_byte(bytes.get(end).copied()) {
        return false;
    }
    let digits = value.bytes().filter(u8::is_ascii_digit).count();
    if !(7..=15).contains(&digits) {
        return false;
    }
    if value.starts_with('+') {
        return digits >= 8;
    }
    if value.starts_with('(') {
        return digits >= 9;
    }
    let mut separators = value.bytes().filter(|c| !c.is_ascii_digit());
    let first_sep = separators.next();
    if let Some(sep) = first_sep
        && separators.any(|c| c != sep)
    {
        return false;
    }
    let groups: Vec<&str> = match first_sep {
        Some(sep) => value.split(char::from(sep)).collect(),
        None => vec![value],
    };
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if looks_like_date(&groups) {
        return false;
    }
    let context = || has_context(text, start, 24, &PHONE_CONTEXT);
    match lens.as_slice() {
        [_] => {
            let plain =
                digits == 10 || (digits == 11 && matches!(value.as_bytes()[0], b'0' | b'1'));
            plain && context()
        }
        [3, 3, 4] => true,
        [1, 3, 3, 4] => value.starts_with('1'),
        _ if value.starts_with('0') && digits >= 9 && lens.iter().all(|&l| l >= 2) => true,
        _ => groups.len() >= 2 && lens.iter().all(|&l| l >= 2) && context(),
    }
}

fn looks_like_date(groups: &[&str]) -> bool {
    let num = |s: &str| s.parse::<u32>().unwrap_or(0);
    match groups {
        [y, m, d] if y.len() == 4 && m.len() <= 2 && d.len() <= 2 => {
            (1..=12).contains(&num(m)) && (1..=31).contains(&num(d))
        }
        [a, b, y] if y.len() == 4 && a.len() <= 2 && b.len() <= 2 => {
            (1..=31).contains(&num(a)) && (1..=31).contains(&num(b))
        }
        _ => false,
    }
}

/// The length (in bytes of `candidate`) of the longest prefix, cut at a group boundary, that
/// is a valid card number: consistent separators, 13–19 digits, a known issuer prefix, Luhn.
fn card_prefix_len(candidate: &str) -> Option<usize> {
    let bytes = candidate.as_bytes();
    let sep = bytes.iter().copied().find(|c| !c.is_ascii_digit());
    if let Some(sep) = sep
        && bytes.iter().any(|&c| !c.is_ascii_digit() && c != sep)
    {
        return None;
    }
    // Group boundaries; candidate prefixes end at each of them, longest first.
    let mut ends: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|&(_, &c)| !c.is_ascii_digit())
        .map(|(i, _)| i)
        .collect();
    ends.push(bytes.len());
    (0..ends.len()).rev().find_map(|last| {
        let end = ends[last];
        // One unbroken run, or groups of 3–6 digits (4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3).
        let grouped = last == 0
            || bytes[..end]
                .split(|c| !c.is_ascii_digit())
                .all(|g| (3..=6).contains(&g.len()));
        let digits: Vec<u8> = bytes[..end]
            .iter()
            .filter(|c| c.is_ascii_digit())
            .map(|c| c - b'0')
            .collect();
        (grouped && (13..=19).contains(&digits.len()) && known_issuer(&digits) && luhn(&digits))
            .then_some(end)
    })
}

/// Issuer identification numbers of the major networks (and a plausible length for each).
fn known_issuer(digits: &[u8]) -> bool {
    let prefix = |n: usize| {
        digits[..n.min(digits.len())]
            .iter()
            .fold(0u32, |acc, &d| acc * 10 + u32::from(d))
    };
    let len = digits.len();
    let (p1, p2, p3, p4) = (prefix(1), prefix(2), prefix(3), prefix(4));
    match p1 {
        4 => matches!(len, 13 | 16 | 19),
        2 => (2221..=2720).contains(&p4) && len == 16,
        5 => (51..=55).contains(&p2) && len == 16 || (p2 == 50 || p2 >= 56) && len >= 13,
        3 => {
            (p2 == 34 || p2 == 37) && len == 15
                || (3528..=3589).contains(&p4) && len >= 16
                || ((300..=305).contains(&p3) || p2 == 36 || p2 == 38) && len >= 14
        }
        6 => {
            (p4 == 6011 || p2 == 65 || (644..=649).contains(&p3) || p2 == 62) && len >= 16
                || len >= 13 // Maestro 56–69
        }
        _ => false,
    }
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// IBAN lengths by country (ISO 13616 registry, the countries kiln's users bank in most).
fn iban_length(country: &str) -> Option<usize> {
    let len = match country {
        "NO" => 15,
        "BE" => 16,
        "DK" | "FI" | "FO" | "GL" | "NL" => 18,
        "MK" | "SI" => 19,
        "AT" | "BA" | "EE" | "KZ" | "LT" | "LU" | "XK" => 20,
        "CH" | "HR" | "LI" | "LV" => 21,
        "BG" | "BH" | "CR" | "DE" | "GB" | "GE" | "IE" | "ME" | "RS" => 22,
        "AE" | "GI" | "IL" | "TL" => 23,
        "AD" | "CZ" | "ES" | "MD" | "PK" | "RO" | "SA" | "SE" | "SK" | "TN" | "VG" => 24,
        "PT" | "ST" => 25,
        "IS" | "TR" => 26,
        "FR" | "GR" | "IT" | "MC" | "MR" | "SM" => 27,
        "AL" | "AZ" | "BY" | "CY" | "DO" | "GT" | "HU" | "LB" | "PL" => 28,
        "BR" | "EG" | "PS" | "QA" | "UA" => 29,
        "JO" | "KW" | "MU" => 30,
        "MT" | "SC" => 31,
        "LC" => 32,
        _ => return None,
    };
    Some(len)
}

/// The byte length of the IBAN at the start of `candidate` (compact, or in groups of four),
/// if its length fits the country and its check digits pass mod-97.
fn iban_prefix_len(candidate: &str) -> Option<usize> {
    let bytes = candidate.as_bytes();
    let spaced = bytes.get(4) == Some(&b' ');
    // ends[n - 1]: the byte offset just past the n-th character of the compact form, for as
    // long as the grouping holds (a space only after every fourth character, when spaced).
    let mut ends = Vec::with_capacity(bytes.len());
    let mut chars = Vec::with_capacity(bytes.len());
    for (i, &c) in bytes.iter().enumerate() {
        if c == b' ' {
            if !spaced || chars.len() % 4 != 0 {
                break;
            }
        } else {
            if spaced && i > 0 && chars.len() % 4 == 0 && bytes[i - 1] != b' ' {
                break;
            }
            chars.push(c);
            ends.push(i + 1);
        }
    }
    let try_len = |n: usize| -> Option<usize> {
        let end = *ends.get(n.checked_sub(1)?)?;
        let next = bytes.get(end).copied();
        (!next.is_some_and(|c| c.is_ascii_alphanumeric()) && mod97(&chars[..n])).then_some(end)
    };
    match iban_length(candidate.get(..2)?) {
        Some(n) => try_len(n),
        None => (15..=34).rev().find_map(try_len),
    }
}

fn mod97(iban: &[u8]) -> bool {
    let rearranged = iban[4..].iter().chain(&iban[..4]);
    let mut rem: u32 = 0;
    for &c in rearranged {
        let v = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn valid_ssn(digits: &[u8]) -> bool {
    let num = |s: &[u8]| {
        s.iter()
            .fold(0u32, |acc, &d| acc * 10 + u32::from(d - b'0'))
    };
    if digits.len() != 9 {
        return false;
    }
    let (area, group, serial) = (num(&digits[..3]), num(&digits[3..5]), num(&digits[5..]));
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn valid_ipv6(address: &str) -> bool {
    if !address.bytes().any(|c| c.is_ascii_hexdigit()) || address.parse::<Ipv6Addr>().is_err() {
        return false;
    }
    // EUI-64 / MAC-like: every group exactly two hex digits and no compression.
    let groups: Vec<&str> = address.split(':').collect();
    let mac_like = !address.contains("::") && groups.iter().all(|g| g.len() == 2);
    !mac_like
}

/// A random-looking key body: letters of both cases and digits.
fn looks_random(s: &str) -> bool {
    s.bytes().any(|c| c.is_ascii_digit())
        && s.bytes().any(|c| c.is_ascii_uppercase())
        && s.bytes().any(|c| c.is_ascii_lowercase())
}

const MIN_ENTROPY_LEN: usize = 24;
const MIN_ENTROPY_BITS: f64 = 4.2;

/// Runs of ≥ 24 token characters with a letter, a digit and ≥ 4.2 bits/char of entropy.
/// `=` only ends a token (base64 padding): `key=value` is two runs, not one.
fn find_high_entropy(text: &str, out: &mut Vec<PiiMatch>) {
    let bytes = text.as_bytes();
    let in_run = |c: u8| is_token_byte(c) && c != b'=';
    let mut i = 0;
    while i < bytes.len() {
        if !in_run(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && in_run(bytes[i]) {
            i += 1;
        }
        // Trailing separators (a dash ending a sentence) are not part of the token.
        let mut end = i;
        while end > start && matches!(bytes[end - 1], b'-' | b'_') {
            end -= 1;
        }
        let run = &bytes[start..end];
        // Inline data (`data:image/png;base64,…`) is content, not a credential.
        let data_uri = bytes[..start].ends_with(b";base64,");
        if !data_uri
            && run.len() >= MIN_ENTROPY_LEN
            && run.iter().any(u8::is_ascii_alphabetic)
            && run.iter().any(u8::is_ascii_digit)
            && shannon_entropy(run) >= MIN_ENTROPY_BITS
        {
            if end == i {
                while end < bytes.len() && end - i < 2 && bytes[end] == b'=' {
                    end += 1;
                }
            }
            out.push(new_match(PiiKind::Secret, start, end, "high_entropy"));
        }
        while i < bytes.len() && bytes[i] == b'=' {
            i += 1;
        }
    }
}

/// Shannon entropy in bits per byte.
fn shannon_entropy(run: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &c in run {
        counts[usize::from(c)] += 1;
    }
    let n = run.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_test_cards_and_rejects_a_changed_digit() {
        let digits = |s: &str| s.bytes().map(|c| c - b'0').collect::<Vec<_>>();
        assert!(luhn(&digits("4111111111111111")));
        assert!(luhn(&digits("378282246310005")));
        assert!(!luhn(&digits("4111111111111112")));
    }

    #[test]
    fn mod97_accepts_the_registry_example_and_rejects_a_changed_check_digit() {
        assert!(mod97(b"GB29NWBK60161331926819"));
        assert!(!mod97(b"GB28NWBK60161331926819"));
    }

    #[test]
    fn entropy_of_hex_never_reaches_the_threshold() {
        let sha = b"3f786850e387550fdab836ed7e6dc881de23001b";
        assert!(shannon_entropy(sha) < MIN_ENTROPY_BITS);
        assert!(shannon_entropy(b"aB3dE5gH7jK9mN1pQ3sT5vW7yZ9") > MIN_ENTROPY_BITS);
    }

    #[test]
    fn context_words_must_start_a_word() {
        assert!(has_context("call me at ", 11, 24, &PHONE_CONTEXT));
        assert!(has_context("Telephone: ", 11, 24, &PHONE_CONTEXT));
        assert!(!has_context("the hotel room ", 15, 24, &PHONE_CONTEXT));
    }

    #[test]
    fn context_window_starts_on_a_char_boundary() {
        let text = "电话电话电话电话 call 😀 ";
        assert!(has_context(text, text.len(), 12, &PHONE_CONTEXT));
        assert!(!has_context(text, text.len(), 3, &PHONE_CONTEXT));
    }

    #[test]
    fn ssn_rules() {
        assert!(valid_ssn(b"123456789"));
        assert!(!valid_ssn(b"000456789"));
        assert!(!valid_ssn(b"666456789"));
        assert!(!valid_ssn(b"912456789"));
        assert!(!valid_ssn(b"123006789"));
        assert!(!valid_ssn(b"123450000"));
    }
}
