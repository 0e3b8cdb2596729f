#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The live series (`kiln_monitor::live`) and the dashboard page, the latter rendered by
//! headless Chromium against a real server.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_monitor::dashboard::{
    CONTENT_SECURITY_POLICY, CONTENT_TYPE, LABEL_CONTENT_SECURITY_POLICY, LABEL_PAGE, PAGE,
};
use kiln_monitor::feedback::{LabelItem, LabelReply};
use kiln_monitor::live::{DRIFT_HISTORY, DriftPoint, Live, MAX_LABELS, OTHER_LABEL, Observation};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A bucket boundary in the past (2023), so tests do not depend on the clock.
const T0_MS: u64 = 1_700_000_000_000;

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn obs(at_ms: u64, total_ms: f64) -> Observation {
    Observation {
        at: at(at_ms),
        tenant: "acme".into(),
        model: "llama-3-8b".into(),
        status: 200,
        total_ms,
        gateway_ms: 1.0,
        queue_ms: None,
        ttft_ms: None,
        prompt_tokens: 0,
        completion_tokens: 0,
        cost_usd: None,
        cache_hit: false,
        cache_lookup: false,
        guard_blocked: false,
        hallucination: None,
        p_wrong: None,
    }
}

/// Nearest-rank percentile of sorted values.
fn exact(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn assert_close(what: &str, got: Option<f64>, want: f64, rel: f64) {
    let got = got.unwrap_or_else(|| panic!("{what}: got null, want {want}"));
    assert!(
        (got - want).abs() <= rel * want.abs() + 1e-9,
        "{what}: got {got}, want {want} within {rel}"
    );
}

#[test]
fn percentiles_from_the_histogram_are_within_its_resolution() {
    let live = Live::new(Duration::from_secs(10), 6);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // Log-uniform from 0.5 ms to 20 s, plus a heavy tail, all in one bucket.
    let mut values: Vec<f64> = (0..20_000)
        .map(|i| {
            if i % 50 == 0 {
                rng.random_range(20_000.0..90_000.0)
            } else {
                (rng.random_range(0.5f64.ln()..20_000f64.ln())).exp()
            }
        })
        .collect();
    for (i, v) in values.iter().enumerate() {
        let mut o = obs(T0_MS + (i as u64 % 9_000), *v);
        o.gateway_ms = v / 10.0;
        o.ttft_ms = Some(v / 2.0);
        live.observe(&o);
    }
    values.sort_by(f64::total_cmp);
    let snap = live.snapshot(at(T0_MS + 9_999));
    let b = snap.buckets.last().unwrap();
    assert_eq!(b.requests, 20_000);
    for (q, got) in [
        (0.50, b.latency_p50_ms),
        (0.95, b.latency_p95_ms),
        (0.99, b.latency_p99_ms),
    ] {
        assert_close(&format!("p{q}"), got, exact(&values, q), 0.10);
    }
    assert_close(
        "gateway p99",
        b.gateway_p99_ms,
        exact(&values, 0.99) / 10.0,
        0.10,
    );
    assert_close("ttft p50", b.ttft_p50_ms, exact(&values, 0.50) / 2.0, 0.10);
    assert_close("ttft p95", b.ttft_p95_ms, exact(&values, 0.95) / 2.0, 0.10);
    // The window totals merge the same histograms.
    assert_close(
        "total p99",
        snap.totals.latency_p99_ms,
        exact(&values, 0.99),
        0.10,
    );
}

#[test]
fn percentiles_stay_inside_the_values_seen() {
    let live = Live::new(Duration::from_secs(10), 3);
    // One value: every percentile is that value, not the edge of its bin.
    live.observe(&obs(T0_MS, 123.0));
    // Beyond the top of the histogram (120 s) and below its bottom (0.05 ms).
    live.observe(&obs(T0_MS + 10_000, 500_000.0));
    live.observe(&obs(T0_MS + 10_000, 0.01));
    // Garbage is counted as 0 rather than poisoning the histogram.
    live.observe(&obs(T0_MS + 20_000, f64::NAN));
    let snap = live.snapshot(at(T0_MS + 29_000));
    let b = &snap.buckets;
    assert_eq!(b[0].latency_p50_ms, Some(123.0));
    assert_eq!(b[0].latency_p99_ms, Some(123.0));
    assert_eq!(b[1].latency_p99_ms, Some(500_000.0));
    let p50 = b[1].latency_p50_ms.unwrap();
    assert!((0.01..=0.05).contains(&p50), "{p50}");
    assert_eq!(b[2].latency_p50_ms, Some(0.0));
}

#[test]
fn buckets_cover_the_window_with_gaps_as_zeros() {
    let live = Live::new(Duration::from_secs(10), 6);
    live.observe(&obs(T0_MS + 1_000, 10.0));
    live.observe(&obs(T0_MS + 9_999, 20.0));
    live.observe(&obs(T0_MS + 35_000, 30.0));
    let snap = live.snapshot(at(T0_MS + 55_000));
    assert_eq!(snap.bucket_s, 10.0);
    assert_eq!(snap.window_s, 60.0);
    let t: Vec<u64> = snap.buckets.iter().map(|b| b.t_ms).collect();
    let want: Vec<u64> = (0..6).map(|i| T0_MS + i * 10_000).collect();
    assert_eq!(t, want);
    let req: Vec<u64> = snap.buckets.iter().map(|b| b.requests).collect();
    assert_eq!(req, [2, 0, 0, 1, 0, 0]);
    let empty = &snap.buckets[1];
    assert_eq!(empty.latency_p50_ms, None);
    assert_eq!(empty.cache_hit_ratio, None);
    assert_eq!(empty.cost_usd, 0.0);
    assert_eq!(snap.totals.requests, 3);

    // The window slides: 30 s later the first bucket has left it.
    let later = live.snapshot(at(T0_MS + 85_000));
    assert_eq!(later.buckets.len(), 6);
    assert_eq!(later.buckets[0].t_ms, T0_MS + 30_000);
    assert_eq!(later.buckets[0].requests, 1);
    assert_eq!(later.totals.requests, 1);

    // A request older than the window of the newest one is dropped, not put in a live slot.
    live.observe(&obs(T0_MS + 95_000, 1.0));
    live.observe(&obs(T0_MS + 2_000, 1.0));
    let snap = live.snapshot(at(T0_MS + 95_000));
    assert_eq!(snap.totals.requests, 1);
    // Bucket 9 reuses the slot of bucket 3 without its counts.
    assert_eq!(snap.buckets.last().unwrap().requests, 1);
    assert_eq!(snap.buckets.last().unwrap().latency_p50_ms, Some(1.0));
}

#[test]
fn totals_counts_ratios_and_cost_per_1k_tokens() {
    let live = Live::new(Duration::from_secs(10), 360);
    live.set_infra_cost_per_hour(Some(36.0));
    let mut a = obs(T0_MS, 100.0);
    a.prompt_tokens = 300;
    a.completion_tokens = 200;
    a.cost_usd = Some(0.002);
    a.cache_lookup = true;
    a.hallucination = Some(true);
    a.p_wrong = Some(0.8);
    let mut b = obs(T0_MS + 5_000, 200.0);
    b.status = 503;
    b.prompt_tokens = 100;
    b.completion_tokens = 400;
    b.cost_usd = Some(0.003);
    b.cache_lookup = true;
    b.cache_hit = true;
    b.hallucination = Some(false);
    b.p_wrong = Some(0.2);
    b.model = "gpt-4o".into();
    let mut c = obs(T0_MS + 15_000, 300.0);
    c.status = 429;
    c.guard_blocked = true;
    c.prompt_tokens = 1_000; // no price: counts as tokens, not in the price per 1k
    c.tenant = "globex".into();
    for o in [&a, &b, &c] {
        live.observe(o);
    }
    // 100 s after the first request.
    let snap = live.snapshot(at(T0_MS + 100_000));
    let t = &snap.totals;
    assert_eq!(t.requests, 3);
    assert_eq!((t.errors_5xx, t.errors_4xx, t.guard_blocks), (1, 1, 1));
    assert_eq!(
        (t.prompt_tokens, t.completion_tokens, t.tokens),
        (1_400, 600, 2_000)
    );
    assert_close("cost", Some(t.cost_usd), 0.005, 1e-12);
    assert_close(
        "cost/1k",
        t.cost_per_1k_tokens,
        0.005 / 1_000.0 * 1000.0,
        1e-12,
    );
    // $36/h over 100 s = $1; over 2000 tokens = $0.5 per 1k.
    assert_close("infra", t.infra_cost_usd, 1.0, 1e-9);
    assert_close("infra/1k", t.infra_cost_per_1k_tokens, 0.5, 1e-9);
    assert_eq!(t.cache_lookups, 2);
    assert_eq!(t.cache_hit_ratio, Some(0.5));
    assert_eq!(t.assessed, 2);
    assert_eq!(t.hallucination_rate, Some(0.5));
    assert_close("p_wrong", t.p_wrong_mean, 0.5, 1e-12);

    // Per bucket: the first holds a and b.
    let first = snap.buckets.iter().find(|x| x.t_ms == T0_MS).unwrap();
    assert_eq!(first.requests, 2);
    assert_eq!(first.errors_5xx, 1);
    assert_close("bucket cost/1k", first.cost_per_1k_tokens, 0.005, 1e-12);
    // $36/h for 10 s = $0.1 over 1000 tokens.
    assert_close("bucket infra/1k", first.infra_cost_per_1k_tokens, 0.1, 1e-9);
    // The bucket still filling is charged for the time so far: 4 s of $36/h over 1000 tokens.
    let mut d = obs(T0_MS + 100_000, 1.0);
    d.prompt_tokens = 1_000;
    live.observe(&d);
    let newest = live.snapshot(at(T0_MS + 104_000));
    let newest = newest.buckets.last().unwrap();
    assert_eq!(newest.t_ms, T0_MS + 100_000);
    assert_close(
        "newest infra/1k",
        newest.infra_cost_per_1k_tokens,
        0.04,
        1e-9,
    );
    let second = snap
        .buckets
        .iter()
        .find(|x| x.t_ms == T0_MS + 10_000)
        .unwrap();
    assert_eq!(second.cost_per_1k_tokens, None);
    assert_eq!(second.cache_hit_ratio, None);
    assert_eq!(second.hallucination_rate, None);

    // Per model and tenant, most requests first.
    let models: Vec<(&str, u64)> = snap
        .models
        .iter()
        .map(|r| (r.name.as_str(), r.requests))
        .collect();
    assert_eq!(models, [("llama-3-8b", 2), ("gpt-4o", 1)]);
    let acme = &snap.tenants[0];
    assert_eq!(
        (acme.name.as_str(), acme.requests, acme.tokens),
        ("acme", 2, 1_000)
    );
    assert_close("acme cost", Some(acme.cost_usd), 0.005, 1e-12);

    // Without an infra price, or without tokens, there is no infra cost per 1k.
    live.set_infra_cost_per_hour(None);
    let t = live.snapshot(at(T0_MS + 100_000)).totals;
    assert_eq!((t.infra_cost_usd, t.infra_cost_per_1k_tokens), (None, None));
    let idle = Live::new(Duration::from_secs(10), 6);
    idle.set_infra_cost_per_hour(Some(10.0));
    idle.observe(&obs(T0_MS, 5.0));
    let t = idle.snapshot(at(T0_MS + 30_000)).totals;
    assert_eq!(t.infra_cost_per_1k_tokens, None);
    assert_eq!(t.cost_per_1k_tokens, None);
    assert_eq!(t.cache_hit_ratio, None);
}

#[test]
fn tenant_and_model_names_are_capped() {
    let live = Live::new(Duration::from_secs(10), 6);
    for i in 0..120 {
        let mut o = obs(T0_MS + i, 1.0);
        o.tenant = format!("tenant-{i:03}");
        o.model = format!("model-{}", i % 7);
        live.observe(&o);
    }
    let snap = live.snapshot(at(T0_MS + 1_000));
    assert_eq!(snap.tenants.len(), MAX_LABELS);
    assert_eq!(snap.models.len(), 7);
    let other = snap.tenants.iter().find(|r| r.name == OTHER_LABEL).unwrap();
    assert_eq!(other.requests, 120 - (MAX_LABELS as u64 - 1));
    assert_eq!(snap.tenants.iter().map(|r| r.requests).sum::<u64>(), 120);
    assert_eq!(snap.tenants[0].name, OTHER_LABEL, "most requests first");

    // Once the old names leave the window their slots are free for new ones.
    for i in 0..10 {
        let mut o = obs(T0_MS + 200_000 + i, 1.0);
        o.tenant = format!("new-{i}");
        live.observe(&o);
    }
    let snap = live.snapshot(at(T0_MS + 201_000));
    let names: HashSet<&str> = snap.tenants.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names.len(), 10);
    assert!(names.iter().all(|n| n.starts_with("new-")), "{names:?}");

    // Very long names are cut.
    let mut o = obs(T0_MS + 200_500, 1.0);
    o.model = "é".repeat(500);
    live.observe(&o);
    let snap = live.snapshot(at(T0_MS + 201_000));
    assert!(snap.models.iter().all(|r| r.name.len() <= 128));
}

