#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Table-driven tests for PII and secret detection and for redaction: for every detector a
//! table of true positives drawn from realistic traffic and a table of look-alikes that must
//! not be reported as that kind.

use kiln_guard::pii::{CustomPattern, PiiDetector, PiiError, PiiKind, PiiMatch, PiiOptions};
use kiln_guard::redact::{RedactMode, Vault, redact};

fn detector() -> PiiDetector {
    PiiDetector::default()
}

fn found(d: &PiiDetector, text: &str) -> Vec<(PiiKind, String)> {
    d.detect(text)
        .into_iter()
        .map(|m| (m.kind, text[m.start..m.end].to_owned()))
        .collect()
}

/// Every (text, expected substring) must be reported as exactly that substring and kind.
fn assert_true_positives(kind: PiiKind, table: &[(&str, &str)]) {
    let d = detector();
    for (text, expected) in table {
        let got = found(&d, text);
        assert!(
            got.iter().any(|(k, v)| *k == kind && v == expected),
            "{kind:?}: expected {expected:?} in {text:?}, got {got:?}"
        );
    }
}

/// No text may yield a match of `kind`.
fn assert_false_positives(kind: PiiKind, table: &[&str]) {
    let d = detector();
    for text in table {
        let got = found(&d, text);
        assert!(
            got.iter().all(|(k, _)| *k != kind),
            "{kind:?}: false positive in {text:?}: {got:?}"
        );
    }
}

#[test]
fn email_true_positives() {
    assert_true_positives(
        PiiKind::Email,
        &[
            ("contact john.doe@example.com today", "john.doe@example.com"),
            (
                "Mail: a.b+tag@mail.example.co.uk.",
                "a.b+tag@mail.example.co.uk",
            ),
            (
                "<jane_smith99@company-name.org>",
                "jane_smith99@company-name.org",
            ),
            ("send to USER@EXAMPLE.IO, thanks", "USER@EXAMPLE.IO"),
            ("mailto:support@kiln.dev", "support@kiln.dev"),
            (
                "see ...first.last@sub.domain.travel",
                "first.last@sub.domain.travel",
            ),
            ("Grüße an jörg@beispiel.de!", "jörg@beispiel.de"),
            ("电子邮件：li.wei@example.cn 谢谢", "li.wei@example.cn"),
            ("メールjohn@example.com", "john@example.com"),
            (
                "почта иван.петров@пример.рф — no, ivan@example.ru",
                "ivan@example.ru",
            ),
            (
                "(email: o.reilly-1@mx1.example-mail.com)",
                "o.reilly-1@mx1.example-mail.com",
            ),
        ],
    );
}

#[test]
fn email_false_positives() {
    assert_false_positives(
        PiiKind::Email,
        &[
            "ssh root@localhost and restart",
            "push to git@github then",
            "@channel please review",
            "5@3.50 each",
            "pip install package@1.2.3",
            "john..doe@example.com",
            "address email@example.c is incomplete",
            "foo@bar.123",
            "@@@ nothing here @",
            "decorator @property def x(self)",
        ],
    );
}

#[test]
fn phone_true_positives() {
    assert_true_positives(
        PiiKind::Phone,
        &[
            ("London: +44 20 7946 0958.", "+44 20 7946 0958"),
            ("Ring +1 (415) 555-0132 after 5pm", "+1 (415) 555-0132"),
            ("office (415) 555-0132", "(415) 555-0132"),
            ("her number is 415-555-0132", "415-555-0132"),
            ("or 415.555.0132 if busy", "415.555.0132"),
            ("Berlin +49 30 901820", "+49 30 901820"),
            ("Paris: +33 1 23 45 67 89", "+33 1 23 45 67 89"),
            ("mobile +91 98765 43210", "+91 98765 43210"),
            ("Tokyo +81-3-1234-5678", "+81-3-1234-5678"),
            ("E.164 +14155550132", "+14155550132"),
            ("call me at 4155550132 tomorrow", "4155550132"),
            ("UK office 020 7946 0958", "020 7946 0958"),
            ("Tel. 555-0132", "555-0132"),
            ("1-415-555-0132 toll", "1-415-555-0132"),
        ],
    );
}

