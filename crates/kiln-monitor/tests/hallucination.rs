//! Confidence from replies and streams, grounding against retrieved context, and the
//! hallucination flag with its calibration.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_monitor::confidence::{self, Confidence, StreamConfidence};
use kiln_monitor::grounding::{self, Context, Grounding};
use kiln_monitor::hallucination::{
    Calibration, HallucinationConfig, assess, auroc, calibration_report,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

const EPS: f64 = 1e-9;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < EPS
}

/// −Σ p ln p over the given probabilities plus the tail as one outcome.
fn entropy(ps: &[f64]) -> f64 {
    let tail = (1.0 - ps.iter().sum::<f64>()).max(0.0);
    ps.iter()
        .chain([&tail])
        .filter(|p| **p > 0.0)
        .map(|p| -p * p.ln())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// AUROC
// ---------------------------------------------------------------------------------------------

#[test]
fn auroc_hand_computed() {
    let cases: &[(&[f64], &[bool], Option<f64>)] = &[
        // Perfect separation.
        (
            &[0.1, 0.4, 0.35, 0.8],
            &[false, true, false, true],
            Some(1.0),
        ),
        // The scikit-learn example: 3 of 4 pairs ordered.
        (
            &[0.1, 0.4, 0.35, 0.8],
            &[false, false, true, true],
            Some(0.75),
        ),
        // Reversed.
        (
            &[0.9, 0.8, 0.1, 0.2],
            &[false, false, true, true],
            Some(0.0),
        ),
        // Ties: pos {0.5, 0.9}, neg {0.5, 0.5} → (0.5 + 0.5 + 1 + 1) / 4.
        (
            &[0.5, 0.5, 0.5, 0.9],
            &[true, false, false, true],
            Some(0.75),
        ),
        // All tied.
        (&[0.3, 0.3, 0.3], &[true, false, true], Some(0.5)),
        // An empty class.
        (&[0.3, 0.4], &[true, true], None),
        (&[0.3, 0.4], &[false, false], None),
        (&[], &[], None),
        // NaN scores are skipped: leaves pos 0.7 vs neg 0.2.
        (&[0.7, f64::NAN, 0.2], &[true, false, false], Some(1.0)),
    ];
    for (scores, labels, want) in cases {
        let got = auroc(scores, labels);
        match (got, want) {
            (Some(g), Some(w)) => assert!(close(g, *w), "{scores:?} {labels:?}: {g} != {w}"),
            _ => assert_eq!(got, *want, "{scores:?} {labels:?}"),
        }
    }
}

#[test]
fn auroc_matches_pair_counting() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..50 {
        let n = rng.random_range(2..40);
        // Coarse scores so ties are common.
        let scores: Vec<f64> = (0..n)
            .map(|_| rng.random_range(0..6) as f64 / 5.0)
            .collect();
        let labels: Vec<bool> = (0..n).map(|_| rng.random_bool(0.4)).collect();
        let mut num = 0.0;
        let mut den = 0.0;
        for (si, li) in scores.iter().zip(&labels) {
            for (sj, lj) in scores.iter().zip(&labels) {
                if *li && !*lj {
                    den += 1.0;
                    num += if si > sj {
                        1.0
                    } else if si == sj {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        let want = (den > 0.0).then(|| num / den);
        match (auroc(&scores, &labels), want) {
            (Some(g), Some(w)) => assert!(close(g, w), "{g} != {w}"),
            (g, w) => assert_eq!(g, w),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Confidence
// ---------------------------------------------------------------------------------------------

#[test]
fn from_reply_reads_the_kiln_extension() {
    let body = json!({
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": null,
             "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": "yo"}, "logprobs": null,
             "finish_reason": "stop"}
        ],
        "kiln": {"choices": [
            {"index": 1, "mean_logprob": -1.5, "mean_entropy": null},
            {"index": 0, "mean_logprob": -0.42, "mean_entropy": 0.8}
        ]}
    });
    assert_eq!(
        confidence::from_reply(&body, 0),
        Some(Confidence {
            mean_logprob: -0.42,
            mean_entropy: Some(0.8),
            min_logprob: None,
            tokens: None
        })
    );
    assert_eq!(
        confidence::from_reply(&body, 1),
        Some(Confidence {
            mean_logprob: -1.5,
            mean_entropy: None,
            min_logprob: None,
            tokens: None
        })
    );
    assert_eq!(confidence::from_reply(&body, 2), None);
}

fn chat_logprobs_body() -> Value {
    json!({
        "object": "chat.completion",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Paris."},
            "logprobs": {"content": [
                {"token": "Paris", "logprob": 0.5f64.ln(), "bytes": [80, 97, 114, 105, 115],
                 "top_logprobs": [
                    {"token": "Paris", "logprob": 0.5f64.ln(), "bytes": [80]},
                    {"token": "Lyon", "logprob": 0.5f64.ln(), "bytes": [76]}
                 ]},
                {"token": ".", "logprob": 0.25f64.ln(), "bytes": [46],
                 "top_logprobs": [{"token": ".", "logprob": 0.25f64.ln(), "bytes": [46]}]},
                {"token": "", "logprob": 0.0, "bytes": [], "top_logprobs": []}
            ], "refusal": null},
            "finish_reason": "stop"
        }]
    })
}

#[test]
fn from_reply_reads_chat_logprobs() {
    let c = confidence::from_reply(&chat_logprobs_body(), 0).unwrap();
    let want_mean = (0.5f64.ln() + 0.25f64.ln() + 0.0) / 3.0;
    // The third token has no alternatives, so no entropy.
    let want_entropy = (2f64.ln() + entropy(&[0.25])) / 2.0;
    assert!(close(c.mean_logprob, want_mean), "{c:?}");
    assert!(close(c.mean_entropy.unwrap(), want_entropy), "{c:?}");
    assert!(close(c.min_logprob.unwrap(), 0.25f64.ln()));
    assert_eq!(c.tokens, Some(3));
}

#[test]
fn kiln_extension_wins_but_logprobs_give_min_and_count() {
    let mut body = chat_logprobs_body();
    body["kiln"] = json!({"choices": [{"index": 0, "mean_logprob": -0.3, "mean_entropy": 1.1}]});
    let c = confidence::from_reply(&body, 0).unwrap();
    assert_eq!(c.mean_logprob, -0.3);
    assert_eq!(c.mean_entropy, Some(1.1));
    assert!(close(c.min_logprob.unwrap(), 0.25f64.ln()));
    assert_eq!(c.tokens, Some(3));
}

#[test]
fn from_reply_reads_legacy_completion_logprobs() {
    let body = json!({
        "object": "text_completion",
        "choices": [{
            "index": 0,
            "text": "abc",
            "logprobs": {
                "tokens": ["a", "b", "c"],
                "token_logprobs": [-0.5, -1.5, null],
                "top_logprobs": [{"a": 0.9f64.ln(), "x": 0.1f64.ln()}, {"b": 0.5f64.ln()}, null],
                "text_offset": [0, 1, 2]
            },
            "finish_reason": "length"
        }]
    });
    let c = confidence::from_reply(&body, 0).unwrap();
    assert!(close(c.mean_logprob, -1.0), "{c:?}");
    assert!(close(c.min_logprob.unwrap(), -1.5));
    assert_eq!(c.tokens, Some(2));
    let want_entropy = (entropy(&[0.9, 0.1]) + entropy(&[0.5])) / 2.0;
    assert!(close(c.mean_entropy.unwrap(), want_entropy), "{c:?}");
}

#[test]
fn from_reply_without_signals_is_none() {
    for body in [
        json!({"choices": [{"index": 0, "message": {"content": "x"}, "logprobs": null}]}),
        json!({"choices": [{"index": 0, "text": "x"}]}),
        json!({"choices": []}),
        json!({"error": {"message": "nope"}}),
        json!("text"),
    ] {
        assert_eq!(confidence::from_reply(&body, 0), None, "{body}");
    }
}

fn chat_chunk(index: usize, content: Option<&str>, finish: Option<&str>, logprobs: Value) -> Value {
    let delta = content.map_or(json!({}), |c| json!({"content": c}));
    json!({
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                     "finish_reason": finish}],
        "usage": null
    })
}

