//! GPTQ (Frantar et al., 2022, <https://arxiv.org/abs/2210.17323>): quantize a linear layer one
//! input column at a time and spread each column's rounding error over the columns not yet
//! quantized, weighted by the inverse Hessian of the layer's reconstruction loss
//! `‖W·X − Q·X‖²`, `H = 2·X·Xᵀ / N`.
//!
//! As the reference `fasterquant` does it: dead inputs zeroed, optional act-order (columns by
//! decreasing `diag(H)`), dampening `percdamp · mean(diag(H))` on the diagonal, the upper
//! Cholesky factor `U` of `H⁻¹`, then blocks of 128 columns whose error reaches the rest of
//! the matrix in one product per block ("lazy batch updates"). Group parameters are computed when
//! a group's first column comes up, from the weights as updated so far.
//!
//! One departure, for the failure AutoGPTQ users hit most (`cholesky … not positive-definite`):
//! when a factorization fails, the dampening grows and the layer is tried again, and the
//! dampening used is reported.

use candle_core::{DType, Result, Tensor};
use kiln_model::quant::QuantizedMatrix;
use rayon::prelude::*;

use crate::quantizer::QuantSpec;

/// GPTQ's knobs.
#[derive(Debug, Clone, Copy)]
pub struct GptqOptions {
    pub spec: QuantSpec,
    /// Quantize columns in order of decreasing `diag(H)` (AutoGPTQ's `desc_act`).
    pub act_order: bool,
    /// Initial dampening as a fraction of the mean diagonal (`damp_percent`, 0.01).
    pub percdamp: f64,
    /// Columns per lazy block (128).
    pub block_size: usize,
}

impl GptqOptions {
    pub fn new(spec: QuantSpec) -> Self {
        Self {
            spec,
            act_order: false,
            percdamp: 0.01,
            block_size: 128,
        }
    }
}

/// Dampening fractions tried in turn after the configured one fails.
const DAMP_RETRIES: [f64; 6] = [0.02, 0.05, 0.1, 0.2, 0.5, 1.0];

/// The running Hessian `H = 2/N · Σ x·xᵀ` of one layer's inputs.
#[derive(Debug, Clone)]
pub struct Hessian {
    dim: usize,
    h: Vec<f64>,
    samples: usize,
}

impl Hessian {
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            h: vec![0.0; dim * dim],
            samples: 0,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Input rows seen so far.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Adds a batch of input rows `x` (`[tokens, dim]`).
    pub fn add_batch(&mut self, x: &Tensor) -> Result<()> {
        let x = x.to_dtype(DType::F32)?;
        let x = x.reshape(((), self.dim))?;
        let t = x.dim(0)?;
        if t == 0 {
            return Ok(());
        }
        let xtx: Vec<f32> = x.t()?.matmul(&x)?.flatten_all()?.to_vec1()?;
        let total = self.samples + t;
        let keep = self.samples as f64 / total as f64;
        let add = 2.0 / total as f64;
        for (h, &v) in self.h.iter_mut().zip(&xtx) {
            *h = *h * keep + add * f64::from(v);
        }
        self.samples = total;
        Ok(())
    }
}

/// A quantized layer and what it cost.
#[derive(Debug, Clone)]
pub struct GptqResult {
    pub matrix: QuantizedMatrix,
    /// GPTQ's own loss: `Σ (w − q)² / U[i,i]² / 2` over all weights.
    pub loss: f64,
    /// The dampening fraction that factorized.
    pub percdamp: f64,
}