#[test]
fn phone_false_positives() {
    assert_false_positives(
        PiiKind::Phone,
        &[
            "released on 2024-01-15",
            "am 15.01.2024 um 10 Uhr",
            "upgrade to version 1.2.3",
            "meeting at 12:30:45",
            "pi is 3.14159265",
            "order 12345678901234 shipped",
            "card 4111 1111 1111 1111",
            "server 192.168.1.1",
            "your code is 123456",
            "total 4155550132 items",
            "ISBN 978-3-16-148410-0",
            "logged 2024-01-15 10:30:00",
            "SSN 123-45-6789",
            "epoch 1700000000",
            "price $1,299.99 or 2+2",
        ],
    );
}

#[test]
fn credit_card_true_positives() {
    assert_true_positives(
        PiiKind::CreditCard,
        &[
            ("Visa 4111 1111 1111 1111 exp 12/27", "4111 1111 1111 1111"),
            ("MC 5555-5555-5555-4444", "5555-5555-5555-4444"),
            ("amex:378282246310005.", "378282246310005"),
            ("Amex 3782 822463 10005", "3782 822463 10005"),
            ("discover 6011111111111117", "6011111111111117"),
            ("jcb 3530111333300000", "3530111333300000"),
            ("diners 30569309025904", "30569309025904"),
            ("mastercard 2223003122003222", "2223003122003222"),
            ("unionpay 6200000000000005", "6200000000000005"),
            ("pay with 4012888888881881, thanks", "4012888888881881"),
            ("4111 1111 1111 1111 5 items", "4111 1111 1111 1111"),
        ],
    );
}

#[test]
fn credit_card_false_positives() {
    assert_false_positives(
        PiiKind::CreditCard,
        &[
            "order number 4111111111111112",
            "order #5555555555554445",
            "ISBN 978-0-306-40615-7",
            "4111 1111 1111 1112",
            "tracking 9400 1000 0000 0000 0000 00",
            "ref 1234 5678 9012 3456",
            "phone +1 415 555 0132",
            "timestamp 1700000000000",
            "4111-1111 1111-1111",
            "41111111111111111111",
            "pi 3.14159265358979",
        ],
    );
}

#[test]
fn iban_true_positives() {
    assert_true_positives(
        PiiKind::Iban,
        &[
            ("IBAN DE89370400440532013000", "DE89370400440532013000"),
            (
                "IBAN: DE89 3704 0044 0532 0130 00.",
                "DE89 3704 0044 0532 0130 00",
            ),
            (
                "GB29 NWBK 6016 1331 9268 19 please",
                "GB29 NWBK 6016 1331 9268 19",
            ),
            ("FR1420041010050500013M02606", "FR1420041010050500013M02606"),
            ("ES9121000418450200051332", "ES9121000418450200051332"),
            ("IT60X0542811101000000123456", "IT60X0542811101000000123456"),
            ("NL91ABNA0417164300", "NL91ABNA0417164300"),
            ("BE68539007547034", "BE68539007547034"),
            ("CH9300762011623852957", "CH9300762011623852957"),
            ("AT611904300234573201", "AT611904300234573201"),
            (
                "PL61109010140000071219812874",
                "PL61109010140000071219812874",
            ),
            ("SE4550000000058398257466", "SE4550000000058398257466"),
            ("NO9386011117947", "NO9386011117947"),
            ("DK5000400440116243", "DK5000400440116243"),
            ("FI2112345600000785", "FI2112345600000785"),
            ("IE29AIBK93115212345678", "IE29AIBK93115212345678"),
            ("PT50000201231234567890154", "PT50000201231234567890154"),
            ("LU280019400644750000", "LU280019400644750000"),
        ],
    );
}

#[test]
fn iban_false_positives() {
    assert_false_positives(
        PiiKind::Iban,
        &[
            "bad check DE88370400440532013000",
            "too short GB29NWBK6016133192681",
            "spaced short DE89 3704 0044 0532 0130 0",
            "too long DE89370400440532013000123",
            "ISO8601 and RFC3339",
            "AB12 CDEF",
            "model GPT4 turbo 2024",
            "SKU XY12345678901234567890",
            "grouped wrong DE893 7040 0440 5320 1300 0",
            "DE89 3704 0044 0532 0130 00X",
        ],
    );
}