#[test]
fn stream_takes_the_kiln_entry_on_the_last_chunk() {
    let mut last = chat_chunk(0, None, Some("length"), Value::Null);
    last["kiln"] = json!({"choices": [{"index": 0, "mean_logprob": -0.42, "mean_entropy": 0.8}]});
    let chunks = [
        json!({"object": "chat.completion.chunk", "choices": [{"index": 0,
            "delta": {"role": "assistant", "content": ""}, "logprobs": null,
            "finish_reason": null}], "usage": null}),
        chat_chunk(0, Some("Hel"), None, Value::Null),
        chat_chunk(0, Some("lo"), None, Value::Null),
        last,
        json!({"object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}),
    ];
    let mut stream = StreamConfidence::default();
    assert_eq!(stream.finish(), None);
    for chunk in &chunks {
        stream.push_chunk(chunk);
    }
    assert_eq!(
        stream.finish(),
        Some(Confidence {
            mean_logprob: -0.42,
            mean_entropy: Some(0.8),
            min_logprob: None,
            tokens: None
        })
    );
}

fn token(lp: f64, top: &[f64]) -> Value {
    let top: Vec<Value> = top
        .iter()
        .map(|p| json!({"token": "t", "logprob": p.ln(), "bytes": []}))
        .collect();
    json!({"content": [{"token": "t", "logprob": lp, "bytes": [], "top_logprobs": top}]})
}

#[test]
fn stream_accumulates_openai_logprobs_of_choice_zero() {
    let chunks = [
        chat_chunk(0, Some(""), None, Value::Null),
        chat_chunk(0, Some("A"), None, token(-0.2, &[0.8, 0.1])),
        // Another choice is ignored.
        chat_chunk(1, Some("Z"), None, token(-9.0, &[0.01])),
        chat_chunk(0, Some("B"), None, token(-1.0, &[0.4, 0.3, 0.2])),
        chat_chunk(0, Some("C"), None, token(f64::MIN, &[])),
        chat_chunk(0, None, Some("stop"), Value::Null),
    ];
    let mut stream = StreamConfidence::default();
    for chunk in &chunks {
        stream.push_chunk(chunk);
    }
    let c = stream.finish().unwrap();
    // f64::MIN is finite, so it counts: an extreme but valid log-prob.
    assert!(
        close(c.mean_logprob, (-0.2 - 1.0 + f64::MIN) / 3.0),
        "{c:?}"
    );
    assert_eq!(c.min_logprob, Some(f64::MIN));
    assert_eq!(c.tokens, Some(3));
    let want_entropy = (entropy(&[0.8, 0.1]) + entropy(&[0.4, 0.3, 0.2])) / 2.0;
    assert!(close(c.mean_entropy.unwrap(), want_entropy), "{c:?}");

    // The same stream with a kiln entry at the end: the extension gives the means.
    let mut last = chat_chunk(0, None, Some("stop"), Value::Null);
    last["kiln"] = json!({"choices": [{"index": 0, "mean_logprob": -0.6, "mean_entropy": 0.7}]});
    let mut stream = StreamConfidence::default();
    for chunk in chunks.iter().take(5).chain([&last]) {
        stream.push_chunk(chunk);
    }
    let c = stream.finish().unwrap();
    assert_eq!((c.mean_logprob, c.mean_entropy), (-0.6, Some(0.7)));
    assert_eq!((c.min_logprob, c.tokens), (Some(f64::MIN), Some(3)));
}

#[test]
fn stream_reads_legacy_completion_chunks() {
    let chunk = |tok: &str, lp: f64| {
        json!({"object": "text_completion", "choices": [{"index": 0, "text": tok,
            "logprobs": {"tokens": [tok], "token_logprobs": [lp], "top_logprobs": [{tok: lp}],
                         "text_offset": [0]},
            "finish_reason": null}]})
    };
    let mut stream = StreamConfidence::default();
    stream.push_chunk(&chunk("a", 0.5f64.ln()));
    stream.push_chunk(&chunk("b", 0.25f64.ln()));
    stream.push_chunk(&json!({"not": "a chunk"}));
    let c = stream.finish().unwrap();
    assert!(close(c.mean_logprob, (0.5f64.ln() + 0.25f64.ln()) / 2.0));
    let want_entropy = (entropy(&[0.5]) + entropy(&[0.25])) / 2.0;
    assert!(close(c.mean_entropy.unwrap(), want_entropy));
}

// ---------------------------------------------------------------------------------------------
// Context and grounding
// ---------------------------------------------------------------------------------------------

#[test]
fn context_of_table() {
    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        (
            "tool message",
            json!({"messages": [
                {"role": "user", "content": "When was it built?"},
                {"role": "assistant", "content": null, "tool_calls": []},
                {"role": "tool", "tool_call_id": "1", "content": "Built in 1889."}
            ]}),
            Some("Built in 1889."),
        ),
        (
            "legacy function message",
            json!({"messages": [{"role": "function", "name": "search", "content": "Doc text"}]}),
            Some("Doc text"),
        ),
        (
            "context tag",
            json!({"messages": [{"role": "system",
                "content": "Answer from this.\n<context>The sky is blue.</context>\nBe brief."}]}),
            Some("The sky is blue."),
        ),
        (
            "documents with nested document tags, any case",
            json!({"messages": [{"role": "user", "content":
                "<Documents><document id=\"1\">Alpha.</document>\n<DOCUMENT id=2>Beta.</Document></documents> Which?"}]}),
            Some("Alpha.\n\n\nBeta."),
        ),
        (
            "document tag with attributes",
            json!({"messages": [{"role": "user", "content":
                "<document source=\"wiki\" id=3>Gamma ray.</document>\nWhat is it?"}]}),
            Some("Gamma ray."),
        ),
        (
            "unclosed tag runs to the end",
            json!({"messages": [{"role": "user", "content": "<context>\nOpen ended"}]}),
            Some("Open ended"),
        ),
        (
            "Context: block up to Question:",
            json!({"messages": [{"role": "user", "content":
                "Use the text below.\nContext: Line one.\nLine two.\nQuestion: What?"}]}),
            Some("Line one.\nLine two."),
        ),
        (
            "Sources: block to the end",
            json!({"messages": [{"role": "user", "content": "Sources:\n[1] A fact.\n[2] B fact."}]}),
            Some("[1] A fact.\n[2] B fact."),
        ),
        (
            "content parts",
            json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "Retrieved:"},
                {"type": "image_url", "image_url": {"url": "http://x"}},
                {"type": "text", "text": "Part fact.\nQuery: why?"}
            ]}]}),
            Some("Part fact."),
        ),
        (
            "completions prompt string",
            json!({"prompt": "Documents: The river is long.\nQuestion: How long?\nAnswer:"}),
            Some("The river is long."),
        ),
        (
            "completions prompt array",
            json!({"prompt": ["No context here.", "<context>Second prompt ctx</context>"]}),
            Some("Second prompt ctx"),
        ),
        (
            "ordinary chat",
            json!({"messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the context of this quote: 'to be or not'? Give sources."},
                {"role": "assistant", "content": "It is from Hamlet."}
            ]}),
            None,
        ),
        (
            "label mid-line is not a block; a contextual tag is not a context tag",
            json!({"messages": [{"role": "user",
                "content": "My question: what context: none. <contextual>x</contextual> <doc>y</doc>"}]}),
            None,
        ),
        (
            "ordinary prompt",
            json!({"prompt": "Once upon a time"}),
            None,
        ),
        ("token-id prompt", json!({"prompt": [[1, 2, 3]]}), None),
        (
            "empty tool message and empty tags",
            json!({"messages": [{"role": "tool", "content": "  "},
                                {"role": "user", "content": "<context></context>"}]}),
            None,
        ),
        ("not a request", json!(42), None),
    ];
    for (name, request, want) in cases {
        assert_eq!(
            grounding::context_of(&request).as_deref(),
            want,
            "{name}: {request}"
        );
    }
}