/// Quantizes `w` (`[out, in]`, row-major) against the Hessian of its inputs.
pub fn gptq_quantize(
    w: &[f32],
    out_features: usize,
    in_features: usize,
    hessian: &Hessian,
    opts: &GptqOptions,
) -> Result<GptqResult> {
    let n = in_features;
    if hessian.dim != n || w.len() != out_features * n {
        candle_core::bail!(
            "GPTQ: a {out_features}x{n} weight ({} values) with a Hessian of dimension {}",
            w.len(),
            hessian.dim
        );
    }
    if hessian.samples == 0 {
        candle_core::bail!("GPTQ: the layer saw no calibration input");
    }
    let mut h = hessian.h.clone();
    let mut w = w.to_vec();
    // Inputs that never fire carry no information: their weights are zeroed (and quantize to
    // an exact zero), their diagonal set to 1 so that H stays invertible.
    for i in 0..n {
        if h[i * n + i] == 0.0 {
            h[i * n + i] = 1.0;
            for r in 0..out_features {
                w[r * n + i] = 0.0;
            }
        }
    }
    let perm: Vec<usize> = if opts.act_order {
        let mut p: Vec<usize> = (0..n).collect();
        p.sort_by(|&a, &b| h[b * n + b].total_cmp(&h[a * n + a]));
        p
    } else {
        (0..n).collect()
    };
    let h: Vec<f64> = (0..n * n)
        .map(|k| h[perm[k / n] * n + perm[k % n]])
        .collect();
    let mut wp: Vec<f32> = (0..out_features * n)
        .map(|k| w[(k / n) * n + perm[k % n]])
        .collect();

    let mean_diag = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    let mut found = None;
    for percdamp in std::iter::once(opts.percdamp).chain(DAMP_RETRIES) {
        if percdamp < opts.percdamp {
            continue;
        }
        let mut damped = h.clone();
        for i in 0..n {
            damped[i * n + i] += percdamp * mean_diag;
        }
        if let Some(u) = inverse_upper_cholesky(&damped, n) {
            found = Some((u, percdamp));
            break;
        }
    }
    let Some((u, percdamp)) = found else {
        candle_core::bail!(
            "GPTQ: the Hessian of a {out_features}x{n} layer is not positive definite even with \
             dampening {}; use more or longer calibration samples",
            DAMP_RETRIES[DAMP_RETRIES.len() - 1]
        );
    };
    let u: Vec<f32> = u.iter().map(|&v| v as f32).collect();

    let spec = opts.spec;
    let group = spec.group_for(n);
    let n_groups = n.div_ceil(group);
    let grouped = spec.group_size.is_some() && group < n;
    let mut q = vec![0u8; out_features * n];
    let mut scales = vec![0f32; out_features * n_groups];
    let mut zeros = vec![0u8; out_features * n_groups];
    if !grouped {
        // One set of parameters per row, from the whole (dead-zeroed) row.
        for r in 0..out_features {
            let (s, z) = spec.params_of(wp[r * n..(r + 1) * n].iter().copied());
            scales[r * n_groups] = s;
            zeros[r * n_groups] = z;
        }
    }

    let block = opts.block_size.max(1);
    let mut loss = 0.0f64;
    for i1 in (0..n).step_by(block) {
        let i2 = (i1 + block).min(n);
        loss += wp
            .par_chunks_mut(n)
            .zip(q.par_chunks_mut(n))
            .zip(
                scales
                    .par_chunks_mut(n_groups)
                    .zip(zeros.par_chunks_mut(n_groups)),
            )
            .map(|((row, qrow), (srow, zrow))| {
                let mut err = vec![0f32; i2 - i1];
                let mut row_loss = 0.0f64;
                for i in i1..i2 {
                    if grouped && i % group == 0 {
                        let end = (i + group).min(n);
                        let (s, z) = spec.params_of(row[i..end].iter().copied());
                        srow[i / group] = s;
                        zrow[i / group] = z;
                    }
                    let (s, z) = (srow[i / group], zrow[i / group]);
                    let code = spec.code(row[i], s, z);
                    qrow[i] = code;
                    let dq = s * (f32::from(code) - f32::from(z));
                    let d = u[i * n + i];
                    let e = (row[i] - dq) / d;
                    row_loss += f64::from(e) * f64::from(e) / 2.0;
                    let urow = &u[i * n..(i + 1) * n];
                    for j in i + 1..i2 {
                        row[j] -= e * urow[j];
                    }
                    err[i - i1] = e;
                }
                // The block's error reaches every later column at once.
                for (k, &e) in err.iter().enumerate() {
                    let urow = &u[(i1 + k) * n..(i1 + k + 1) * n];
                    for (x, &uv) in row[i2..].iter_mut().zip(&urow[i2..]) {
                        *x -= e * uv;
                    }
                }
                row_loss
            })
            .sum::<f64>();
    }

    // Back to the natural order of the inputs; groups formed in act-order keep their ids
    // through `g_idx`.
    let mut q_nat = vec![0u8; out_features * n];
    for r in 0..out_features {
        for (j, &i) in perm.iter().enumerate() {
            q_nat[r * n + i] = q[r * n + j];
        }
    }
    let g_idx = (opts.act_order && grouped).then(|| {
        let mut g = vec![0u32; n];
        for (j, &i) in perm.iter().enumerate() {
            g[i] = (j / group) as u32;
        }
        g
    });
    Ok(GptqResult {
        matrix: QuantizedMatrix {
            bits: spec.bits,
            group_size: group,
            out_features,
            in_features: n,
            q: q_nat,
            scales,
            zeros,
            g_idx,
        },
        loss,
        percdamp,
    })
}

