//! The hallucination flag: token confidence and grounding combined, and the numbers to
//! calibrate it.
//!
//! Both signals are proxies, not ground truth. Low token confidence (a low mean log-prob, a
//! high entropy, one very unlikely token) goes with wrong answers more often than not, and a
//! reply its retrieved context does not support is more likely invented; neither proves it.
//! [`Calibration`] turns a [`Confidence`] into a probability that the answer is wrong by
//! logistic regression, fitted on a labelled sample ([`Calibration::fit`]);
//! [`calibration_report`] says how well it separates right from wrong (AUROC) and where to
//! put the threshold. Until it is fitted, [`Calibration::default`] is a fixed monotone mapping
//! of the mean log-prob alone.

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::confidence::Confidence;
use crate::grounding::Grounding;

pub use crate::stats::auroc;

/// The number of features [`Calibration`] uses.
const FEATURES: usize = 3;

/// The features, each oriented so that larger means less confident: `−mean_logprob`,
/// `mean_entropy` (0 when absent) and `−min_logprob` (`−mean_logprob` when absent).
/// Non-finite values become `None`.
fn features(c: &Confidence) -> [Option<f64>; FEATURES] {
    let f = |x: f64| x.is_finite().then_some(x);
    [
        f(-c.mean_logprob),
        f(c.mean_entropy.unwrap_or(0.0)),
        f(-c.min_logprob.unwrap_or(c.mean_logprob)),
    ]
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Logistic regression from a [`Confidence`] to the probability that the answer is wrong:
/// `p_wrong = sigmoid(bias + Σ weights[k] · (x[k] − mean[k]) / scale[k])` over the features
/// `[−mean_logprob, mean_entropy (0 when absent), −min_logprob (−mean_logprob when absent)]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Per-feature means used to standardize.
    pub mean: [f64; FEATURES],
    /// Per-feature standard deviations used to standardize (1 for a constant feature).
    pub scale: [f64; FEATURES],
    /// Weights on the standardized features.
    pub weights: [f64; FEATURES],
    /// The intercept.
    pub bias: f64,
}

impl Default for Calibration {
    /// The uncalibrated starting point: `p_wrong = sigmoid(2.5 · (−mean_logprob − 1.0))`, so a
    /// mean log-prob of −1 (a typical token had about e^−1 ≈ 37% probability) gives 0.5, −0.5
    /// gives 0.22 and −2 gives 0.92. Entropy and the minimum are ignored. It is monotone and
    /// sensible for chat models at temperature 0–1, but it is a starting point: fit one on a
    /// labelled sample of your own traffic ([`Calibration::fit`]).
    fn default() -> Self {
        Self {
            mean: [0.0; FEATURES],
            scale: [1.0; FEATURES],
            weights: [2.5, 0.0, 0.0],
            bias: -2.5,
        }
    }
}

/// The L2 penalty on the weights (not the intercept), on standardized features: enough to keep
/// a separable sample's weights finite, too little to matter with a few hundred samples.
const L2: f64 = 1.0;
const MAX_NEWTON_STEPS: usize = 100;

impl Calibration {
    /// Fits the logistic regression to `(confidence, wrong)` samples by Newton's method
    /// (iteratively reweighted least squares) with an L2 penalty of 1 on the standardized
    /// weights; deterministic. `None` with fewer than 2 samples in either class, or if the fit
    /// does not give finite numbers.
    pub fn fit(samples: &[(Confidence, bool)]) -> Option<Calibration> {
        let rows: Vec<([Option<f64>; FEATURES], bool)> =
            samples.iter().map(|(c, w)| (features(c), *w)).collect();
        let wrong = rows.iter().filter(|(_, w)| *w).count();
        if wrong < 2 || rows.len() - wrong < 2 {
            return None;
        }
        let mut mean = [0.0; FEATURES];
        let mut scale = [1.0; FEATURES];
        for k in 0..FEATURES {
            let xs: Vec<f64> = rows.iter().filter_map(|(x, _)| x[k]).collect();
            if xs.is_empty() {
                continue;
            }
            let m = xs.iter().sum::<f64>() / xs.len() as f64;
            let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
            mean[k] = m;
            scale[k] = if var.sqrt() > 1e-12 { var.sqrt() } else { 1.0 };
        }
        // Design rows: [1, z_0, z_1, z_2]; a missing feature sits at its mean (z = 0).
        let design: Vec<([f64; FEATURES + 1], f64)> = rows
            .iter()
            .map(|(x, w)| {
                let mut z = [1.0; FEATURES + 1];
                for k in 0..FEATURES {
                    z[k + 1] = x[k].map_or(0.0, |v| (v - mean[k]) / scale[k]);
                }
                (z, if *w { 1.0 } else { 0.0 })
            })
            .collect();
        let mut beta = [0.0; FEATURES + 1];
        for _ in 0..MAX_NEWTON_STEPS {
            let mut grad = [0.0; FEATURES + 1];
            let mut hess = [[0.0; FEATURES + 1]; FEATURES + 1];
            for (z, y) in &design {
                let eta: f64 = z.iter().zip(&beta).map(|(a, b)| a * b).sum();
                let p = sigmoid(eta);
                let w = (p * (1.0 - p)).max(1e-12);
                for a in 0..=FEATURES {
                    grad[a] += (p - y) * z[a];
                    for b in 0..=FEATURES {
                        hess[a][b] += w * z[a] * z[b];
                    }
                }
            }
            for a in 1..=FEATURES {
                grad[a] += L2 * beta[a];
                hess[a][a] += L2;
            }
            let step = solve(hess, grad)?;
            let mut largest: f64 = 0.0;
            for a in 0..=FEATURES {
                beta[a] -= step[a];
                largest = largest.max(step[a].abs());
            }
            if largest < 1e-10 {
                break;
            }
        }
        let fitted = Calibration {
            mean,
            scale,
            weights: [beta[1], beta[2], beta[3]],
            bias: beta[0],
        };
        fitted.is_finite().then_some(fitted)
    }

