//! Two-sample statistics for drift detection, matching Evidently's column tests.
//!
//! Every function here is pure and works on plain slices, so it can be checked number for
//! number against the reference implementation it names (numpy, scipy, Evidently's
//! `get_binned_data`). Deviations are stated where they exist.
//!
//! Binning follows Evidently (`evidently/calculations/stattests/utils.py::get_binned_data`):
//! a numerical column whose reference has more than `n_bins` (30) distinct values is binned by
//! `numpy.histogram_bin_edges(reference ∪ current, bins="sturges")`; otherwise its distinct
//! values are the categories. Bin shares are `count / len`, and a share of exactly zero is
//! replaced by `0.0001` so that logarithms stay finite.

use std::cmp::Ordering;

/// The share Evidently substitutes for an empty bin.
pub const EMPTY_BIN_SHARE: f64 = 0.0001;

/// Evidently's default `n_bins`: a numerical column with at most this many distinct reference
/// values is treated as categorical when binned.
pub const DEFAULT_N_BINS: usize = 30;

fn total_cmp(a: &f64, b: &f64) -> Ordering {
    a.total_cmp(b)
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v = values.to_vec();
    v.sort_by(total_cmp);
    v
}

/// Number of distinct values (`pandas.Series.nunique`).
pub fn n_unique(values: &[f64]) -> usize {
    let v = sorted(values);
    let mut n = 0;
    for (i, x) in v.iter().enumerate() {
        if i == 0 || *x != v[i - 1] {
            n += 1;
        }
    }
    n
}