#[test]
fn ssn_true_positives() {
    assert_true_positives(
        PiiKind::UsSsn,
        &[
            ("my SSN is 123-45-6789", "123-45-6789"),
            ("SSN: 078-05-1120", "078-05-1120"),
            ("number 123 45 6789 on file", "123 45 6789"),
            ("ssn 219099999", "219099999"),
            ("social security number is 536-22-1234", "536-22-1234"),
            ("Social Security: 536221234", "536221234"),
            ("id 001-01-0001", "001-01-0001"),
            ("899-99-9999", "899-99-9999"),
        ],
    );
}

#[test]
fn ssn_false_positives() {
    assert_false_positives(
        PiiKind::UsSsn,
        &[
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "999-12-3456",
            "123-00-4567",
            "123-45-0000",
            "order 123456789 shipped",
            "123-45-67890",
            "part 123-45-6789-01",
            "released 2024-01-15",
            "1234-56-789",
        ],
    );
}

#[test]
fn ip_true_positives() {
    assert_true_positives(
        PiiKind::IpAddress,
        &[
            ("ping 192.168.1.1", "192.168.1.1"),
            ("broadcast 10.0.0.255.", "10.0.0.255"),
            ("dns 8.8.8.8,", "8.8.8.8"),
            ("server at 172.16.254.1:8080", "172.16.254.1"),
            ("v6 2001:db8::1 up", "2001:db8::1"),
            ("link-local fe80::1%eth0", "fe80::1%eth0"),
            ("loopback ::1", "::1"),
            (
                "full 2001:0db8:85a3:0000:0000:8a2e:0370:7334",
                "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
            ),
            ("[2001:db8::ff00:42:8329]:443", "2001:db8::ff00:42:8329"),
            ("mapped ::ffff:192.0.2.128", "::ffff:192.0.2.128"),
        ],
    );
}

#[test]
fn ip_false_positives() {
    assert_false_positives(
        PiiKind::IpAddress,
        &[
            "999.1.1.1",
            "version 1.2.3.4.5",
            "tag v1.2.3.4",
            "256.1.1.1",
            "at 12:30:45",
            "mac 00:1A:2B:3C:4D:5E",
            "use std::net::Ipv6Addr;",
            "2024-01-15T10:30:45Z",
            "version 1.2.3",
            "a :: b",
            "oid 1.3.6.1.4.1",
            "eui 00:11:22:33:44:55:66:77",
        ],
    );
}