    fn is_finite(&self) -> bool {
        self.mean
            .iter()
            .chain(&self.scale)
            .chain(&self.weights)
            .chain([&self.bias])
            .all(|v| v.is_finite())
            && self.scale.iter().all(|s| *s > 0.0)
    }

    /// The probability that the answer with this confidence is wrong, in 0..=1. A feature
    /// that is not a finite number counts as its mean.
    pub fn p_wrong(&self, c: &Confidence) -> f64 {
        let x = features(c);
        let mut z = self.bias;
        for (k, v) in x.iter().enumerate() {
            if let Some(v) = v {
                z += self.weights[k] * (v - self.mean[k]) / self.scale[k];
            }
        }
        if z.is_nan() { 0.5 } else { sigmoid(z) }
    }

    /// Reads a calibration saved by [`Calibration::save`] (JSON).
    pub fn load(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the calibration {}", path.display()))?;
        let calibration: Calibration = serde_json::from_str(&text)
            .with_context(|| format!("parsing the calibration {}", path.display()))?;
        anyhow::ensure!(
            calibration.is_finite(),
            "the calibration {} has a non-finite number or a scale that is not positive",
            path.display()
        );
        Ok(calibration)
    }

    /// Writes the calibration as pretty-printed JSON.
    pub fn save(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        let text = serde_json::to_string_pretty(self).context("serializing the calibration")?;
        std::fs::write(path, text)
            .with_context(|| format!("writing the calibration {}", path.display()))
    }
}

