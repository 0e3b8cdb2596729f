#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Drift statistics against scipy/numpy, and `detect` on synthetic traffic: the false-alarm
//! rate on two windows of the same distribution, and the detection rate on shifted windows,
//! at window sizes 200 (KS regime) and 2,000 (Wasserstein regime).
//!
//! `tests/data/stats_scipy.json` was produced with scipy 1.x / numpy 2.x (versions inside the
//! file): `scipy.stats.ks_2samp`, `scipy.stats.wasserstein_distance / np.std(ref)`,
//! Evidently's `get_binned_data` re-run with numpy (Sturges edges, zero shares → 0.0001),
//! `scipy.spatial.distance.jensenshannon`, `scipy.stats.chisquare(cur, ref·k)`,
//! `scipy.special.gammaincc`, `scipy.special.kolmogorov` and Mann–Whitney U / (n1·n2).

use kiln_monitor::drift::{DriftConfig, DriftError, DriftReport, detect};
use kiln_monitor::features::{LengthUnit, Sample, SampleFeatures};
use kiln_monitor::stats;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/stats_scipy.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    let tol = rel * want.abs().max(1e-300);
    assert!(
        (got - want).abs() <= tol || (got - want).abs() < 1e-14,
        "{what}: got {got:e}, want {want:e} (rel {:e})",
        ((got - want) / want).abs()
    );
}

#[test]
fn two_sample_statistics_match_scipy() {
    let fx = fixture();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let r = floats(&case["reference"]);
        let c = floats(&case["current"]);
        let ks = stats::ks_2samp(&r, &c);
        close(
            ks.statistic,
            case["ks_statistic"].as_f64().unwrap(),
            1e-12,
            &format!("{name} ks D"),
        );
        assert!(ks.exact, "{name}: small samples use the exact p-value");
        close(
            ks.p_value,
            case["ks_p_value"].as_f64().unwrap(),
            1e-6,
            &format!("{name} ks p"),
        );
        close(
            stats::wasserstein_normed(&r, &c),
            case["wasserstein_normed"].as_f64().unwrap(),
            1e-9,
            &format!("{name} wasserstein"),
        );
        let edges = stats::sturges_edges(&r, &c);
        let want_edges = floats(&case["sturges_edges"]);
        assert_eq!(edges.len(), want_edges.len(), "{name} sturges bins");
        for (g, w) in edges.iter().zip(&want_edges) {
            close(*g, *w, 1e-12, &format!("{name} edge"));
        }
        let (rs, cs) = stats::binned_shares(&r, &c, stats::DEFAULT_N_BINS);
        let (wr, wc) = (floats(&case["ref_shares"]), floats(&case["cur_shares"]));
        assert_eq!(rs.len(), wr.len(), "{name} bins");
        for (g, w) in rs.iter().zip(&wr).chain(cs.iter().zip(&wc)) {
            close(*g, *w, 1e-12, &format!("{name} share"));
        }
        close(
            stats::psi(&rs, &cs),
            case["psi"].as_f64().unwrap(),
            1e-9,
            &format!("{name} psi"),
        );
        close(
            stats::jensen_shannon(&rs, &cs),
            case["js"].as_f64().unwrap(),
            1e-9,
            &format!("{name} js"),
        );
    }
}

#[test]
fn chi_squared_matches_scipy_chisquare() {
    let fx = fixture();
    for case in fx["chisquare"].as_array().unwrap() {
        let (r, c) = (floats(&case["reference"]), floats(&case["current"]));
        let (stat, p) = stats::chi_squared(&r, &c);
        match case["statistic"].as_f64() {
            Some(want) => {
                close(stat, want, 1e-12, "chi2 statistic");
                close(p, case["p_value"].as_f64().unwrap(), 1e-9, "chi2 p");
            }
            // A category the reference never saw: infinite statistic, p = 0.
            None => assert_eq!((stat, p), (f64::INFINITY, 0.0)),
        }
    }
}

#[test]
fn incomplete_gamma_and_kolmogorov_match_scipy_special() {
    let fx = fixture();
    for case in fx["gammaincc"].as_array().unwrap() {
        let (a, x) = (case["a"].as_f64().unwrap(), case["x"].as_f64().unwrap());
        close(
            stats::gamma_q(a, x),
            case["q"].as_f64().unwrap(),
            1e-10,
            &format!("Q({a}, {x})"),
        );
    }
    for case in fx["kolmogorov"].as_array().unwrap() {
        let x = case["x"].as_f64().unwrap();
        close(
            stats::kolmogorov_sf(x),
            case["sf"].as_f64().unwrap(),
            1e-10,
            &format!("K({x})"),
        );
    }
}