/// (text, secret, rule)
fn secret_cases() -> Vec<(String, String, &'static str)> {
    let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4\
               gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
    let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq98\nabcDEF123==\n\
               -----END RSA PRIVATE KEY-----";
    let open_pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nAAAB";
    let cases: Vec<(String, &str, &'static str)> = vec![
        (
            "key AKIAIOSFODNN7EXAMPLE".into(),
            "AKIAIOSFODNN7EXAMPLE",
            "aws_access_key",
        ),
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "aws_secret_key",
        ),
        (
            "maps key AIzaKLzdocJ2isAjIhKtJ0RlgLKOmxgJTeKdNnF".into(),
            "AIzaKLzdocJ2isAjIhKtJ0RlgLKOmxgJTeKdNnF",
            "gcp_api_key",
        ),
        (
            "GH_TOKEN=ghp_u8jzPde0IgxLd6GncfBAepfJBd0Kh8oOOL8d".into(),
            "ghp_u8jzPde0IgxLd6GncfBAepfJBd0Kh8oOOL8d",
            "github_token",
        ),
        (
            "pat github_pat_11u8iS2G8NPRVdD53X83RZ_JzzzzgEOzdmenCkhvMdgaKjIg8xNbe".into(),
            "github_pat_11u8iS2G8NPRVdD53X83RZ_JzzzzgEOzdmenCkhvMdgaKjIg8xNbe",
            "github_token",
        ),
        (
            "slack xoxb-1234567890-3nNyjOq9wMxEhh2FDEEtfjgV".into(),
            "xoxb-1234567890-3nNyjOq9wMxEhh2FDEEtfjgV",
            "slack_token",
        ),
        (
            "stripe.api_key = 'sk_live_RIBXuDL7DxtpYlSXpfKtHF4v'".into(),
            "sk_live_RIBXuDL7DxtpYlSXpfKtHF4v",
            "stripe_key",
        ),
        (
            "OPENAI_API_KEY=sk-proj-UCsMehGAkWvj7FAc9QeWJKY40uvSwMFLZDe1f8rE".into(),
            "sk-proj-UCsMehGAkWvj7FAc9QeWJKY40uvSwMFLZDe1f8rE",
            "openai_key",
        ),
        (
            "key: sk-SQedUStPKR0CsTy4Qwb8DwkNhFdnXsiVpzz63FfkCzJr4i0B".into(),
            "sk-SQedUStPKR0CsTy4Qwb8DwkNhFdnXsiVpzz63FfkCzJr4i0B",
            "openai_key",
        ),
        (format!("here:\n{pem}\nthanks"), pem, "private_key"),
        (format!("truncated {open_pem}"), open_pem, "private_key"),
        (format!("token {jwt} expired"), jwt, "jwt"),
        (
            "Authorization: Bearer abc123def456ghi789".into(),
            "abc123def456ghi789",
            "bearer_token",
        ),
        (
            "GET /cb?token=9f8e7d6c5b4a&x=1".into(),
            "9f8e7d6c5b4a",
            "bearer_token",
        ),
        (
            "password is 3JrTAwR4y9ojfljoQoaF1LlqsajAIxNK ok".into(),
            "3JrTAwR4y9ojfljoQoaF1LlqsajAIxNK",
            "high_entropy",
        ),
    ];
    cases
        .into_iter()
        .map(|(t, s, r)| (t, s.to_owned(), r))
        .collect()
}

#[test]
fn secret_true_positives() {
    let d = detector();
    for (text, secret, rule) in secret_cases() {
        let got = d.detect(&text);
        assert!(
            got.iter().any(|m| m.kind == PiiKind::Secret
                && m.rule == rule
                && text[m.start..m.end] == secret),
            "expected {rule} {secret:?} in {text:?}, got {got:?}"
        );
    }
}

#[test]
fn secret_false_positives() {
    assert_false_positives(
        PiiKind::Secret,
        &[
            "The key to success is persistence and a good token economy.",
            "Please pass the token to the next function, it is a secret.",
            "Keep this secret between us; the secret key is in the drawer.",
            "He was the bearer of bad news",
            "commit 3f786850e387550fdab836ed7e6dc881de23001b fixed it",
            "request id 550e8400-e29b-41d4-a716-446655440000",
            "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "iVBORwKGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVRmNkYPhfDwAChwGAeekgAAAABJRUErkJggg",
            "a state-of-the-art-machine-learning-pipeline-design",
            "sk-learn-is-a-great-python-library",
            "token=abcdefghijkl and token=abc",
            "-----BEGIN PUBLIC KEY-----",
            "built at 2024-01-15T10:30:45.123456789Z",
            "v1.2.3-alpha.4+build.20240115",
            "averyveryverylongwordwithoutanydigitsatall",
            "/usr/local/lib/python3/site-packages/torch",
            "<img src=\"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==\">",
        ],
    );
}

#[test]
fn secret_rule_beats_generic_rules_on_the_same_span() {
    let d = detector();
    let text = "token=AKIAIOSFODNN7EXAMPLE";
    let got = d.detect(text);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].rule, "aws_access_key");
}

#[test]
fn labels_and_builtin_names_round_trip() {
    for name in [
        "email",
        "phone",
        "credit_card",
        "iban",
        "us_ssn",
        "ip_address",
        "secret",
    ] {
        let kind = PiiKind::builtin(&name.to_uppercase()).unwrap();
        assert_eq!(kind.label(), name.to_uppercase());
    }
    assert_eq!(PiiKind::builtin("passport"), None);
    assert_eq!(PiiKind::Custom("employee_id".into()).label(), "EMPLOYEE_ID");
}