const EIFFEL: &str = "The Eiffel Tower was completed in 1889 and is 330 metres tall. It was \
    designed by the engineering company of Gustave Eiffel. The tower received 5,889,000 \
    visitors in 2015, and the lift ride takes 3.0 minutes.";

#[test]
fn ground_table() {
    let g = |score: f64, sentences: usize, supported: usize, unsupported_numbers: usize| {
        Some(Grounding {
            score,
            sentences,
            supported,
            unsupported_numbers,
        })
    };
    let cases = [
        (
            "supported",
            "The Eiffel Tower was completed in 1889.",
            g(1.0, 1, 1, 0),
        ),
        (
            "supported with inflections and normalized numbers",
            "Gustave Eiffel's company designed it. Visitors: 5889000 in 2015! The ride takes 3 minutes.",
            g(1.0, 3, 3, 0),
        ),
        (
            // 4 content tokens supported, 4 not (painted, bright, purple, volunteers).
            "partly supported",
            "The Eiffel Tower was completed in 1889. It was painted bright purple by volunteers.",
            g(0.5, 2, 1, 0),
        ),
        (
            // 3 of 4 tokens found, above 60%, but the number is wrong.
            "wrong number",
            "The Eiffel Tower was completed in 1899.",
            g(0.0, 1, 0, 1),
        ),
        (
            // 5 of 7 tokens found, above 60%, but two names are invented.
            "invented name",
            "The Eiffel Tower was designed by Gustave Eiffel and Marcel Dupont.",
            g(0.0, 1, 0, 0),
        ),
        (
            "abstention",
            "I don't know. The context does not say who painted it.",
            g(1.0, 2, 2, 0),
        ),
        (
            "abstention with curly apostrophe",
            "Sorry, I don\u{2019}t know.",
            g(1.0, 1, 1, 0),
        ),
        (
            "a hedge does not excuse an invented number",
            "I'm not sure, but it was finished in 1920.",
            g(0.0, 1, 0, 1),
        ),
        ("no content words", "Yes, it is.", None),
        ("empty", "", None),
    ];
    let context = Context::new(EIFFEL);
    for (name, reply, want) in cases {
        let got = grounding::ground(reply, EIFFEL);
        assert_eq!(got, want, "{name}");
        assert_eq!(context.ground(reply), got, "{name}: Context reuse");
    }
}

