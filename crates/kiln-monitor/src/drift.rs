//! Drift between a reference window of traffic and the current one, with Evidently's
//! semantics.
//!
//! Per feature, one *deciding* test says drift or not; PSI, Jensen–Shannon and KS are
//! reported alongside for numerical features. The dataset drifts when the share of drifted
//! features is at least `drift_share` (0.5), counting only the features that were evaluated.
//!
//! | feature | deciding test (defaults) |
//! |---|---|
//! | `prompt_length`, `output_length`, `output_entropy` | reference ≤ 1000 rows: two-sample KS, drift when p < 0.05; otherwise normed Wasserstein ≥ 0.1. With ≤ 5 distinct reference values the column is categorical: chi-squared p < 0.05, or Jensen–Shannon ≥ 0.1 past 1000 rows |
//! | `prompt_words` | Jensen–Shannon distance of the word distribution (top-K words + "other") ≥ max(0.1, permutation 95% quantile) |
//! | `prompt_embedding` | domain classifier (logistic regression on half of each window), held-out ROC AUC > max(0.55, null 95% quantile) |
//!
//! **Why not chi-squared over words.** The words of one prompt are not independent draws:
//! prompts come from templates, so words arrive in correlated bundles. A chi-squared test over
//! thousands of word tokens treats each as an independent observation, and its p-value goes to
//! zero for any difference at all, including the sampling noise of which templates happened
//! to be drawn. The Jensen–Shannon distance is an effect size, not a test, and its threshold
//! is raised to the 95% quantile of its own null distribution, obtained by permuting whole
//! prompts (the independent units) between the windows — so small windows with a large
//! vocabulary do not alarm on noise.
//!
//! Output features are skipped (not listed, not counted) when either window lacks them; a
//! feature with fewer than `min_samples` values in a window is listed as insufficient data and
//! not counted. Everything is deterministic for a given `seed`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::features::{EMBEDDING_DIM, LengthUnit, SampleFeatures};
use crate::stats;

/// Which test decides drift for a numerical feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumericalTest {
    /// Evidently's default: KS (or chi-squared) up to `large_reference` rows, Wasserstein
    /// (or Jensen–Shannon) beyond.
    Auto,
    Ks,
    Wasserstein,
    Psi,
    JensenShannon,
}

/// Test choice and thresholds. Defaults are Evidently's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DriftConfig {
    /// The dataset drifts when at least this share of evaluated features drifts.
    pub drift_share: f64,
    /// Fewer values than this in either window: "insufficient data", not drift.
    pub min_samples: usize,
    /// References with more rows than this use the large-sample tests.
    pub large_reference: usize,
    pub numerical_test: NumericalTest,
    /// KS and chi-squared: drift when p < this.
    pub p_value_threshold: f64,
    /// Normed Wasserstein: drift when ≥ this.
    pub wasserstein_threshold: f64,
    /// Jensen–Shannon distance: drift when ≥ this.
    pub js_threshold: f64,
    /// PSI: drift when ≥ this (0.1–0.2 moderate, > 0.2 significant by convention; Evidently's
    /// own default is 0.1).
    pub psi_threshold: f64,
    /// Evidently's `n_bins`: numerical columns with at most this many distinct reference
    /// values are binned by value rather than by Sturges edges.
    pub n_bins: usize,
    /// At most this many distinct reference values make a numerical column categorical.
    pub categorical_max_unique: usize,
    /// Word distribution: the K most frequent words of reference ∪ current, plus "other".
    pub top_words: usize,
    /// Permutations of whole prompts for the word-distribution null (0: fixed threshold).
    pub word_permutations: usize,
    /// Domain classifier: drift when held-out AUC > max(this, the null 95% quantile).
    pub auc_threshold: f64,
    /// Gradient steps of the domain classifier.
    pub classifier_iterations: usize,
    /// L2 penalty of the domain classifier.
    pub classifier_l2: f64,
    pub seed: u64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        Self {
            drift_share: 0.5,
            min_samples: 30,
            large_reference: 1000,
            numerical_test: NumericalTest::Auto,
            p_value_threshold: 0.05,
            wasserstein_threshold: 0.1,
            js_threshold: 0.1,
            psi_threshold: 0.2,
            n_bins: stats::DEFAULT_N_BINS,
            categorical_max_unique: 5,
            top_words: 200,
            word_permutations: 100,
            auc_threshold: 0.55,
            classifier_iterations: 100,
            classifier_l2: 1e-2,
            seed: 0x6b69_6c6e,
        }
    }
}