/// Round-to-nearest of `w` (`[out, in]`) per group: the baseline every method is measured
/// against.
pub fn rtn_quantize(
    w: &[f32],
    out_features: usize,
    in_features: usize,
    spec: &QuantSpec,
) -> QuantizedMatrix {
    let n = in_features;
    let group = spec.group_for(n);
    let n_groups = n.div_ceil(group);
    let mut q = vec![0u8; out_features * n];
    let mut scales = vec![0f32; out_features * n_groups];
    let mut zeros = vec![0u8; out_features * n_groups];
    q.par_chunks_mut(n)
        .zip(
            scales
                .par_chunks_mut(n_groups)
                .zip(zeros.par_chunks_mut(n_groups)),
        )
        .enumerate()
        .for_each(|(r, (qrow, (srow, zrow)))| {
            let row = &w[r * n..(r + 1) * n];
            for (g, (xs, qs)) in row.chunks(group).zip(qrow.chunks_mut(group)).enumerate() {
                let (s, z) = spec.params_of(xs.iter().copied());
                srow[g] = s;
                zrow[g] = z;
                for (c, &x) in qs.iter_mut().zip(xs) {
                    *c = spec.code(x, s, z);
                }
            }
        });
    QuantizedMatrix {
        bits: spec.bits,
        group_size: group,
        out_features,
        in_features: n,
        q,
        scales,
        zeros,
        g_idx: None,
    }
}

/// `U` with `Uᵀ·U = A⁻¹` (row-major, upper triangular), through `A = L·Lᵀ`; `None` when `A` is
/// not numerically positive definite.
fn inverse_upper_cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let l = cholesky(a, n)?;
    // M = L⁻ᵀ (upper), built row by row: M[j][k] = (L⁻¹)[k][j].
    let mut m = vec![0f64; n * n];
    for j in 0..n {
        m[j * n + j] = 1.0 / l[j * n + j];
    }
    // Column j of L⁻¹ by forward substitution, written as row j of M.
    m.par_chunks_mut(n).enumerate().for_each(|(j, mrow)| {
        for k in j + 1..n {
            let lrow = &l[k * n..k * n + k];
            let s = dot(&lrow[j..k], &mrow[j..k]);
            mrow[k] = -s / l[k * n + k];
        }
    });
    // A⁻¹ = L⁻ᵀ·L⁻¹ = M·Mᵀ.
    let mut inv = vec![0f64; n * n];
    inv.par_chunks_mut(n).enumerate().for_each(|(a_row, out)| {
        let ma = &m[a_row * n..(a_row + 1) * n];
        for (b, o) in out.iter_mut().enumerate() {
            let start = a_row.max(b);
            *o = dot(&ma[start..], &m[b * n + start..(b + 1) * n]);
        }
    });
    let l2 = cholesky(&inv, n)?;
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = l2[i * n + j];
        }
    }
    Some(u)
}

/// Lower Cholesky factor of a symmetric `n × n` matrix.
fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for j in 0..n {
        let (done, rest) = l.split_at_mut((j + 1) * n);
        let row_j = &mut done[j * n..(j + 1) * n];
        let d = a[j * n + j] - dot(&row_j[..j], &row_j[..j]);
        if !(d > 0.0 && d.is_finite()) {
            return None;
        }
        let d = d.sqrt();
        row_j[j] = d;
        let row_j = &done[j * n..(j + 1) * n];
        rest.par_chunks_mut(n).enumerate().for_each(|(k, row_i)| {
            let i = j + 1 + k;
            row_i[j] = (a[i * n + j] - dot(&row_i[..j], &row_j[..j])) / d;
        });
    }
    Some(l)
}