/// `numpy.histogram_bin_edges(reference ∪ current, bins="sturges")`.
///
/// Width = `ptp / (log2(n) + 1)`, `n_bins = ceil(ptp / width)` (1 when the data are constant,
/// in which case the range is widened by ±0.5), edges = `linspace(min, max, n_bins + 1)`.
/// Returns an empty vector when both inputs are empty.
pub fn sturges_edges(reference: &[f64], current: &[f64]) -> Vec<f64> {
    let all = reference.iter().chain(current.iter()).copied();
    let n = reference.len() + current.len();
    if n == 0 {
        return Vec::new();
    }
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in all {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    let ptp = hi - lo;
    let width = ptp / ((n as f64).log2() + 1.0);
    let (first, last) = if lo == hi {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let bins = if width > 0.0 {
        ((last - first) / width).ceil() as usize
    } else {
        1
    };
    let step = (last - first) / bins as f64;
    let mut edges: Vec<f64> = (0..=bins).map(|i| i as f64 * step + first).collect();
    edges[bins] = last;
    edges
}

/// `numpy.histogram(values, edges)[0]`: bins are `[e_i, e_{i+1})`, the last one closed;
/// values outside `[e_0, e_last]` are not counted.
pub fn histogram(values: &[f64], edges: &[f64]) -> Vec<usize> {
    let bins = edges.len().saturating_sub(1);
    let mut counts = vec![0; bins];
    if bins == 0 {
        return counts;
    }
    for &x in values {
        if x < edges[0] || x > edges[bins] || x.is_nan() {
            continue;
        }
        let i = edges
            .partition_point(|e| *e <= x)
            .saturating_sub(1)
            .min(bins - 1);
        counts[i] += 1;
    }
    counts
}

/// Shares `count / total` with zeros replaced by [`EMPTY_BIN_SHARE`] (Evidently's `np.place`).
pub fn shares(counts: &[f64], total: f64) -> Vec<f64> {
    counts
        .iter()
        .map(|c| {
            let p = if total > 0.0 { c / total } else { 0.0 };
            if p == 0.0 { EMPTY_BIN_SHARE } else { p }
        })
        .collect()
}

/// Aligned counts of the distinct values of `reference ∪ current`, in sorted order.
pub fn categorical_counts(reference: &[f64], current: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let r = sorted(reference);
    let c = sorted(current);
    let mut keys: Vec<f64> = r.iter().chain(c.iter()).copied().collect();
    keys.sort_by(total_cmp);
    keys.dedup();
    let count = |v: &[f64], k: f64| {
        let lo = v.partition_point(|x| x.total_cmp(&k) == Ordering::Less);
        let hi = v.partition_point(|x| x.total_cmp(&k) != Ordering::Greater);
        (hi - lo) as f64
    };
    let rc = keys.iter().map(|&k| count(&r, k)).collect();
    let cc = keys.iter().map(|&k| count(&c, k)).collect();
    (rc, cc)
}

/// Evidently's `get_binned_data` for a numerical column: Sturges histogram shares when the
/// reference has more than `n_bins` distinct values, else shares of the distinct values;
/// empty bins get [`EMPTY_BIN_SHARE`].
pub fn binned_shares(reference: &[f64], current: &[f64], n_bins: usize) -> (Vec<f64>, Vec<f64>) {
    let (rc, cc) = if n_unique(reference) > n_bins {
        let edges = sturges_edges(reference, current);
        let f = |v: &[f64]| histogram(v, &edges).into_iter().map(|c| c as f64).collect();
        (f(reference), f(current))
    } else {
        categorical_counts(reference, current)
    };
    (
        shares(&rc, reference.len() as f64),
        shares(&cc, current.len() as f64),
    )
}

/// Population stability index of two share vectors (already binned, zeros replaced):
/// `PSI = Σ (cur − ref) · ln(cur / ref)` — Evidently's `psi` stattest.
pub fn psi(reference_shares: &[f64], current_shares: &[f64]) -> f64 {
    reference_shares
        .iter()
        .zip(current_shares)
        .map(|(r, c)| (c - r) * (c / r).ln())
        .sum()
}

fn rel_entr(x: f64, y: f64) -> f64 {
    if x > 0.0 && y > 0.0 {
        x * (x / y).ln()
    } else if x == 0.0 && y >= 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

/// Jensen–Shannon **distance** (`scipy.spatial.distance.jensenshannon(p, q)`, natural log):
/// both vectors are normalized to sum 1, `m = (p + q) / 2`,
/// `JS = sqrt((KL(p‖m) + KL(q‖m)) / 2)`. In `[0, sqrt(ln 2)]`.
pub fn jensen_shannon(p: &[f64], q: &[f64]) -> f64 {
    let sp: f64 = p.iter().sum();
    let sq: f64 = q.iter().sum();
    if sp <= 0.0 || sq <= 0.0 {
        return 0.0;
    }
    let mut js = 0.0;
    for (a, b) in p.iter().zip(q) {
        let (a, b) = (a / sp, b / sq);
        let m = 0.5 * (a + b);
        js += rel_entr(a, m) + rel_entr(b, m);
    }
    (js / 2.0).max(0.0).sqrt()
}

/// `scipy.stats.wasserstein_distance(u, v)` divided by `max(std(reference), 0.001)` with the
/// population standard deviation (`np.std`, ddof 0) — Evidently's `wasserstein` stattest.
/// The distance is `∫ |F_u − F_v|`, the area between the two empirical CDFs.
pub fn wasserstein_normed(reference: &[f64], current: &[f64]) -> f64 {
    wasserstein(reference, current) / std_pop(reference).max(0.001)
}

/// `scipy.stats.wasserstein_distance(u, v)` (1-D, unweighted).
pub fn wasserstein(u: &[f64], v: &[f64]) -> f64 {
    if u.is_empty() || v.is_empty() {
        return 0.0;
    }
    let (u, v) = (sorted(u), sorted(v));
    let (nu, nv) = (u.len() as f64, v.len() as f64);
    let (mut i, mut j) = (0, 0);
    let mut dist = 0.0;
    let mut prev = u[0].min(v[0]);
    while i < u.len() || j < v.len() {
        let x = match (u.get(i), v.get(j)) {
            (Some(a), Some(b)) => a.min(*b),
            (Some(a), None) => *a,
            (None, Some(b)) => *b,
            (None, None) => break,
        };
        dist += (i as f64 / nu - j as f64 / nv).abs() * (x - prev);
        while i < u.len() && u[i] == x {
            i += 1;
        }
        while j < v.len() && v[j] == x {
            j += 1;
        }
        prev = x;
    }
    dist
}

/// Population standard deviation (`np.std`, ddof 0).
pub fn std_pop(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// Result of a two-sample Kolmogorov–Smirnov test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KsResult {
    pub statistic: f64,
    pub p_value: f64,
    /// Whether the p-value is the exact small-sample one.
    pub exact: bool,
}

/// Largest `max(n1, n2)` for which the exact p-value is computed (scipy's `MAX_AUTO_N`).
pub const KS_MAX_EXACT_N: usize = 10_000;

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Two-sided two-sample Kolmogorov–Smirnov test, `scipy.stats.ks_2samp(a, b)` with
/// `method="auto"`.
///
/// `D = max |F_a(x) − F_b(x)|` over the pooled sample. When `max(n1, n2) ≤ 10 000` the
/// p-value is exact: `P(D ≥ d)` for `d = h / lcm(n1, n2)`, `h = round(d · lcm)`, computed as
/// the probability mass of lattice paths from `(0, 0)` to `(n1, n2)` that touch the band
/// `|i·n2 − j·n1| ≥ h·gcd`. The mass is propagated as a probability (each path has weight
/// `1 / C(n1+n2, n1)`) and summed where it leaves the band, so there is neither overflow nor
/// cancellation for tiny p-values; it agrees with scipy's `_compute_prob_outside_square` /
/// `_compute_outer_prob_inside_method`. Otherwise the asymptotic Kolmogorov distribution
/// `Q_KS(sqrt(n1·n2/(n1+n2)) · D)` is used (scipy uses `kstwo.sf(D, round(n1·n2/(n1+n2)))`
/// there; the two agree to within a few percent of the p-value at these sizes).
///
/// Returns statistic 0 and p-value 1 when either sample is empty.
pub fn ks_2samp(a: &[f64], b: &[f64]) -> KsResult {
    if a.is_empty() || b.is_empty() {
        return KsResult {
            statistic: 0.0,
            p_value: 1.0,
            exact: false,
        };
    }
    let (a, b) = (sorted(a), sorted(b));
    let (n1, n2) = (a.len(), b.len());
    let (mut i, mut j) = (0, 0);
    let mut d: f64 = 0.0;
    while i < n1 || j < n2 {
        let x = match (a.get(i), b.get(j)) {
            (Some(p), Some(q)) => p.min(*q),
            (Some(p), None) => *p,
            (None, Some(q)) => *q,
            (None, None) => break,
        };
        while i < n1 && a[i] == x {
            i += 1;
        }
        while j < n2 && b[j] == x {
            j += 1;
        }
        d = d.max((i as f64 / n1 as f64 - j as f64 / n2 as f64).abs());
    }
    if n1.max(n2) <= KS_MAX_EXACT_N {
        let (p, d_exact) = ks_exact_sf(n1 as u64, n2 as u64, d);
        KsResult {
            statistic: d_exact,
            p_value: p.clamp(0.0, 1.0),
            exact: true,
        }
    } else {
        let en = (n1 * n2) as f64 / (n1 + n2) as f64;
        KsResult {
            statistic: d,
            p_value: kolmogorov_sf(en.sqrt() * d).clamp(0.0, 1.0),
            exact: false,
        }
    }
}

/// Exact `P(D_{m,n} ≥ d)` under the null; returns `(p, d rounded to the lattice)`.
fn ks_exact_sf(m: u64, n: u64, d: f64) -> (f64, f64) {
    let g = gcd(m, n);
    let lcm = (m / g) * n;
    let h = (d * lcm as f64).round() as u64;
    let d = h as f64 / lcm as f64;
    if h == 0 {
        return (1.0, d);
    }
    // A point (i, j) — i of a, j of b taken — is outside when |i·n − j·m| ≥ h·g.
    let bound = (h * g) as i128;
    let (mi, ni) = (m as i128, n as i128);
    let outside = |i: i128, j: i128| (i * ni - j * mi).abs() >= bound;
    // Probability mass at each j of the current column i, for points not yet absorbed.
    let nu = n as usize;
    let mut cur = vec![0.0f64; nu + 1];
    let mut next = vec![0.0f64; nu + 1];
    let mut absorbed = 0.0;
    cur[0] = 1.0;
    // Band of j values that can be inside for column i: |i·n − j·m| < h·g.
    let band = |i: i128| -> (usize, usize) {
        // j > (i·n − bound) / m and j < (i·n + bound) / m
        let lo = (i * ni - bound).div_euclid(mi) + 1;
        let hi = (i * ni + bound - 1).div_euclid(mi);
        (lo.max(0) as usize, (hi.min(ni)).max(-1) as usize)
    };
    let total = (m + n) as f64;
    for i in 0..=m as i128 {
        let (lo, hi) = band(i);
        let (nlo, nhi) = band(i + 1);
        // Clear the next column's band.
        if i < mi {
            for x in next.iter_mut().take(nhi.min(nu) + 1).skip(nlo) {
                *x = 0.0;
            }
        }
        if lo > hi {
            break;
        }
        for j in lo..=hi.min(nu) {
            let p = cur[j];
            if p == 0.0 {
                continue;
            }
            let remaining = total - (i as f64 + j as f64);
            if remaining <= 0.0 {
                continue;
            }
            // Step in a (i + 1) with probability (m − i) / remaining.
            let pa = p * (mi - i) as f64 / remaining;
            let pb = p - pa;
            if i < mi {
                if outside(i + 1, j as i128) {
                    absorbed += pa;
                } else {
                    next[j] += pa;
                }
            }
            if (j as u64) < n {
                if outside(i, j as i128 + 1) {
                    absorbed += pb;
                } else {
                    // Same column: j + 1 is processed after j in this loop.
                    cur[j + 1] += pb;
                }
            }
        }
        // Reset the current column's band before swapping it in as "next-next".
        for x in cur.iter_mut().take(hi.min(nu) + 1).skip(lo) {
            *x = 0.0;
        }
        std::mem::swap(&mut cur, &mut next);
    }
    (absorbed, d)
}

/// Survival function of the Kolmogorov distribution (`scipy.special.kolmogorov`):
/// `Q(λ) = 2 Σ_{k≥1} (−1)^{k−1} exp(−2k²λ²)`, with the dual theta series
/// `1 − sqrt(2π)/λ Σ exp(−(2k−1)²π²/(8λ²))` for small λ.
pub fn kolmogorov_sf(lambda: f64) -> f64 {
    if lambda <= 0.0 {
        return 1.0;
    }
    if lambda < 1.0 {
        let pi2 = std::f64::consts::PI * std::f64::consts::PI;
        let mut s = 0.0;
        for k in 1..=20 {
            let t = (2 * k - 1) as f64;
            s += (-t * t * pi2 / (8.0 * lambda * lambda)).exp();
        }
        1.0 - (2.0 * std::f64::consts::PI).sqrt() / lambda * s
    } else {
        let mut s = 0.0;
        for k in 1..=100 {
            let kf = k as f64;
            let term = (-2.0 * kf * kf * lambda * lambda).exp();
            s += if k % 2 == 1 { term } else { -term };
            if term < 1e-300 {
                break;
            }
        }
        (2.0 * s).clamp(0.0, 1.0)
    }
}

/// Pearson's chi-squared test as Evidently's `chisquare` stattest runs it: observed = the
/// current counts, expected = the reference counts scaled by `n_current / n_reference`
/// (`scipy.stats.chisquare(cur, ref · k)`), statistic `Σ (o − e)² / e`, `k − 1` degrees of
/// freedom, p-value = `Q((k−1)/2, stat/2)` (the regularized upper incomplete gamma).
///
/// Returns `(statistic, p_value)`; a category absent from the reference gives an infinite
/// statistic and p-value 0, as in scipy. With fewer than two categories: `(0, 1)`.
pub fn chi_squared(reference_counts: &[f64], current_counts: &[f64]) -> (f64, f64) {
    let nr: f64 = reference_counts.iter().sum();
    let nc: f64 = current_counts.iter().sum();
    let k = reference_counts.len().min(current_counts.len());
    if k < 2 || nr <= 0.0 || nc <= 0.0 {
        return (0.0, 1.0);
    }
    let scale = nc / nr;
    let mut stat = 0.0;
    for (r, c) in reference_counts.iter().zip(current_counts) {
        let e = r * scale;
        if e == 0.0 {
            if *c == 0.0 {
                continue;
            }
            return (f64::INFINITY, 0.0);
        }
        stat += (c - e).powi(2) / e;
    }
    (stat, chi2_sf(stat, (k - 1) as f64))
}

/// Chi-squared survival function `P(X ≥ x)` with `dof` degrees of freedom.
pub fn chi2_sf(x: f64, dof: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    gamma_q(dof / 2.0, x / 2.0)
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, 9 terms; ~1e-15 relative).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Regularized upper incomplete gamma `Q(a, x) = Γ(a, x) / Γ(a)` (`scipy.special.gammaincc`):
/// the series for `P` when `x < a + 1`, Lentz's continued fraction for `Q` otherwise
/// (Numerical Recipes §6.2).
pub fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let ln_pre = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        let mut sum = 1.0 / a;
        let mut term = sum;
        let mut ap = a;
        for _ in 0..10_000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-16 {
                break;
            }
        }
        (1.0 - sum * ln_pre.exp()).clamp(0.0, 1.0)
    } else {
        const TINY: f64 = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        (ln_pre.exp() * h).clamp(0.0, 1.0)
    }
}