#[test]
fn ground_mixed_reply_scores_by_tokens() {
    // Sentence 1: eiffel, tower, 330, metr, tall (5, supported). Sentence 2: built, 1920,
    // napoleon (3, unsupported: number and name missing).
    let got = grounding::ground(
        "The Eiffel Tower is 330 metres tall.\nIt was built in 1920 for Napoleon.",
        EIFFEL,
    )
    .unwrap();
    assert!(close(got.score, 5.0 / 8.0), "{got:?}");
    assert_eq!(
        (got.sentences, got.supported, got.unsupported_numbers),
        (2, 1, 1)
    );
}

#[test]
fn ground_against_empty_context_supports_nothing() {
    let got = grounding::ground("Paris is the capital of France.", "").unwrap();
    assert_eq!(got.score, 0.0);
    assert!(Context::new("  ").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Calibration and the flag
// ---------------------------------------------------------------------------------------------

fn conf(mean: f64, entropy: Option<f64>, min: Option<f64>) -> Confidence {
    Confidence {
        mean_logprob: mean,
        mean_entropy: entropy,
        min_logprob: min,
        tokens: Some(10),
    }
}

fn p_wrongs(cal: &Calibration, samples: &[(Confidence, bool)]) -> Vec<f64> {
    samples.iter().map(|(c, _)| cal.p_wrong(c)).collect()
}

fn labels(samples: &[(Confidence, bool)]) -> Vec<bool> {
    samples.iter().map(|(_, w)| *w).collect()
}

/// The best AUROC of one feature alone (each oriented so larger means less confident).
fn best_single_feature(samples: &[(Confidence, bool)]) -> f64 {
    let y = labels(samples);
    let cols: [Vec<f64>; 3] = [
        samples.iter().map(|(c, _)| -c.mean_logprob).collect(),
        samples
            .iter()
            .map(|(c, _)| c.mean_entropy.unwrap_or(0.0))
            .collect(),
        samples
            .iter()
            .map(|(c, _)| -c.min_logprob.unwrap_or(c.mean_logprob))
            .collect(),
    ];
    cols.iter()
        .map(|x| auroc(x, &y).unwrap())
        .fold(0.0, f64::max)
}

fn separable(rng: &mut ChaCha8Rng, n: usize) -> Vec<(Confidence, bool)> {
    (0..n)
        .map(|i| {
            let wrong = i % 3 == 0;
            let mean = if wrong {
                rng.random_range(-3.0..-1.5)
            } else {
                rng.random_range(-1.0..-0.05)
            };
            let entropy = -mean * rng.random_range(0.5..1.5);
            (
                conf(mean, Some(entropy), Some(mean - rng.random_range(0.0..2.0))),
                wrong,
            )
        })
        .collect()
}

/// Wrongness driven mostly by entropy and the minimum log-prob, barely by the mean.
fn noisy(rng: &mut ChaCha8Rng, n: usize) -> Vec<(Confidence, bool)> {
    (0..n)
        .map(|_| {
            let mean: f64 = rng.random_range(-2.0..0.0);
            let entropy: f64 = rng.random_range(0.0..3.0);
            let min = mean - rng.random_range(0.0..4.0);
            let z: f64 = 2.0 * (entropy - 1.5) + 0.8 * (-min - 3.0) + 0.2 * (-mean - 1.0);
            let wrong = rng.random_bool(1.0 / (1.0 + (-z).exp()));
            (conf(mean, Some(entropy), Some(min)), wrong)
        })
        .collect()
}

#[test]
fn fit_on_separable_data() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let samples = separable(&mut rng, 300);
    let cal = Calibration::fit(&samples).unwrap();
    assert!(cal.weights.iter().chain([&cal.bias]).all(|w| w.is_finite()));
    let a = auroc(&p_wrongs(&cal, &samples), &labels(&samples)).unwrap();
    assert!(a >= best_single_feature(&samples) - 0.01, "{a}");
    assert!(a > 0.99, "{a}");
    // Deterministic.
    assert_eq!(Calibration::fit(&samples), Some(cal));
}

#[test]
fn fit_on_noisy_data_beats_the_default() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let train = noisy(&mut rng, 2000);
    let test = noisy(&mut rng, 2000);
    let cal = Calibration::fit(&train).unwrap();
    let y = labels(&test);
    let fitted = auroc(&p_wrongs(&cal, &test), &y).unwrap();
    let default = auroc(&p_wrongs(&Calibration::default(), &test), &y).unwrap();
    assert!(fitted >= best_single_feature(&test) - 0.02, "{fitted}");
    assert!(fitted > default + 0.1, "fitted {fitted}, default {default}");
    // Calibrated in the large: the mean probability is close to the wrong rate.
    let rate = y.iter().filter(|w| **w).count() as f64 / y.len() as f64;
    let mean_p = p_wrongs(&cal, &train).iter().sum::<f64>() / train.len() as f64;
    let train_rate = labels(&train).iter().filter(|w| **w).count() as f64 / train.len() as f64;
    assert!(
        (mean_p - train_rate).abs() < 0.01,
        "{mean_p} vs {train_rate}"
    );
    assert!((rate - train_rate).abs() < 0.05);
}