/// The verdict on one feature. For the p-value tests (`ks`, `chisquare`) drift is
/// `score < threshold`; for the others `score ≥ threshold` (`>` for the AUC).
#[derive(Debug, Clone, Serialize)]
pub struct FeatureDrift {
    /// `prompt_length` | `prompt_words` | `prompt_embedding` | `output_length` | `output_entropy`
    pub feature: String,
    /// `ks` | `wasserstein` | `jensenshannon` | `psi` | `domain_classifier_auc` | `chisquare`
    pub test: String,
    pub score: f64,
    pub threshold: f64,
    pub drift: bool,
    /// Whether the feature counts toward the dataset share (false: insufficient data).
    pub evaluated: bool,
    pub psi: Option<f64>,
    pub js: Option<f64>,
    pub ks_statistic: Option<f64>,
    pub ks_p_value: Option<f64>,
    pub reference_n: usize,
    pub current_n: usize,
    pub note: Option<String>,
}

/// Drift of the whole window.
#[derive(Debug, Clone, Serialize)]
pub struct DriftReport {
    pub features: Vec<FeatureDrift>,
    /// Features that counted (enough data in both windows).
    pub evaluated: usize,
    pub drifted: usize,
    /// `drifted / evaluated` (0 when nothing was evaluated).
    pub share: f64,
    pub drift_share: f64,
    pub drift: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error(
        "cannot compare `{feature}`: the reference counts it in {reference} and the current window in {current}; compute both windows the same way (text → words, token counts → tokens)"
    )]
    LengthUnitsDiffer {
        feature: &'static str,
        reference: String,
        current: String,
    },
}

/// Deterministic generator for shuffles (SplitMix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64 * n as f64) as usize % n.max(1)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// The units present in a window, for the error message ("words", "tokens", "words and tokens").
fn units_of(units: impl Iterator<Item = LengthUnit>) -> Option<String> {
    let (mut w, mut t) = (false, false);
    for u in units {
        match u {
            LengthUnit::Words => w = true,
            LengthUnit::Tokens => t = true,
        }
    }
    match (w, t) {
        (false, false) => None,
        (true, false) => Some("words".into()),
        (false, true) => Some("tokens".into()),
        (true, true) => Some("words and tokens".into()),
    }
}

fn check_units(
    feature: &'static str,
    reference: impl Iterator<Item = LengthUnit>,
    current: impl Iterator<Item = LengthUnit>,
) -> Result<(), DriftError> {
    let (r, c) = (units_of(reference), units_of(current));
    match (r, c) {
        (Some(r), Some(c)) if r != c || r.contains(" and ") => Err(DriftError::LengthUnitsDiffer {
            feature,
            reference: r,
            current: c,
        }),
        _ => Ok(()),
    }
}