#[test]
fn auroc_matches_mann_whitney() {
    let fx = fixture();
    for case in fx["auroc"].as_array().unwrap() {
        let s = floats(&case["scores"]);
        let l: Vec<bool> = case["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_bool().unwrap())
            .collect();
        close(
            stats::auroc(&s, &l).unwrap(),
            case["auc"].as_f64().unwrap(),
            1e-12,
            "auroc",
        );
    }
    // The analytic null quantile: n1 = n2 = 100 → 0.5 + 1.645·sqrt(201 / 120000).
    let want = 0.5 + 1.645 * (201.0f64 / 120_000.0).sqrt();
    close(stats::auc_null_q95(100, 100), want, 1e-15, "auc q95");
}

#[test]
fn ks_exact_equal_sizes_matches_closed_form() {
    // n = m = 5, D = 3/5: P(D ≥ 3/5) by the reflection formula
    // 2·(C(10, 2) − C(10, −1)) / C(10, 5) = 2·45/252.
    let a = [0.0, 1.0, 2.0, 3.0, 4.0];
    let b = [3.5, 4.5, 5.0, 6.0, 7.0];
    let r = stats::ks_2samp(&a, &b);
    close(r.statistic, 0.8, 1e-15, "D");
    // D = 4/5: 2·C(10, 1)/C(10, 5) = 20/252.
    close(r.p_value, 20.0 / 252.0, 1e-12, "p");
}

/// Exact p-values at window-sized samples, including a tiny one (no cancellation), against
/// `scipy.stats.ks_2samp(a, b)` on low-discrepancy sequences both sides can regenerate.
#[test]
fn ks_exact_matches_scipy_at_window_sizes() {
    let seq = |n: usize, c: f64, s: f64, o: f64| -> Vec<f64> {
        (0..n).map(|i| ((i as f64 * c) % 1.0) * s + o).collect()
    };
    let golden = 0.618_033_988_749_894_9;
    let plastic = 0.754_877_666_246_692_7;
    for (n1, n2, s, o, d, p) in [
        (
            1500,
            1200,
            1.05,
            0.01,
            0.056_833_333_333_333_33,
            0.025_954_501_948_009_28,
        ),
        (800, 800, 1.0, 0.03, 0.031_25, 0.829_880_686_982_489_1),
        (
            1000,
            999,
            1.0,
            0.0,
            0.004_387_387_387_387_387,
            0.999_999_999_999_999_8,
        ),
        (
            1500,
            1200,
            1.2,
            0.05,
            0.207_666_666_666_666_67,
            1.246_066_161_808_241_2e-25,
        ),
        (
            600,
            900,
            1.0,
            0.1,
            0.103_333_333_333_333_33,
            0.000_865_633_552_666_702_8,
        ),
    ] {
        let r = stats::ks_2samp(&seq(n1, golden, 1.0, 0.0), &seq(n2, plastic, s, o));
        assert!(r.exact);
        close(r.statistic, d, 1e-12, &format!("{n1}x{n2} D"));
        close(r.p_value, p, 1e-6, &format!("{n1}x{n2} p"));
    }
}

#[test]
fn ks_large_samples_use_the_asymptotic_distribution() {
    let a: Vec<f64> = (0..12_000).map(|i| i as f64).collect();
    let b: Vec<f64> = (0..12_000).map(|i| i as f64 + 300.0).collect();
    let r = stats::ks_2samp(&a, &b);
    assert!(!r.exact);
    close(r.statistic, 0.025, 1e-12, "D");
    close(
        r.p_value,
        stats::kolmogorov_sf((6000.0f64).sqrt() * 0.025),
        1e-12,
        "p",
    );
}

// ---- synthetic traffic ---------------------------------------------------------------------

const COMMON: &[&str] = &[
    "please", "can", "you", "the", "a", "of", "to", "and", "for", "me", "with", "how", "what",
    "is", "in", "my", "write", "explain", "help", "about",
];
const COOKING: &[&str] = &[
    "recipe", "pasta", "sauce", "oven", "bake", "garlic", "onion", "butter", "flour", "sugar",
    "salt", "pepper", "chicken", "soup", "bread", "dough", "simmer", "roast", "salad", "cheese",
    "tomato", "basil", "grill", "fry", "boil", "knife", "pan", "spice", "lemon", "rice",
];
const FINANCE: &[&str] = &[
    "stock",
    "bond",
    "interest",
    "rate",
    "loan",
    "mortgage",
    "budget",
    "tax",
    "invest",
    "fund",
    "dividend",
    "portfolio",
    "inflation",
    "bank",
    "credit",
    "debt",
    "equity",
    "market",
    "price",
    "savings",
    "retire",
    "account",
    "hedge",
    "yield",
    "asset",
    "income",
    "expense",
    "profit",
    "risk",
    "index",
];

#[derive(Clone, Copy)]
struct Traffic {
    topic: &'static [&'static str],
    extra_words: usize,
    output_scale: f64,
}