#[test]
fn fit_needs_two_of_each_class() {
    let s = |m: f64, w: bool| (conf(m, None, None), w);
    assert_eq!(Calibration::fit(&[]), None);
    assert_eq!(
        Calibration::fit(&[s(-1.0, true), s(-2.0, false), s(-3.0, false)]),
        None
    );
    // Two of each, constant entropy and no minimum: still fits.
    let cal =
        Calibration::fit(&[s(-2.0, true), s(-2.5, true), s(-0.2, false), s(-0.4, false)]).unwrap();
    assert!(cal.p_wrong(&conf(-2.2, None, None)) > cal.p_wrong(&conf(-0.3, None, None)));
}

#[test]
fn p_wrong_tolerates_non_finite_input() {
    let cal = Calibration::default();
    let p = cal.p_wrong(&conf(f64::NAN, Some(f64::INFINITY), None));
    assert!((0.0..=1.0).contains(&p));
}

#[test]
fn calibration_save_load_round_trip() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let cal = Calibration::fit(&noisy(&mut rng, 200)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calibration.json");
    cal.save(&path).unwrap();
    assert_eq!(Calibration::load(&path).unwrap(), cal);

    std::fs::write(&path, "{\"mean\": [0, 0]}").unwrap();
    assert!(Calibration::load(&path).is_err());
    let err = Calibration::load(dir.path().join("missing.json")).unwrap_err();
    assert!(format!("{err:#}").contains("missing.json"), "{err:#}");
}