fn drift_point(at_ms: u64, drift: bool) -> DriftPoint {
    let scores = BTreeMap::from([
        ("prompt_length".to_string(), if drift { 0.31 } else { 0.05 }),
        ("output_entropy".to_string(), 0.04),
    ]);
    let thresholds = BTreeMap::from([
        ("prompt_length".to_string(), 0.1),
        ("output_entropy".to_string(), 0.1),
    ]);
    DriftPoint {
        at_ms,
        drift,
        share: if drift { 0.5 } else { 0.0 },
        scores,
        thresholds,
        drifted: if drift {
            vec!["prompt_length".into()]
        } else {
            vec![]
        },
    }
}

/// Regression: one request stamped a day ahead moved the window forward, and every later
/// (correctly stamped) request was then dropped as too old.
#[test]
fn a_request_from_the_future_does_not_move_the_window() {
    let live = Live::new(Duration::from_secs(10), 6);
    let now = SystemTime::now();
    live.observe(&Observation {
        at: now + Duration::from_secs(86_400),
        ..obs(0, 1.0)
    });
    live.observe(&Observation {
        at: now,
        ..obs(0, 1.0)
    });
    let snap = live.snapshot(now);
    assert_eq!(snap.totals.requests, 1);
    assert_eq!(snap.buckets.last().unwrap().requests, 1);
}