/// Compares the current window with the reference. Errors only when length units differ
/// between (or within) the windows.
pub fn detect(
    reference: &[SampleFeatures],
    current: &[SampleFeatures],
    cfg: &DriftConfig,
) -> Result<DriftReport, DriftError> {
    check_units(
        "prompt_length",
        reference.iter().map(|s| s.prompt_length_unit),
        current.iter().map(|s| s.prompt_length_unit),
    )?;
    let out_units = |w: &[SampleFeatures]| -> Vec<LengthUnit> {
        w.iter()
            .filter(|s| s.output_length.is_some())
            .map(|s| s.output_length_unit)
            .collect()
    };
    check_units(
        "output_length",
        out_units(reference).into_iter(),
        out_units(current).into_iter(),
    )?;

    let mut features = Vec::new();
    let col = |w: &[SampleFeatures], f: fn(&SampleFeatures) -> Option<f64>| -> Vec<f64> {
        w.iter().filter_map(f).filter(|x| x.is_finite()).collect()
    };
    features.push(numerical(
        "prompt_length",
        &col(reference, |s| Some(s.prompt_length)),
        &col(current, |s| Some(s.prompt_length)),
        cfg,
    ));
    let text_ref: Vec<&SampleFeatures> = reference.iter().filter(|s| s.has_text()).collect();
    let text_cur: Vec<&SampleFeatures> = current.iter().filter(|s| s.has_text()).collect();
    if !text_ref.is_empty() && !text_cur.is_empty() {
        features.push(words(&text_ref, &text_cur, cfg));
        features.push(embedding(&text_ref, &text_cur, cfg));
    }
    for (name, get) in [
        (
            "output_length",
            (|s: &SampleFeatures| s.output_length) as fn(&SampleFeatures) -> Option<f64>,
        ),
        ("output_entropy", |s: &SampleFeatures| s.output_entropy),
    ] {
        let (r, c) = (col(reference, get), col(current, get));
        if !r.is_empty() && !c.is_empty() {
            features.push(numerical(name, &r, &c, cfg));
        }
    }

    let evaluated = features.iter().filter(|f| f.evaluated).count();
    let drifted = features.iter().filter(|f| f.evaluated && f.drift).count();
    let share = if evaluated > 0 {
        drifted as f64 / evaluated as f64
    } else {
        0.0
    };
    Ok(DriftReport {
        features,
        evaluated,
        drifted,
        share,
        drift_share: cfg.drift_share,
        drift: evaluated > 0 && share >= cfg.drift_share,
    })
}

fn insufficient(
    feature: &str,
    test: &str,
    rn: usize,
    cn: usize,
    cfg: &DriftConfig,
) -> FeatureDrift {
    FeatureDrift {
        feature: feature.into(),
        test: test.into(),
        score: 0.0,
        threshold: 0.0,
        drift: false,
        evaluated: false,
        psi: None,
        js: None,
        ks_statistic: None,
        ks_p_value: None,
        reference_n: rn,
        current_n: cn,
        note: Some(format!(
            "insufficient data: {rn} reference and {cn} current values, need {} in each",
            cfg.min_samples
        )),
    }
}

fn numerical(feature: &str, r: &[f64], c: &[f64], cfg: &DriftConfig) -> FeatureDrift {
    let categorical = stats::n_unique(r) <= cfg.categorical_max_unique;
    let large = r.len() > cfg.large_reference;
    let test = match cfg.numerical_test {
        NumericalTest::Auto => match (categorical, large) {
            (true, false) => "chisquare",
            (true, true) => "jensenshannon",
            (false, false) => "ks",
            (false, true) => "wasserstein",
        },
        NumericalTest::Ks => "ks",
        NumericalTest::Wasserstein => "wasserstein",
        NumericalTest::Psi => "psi",
        NumericalTest::JensenShannon => "jensenshannon",
    };
    if r.len() < cfg.min_samples || c.len() < cfg.min_samples {
        return insufficient(feature, test, r.len(), c.len(), cfg);
    }
    let (rs, cs) = stats::binned_shares(r, c, cfg.n_bins);
    let psi = stats::psi(&rs, &cs);
    let js = stats::jensen_shannon(&rs, &cs);
    let ks = stats::ks_2samp(r, c);
    let (score, threshold, drift) = match test {
        "chisquare" => {
            let (rc, cc) = stats::categorical_counts(r, c);
            let (_, p) = stats::chi_squared(&rc, &cc);
            (p, cfg.p_value_threshold, p < cfg.p_value_threshold)
        }
        "ks" => (
            ks.p_value,
            cfg.p_value_threshold,
            ks.p_value < cfg.p_value_threshold,
        ),
        "wasserstein" => {
            let w = stats::wasserstein_normed(r, c);
            (w, cfg.wasserstein_threshold, w >= cfg.wasserstein_threshold)
        }
        "psi" => (psi, cfg.psi_threshold, psi >= cfg.psi_threshold),
        _ => (js, cfg.js_threshold, js >= cfg.js_threshold),
    };
    FeatureDrift {
        feature: feature.into(),
        test: test.into(),
        score,
        threshold,
        drift,
        evaluated: true,
        psi: Some(psi),
        js: Some(js),
        ks_statistic: Some(ks.statistic),
        ks_p_value: Some(ks.p_value),
        reference_n: r.len(),
        current_n: c.len(),
        note: (psi >= cfg.psi_threshold).then(|| format!("psi {psi:.3} ≥ {}", cfg.psi_threshold)),
    }
}