#[test]
fn assess_combinations() {
    let cal = Calibration::default();
    let cfg = HallucinationConfig::default();
    let confident = conf(-0.1, Some(0.2), Some(-0.5));
    let unsure = conf(-2.5, Some(2.0), Some(-6.0));
    let grounded = Grounding {
        score: 0.9,
        sentences: 2,
        supported: 2,
        unsupported_numbers: 0,
    };
    let ungrounded = Grounding {
        score: 0.2,
        sentences: 2,
        supported: 0,
        unsupported_numbers: 1,
    };
    assert!(assess(None, None, &cal, &cfg).is_none());

    let a = assess(Some(&confident), None, &cal, &cfg).unwrap();
    assert!(!a.flagged && a.reasons.is_empty() && a.grounding.is_none());
    assert!(a.p_wrong.unwrap() < 0.5);

    let a = assess(Some(&unsure), None, &cal, &cfg).unwrap();
    assert!(a.flagged);
    assert_eq!(a.reasons, ["low_confidence"]);

    let a = assess(None, Some(&ungrounded), &cal, &cfg).unwrap();
    assert_eq!((a.flagged, a.reasons.clone()), (true, vec!["ungrounded"]));
    assert_eq!((a.p_wrong, a.grounding), (None, Some(0.2)));

    let a = assess(Some(&confident), Some(&grounded), &cal, &cfg).unwrap();
    assert!(!a.flagged);

    let a = assess(Some(&unsure), Some(&ungrounded), &cal, &cfg).unwrap();
    assert_eq!(a.reasons, ["low_confidence", "ungrounded"]);

    // Thresholds come from the config.
    let strict = HallucinationConfig {
        max_p_wrong: 0.01,
        min_grounding: 0.95,
    };
    let a = assess(Some(&confident), Some(&grounded), &cal, &strict).unwrap();
    assert_eq!(a.reasons, ["low_confidence", "ungrounded"]);
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(json["reasons"], json!(["low_confidence", "ungrounded"]));
}