/// Area under the ROC curve, by Mann–Whitney: the probability that a random positive scores
/// above a random negative, ties counting ½ (`sklearn.metrics.roc_auc_score`). NaN scores are
/// left out. `None` when either class is empty or the lengths differ.
pub fn auroc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    if scores.len() != labels.len() {
        return None;
    }
    let mut pairs: Vec<(f64, bool)> = scores
        .iter()
        .zip(labels)
        .filter(|(s, _)| !s.is_nan())
        .map(|(s, l)| (*s, *l))
        .collect();
    let n_pos = pairs.iter().filter(|(_, l)| *l).count();
    let n_neg = pairs.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Sum of (average, 1-based) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut k = 0;
    while k < pairs.len() {
        let mut e = k;
        while e + 1 < pairs.len() && pairs[e + 1].0 == pairs[k].0 {
            e += 1;
        }
        let avg = (k + e) as f64 / 2.0 + 1.0;
        rank_sum += avg * pairs[k..=e].iter().filter(|(_, l)| *l).count() as f64;
        k = e + 1;
    }
    let (p, q) = (n_pos as f64, n_neg as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * q))
}

/// The one-sided 95% quantile of the AUC of an uninformative classifier on `n1` positives and
/// `n2` negatives, by the normal approximation to Mann–Whitney's U:
/// `0.5 + 1.645 · sqrt((n1 + n2 + 1) / (12 · n1 · n2))`.
pub fn auc_null_q95(n1: usize, n2: usize) -> f64 {
    if n1 == 0 || n2 == 0 {
        return 1.0;
    }
    let (a, b) = (n1 as f64, n2 as f64);
    0.5 + 1.645 * ((a + b + 1.0) / (12.0 * a * b)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_of_identical_shares_is_zero() {
        assert_eq!(psi(&[0.2, 0.8], &[0.2, 0.8]), 0.0);
    }

    #[test]
    fn psi_hand_computed() {
        // (0.5-0.2)ln(0.5/0.2) + (0.5-0.8)ln(0.5/0.8)
        let want = 0.3 * (2.5f64).ln() + (-0.3) * (0.625f64).ln();
        assert!((psi(&[0.2, 0.8], &[0.5, 0.5]) - want).abs() < 1e-15);
    }

    #[test]
    fn js_of_disjoint_is_sqrt_ln2() {
        let d = jensen_shannon(&[1.0, 0.0], &[0.0, 1.0]);
        assert!((d - 2f64.ln().sqrt()).abs() < 1e-12);
    }

    #[test]
    fn auroc_ties_count_half() {
        assert_eq!(auroc(&[1.0, 1.0], &[true, false]), Some(0.5));
        assert_eq!(auroc(&[0.0, 1.0], &[false, true]), Some(1.0));
        assert_eq!(auroc(&[0.0, 1.0], &[true, true]), None);
    }

    #[test]
    fn gamma_q_matches_exponential() {
        // Q(1, x) = exp(-x)
        for x in [0.1, 1.0, 3.0, 10.0] {
            assert!((gamma_q(1.0, x) - (-x).exp()).abs() < 1e-13);
        }
    }

    #[test]
    fn ks_exact_square_matches_closed_form() {
        // n = m = 1: D is always 1, P(D >= 1) = 1.
        let r = ks_2samp(&[0.0], &[1.0]);
        assert_eq!(r.statistic, 1.0);
        assert!((r.p_value - 1.0).abs() < 1e-12);
        // n = m = 2, fully separated: P(D = 1) = 2 / C(4, 2) = 1/3.
        let r = ks_2samp(&[0.0, 1.0], &[2.0, 3.0]);
        assert!((r.p_value - 1.0 / 3.0).abs() < 1e-12);
    }
}