const BASE: Traffic = Traffic {
    topic: COOKING,
    extra_words: 0,
    output_scale: 1.0,
};

fn pick<'a>(rng: &mut ChaCha8Rng, words: &[&'a str]) -> &'a str {
    // Skewed (Zipf-like) choice: low indices are more frequent.
    let u: f64 = rng.random();
    words[((u * u) * words.len() as f64) as usize % words.len()]
}

fn sample(rng: &mut ChaCha8Rng, t: Traffic) -> SampleFeatures {
    let n = rng.random_range(5..25) + t.extra_words;
    let mut prompt = String::new();
    for i in 0..n {
        if i > 0 {
            prompt.push(' ');
        }
        let w = if rng.random::<f64>() < 0.4 {
            pick(rng, COMMON)
        } else {
            pick(rng, t.topic)
        };
        prompt.push_str(w);
    }
    let out = ((rng.random_range(20..120) as f64) * t.output_scale) as usize;
    let completion = "word ".repeat(out);
    let entropy = (0..4).map(|_| rng.random::<f64>()).sum::<f64>() / 2.0;
    SampleFeatures::from_text(&prompt, Some(&completion), Some(entropy))
}

fn window(seed: u64, n: usize, t: Traffic) -> Vec<SampleFeatures> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| sample(&mut rng, t)).collect()
}

const FEATURES: [&str; 5] = [
    "prompt_length",
    "prompt_words",
    "prompt_embedding",
    "output_length",
    "output_entropy",
];