fn words(r: &[&SampleFeatures], c: &[&SampleFeatures], cfg: &DriftConfig) -> FeatureDrift {
    if r.len() < cfg.min_samples || c.len() < cfg.min_samples {
        return insufficient("prompt_words", "jensenshannon", r.len(), c.len(), cfg);
    }
    // Top-K words of reference ∪ current, ties broken by id for determinism.
    let mut counts: HashMap<u32, u64> = HashMap::new();
    for s in r.iter().chain(c) {
        for w in &s.words {
            *counts.entry(*w).or_insert(0) += 1;
        }
    }
    let mut top: Vec<(u32, u64)> = counts.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(cfg.top_words);
    let bucket: HashMap<u32, usize> = top.iter().enumerate().map(|(i, (w, _))| (*w, i)).collect();
    let k = top.len() + 1;
    // Each prompt as its list of buckets (flat), for the permutations.
    let mut flat: Vec<u32> = Vec::new();
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(r.len() + c.len());
    for s in r.iter().chain(c) {
        let start = flat.len();
        flat.extend(
            s.words
                .iter()
                .map(|w| bucket.get(w).copied().unwrap_or(k - 1) as u32),
        );
        spans.push((start, flat.len()));
    }
    let mut total = vec![0.0f64; k];
    for b in &flat {
        total[*b as usize] += 1.0;
    }
    let js_of = |members: &[usize]| -> (f64, f64) {
        let mut rc = vec![0.0f64; k];
        for &m in members {
            let (a, b) = spans[m];
            for x in &flat[a..b] {
                rc[*x as usize] += 1.0;
            }
        }
        let cc: Vec<f64> = total.iter().zip(&rc).map(|(t, x)| t - x).collect();
        let rs = stats::shares(&rc, rc.iter().sum());
        let cs = stats::shares(&cc, cc.iter().sum());
        (stats::jensen_shannon(&rs, &cs), stats::psi(&rs, &cs))
    };
    let ref_idx: Vec<usize> = (0..r.len()).collect();
    let (js, psi) = js_of(&ref_idx);
    let mut threshold = cfg.js_threshold;
    let mut note = None;
    if cfg.word_permutations > 0 {
        let mut rng = SplitMix(cfg.seed ^ 0x776f_7264);
        let mut pool: Vec<usize> = (0..spans.len()).collect();
        let mut null: Vec<f64> = (0..cfg.word_permutations)
            .map(|_| {
                rng.shuffle(&mut pool);
                js_of(&pool[..r.len()]).0
            })
            .collect();
        null.sort_by(f64::total_cmp);
        let q = ((0.95 * null.len() as f64).ceil() as usize).clamp(1, null.len());
        let q95 = null[q - 1];
        if q95 > threshold {
            threshold = q95;
            note = Some(format!(
                "threshold raised from {} to the permutation 95% quantile",
                cfg.js_threshold
            ));
        }
    }
    FeatureDrift {
        feature: "prompt_words".into(),
        test: "jensenshannon".into(),
        score: js,
        threshold,
        drift: js >= threshold,
        evaluated: true,
        psi: Some(psi),
        js: Some(js),
        ks_statistic: None,
        ks_p_value: None,
        reference_n: r.len(),
        current_n: c.len(),
        note,
    }
}