fn with_custom(name: &str, regex: &str) -> PiiOptions {
    PiiOptions {
        custom: vec![CustomPattern {
            name: name.into(),
            regex: regex.into(),
        }],
        ..PiiOptions::default()
    }
}

#[test]
fn custom_pattern_is_reported_with_its_name() {
    let d = PiiDetector::new(&with_custom("employee_id", r"EMP-[0-9]{6}")).unwrap();
    let text = "ticket from EMP-004211 and EMP-123456";
    let got = d.detect(text);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].kind, PiiKind::Custom("employee_id".into()));
    assert_eq!(got[0].rule, "employee_id");
    assert_eq!(&text[got[1].start..got[1].end], "EMP-123456");
}

#[test]
fn custom_pattern_loses_a_tie_to_a_builtin() {
    let d = PiiDetector::new(&with_custom("ref", r"[0-9]{3}-[0-9]{2}-[0-9]{4}")).unwrap();
    let got = d.detect("SSN 123-45-6789");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].kind, PiiKind::UsSsn);
}

#[test]
fn config_errors_name_the_problem() {
    let err = PiiDetector::new(&with_custom("bad", "(unclosed")).unwrap_err();
    assert!(matches!(err, PiiError::InvalidRegex { .. }));
    let msg = err.to_string();
    assert!(msg.contains("`bad`") && msg.contains("unclosed"), "{msg}");

    let err = PiiDetector::new(&with_custom("  ", "x")).unwrap_err();
    assert!(matches!(err, PiiError::EmptyCustomName), "{err}");

    let err = PiiDetector::new(&with_custom("a<b>", "x")).unwrap_err();
    assert!(matches!(err, PiiError::InvalidCustomName { .. }), "{err}");

    let options = PiiOptions {
        entities: vec!["email".into(), "passport".into()],
        ..PiiOptions::default()
    };
    let msg = PiiDetector::new(&options).unwrap_err().to_string();
    assert!(
        msg.contains("passport") && msg.contains("credit_card"),
        "{msg}"
    );
}