/// A dot product with four independent accumulators (so it vectorizes).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let chunks = a.len() / 4;
    for c in 0..chunks {
        for lane in 0..4 {
            acc[lane] += a[4 * c + lane] * b[4 * c + lane];
        }
    }
    let mut s = acc[0] + acc[1] + acc[2] + acc[3];
    for i in 4 * chunks..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn inverse_upper_cholesky_inverts() {
        let n = 5;
        // A = B·Bᵀ + I, positive definite.
        let b: Vec<f64> = (0..n * n)
            .map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let u = inverse_upper_cholesky(&a, n).expect("positive definite");
        // Uᵀ·U·A = I.
        for i in 0..n {
            for j in 0..n {
                let uu: Vec<f64> = (0..n)
                    .map(|k| (0..n).map(|m| u[m * n + i] * u[m * n + k]).sum())
                    .collect();
                let v: f64 = (0..n).map(|k| uu[k] * a[k * n + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-9, "({i},{j}): {v}");
            }
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0, "upper triangular");
            }
        }
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_none(), "indefinite");
    }

    /// `‖(W − Q)·X‖²` over the calibration rows.
    fn output_error(w: &[f32], m: &QuantizedMatrix, x: &Tensor) -> f64 {
        let (o, i) = (m.out_features, m.in_features);
        let w = Tensor::from_vec(w.to_vec(), (o, i), &Device::Cpu).unwrap();
        let q = Tensor::from_vec(m.dequantize(), (o, i), &Device::Cpu).unwrap();
        let d = x.matmul(&(w - q).unwrap().t().unwrap()).unwrap();
        d.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .into()
    }

    #[allow(clippy::unwrap_used)]
    fn correlated_inputs(rows: usize, dim: usize) -> Tensor {
        // Few latent factors and uneven channel scales: the structure real activations have,
        // and the one GPTQ exploits.
        let dev = Device::Cpu;
        let z = Tensor::randn(0f32, 1.0, (rows, 8), &dev).unwrap();
        let mix = Tensor::randn(0f32, 1.0, (8, dim), &dev).unwrap();
        let scale: Vec<f32> = (0..dim).map(|i| 0.2 + (i % 7) as f32).collect();
        let scale = Tensor::from_vec(scale, dim, &dev).unwrap();
        let noise = Tensor::randn(0f32, 0.1, (rows, dim), &dev).unwrap();
        (z.matmul(&mix).unwrap() + noise)
            .unwrap()
            .broadcast_mul(&scale)
            .unwrap()
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn gptq_beats_round_to_nearest_on_the_layer_output() {
        let (out, dim) = (48, 128);
        let x = correlated_inputs(512, dim);
        let w: Vec<f32> = Tensor::randn(0f32, 0.05, (out, dim), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut h = Hessian::new(dim);
        h.add_batch(&x.narrow(0, 0, 200).unwrap()).unwrap();
        h.add_batch(&x.narrow(0, 200, 312).unwrap()).unwrap();
        assert_eq!(h.samples(), 512);
        for (bits, group, act_order) in [
            (4, Some(32), false),
            (4, Some(32), true),
            (4, None, false),
            (8, Some(64), true),
        ] {
            let spec = QuantSpec {
                bits,
                group_size: group,
                sym: false,
            };
            let rtn = rtn_quantize(&w, out, dim, &spec);
            let opts = GptqOptions {
                act_order,
                ..GptqOptions::new(spec)
            };
            let g = gptq_quantize(&w, out, dim, &h, &opts).unwrap();
            g.matrix.validate().unwrap();
            assert_eq!(g.matrix.g_idx.is_some(), act_order && group.is_some());
            let (e_rtn, e_gptq) = (output_error(&w, &rtn, &x), output_error(&w, &g.matrix, &x));
            assert!(
                e_gptq < 0.8 * e_rtn,
                "{bits} bits, group {group:?}, act-order {act_order}: GPTQ {e_gptq} vs RTN {e_rtn}"
            );
        }
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_singular_hessian_is_dampened_until_it_factorizes() {
        // Two identical input channels and a dead one: H is singular.
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (64, 1), &dev).unwrap();
        let zero = Tensor::zeros((64, 1), DType::F32, &dev).unwrap();
        let x = Tensor::cat(&[&a, &a, &zero, &a], 1).unwrap();
        let mut h = Hessian::new(4);
        h.add_batch(&x).unwrap();
        let w = vec![0.5f32, -0.25, 0.75, 0.1, 0.2, 0.3, -0.4, 0.9];
        let spec = QuantSpec {
            bits: 4,
            group_size: None,
            sym: true,
        };
        let opts = GptqOptions {
            percdamp: 0.0,
            ..GptqOptions::new(spec)
        };
        let g = gptq_quantize(&w, 2, 4, &h, &opts).unwrap();
        assert!(g.percdamp > 0.0, "the undamped factorization had to fail");
        // The dead input's weights quantize to exact zeros.
        let dq = g.matrix.dequantize();
        assert_eq!((dq[2], dq[6]), (0.0, 0.0));
    }
}