/// Logistic regression `σ(w·x + b)` by Nesterov-accelerated gradient descent on the mean
/// log-loss plus `l2/2 · |w|²`; rows have norm ≤ 1, so step `1 / (0.5 + l2)` is safe.
fn train_logistic(x: &[&[f32]], y: &[bool], iterations: usize, l2: f64) -> (Vec<f64>, f64) {
    let d = EMBEDDING_DIM;
    let n = x.len().max(1) as f64;
    let lr = 1.0 / (0.5 + l2);
    let (mut w, mut b) = (vec![0.0f64; d], 0.0f64);
    let (mut wp, mut bp) = (w.clone(), b);
    let mut grad = vec![0.0f64; d];
    for t in 0..iterations {
        let mom = t as f64 / (t as f64 + 3.0);
        let look: Vec<f64> = w.iter().zip(&wp).map(|(a, p)| a + mom * (a - p)).collect();
        let lb = b + mom * (b - bp);
        grad.iter_mut().for_each(|g| *g = 0.0);
        let mut gb = 0.0;
        for (row, &label) in x.iter().zip(y) {
            let z: f64 = row
                .iter()
                .zip(&look)
                .map(|(a, w)| f64::from(*a) * w)
                .sum::<f64>()
                + lb;
            let err = 1.0 / (1.0 + (-z).exp()) - if label { 1.0 } else { 0.0 };
            for (g, a) in grad.iter_mut().zip(row.iter()) {
                *g += err * f64::from(*a);
            }
            gb += err;
        }
        wp.clone_from(&w);
        bp = b;
        for ((wi, g), l) in w.iter_mut().zip(&grad).zip(&look) {
            *wi = l - lr * (g / n + l2 * l);
        }
        b = lb - lr * gb / n;
    }
    (w, b)
}

fn rows<'a>(idx: &[usize], w: &[&'a SampleFeatures]) -> Vec<&'a [f32]> {
    idx.iter().map(|&i| w[i].embedding.as_slice()).collect()
}

fn embedding(r: &[&SampleFeatures], c: &[&SampleFeatures], cfg: &DriftConfig) -> FeatureDrift {
    let name = "prompt_embedding";
    let test = "domain_classifier_auc";
    if r.len() < cfg.min_samples || c.len() < cfg.min_samples {
        return insufficient(name, test, r.len(), c.len(), cfg);
    }
    let mut rng = SplitMix(cfg.seed ^ 0x656d_6264);
    let mut ri: Vec<usize> = (0..r.len()).collect();
    let mut ci: Vec<usize> = (0..c.len()).collect();
    rng.shuffle(&mut ri);
    rng.shuffle(&mut ci);
    let (rh, ch) = (r.len() / 2, c.len() / 2);
    let mut train_x = rows(&ri[..rh], r);
    train_x.extend(rows(&ci[..ch], c));
    let train_y: Vec<bool> = (0..rh)
        .map(|_| false)
        .chain((0..ch).map(|_| true))
        .collect();
    let (w, b) = train_logistic(
        &train_x,
        &train_y,
        cfg.classifier_iterations,
        cfg.classifier_l2,
    );
    let mut test_x = rows(&ri[rh..], r);
    test_x.extend(rows(&ci[ch..], c));
    let (tr, tc) = (r.len() - rh, c.len() - ch);
    let test_y: Vec<bool> = (0..tr)
        .map(|_| false)
        .chain((0..tc).map(|_| true))
        .collect();
    let scores: Vec<f64> = test_x
        .iter()
        .map(|row| {
            row.iter()
                .zip(&w)
                .map(|(a, w)| f64::from(*a) * w)
                .sum::<f64>()
                + b
        })
        .collect();
    let auc = stats::auroc(&scores, &test_y).unwrap_or(0.5);
    let threshold = cfg.auc_threshold.max(stats::auc_null_q95(tc, tr));
    FeatureDrift {
        feature: name.into(),
        test: test.into(),
        score: auc,
        threshold,
        drift: auc > threshold,
        evaluated: true,
        psi: None,
        js: None,
        ks_statistic: None,
        ks_p_value: None,
        reference_n: r.len(),
        current_n: c.len(),
        note: Some(format!("held-out {tr} reference + {tc} current")),
    }
}