/// Solves `a · x = b` by Gaussian elimination with partial pivoting; `None` when singular.
fn solve<const N: usize>(mut a: [[f64; N]; N], mut b: [f64; N]) -> Option<[f64; N]> {
    for col in 0..N {
        let pivot = (col..N).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].is_nan() || a[pivot][col].abs() <= 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..N {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col];
            for (k, v) in a[row].iter_mut().enumerate().skip(col) {
                *v -= f * pivot_row[k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; N];
    for row in (0..N).rev() {
        let s: f64 = (row + 1..N).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// When to flag a reply.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default)]
pub struct HallucinationConfig {
    /// Flag when the calibrated probability of a wrong answer is above this.
    pub max_p_wrong: f64,
    /// Flag when the grounding score is below this.
    pub min_grounding: f64,
}

impl Default for HallucinationConfig {
    fn default() -> Self {
        Self {
            max_p_wrong: 0.5,
            min_grounding: 0.5,
        }
    }
}

/// The verdict on one reply.
#[derive(Debug, Clone, Serialize)]
pub struct Assessment {
    /// The calibrated probability that the answer is wrong, when there was a confidence.
    pub p_wrong: Option<f64>,
    /// The grounding score, when the request carried context.
    pub grounding: Option<f64>,
    /// Whether any reason applies.
    pub flagged: bool,
    /// `"low_confidence"` (p_wrong above the limit) and/or `"ungrounded"` (grounding below it).
    pub reasons: Vec<&'static str>,
}

/// Assesses one reply from whichever signals exist; `None` when neither does.
pub fn assess(
    confidence: Option<&Confidence>,
    grounding: Option<&Grounding>,
    calibration: &Calibration,
    cfg: &HallucinationConfig,
) -> Option<Assessment> {
    if confidence.is_none() && grounding.is_none() {
        return None;
    }
    let p_wrong = confidence.map(|c| calibration.p_wrong(c));
    let grounding = grounding.map(|g| g.score);
    let mut reasons = Vec::new();
    if p_wrong.is_some_and(|p| p > cfg.max_p_wrong) {
        reasons.push("low_confidence");
    }
    if grounding.is_some_and(|g| g < cfg.min_grounding) {
        reasons.push("ungrounded");
    }
    Some(Assessment {
        p_wrong,
        grounding,
        flagged: !reasons.is_empty(),
        reasons,
    })
}

/// How well a calibration separates wrong answers from right ones on a labelled sample.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    /// Samples.
    pub n: usize,
    /// Of those, wrong answers.
    pub wrong: usize,
    /// AUROC of `p_wrong` for predicting a wrong answer.
    pub auroc: Option<f64>,
    /// AUROC of `−mean_logprob` alone.
    pub auroc_mean_logprob: Option<f64>,
    /// AUROC of `mean_entropy` alone, over the samples that have one.
    pub auroc_mean_entropy: Option<f64>,
    /// Of the flagged samples (`p_wrong > max_p_wrong`), the share that are wrong; 0 when none
    /// is flagged.
    pub precision: f64,
    /// Of the wrong samples, the share flagged; 0 when none is wrong.
    pub recall: f64,
    /// The `max_p_wrong` that maximizes Youden's J (recall − false-positive rate), a midpoint
    /// between two adjacent distinct `p_wrong` values; `None` when a class is empty or all
    /// `p_wrong` are equal.
    pub best_threshold: Option<f64>,
}

/// The [`CalibrationReport`] of `calibration` on `(confidence, wrong)` samples.
pub fn calibration_report(
    samples: &[(Confidence, bool)],
    calibration: &Calibration,
    cfg: &HallucinationConfig,
) -> CalibrationReport {
    let labels: Vec<bool> = samples.iter().map(|(_, w)| *w).collect();
    let p: Vec<f64> = samples
        .iter()
        .map(|(c, _)| calibration.p_wrong(c))
        .collect();
    let neg_mean: Vec<f64> = samples.iter().map(|(c, _)| -c.mean_logprob).collect();
    let (entropy, entropy_labels): (Vec<f64>, Vec<bool>) = samples
        .iter()
        .filter_map(|(c, w)| c.mean_entropy.map(|h| (h, *w)))
        .unzip();
    let wrong = labels.iter().filter(|w| **w).count();
    let flagged = p.iter().filter(|p| **p > cfg.max_p_wrong).count();
    let true_flags = p
        .iter()
        .zip(&labels)
        .filter(|(p, w)| **w && **p > cfg.max_p_wrong)
        .count();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    CalibrationReport {
        n: samples.len(),
        wrong,
        auroc: auroc(&p, &labels),
        auroc_mean_logprob: auroc(&neg_mean, &labels),
        auroc_mean_entropy: auroc(&entropy, &entropy_labels),
        precision: ratio(true_flags, flagged),
        recall: ratio(true_flags, wrong),
        best_threshold: youden_threshold(&p, &labels),
    }
}

/// The threshold `t` (flag when `score > t`) maximizing TPR − FPR, among midpoints of adjacent
/// distinct scores; the lowest such `t` on ties.
fn youden_threshold(scores: &[f64], positives: &[bool]) -> Option<f64> {
    let mut pairs: Vec<(f64, bool)> = scores
        .iter()
        .zip(positives)
        .filter(|(s, _)| s.is_finite())
        .map(|(s, p)| (*s, *p))
        .collect();
    let n_pos = pairs.iter().filter(|(_, p)| *p).count();
    let n_neg = pairs.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    // Descending: walk the threshold down, flagging more at each distinct score.
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut best: Option<(f64, f64)> = None;
    let mut i = 0;
    while i < pairs.len() {
        let score = pairs[i].0;
        while i < pairs.len() && pairs[i].0 == score {
            if pairs[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        let Some(&(next, _)) = pairs.get(i) else {
            break;
        };
        let j = tp as f64 / n_pos as f64 - fp as f64 / n_neg as f64;
        let t = (score + next) / 2.0;
        if best.is_none_or(|(bj, _)| j >= bj) {
            best = Some((j, t));
        }
    }
    best.map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn default_matches_its_doc() {
        let c = |m: f64| Confidence {
            mean_logprob: m,
            mean_entropy: Some(3.0),
            min_logprob: Some(-9.0),
            tokens: Some(4),
        };
        let cal = Calibration::default();
        assert!((cal.p_wrong(&c(-1.0)) - 0.5).abs() < 1e-12);
        let expect = 1.0 / (1.0 + (-2.5f64 * (2.0 - 1.0)).exp());
        assert!((cal.p_wrong(&c(-2.0)) - expect).abs() < 1e-12);
        assert!(cal.p_wrong(&c(-0.1)) < cal.p_wrong(&c(-0.5)));
    }

    #[test]
    fn youden_picks_the_separating_midpoint() {
        let t = youden_threshold(&[0.1, 0.2, 0.7, 0.9], &[false, false, true, true]).unwrap();
        assert!((t - 0.45).abs() < 1e-12);
        assert_eq!(youden_threshold(&[0.5, 0.5], &[true, false]), None);
    }

    #[test]
    fn solve_small_system() {
        let x = solve([[2.0, 1.0], [1.0, 3.0]], [3.0, 5.0]).unwrap();
        assert!((x[0] - 0.8).abs() < 1e-12 && (x[1] - 1.4).abs() < 1e-12);
        assert_eq!(solve([[0.0, 0.0], [0.0, 0.0]], [1.0, 1.0]), None);
    }
}
