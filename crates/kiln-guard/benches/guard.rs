//! What the guardrails cost a request.
//!
//! `cargo bench -p kiln-guard --bench guard` times, on a 1 KB prompt that carries an e-mail
//! address, a phone number, a card number and an IBAN: the PII detectors, the injection
//! heuristics, both (the gateway's per-request cost without a classifier; the bar is 200 µs),
//! and PII redaction with placeholders. Then the guard classifier on a 512-token text on one
//! thread (a rayon pool of one; the bar is 10 ms on one core), with the default scratch model's
//! shape (a model trained for a few steps: the weights do not change the cost).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_guard::classifier::GuardClassifier;
use kiln_guard::dataset::Example;
use kiln_guard::injection::InjectionScanner;
use kiln_guard::pii::PiiDetector;
use kiln_guard::redact::{RedactMode, Vault};
use kiln_guard::train::{TrainOptions, train};

/// About 1 KB of support-chat prose with personal data in it.
fn prompt_1kb() -> String {
    let mut text = String::from(
        "Hello team, I am writing about my account. Last Tuesday I tried to pay the invoice for \
         order 2024-118 but the payment page kept timing out. My e-mail is jane.doe@example.com \
         and you can reach me on +44 20 7946 0958 in the afternoon. The card I used was \
         4111 1111 1111 1111 (expiry next year). I would also like the refund to go to my \
         account DE89 3704 0044 0532 0130 00 rather than the card. ",
    );
    while text.len() < 1024 {
        text.push_str(
            "Could you also tell me how long refunds usually take, and whether the late fee \
             will be waived given the outage on your side? Thanks for your help. ",
        );
    }
    text.truncate(1024);
    text
}

fn bench_text(c: &mut Criterion) {
    let text = prompt_1kb();
    let detector = PiiDetector::default();
    let scanner = InjectionScanner::new();
    assert_eq!(
        detector.detect(&text).len(),
        4,
        "the prompt's values are all found"
    );
    let mut group = c.benchmark_group("guard_1kb");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("pii_detect", |b| b.iter(|| detector.detect(&text)));
    group.bench_function("injection_scan", |b| b.iter(|| scanner.scan(&text)));
    group.bench_function("pii_and_injection", |b| {
        b.iter(|| (detector.detect(&text), scanner.scan(&text)))
    });
    group.bench_function("pii_redact_replace", |b| {
        b.iter(|| detector.redact(&text, RedactMode::Replace, &mut Vault::new()))
    });
    group.finish();
}

fn bench_classifier(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let examples: Vec<Example> = (0..32)
        .map(|i| Example {
            text: format!("example number {i} about the weather"),
            label: if i % 2 == 0 { "benign" } else { "injection" }.into(),
        })
        .collect();
    let mut options = TrainOptions::new(examples, Vec::new(), dir.path().join("model"));
    options.epochs = 1;
    train(&options).unwrap();
    let classifier = GuardClassifier::load(&dir.path().join("model")).unwrap();
    // Exactly one full window: words added while the text still fits in 512 tokens.
    let mut text = String::new();
    let words = "ignore the weather report and tell me about the quarterly numbers of the shop";
    for word in words.split(' ').cycle() {
        let longer = format!("{text}{word} ");
        if classifier.windows(&longer).unwrap().len() > 1 {
            break;
        }
        text = longer;
    }
    let windows = classifier.windows(&text).unwrap();
    assert_eq!(windows.len(), 1);
    assert!(windows[0].len() > 500, "{} tokens", windows[0].len());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut group = c.benchmark_group("guard_classifier");
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("classify_512_tokens_1_thread", |b| {
        pool.install(|| b.iter(|| classifier.classify(&text).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, bench_text, bench_classifier);
criterion_main!(benches);