struct Rates {
    dataset: f64,
    per_feature: Vec<(&'static str, f64)>,
    tests: Vec<String>,
}

fn rates(n: usize, seeds: u64, current: Traffic) -> Rates {
    let cfg = DriftConfig::default();
    let mut dataset = 0usize;
    let mut per = [0usize; 5];
    let mut tests = Vec::new();
    for seed in 0..seeds {
        let r = window(2 * seed + 1_000, n, BASE);
        let c = window(2 * seed + 1_001, n, current);
        let rep: DriftReport = detect(&r, &c, &cfg).unwrap();
        assert_eq!(rep.evaluated, 5);
        dataset += usize::from(rep.drift);
        for f in &rep.features {
            let i = FEATURES.iter().position(|x| *x == f.feature).unwrap();
            per[i] += usize::from(f.drift);
            if seed == 0 {
                tests.push(format!("{}={}", f.feature, f.test));
            }
        }
    }
    let s = seeds as f64;
    Rates {
        dataset: dataset as f64 / s,
        per_feature: FEATURES
            .iter()
            .zip(per)
            .map(|(f, k)| (*f, k as f64 / s))
            .collect(),
        tests,
    }
}

const SEEDS: u64 = 50;

fn check_null(n: usize) {
    let r = rates(n, SEEDS, BASE);
    println!(
        "n={n} same distribution: dataset false alarms {:.3}; per feature {:?}; tests {:?}",
        r.dataset, r.per_feature, r.tests
    );
    assert!(
        r.dataset <= 0.05,
        "dataset false-alarm rate {} > 5%",
        r.dataset
    );
    for (f, rate) in &r.per_feature {
        assert!(*rate <= 0.16, "{f}: false-alarm rate {rate} (nominal 5%)");
    }
}

fn check_shift(n: usize, current: Traffic, affected: &[&str], dataset: bool) {
    let r = rates(n, SEEDS, current);
    println!(
        "n={n} shifted: dataset detection {:.3}; per feature {:?}; tests {:?}",
        r.dataset, r.per_feature, r.tests
    );
    for (f, rate) in &r.per_feature {
        if affected.contains(f) {
            assert!(*rate >= 0.95, "{f}: detection rate {rate} < 95%");
        }
    }
    if dataset {
        assert!(
            r.dataset >= 0.95,
            "dataset detection rate {} < 95%",
            r.dataset
        );
    }
}

const SHIFTED: Traffic = Traffic {
    topic: FINANCE,
    extra_words: 6,
    output_scale: 1.5,
};

const ALL_SHIFTED: &[&str] = &[
    "prompt_length",
    "prompt_words",
    "prompt_embedding",
    "output_length",
];

#[test]
fn same_distribution_false_alarms_small_windows() {
    check_null(200);
}

#[test]
fn same_distribution_false_alarms_large_windows() {
    check_null(2_000);
}

#[test]
fn shifted_traffic_is_flagged_small_windows() {
    check_shift(200, SHIFTED, ALL_SHIFTED, true);
}

#[test]
fn shifted_traffic_is_flagged_large_windows() {
    check_shift(2_000, SHIFTED, ALL_SHIFTED, true);
}

#[test]
fn topic_only_shift_flags_words_and_embedding() {
    let topic_only = Traffic {
        topic: FINANCE,
        ..BASE
    };
    check_shift(
        200,
        topic_only,
        &["prompt_words", "prompt_embedding"],
        false,
    );
}

#[test]
fn length_only_shift_flags_prompt_length_not_the_topic() {
    let longer = Traffic {
        extra_words: 6,
        ..BASE
    };
    check_shift(200, longer, &["prompt_length"], false);
}

// ---- edge cases ----------------------------------------------------------------------------

#[test]
fn mixed_length_units_are_refused() {
    let words = window(1, 50, BASE);
    let tokens: Vec<SampleFeatures> = (0..50)
        .map(|i| {
            SampleFeatures::from_sample(&Sample {
                prompt_tokens: Some(10 + i),
                ..Sample::default()
            })
            .unwrap()
        })
        .collect();
    assert_eq!(tokens[0].prompt_length_unit, LengthUnit::Tokens);
    let err = detect(&words, &tokens, &DriftConfig::default()).unwrap_err();
    assert!(matches!(
        err,
        DriftError::LengthUnitsDiffer {
            feature: "prompt_length",
            ..
        }
    ));
    assert!(err.to_string().contains("words") && err.to_string().contains("tokens"));
}

#[test]
fn small_windows_are_insufficient_not_drift() {
    let r = window(3, 10, BASE);
    let c = window(4, 10, SHIFTED);
    let rep = detect(&r, &c, &DriftConfig::default()).unwrap();
    assert_eq!(rep.evaluated, 0);
    assert!(!rep.drift);
    assert!(
        rep.features
            .iter()
            .all(|f| !f.drift && f.note.as_deref().unwrap_or("").contains("insufficient"))
    );
}

#[test]
fn output_features_are_skipped_when_a_window_lacks_them() {
    let r: Vec<SampleFeatures> = window(5, 100, BASE)
        .into_iter()
        .map(|mut s| {
            s.output_length = None;
            s.output_entropy = None;
            s
        })
        .collect();
    let c = window(6, 100, BASE);
    let rep = detect(&r, &c, &DriftConfig::default()).unwrap();
    let names: Vec<&str> = rep.features.iter().map(|f| f.feature.as_str()).collect();
    assert_eq!(names, ["prompt_length", "prompt_words", "prompt_embedding"]);
    assert_eq!(rep.evaluated, 3);
}

#[test]
fn detect_is_deterministic() {
    let r = window(7, 300, BASE);
    let c = window(8, 300, BASE);
    let cfg = DriftConfig::default();
    let a = serde_json::to_string(&detect(&r, &c, &cfg).unwrap()).unwrap();
    let b = serde_json::to_string(&detect(&r, &c, &cfg).unwrap()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn few_distinct_values_use_chi_squared() {
    let mk = |v: f64| SampleFeatures {
        output_entropy: Some(v),
        ..SampleFeatures::from_text("a b", Some("x"), None)
    };
    let r: Vec<SampleFeatures> = (0..100).map(|i| mk((i % 3) as f64)).collect();
    let c: Vec<SampleFeatures> = (0..100)
        .map(|i| mk(if i < 60 { 0.0 } else { (i % 3) as f64 }))
        .collect();
    let rep = detect(&r, &c, &DriftConfig::default()).unwrap();
    let f = rep
        .features
        .iter()
        .find(|f| f.feature == "output_entropy")
        .unwrap();
    assert_eq!(f.test, "chisquare");
    assert!(f.drift, "{f:?}");
}