#[test]
fn options_deserialize_with_defaults_and_reject_unknown_fields() {
    let options: PiiOptions = serde_json::from_str("{}").unwrap();
    assert_eq!(options, PiiOptions::default());
    assert_eq!(options.entities.len(), 7);
    let options: PiiOptions = serde_json::from_str(
        r#"{"entities": ["EMAIL"], "custom": [{"name": "ticket", "regex": "T-[0-9]+"}], "allow": ["a@b.io"]}"#,
    )
    .unwrap();
    assert_eq!(options.custom[0].name, "ticket");
    assert!(serde_json::from_str::<PiiOptions>(r#"{"entitys": []}"#).is_err());
    assert!(
        serde_json::from_str::<PiiOptions>(r#"{"custom": [{"name": "x", "regex": "y", "z": 1}]}"#)
            .is_err()
    );
}

#[test]
fn only_enabled_entities_are_reported() {
    let options = PiiOptions {
        entities: vec!["Email".into()],
        ..PiiOptions::default()
    };
    let d = PiiDetector::new(&options).unwrap();
    let got = found(
        &d,
        "mail a@example.com, card 4111 1111 1111 1111, ip 10.0.0.1",
    );
    assert_eq!(got, vec![(PiiKind::Email, "a@example.com".to_owned())]);
}

#[test]
fn allow_list_suppresses_exact_values_only() {
    let options = PiiOptions {
        allow: vec!["support@kiln.dev".into()],
        ..PiiOptions::default()
    };
    let d = PiiDetector::new(&options).unwrap();
    let got = found(&d, "write to support@kiln.dev or jane@kiln.dev");
    assert_eq!(got, vec![(PiiKind::Email, "jane@kiln.dev".to_owned())]);
    assert!(!d.contains_pii("write to support@kiln.dev"));
    assert!(d.contains_pii("write to jane@kiln.dev"));
}

#[test]
fn overlapping_matches_keep_the_longer_then_the_more_specific() {
    let d = detector();
    // Phone (with context) and SSN cover the same span: SSN is more specific.
    let got = found(&d, "call 123-45-6789");
    assert_eq!(got, vec![(PiiKind::UsSsn, "123-45-6789".to_owned())]);
    // A custom pattern inside an e-mail address loses to the longer address.
    let d = PiiDetector::new(&with_custom("handle", r"jane[0-9]+")).unwrap();
    let got = found(&d, "jane42@example.com");
    assert_eq!(got, vec![(PiiKind::Email, "jane42@example.com".to_owned())]);
    // Results are sorted and disjoint.
    let text = "a@b.io 4111111111111111 10.0.0.1 +44 20 7946 0958 a@b.io";
    let got = d.detect(text);
    assert_eq!(got.len(), 5, "{got:?}");
    for pair in got.windows(2) {
        assert!(pair[0].end <= pair[1].start, "{pair:?}");
    }
}

#[test]
fn offsets_are_char_boundaries_in_non_ascii_text() {
    let d = detector();
    let text = "こんにちは 😀 メール john@example.com と カード 4111 1111 1111 1111、\
                電話 +81-3-1234-5678 🎉 IP ２ 10.1.2.3 終わり";
    let got = d.detect(text);
    let values: Vec<&str> = got.iter().map(|m| &text[m.start..m.end]).collect();
    assert_eq!(
        values,
        [
            "john@example.com",
            "4111 1111 1111 1111",
            "+81-3-1234-5678",
            "10.1.2.3"
        ]
    );
    for m in &got {
        assert!(text.is_char_boundary(m.start) && text.is_char_boundary(m.end));
    }
    // Full-width digits are not ASCII digits and are never matched.
    assert!(d.detect("电话 ４１５５５５０１３２").is_empty());
}

#[test]
fn replace_numbers_placeholders_per_kind_and_reuses_them() {
    let d = detector();
    let mut vault = Vault::new();
    let text = "a@x.io wrote to b@x.io; cc a@x.io; card 4111 1111 1111 1111";
    let (redacted, matches) = d.redact(text, RedactMode::Replace, &mut vault);
    assert_eq!(matches.len(), 4);
    assert_eq!(
        redacted,
        "<EMAIL_1> wrote to <EMAIL_2>; cc <EMAIL_1>; card <CREDIT_CARD_1>"
    );
    assert_eq!(vault.len(), 3);
    assert_eq!(vault.restore(&redacted), text);
    // A later text in the same request reuses the numbering.
    assert_eq!(vault.placeholder(&PiiKind::Email, "b@x.io"), "<EMAIL_2>");
    assert_eq!(vault.placeholder(&PiiKind::Email, "c@x.io"), "<EMAIL_3>");
    // The model's reply mentioning placeholders is restored for the caller.
    assert_eq!(
        vault.restore("I emailed <EMAIL_2> and <EMAIL_3>, not <EMAIL_9>."),
        "I emailed b@x.io and c@x.io, not <EMAIL_9>."
    );
}

#[test]
fn block_replaces_like_replace() {
    let d = detector();
    let text = "ssn 123-45-6789";
    let (blocked, _) = d.redact(text, RedactMode::Block, &mut Vault::new());
    assert_eq!(blocked, "ssn <US_SSN_1>");
}

#[test]
fn mask_keeps_the_last_four_of_cards_ibans_and_phones() {
    let d = detector();
    let mut vault = Vault::new();
    let text = "card 4111 1111 1111 1234? no: 4111 1111 1111 1111, \
                iban DE89 3704 0044 0532 0130 00, tel +1 (415) 555-0132, mail a@b.io";
    let (masked, _) = d.redact(text, RedactMode::Mask, &mut vault);
    assert!(masked.contains("**** **** **** 1111,"), "{masked}");
    assert!(masked.contains("**** **** **** **** **30 00,"), "{masked}");
    assert!(masked.contains("+* (***) ***-0132"), "{masked}");
    assert!(masked.contains("mail ******"), "{masked}");
    assert_eq!(masked.chars().count(), text.chars().count());
    assert!(vault.is_empty());
}

#[test]
fn hash_is_deterministic_and_typed() {
    let d = detector();
    let (a, _) = d.redact("to a@b.io", RedactMode::Hash, &mut Vault::new());
    let (b, _) = d.redact("from a@b.io", RedactMode::Hash, &mut Vault::new());
    // The first 12 hex digits of SHA-256("a@b.io").
    assert_eq!(a, "to <EMAIL:0f3306f460ed>");
    assert_eq!(b, "from <EMAIL:0f3306f460ed>");
    let (c, _) = d.redact("to c@b.io", RedactMode::Hash, &mut Vault::new());
    assert_ne!(a, c);
}

#[test]
fn redact_tolerates_unsorted_and_overlapping_matches() {
    let text = "secret abcdef ghijkl end";
    let m = |start, end| PiiMatch {
        kind: PiiKind::Secret,
        start,
        end,
        rule: "test".into(),
    };
    let matches = [m(14, 20), m(7, 13), m(10, 17)];
    let out = redact(text, &matches, RedactMode::Replace, &mut Vault::new());
    for raw in ["abcdef", "ghijkl", "def", "ghi"] {
        assert!(!out.contains(raw), "{out}");
    }
    let masked = redact(text, &matches, RedactMode::Mask, &mut Vault::new());
    assert_eq!(masked, "secret ************* end");
}

fn mixed_prompt() -> (String, Vec<&'static str>) {
    let planted = vec![
        "maria.garcia@example.com",
        "+44 20 7946 0958",
        "4111 1111 1111 1111",
        "DE89 3704 0044 0532 0130 00",
        "536-22-1234",
        "203.0.113.42",
        "AKIAIOSFODNN7EXAMPLE",
        "sk-proj-UCsMehGAkWvj7FAc9QeWJKY40uvSwMFLZDe1f8rE",
        "(415) 555-0132",
    ];
    let text = format!(
        "Hi team, I'm writing about the Q3 migration of our billing service to the new \
         cluster. Version 2.4.1 shipped on 2024-07-15 and the rollout went mostly fine, but \
         customer Maria Garcia ({}) reported a double charge. She can be reached on {} \
         during UK office hours. Her card on file is {} and refunds go to IBAN {}. For the \
         tax form she sent her SSN {} which we must not store. The request came from \
         {} at 14:32:07 UTC, commit 3f786850e387550fdab836ed7e6dc881de23001b. Somebody \
         also pasted the deploy credentials into the ticket: {} and the model key {} — \
         please rotate both. Order 1234567890123456 was affected, price $1,299.99, \
         request id 550e8400-e29b-41d4-a716-446655440000. Escalations: call {}. Can you \
         summarise what went wrong in the payment pipeline, list the steps to reproduce the \
         double charge, and draft a short apology email? Thanks, and keep it under 200 words.",
        planted[0],
        planted[1],
        planted[2],
        planted[3],
        planted[4],
        planted[5],
        planted[6],
        planted[7],
        planted[8]
    );
    (text, planted)
}

#[test]
fn mixed_1kb_prompt_every_planted_value_is_found_and_redacted() {
    let d = detector();
    let (text, planted) = mixed_prompt();
    assert!((900..1400).contains(&text.len()), "{}", text.len());
    let matches = d.detect(&text);
    let values: Vec<&str> = matches.iter().map(|m| &text[m.start..m.end]).collect();
    assert_eq!(values, planted, "{matches:?}");
    let mut vault = Vault::new();
    let (redacted, _) = d.redact(&text, RedactMode::Replace, &mut vault);
    for value in &planted {
        assert!(!redacted.contains(value), "{value} survived: {redacted}");
    }
    assert!(!redacted.contains("1111 1111") && !redacted.contains("AKIA"));
    assert_eq!(vault.restore(&redacted), text);
    for mode in [RedactMode::Mask, RedactMode::Hash, RedactMode::Block] {
        let (out, _) = d.redact(&text, mode, &mut Vault::new());
        for value in &planted {
            assert!(!out.contains(value), "{mode:?}: {value} survived");
        }
    }
}