#[test]
fn drift_history_is_bounded() {
    let live = Live::new(Duration::from_secs(10), 6);
    assert!(live.snapshot(at(T0_MS)).drift_latest.is_none());
    for i in 0..(DRIFT_HISTORY as u64 + 100) {
        live.set_drift(drift_point(T0_MS + i, i % 2 == 0));
    }
    let snap = live.snapshot(at(T0_MS));
    assert_eq!(snap.drift.len(), DRIFT_HISTORY);
    assert_eq!(snap.drift[0].at_ms, T0_MS + 100);
    let latest = snap.drift_latest.unwrap();
    assert_eq!(latest.at_ms, T0_MS + DRIFT_HISTORY as u64 + 99);
    assert!(!latest.drift);
}

#[test]
fn json_shape_for_the_page() {
    let live = Live::new(Duration::from_secs(10), 3);
    live.observe(&obs(T0_MS, 5.0));
    live.set_drift(drift_point(T0_MS, true));
    let v = serde_json::to_value(live.snapshot(at(T0_MS + 25_000))).unwrap();
    for key in [
        "generated_at_ms",
        "bucket_s",
        "window_s",
        "infra_cost_per_hour",
        "buckets",
        "totals",
        "models",
        "tenants",
        "drift",
        "drift_latest",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    let b = &v["buckets"][1];
    assert_eq!(b["requests"], 0);
    assert!(b["latency_p99_ms"].is_null());
    assert!(b["ttft_p50_ms"].is_null());
    assert!(v["buckets"][0]["latency_p99_ms"].is_number());
    assert!(v["totals"]["cost_per_1k_tokens"].is_null());
    assert!(v["totals"]["infra_cost_per_1k_tokens"].is_null());
    assert_eq!(v["drift_latest"]["drifted"][0], "prompt_length");
    assert_eq!(v["drift_latest"]["thresholds"]["prompt_length"], 0.1);
}

#[test]
fn observe_is_shared_across_threads() {
    let live = Arc::new(Live::new(Duration::from_secs(10), 6));
    let handles: Vec<_> = (0..4)
        .map(|k| {
            let live = live.clone();
            std::thread::spawn(move || {
                for i in 0..1_000 {
                    live.observe(&obs(T0_MS + (i * 7 + k) % 60_000, 3.0));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let snap = live.snapshot(at(T0_MS + 59_999));
    assert_eq!(snap.totals.requests, 4_000);
}

// ---- the page in a browser -----------------------------------------------------------------

#[test]
fn page_is_self_contained() {
    assert!(PAGE.contains("<title>kiln — monitoring</title>"));
    for external in ["http://", "https://", "//cdn", "@import", "<link"] {
        assert!(
            !PAGE.contains(external),
            "the page must load nothing ({external})"
        );
    }
    assert!(PAGE.contains("\"dashboard/data\""), "relative data URL");
    assert!(CONTENT_SECURITY_POLICY.contains("connect-src 'self'"));
}

#[test]
fn label_page_is_self_contained_and_inserts_data_as_text() {
    assert!(LABEL_PAGE.contains("<title>kiln — labelling</title>"));
    for external in ["http://", "https://", "//cdn", "@import", "<link"] {
        assert!(
            !LABEL_PAGE.contains(external),
            "the page must load nothing ({external})"
        );
    }
    // Prompts and replies are user data: never parsed as markup.
    for markup in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
    ] {
        assert!(!LABEL_PAGE.contains(markup), "the page uses {markup}");
    }
    assert!(LABEL_CONTENT_SECURITY_POLICY.contains("connect-src 'self'"));
}

/// SHA-256 (FIPS 180-4), for the CSP hashes; the crate has no hashing dependency.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes(word.try_into().unwrap());
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn sha256_and_base64_match_known_values() {
    assert_eq!(
        base64(&sha256(b"abc")),
        "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
    );
    assert_eq!(
        base64(&sha256(b"")),
        "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    );
    assert_eq!(base64(b"ab"), "YWI=");
}

/// Regression: the CSP allows the inline script and style by hash, so an edit to either
/// without updating [`CONTENT_SECURITY_POLICY`] would leave a blank page in browsers.
#[test]
fn csp_hashes_match_the_page() {
    assert_csp_matches(PAGE, CONTENT_SECURITY_POLICY, "CONTENT_SECURITY_POLICY");
}

/// The same for the labelling page and [`LABEL_CONTENT_SECURITY_POLICY`].
#[test]
fn label_csp_hashes_match_the_page() {
    assert_csp_matches(
        LABEL_PAGE,
        LABEL_CONTENT_SECURITY_POLICY,
        "LABEL_CONTENT_SECURITY_POLICY",
    );
}

fn assert_csp_matches(page: &str, csp: &str, name: &str) {
    for (tag, directive) in [("script", "script-src"), ("style", "style-src")] {
        let open = format!("<{tag}>");
        let start = page.find(&open).unwrap() + open.len();
        let end = start + page[start..].find(&format!("</{tag}>")).unwrap();
        assert_eq!(page.matches(&open).count(), 1, "one inline <{tag}>");
        let hash = format!("'sha256-{}'", base64(&sha256(&page.as_bytes()[start..end])));
        let want = format!("{directive} {hash}");
        assert!(
            csp.contains(&want),
            "the page's <{tag}> changed: {name} needs `{want}`"
        );
    }
    assert!(!csp.contains("unsafe-inline"));
}

const KEY: &str = "test-key-123";
const FED: usize = 640;

/// A few minutes of varied traffic ending now, and a few drift checks.
fn fed_live(now: SystemTime) -> Live {
    let live = Live::new(Duration::from_secs(10), 360);
    live.set_infra_cost_per_hour(Some(12.0));
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let span_ms = 6 * 60_000u64;
    let models = ["llama-3-8b", "mistral-7b", "qwen2-72b"];
    let tenants = ["acme", "globex", "initech", "umbrella"];
    for i in 0..FED {
        let back = span_ms - (i as u64 * span_ms / FED as u64);
        // a quiet minute in the middle, to show gaps
        let back = if (150_000..210_000).contains(&back) {
            back + 60_000
        } else {
            back
        };
        let wave = 1.0 + (i as f64 / 60.0).sin().abs();
        let total = (rng.random_range(3.0f64..7.0)).exp() * wave;
        let status = match rng.random_range(0..100) {
            0..4 => 502,
            4..9 => 429,
            _ => 200,
        };
        let prompt = rng.random_range(50..1500);
        let completion = if status == 200 {
            rng.random_range(20..600)
        } else {
            0
        };
        let lookup = rng.random_bool(0.8);
        live.observe(&Observation {
            at: now - Duration::from_millis(back),
            tenant: tenants[i % tenants.len()].into(),
            model: models[(i / 3) % models.len()].into(),
            status,
            total_ms: total,
            gateway_ms: total * 0.04,
            queue_ms: Some(total * 0.2),
            ttft_ms: rng.random_bool(0.7).then_some(total * 0.3),
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost_usd: Some((prompt as f64 * 0.5 + completion as f64 * 1.5) / 1e6),
            cache_hit: lookup && rng.random_bool(0.35),
            cache_lookup: lookup,
            guard_blocked: rng.random_bool(0.04),
            hallucination: rng.random_bool(0.6).then(|| rng.random_bool(0.12)),
            p_wrong: Some(rng.random_range(0.02..0.3)),
        });
    }
    let now_ms = now.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    for k in 0..12u64 {
        let t = now_ms - (11 - k) * 30_000;
        let drift = k >= 9;
        let mut p = drift_point(t, drift);
        let s = p.scores.get_mut("prompt_length").unwrap();
        *s = 0.03 + k as f64 * 0.025;
        p.scores
            .insert("word_js".into(), 0.05 + (k as f64 * 0.7).sin().abs() * 0.04);
        p.thresholds.insert("word_js".into(), 0.1);
        live.set_drift(p);
    }
    live
}

struct Server {
    /// `/dashboard`: the fed data, behind [`KEY`].
    url: String,
    /// `/empty/dashboard`: a `Live` that saw nothing.
    empty_url: String,
    /// `/flaky/dashboard`: the fed data once, then HTTP 500.
    flaky_url: String,
    _rt: tokio::runtime::Runtime,
}

fn serve(live: Live) -> Server {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;

    let page = || async {
        (
            [
                (header::CONTENT_TYPE, CONTENT_TYPE),
                (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            ],
            PAGE,
        )
    };
    let live = Arc::new(live);
    let flaky_live = live.clone();
    let empty = Arc::new(Live::new(Duration::from_secs(10), 360));
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/dashboard", get(page))
        .route(
            "/dashboard/data",
            get(move |headers: HeaderMap| {
                let live = live.clone();
                async move {
                    let auth = headers
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok());
                    if auth != Some(&format!("Bearer {KEY}")) {
                        return StatusCode::UNAUTHORIZED.into_response();
                    }
                    axum::Json(live.snapshot(SystemTime::now())).into_response()
                }
            }),
        )
        .route("/empty/dashboard", get(page))
        .route(
            "/empty/dashboard/data",
            get(move || {
                let empty = empty.clone();
                async move { axum::Json(empty.snapshot(SystemTime::now())) }
            }),
        )
        .route("/flaky/dashboard", get(page))
        .route(
            "/flaky/dashboard/data",
            get(move || {
                let live = flaky_live.clone();
                let calls = calls.clone();
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) > 0 {
                        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
                    }
                    axum::Json(live.snapshot(SystemTime::now())).into_response()
                }
            }),
        );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    Server {
        url: format!("http://{addr}/dashboard"),
        empty_url: format!("http://{addr}/empty/dashboard"),
        flaky_url: format!("http://{addr}/flaky/dashboard"),
        _rt: rt,
    }
}

fn chromium_path() -> Option<PathBuf> {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if path.exists() {
        return Some(path);
    }
    if std::env::var("KILN_SKIP_BROWSER_TESTS").as_deref() == Ok("1") {
        eprintln!(
            "skipped: no Chromium at {} (KILN_SKIP_BROWSER_TESTS=1)",
            path.display()
        );
        return None;
    }
    panic!(
        "no Chromium at {}: install it (`apt-get install chromium`), point CHROMIUM at it, \
         or set KILN_SKIP_BROWSER_TESTS=1 to skip the browser tests",
        path.display()
    );
}

/// Runs headless Chromium on `url` with `extra` flags; returns its stdout. Killed after 60 s.
fn run_chromium(chromium: &Path, extra: &[String], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let stderr_path = profile.path().join("stderr.txt");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,1000",
            "--virtual-time-budget=5000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {}: {e}", chromium.display()));
    // Read stdout on a thread so a large DOM cannot fill the pipe and stall Chromium.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium ran over 60 s on {url}; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader.join().unwrap().unwrap();
    assert!(
        status.success(),
        "chromium failed ({status}) on {url}; stderr:\n{}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
    out
}

fn screenshot_path() -> PathBuf {
    let tmp = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_TARGET_TMPDIR").map(PathBuf::from));
    match tmp {
        // target/tmp → target
        Some(tmp) => tmp.parent().map(Path::to_path_buf).unwrap_or(tmp),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
    }
    .join("dashboard-screenshot.png")
}

/// `target/label-screenshot.png`, beside the dashboard's.
fn label_screenshot_path() -> PathBuf {
    screenshot_path().with_file_name("label-screenshot.png")
}

/// The text content of the element with `id` in a dumped DOM.
fn element_text<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let open_end = start + dom[start..].find('>')? + 1;
    let close = open_end + dom[open_end..].find('<')?;
    Some(dom[open_end..close].trim())
}

/// Takes a screenshot of `url` into `shot` (replacing any older one) and decodes it.
fn screenshot(chromium: &Path, url: &str, shot: &Path, what: &str) -> (u32, u32, Vec<[u8; 3]>) {
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(shot);
    run_chromium(chromium, &[format!("--screenshot={}", shot.display())], url);
    println!("{what} screenshot: {}", shot.display());
    decode_png(shot)
}

fn decode_png(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let px = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, px)
}

fn hex(c: &str) -> [u8; 3] {
    let v = u32::from_str_radix(c.trim_start_matches('#'), 16).unwrap();
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

#[test]
fn dashboard_renders_in_headless_chromium() {
    let Some(chromium) = chromium_path() else {
        return;
    };
    let server = serve(fed_live(SystemTime::now()));
    let with_key = format!("{}?key={KEY}", server.url);

    // The DOM after the scripts ran: ready, and the totals in the tiles.
    let dom = run_chromium(&chromium, &["--dump-dom".to_string()], &with_key);
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page never rendered data (a stale CSP hash blocks its script: see \
         csp_hashes_match_the_page); DOM:\n{dom}"
    );
    let requests = element_text(&dom, "stat-requests").unwrap();
    assert_eq!(requests.replace(',', ""), FED.to_string(), "requests tile");
    for id in [
        "stat-tokens",
        "stat-cost",
        "stat-cost-per-1k",
        "stat-p99",
        "stat-cache",
        "stat-hallucination",
        "stat-guard",
    ] {
        let text = element_text(&dom, id).unwrap();
        assert!(
            text != "—" && !text.is_empty() && !text.contains("NaN"),
            "{id}: {text:?}"
        );
    }
    assert_eq!(element_text(&dom, "stat-drift"), Some("yes"));
    assert!(!dom.contains("NaN"), "NaN on the page");
    assert!(!dom.contains("class=\"show\""), "error banner shown");
    assert!(
        dom.contains("llama-3-8b") && dom.contains("umbrella"),
        "tables"
    );

    // Without the key the data request is refused: the banner says so.
    let dom = run_chromium(&chromium, &["--dump-dom".to_string()], &server.url);
    assert!(!dom.contains("data-ready=\"1\""));
    let banner = element_text(&dom, "banner").unwrap();
    assert!(banner.contains("HTTP 401"), "banner: {banner:?}");

    // Nothing observed yet: the page still renders, with zeros and dashes, and no NaN.
    let dom = run_chromium(&chromium, &["--dump-dom".to_string()], &server.empty_url);
    assert!(dom.contains("data-ready=\"1\""), "empty data: {dom}");
    assert_eq!(element_text(&dom, "stat-requests"), Some("0"));
    assert_eq!(element_text(&dom, "stat-p99"), Some("—"));
    assert_eq!(element_text(&dom, "stat-drift"), Some("—"));
    assert!(!dom.contains("NaN") && !dom.contains("undefined") && !dom.contains("Infinity"));

    // A failing poll after a good one: the banner shows the status, the last data stays.
    let dom = run_chromium(&chromium, &["--dump-dom".to_string()], &server.flaky_url);
    assert!(dom.contains("data-ready=\"1\""));
    let banner = element_text(&dom, "banner").unwrap();
    assert!(
        banner.contains("HTTP 500") && banner.contains("showing data from"),
        "banner: {banner:?}"
    );
    assert_eq!(
        element_text(&dom, "stat-requests").map(|t| t.replace(',', "")),
        Some(FED.to_string())
    );

    // The screenshot shows the charts.
    let (w, h, px) = screenshot(&chromium, &with_key, &screenshot_path(), "dashboard");
    assert_eq!((w, h), (1400, 1000));
    let distinct: HashSet<[u8; 3]> = px.iter().copied().collect();
    assert!(distinct.len() > 300, "{} distinct colours", distinct.len());
    let near = |want: [u8; 3]| {
        px.iter()
            .filter(|p| p.iter().zip(want).all(|(a, b)| a.abs_diff(b) <= 6))
            .count()
    };
    // Bars (traffic ok and 5xx, prompt tokens, guard blocks) and lines (p99, cache hit ratio).
    for (what, colour, min) in [
        ("traffic bars", "#2563eb", 400),
        ("5xx bars", "#dc2626", 50),
        ("prompt token bars", "#0d9488", 400),
        ("completion token bars", "#6366f1", 100),
        ("guard block bars", "#9333ea", 40),
        ("cache hit line", "#16a34a", 100),
        ("infra cost line", "#ea580c", 50),
    ] {
        let n = near(hex(colour));
        assert!(n >= min, "{what} ({colour}): {n} pixels, want ≥ {min}");
    }
}

// ---- the labelling page in a browser --------------------------------------------------------

/// A chat item whose prompt and replies try to inject markup, and a completion-prompt item.
fn label_items() -> Vec<LabelItem> {
    let reply = |request_id: &str, index: Option<u32>, text: &str| LabelReply {
        request_id: request_id.into(),
        completion_id: Some(format!("chatcmpl-{request_id}")),
        index,
        model: "llama-3-8b".into(),
        text: text.into(),
    };
    vec![
        LabelItem {
            tenant: "acme".into(),
            prompt: serde_json::json!([
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Is <img src=x onerror=\"document.title='pwned'\"> safe to show?"}
            ])
            .to_string(),
            a: reply(
                "kgw-1",
                Some(0),
                "No: <script>document.title='pwned'</script> must stay text.\nSecond line.",
            ),
            b: reply("kgw-1", Some(1), "Yes, <b>always</b>."),
        },
        LabelItem {
            tenant: "acme".into(),
            prompt: "Once upon a time".into(),
            a: reply("kgw-2", None, "there was a kiln."),
            b: reply("kgw-3", None, "a model was trained."),
        },
    ]
}