#[test]
fn config_defaults_and_partial_json() {
    let cfg: HallucinationConfig = serde_json::from_str("{\"max_p_wrong\": 0.3}").unwrap();
    assert_eq!((cfg.max_p_wrong, cfg.min_grounding), (0.3, 0.5));
}

#[test]
fn calibration_report_hand_computed() {
    // Default calibration: p = sigmoid(2.5 · (−m − 1)).
    let samples = [
        (conf(-0.2, None, None), false), // p ≈ 0.119
        (conf(-1.5, None, None), false), // p ≈ 0.777
        (conf(-0.5, None, None), true),  // p ≈ 0.223
        (conf(-2.5, None, None), true),  // p ≈ 0.977
    ];
    let p = |m: f64| 1.0 / (1.0 + (-2.5 * (-m - 1.0f64)).exp());
    let report = calibration_report(
        &samples,
        &Calibration::default(),
        &HallucinationConfig::default(),
    );
    assert_eq!((report.n, report.wrong), (4, 2));
    assert!(close(report.auroc.unwrap(), 0.75));
    assert!(close(report.auroc_mean_logprob.unwrap(), 0.75));
    assert_eq!(report.auroc_mean_entropy, None);
    // Flagged: 0.777 (right) and 0.977 (wrong).
    assert!(close(report.precision, 0.5) && close(report.recall, 0.5));
    // J = 0.5 above 0.777 and again above 0.119; the lower threshold is kept.
    assert!(close(
        report.best_threshold.unwrap(),
        (p(-0.5) + p(-0.2)) / 2.0
    ));

    let empty = calibration_report(
        &[],
        &Calibration::default(),
        &HallucinationConfig::default(),
    );
    assert_eq!((empty.n, empty.auroc, empty.precision), (0, None, 0.0));
    assert_eq!(empty.best_threshold, None);
}

#[test]
fn calibration_report_on_fitted_noisy_data() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let samples = noisy(&mut rng, 1000);
    let cal = Calibration::fit(&samples).unwrap();
    let report = calibration_report(&samples, &cal, &HallucinationConfig::default());
    let auroc_fit = report.auroc.unwrap();
    assert!(auroc_fit >= report.auroc_mean_logprob.unwrap());
    assert!(auroc_fit >= report.auroc_mean_entropy.unwrap() - 0.01);
    let t = report.best_threshold.unwrap();
    assert!((0.0..1.0).contains(&t));
    assert!(report.precision > 0.5 && report.recall > 0.5, "{report:?}");
}