/// `/dashboard/label` (its queue behind [`KEY`]) and `/empty/dashboard/label` (an empty queue).
fn serve_label() -> Server {
    use axum::Router;
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;

    let page = || async {
        (
            [
                (header::CONTENT_TYPE, CONTENT_TYPE),
                (
                    header::CONTENT_SECURITY_POLICY,
                    LABEL_CONTENT_SECURITY_POLICY,
                ),
            ],
            LABEL_PAGE,
        )
    };
    let app = Router::new()
        .route("/dashboard/label", get(page))
        .route(
            "/dashboard/label/next",
            get(|headers: HeaderMap| async move {
                let auth = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok());
                if auth != Some(&format!("Bearer {KEY}")) {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                axum::Json(serde_json::json!({"object": "list", "data": label_items()}))
                    .into_response()
            }),
        )
        .route("/empty/dashboard/label", get(page))
        .route(
            "/empty/dashboard/label/next",
            get(|| async { axum::Json(serde_json::json!({"object": "list", "data": []})) }),
        );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    Server {
        url: format!("http://{addr}/dashboard/label"),
        empty_url: format!("http://{addr}/empty/dashboard/label"),
        flaky_url: String::new(),
        _rt: rt,
    }
}

#[test]
fn label_page_renders_in_headless_chromium() {
    let Some(chromium) = chromium_path() else {
        return;
    };
    let server = serve_label();
    let with_key = format!("{}?key={KEY}", server.url);

    // The first item: the prompt as role + text, both replies, the count; markup stays text.
    let dom = run_chromium(&chromium, &["--dump-dom".to_string()], &with_key);
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page never rendered its queue (a stale CSP hash blocks its script: see \
         label_csp_hashes_match_the_page); DOM:\n{dom}"
    );
    assert_eq!(element_text(&dom, "left"), Some("2 left"));
    assert_eq!(element_text(&dom, "meta-a"), Some("llama-3-8b · choice 0"));
    assert_eq!(element_text(&dom, "meta-b"), Some("llama-3-8b · choice 1"));
    assert_eq!(
        element_text(&dom, "text-b"),
        Some("Yes, &lt;b&gt;always&lt;/b&gt;.")
    );
    assert!(
        element_text(&dom, "text-a")
            .unwrap()
            .starts_with("No: &lt;script&gt;document.title='pwned'&lt;/script&gt;"),
        "{dom}"
    );
    assert!(dom.contains("<div class=\"role\">system</div>"), "{dom}");
    assert!(dom.contains("<div class=\"role\">user</div>"), "{dom}");
    assert!(dom.contains("You are terse."));
    assert!(dom.contains("Is &lt;img src=x onerror="), "{dom}");
    assert!(
        !dom.contains("<img") && !dom.contains("<b>always"),
        "markup ran"
    );
    assert!(
        dom.contains("<title>kiln — labelling</title>"),
        "a script ran"
    );
    assert!(!dom.contains("class=\"show\""), "error banner shown");
    for label in ["A is better", "B is better", "Skip", "Edit"] {
        assert!(dom.contains(label), "no {label:?} button");
    }

    // Without the key the queue is refused: the banner says so.
    let dom = run_chromium(&chromium, &["--dump-dom".to_string()], &server.url);
    assert!(!dom.contains("data-ready=\"1\""));
    let banner = element_text(&dom, "banner").unwrap();
    assert!(banner.contains("HTTP 401"), "banner: {banner:?}");

    // An empty queue says there is nothing to label.
    let dom = run_chromium(&chromium, &["--dump-dom".to_string()], &server.empty_url);
    assert!(dom.contains("data-ready=\"1\""), "{dom}");
    assert_eq!(element_text(&dom, "left"), Some("0 left"));
    assert!(dom.contains("id=\"empty\" class=\"card show\""), "{dom}");
    let main = &dom[dom.find("<main>").unwrap()..dom.find("</main>").unwrap()];
    assert!(
        !main.contains("undefined") && !main.contains("NaN"),
        "{main}"
    );

    // The screenshot shows the two replies and the buttons.
    let (w, h, px) = screenshot(
        &chromium,
        &with_key,
        &label_screenshot_path(),
        "labelling page",
    );
    assert_eq!((w, h), (1400, 1000));
    let blue = px
        .iter()
        .filter(|p| {
            p.iter()
                .zip(hex("#2563eb"))
                .all(|(a, b)| a.abs_diff(b) <= 6)
        })
        .count();
    assert!(blue >= 1000, "the pick buttons: {blue} blue pixels");
    let white = px.iter().filter(|p| **p == [255, 255, 255]).count();
    assert!(white >= 100_000, "the cards: {white} white pixels");
}
