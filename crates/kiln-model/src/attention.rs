//! Fused causal self-attention for training and cache-free forward passes: rotary embedding,
//! scaled scores, the causal (optionally sliding-window) mask, softmax and the value product in
//! one op, with a backward pass that recomputes the probabilities instead of storing them.
//!
//! Composed from candle ops, attention is a dozen graph nodes over `[batch, heads, seq, seq]`
//! tensors, each of which candle's backward pass zero-fills and accumulates again; that, not the
//! matmuls, dominated a training step. This op reads Q, K and V where the projections wrote them
//! (`[tokens, heads · head_dim]`, no transposes), works head by head in cache-sized buffers, and
//! is one node in the graph. Per head, with `S = scale · QᵣKᵣᵀ`, `P = softmax(mask(S))`,
//! `O = P·V`, the backward pass is
//!
//! - `∂V = Pᵀ·∂O`, `∂P = ∂O·Vᵀ`, `∂S = P ⊙ (∂P − rowsum(∂P ⊙ P))`,
//! - `∂Qᵣ = scale · ∂S·Kᵣ`, `∂Kᵣ = scale · ∂Sᵀ·Qᵣ`,
//! - and the rotary embedding's transpose (a rotation by the opposite angle) maps `∂Qᵣ`, `∂Kᵣ`
//!   back to `∂Q`, `∂K`.
//!
//! Query heads that share a KV head (grouped-query attention) are one work item, so the KV
//! gradients of a group are summed without contention. Tests check the op against the composed
//! candle path and against finite differences.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::gemm::{MatMut, MatRef, matmul};
use crate::ops::{contiguous_f32, exp_sum_in_place, max_of, with_cpu_f32};
use crate::rope::RopeTables;

/// Rows per block of the causal products: small enough to skip most of the masked triangle,
/// large enough for the GEMM to run at speed.
const BLOCK: usize = 64;

/// Shapes and tables of one fused attention call; Q is `[batch · seq, heads · head_dim]` (or
/// `[batch, seq, heads · head_dim]`), K and V `[batch · seq, kv_heads · head_dim]`.
#[derive(Debug, Clone)]
pub struct CausalSelfAttention {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Each position sees at most this many positions, itself included (Mistral's window).
    window: Option<usize>,
    /// `cos` and `sin` of the rotary angles, `[seq, head_dim / 2]`.
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
}

impl CausalSelfAttention {
    pub fn new(
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
        rope: &RopeTables,
    ) -> Result<Self> {
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || !head_dim.is_multiple_of(2) {
            candle_core::bail!(
                "fused attention: {heads} query heads over {kv_heads} KV heads of dim {head_dim}"
            );
        }
        let (cos, sin) = rope.to_f32_vecs()?;
        if cos.len() != seq * head_dim / 2 {
            candle_core::bail!(
                "fused attention: rotary tables hold {} angles, expected {seq} positions x {}",
                cos.len(),
                head_dim / 2
            );
        }
        Ok(Self {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            window,
            cos: cos.into(),
            sin: sin.into(),
        })
    }

    /// Attention output `[.., heads · head_dim]`, shaped like `q`.
    pub fn apply(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, self.clone())
    }

    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Positions `lo..=i` that row `i` attends to.
    fn visible_from(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }

    /// Rotates the rows of one head (`seq` rows, `row_stride` apart from `offset`) into `dst`.
    fn rope_rows(&self, src: &[f32], offset: usize, row_stride: usize, dst: &mut [f32]) {
        let (d, half) = (self.head_dim, self.head_dim / 2);
        for (t, out) in dst.chunks_exact_mut(d).enumerate() {
            let x = &src[offset + t * row_stride..offset + t * row_stride + d];
            let (cos, sin) = (&self.cos[t * half..][..half], &self.sin[t * half..][..half]);
            let (o1, o2) = out.split_at_mut(half);
            for i in 0..half {
                o1[i] = x[i] * cos[i] - x[i + half] * sin[i];
                o2[i] = x[i + half] * cos[i] + x[i] * sin[i];
            }
        }
    }

    /// The transpose of `rope_rows`, in place: rotates each row by the opposite angle. `rows`
    /// holds one or more heads of `seq` rows each.
    fn unrope_rows(&self, rows: &mut [f32]) {
        let (d, half) = (self.head_dim, self.head_dim / 2);
        for (i, row) in rows.chunks_exact_mut(d).enumerate() {
            let t = i % self.seq;
            let (cos, sin) = (&self.cos[t * half..][..half], &self.sin[t * half..][..half]);
            let (g1, g2) = row.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (g1[i], g2[i]);
                g1[i] = a * cos[i] + b * sin[i];
                g2[i] = b * cos[i] - a * sin[i];
            }
        }
    }

    /// The causal structure in blocks of `BLOCK` rows: for the queries `rows`, the keys they
    /// see lie in `keys`. Products are formed block by block over these ranges only, which
    /// skips the masked upper triangle (and, with a window, what lies before it).
    fn query_blocks(&self) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + '_ {
        (0..self.seq).step_by(BLOCK).map(move |r0| {
            let r1 = (r0 + BLOCK).min(self.seq);
            (r0..r1, self.visible_from(r0)..r1)
        })
    }

    /// For the keys `keys` (a block of `BLOCK`), the queries that see any of them.
    fn key_blocks(&self) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + '_ {
        (0..self.seq).step_by(BLOCK).map(move |c0| {
            let c1 = (c0 + BLOCK).min(self.seq);
            let last = self.window.map_or(self.seq, |w| (c1 - 1 + w).min(self.seq));
            (c0..c1, c0..last)
        })
    }

    /// `P = softmax(mask(scale · QᵣKᵣᵀ))` into `p` (`[seq, seq]`), masked entries exactly zero.
    fn probabilities(&self, qr: &[f32], kr: &[f32], p: &mut [f32]) -> Result<()> {
        let (t, d) = (self.seq, self.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        for (rows, keys) in self.query_blocks() {
            matmul(
                &mut MatMut::new(p, rows.start * t + keys.start, rows.len(), keys.len(), t)?,
                MatRef::new(qr, rows.start * d, rows.len(), d, d)?,
                MatRef::new(kr, keys.start * d, keys.len(), d, d)?.t(),
                scale,
                false,
            )?;
        }
        for (i, row) in p.chunks_exact_mut(t).enumerate() {
            let lo = self.visible_from(i);
            let seen = &mut row[lo..=i];
            let max = max_of(seen);
            for x in seen.iter_mut() {
                *x -= max;
            }
            let inv = 1.0 / exp_sum_in_place(seen);
            seen.iter_mut().for_each(|x| *x *= inv);
            row[..lo].fill(0.0);
            row[i + 1..].fill(0.0);
        }
        Ok(())
    }

    /// `dst[rows] (+)= beta · P[rows, keys] · src[keys]` for each query block: a product with the
    /// attention matrix (or `∂S`) on the left, over the visible keys only.
    #[allow(clippy::too_many_arguments)]
    fn causal_left(
        &self,
        dst: &mut [f32],
        dst_offset: usize,
        p: &[f32],
        src: &[f32],
        src_offset: usize,
        src_stride: usize,
        beta: f32,
    ) -> Result<()> {
        let (t, d) = (self.seq, self.head_dim);
        for (rows, keys) in self.query_blocks() {
            matmul(
                &mut MatMut::new(dst, dst_offset + rows.start * d, rows.len(), d, d)?,
                MatRef::new(p, rows.start * t + keys.start, rows.len(), keys.len(), t)?,
                MatRef::new(
                    src,
                    src_offset + keys.start * src_stride,
                    keys.len(),
                    d,
                    src_stride,
                )?,
                beta,
                false,
            )?;
        }
        Ok(())
    }

    /// `dst[keys] += beta · P[queries, keys]ᵀ · src[queries]` for each key block: a product with
    /// the transposed attention matrix (or `∂S`), over the queries that see each key.
    fn causal_left_t(
        &self,
        dst: &mut [f32],
        p: &[f32],
        src: &[f32],
        src_offset: usize,
        src_stride: usize,
        beta: f32,
    ) -> Result<()> {
        let (t, d) = (self.seq, self.head_dim);
        for (keys, queries) in self.key_blocks() {
            matmul(
                &mut MatMut::new(dst, keys.start * d, keys.len(), d, d)?,
                MatRef::new(
                    p,
                    queries.start * t + keys.start,
                    queries.len(),
                    keys.len(),
                    t,
                )?
                .t(),
                MatRef::new(
                    src,
                    src_offset + queries.start * src_stride,
                    queries.len(),
                    d,
                    src_stride,
                )?,
                beta,
                true,
            )?;
        }
        Ok(())
    }

    /// Output of the `rep` query heads of KV group `(b, g)`, `[rep, seq, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn forward_group(
        &self,
        scratch: &mut Scratch,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        b: usize,
        g: usize,
        mut saved: Option<&mut [f32]>,
    ) -> Result<Vec<f32>> {
        let (t, d, nh, nkv, rep) = (
            self.seq,
            self.head_dim,
            self.heads,
            self.kv_heads,
            self.rep(),
        );
        let (q_row, kv_row) = (nh * d, nkv * d);
        let kv_offset = b * t * kv_row + g * d;
        let Scratch { kr, qr, p, .. } = scratch;
        self.rope_rows(k, kv_offset, kv_row, kr);
        let mut out = vec![0f32; rep * t * d];
        for r in 0..rep {
            let h = g * rep + r;
            self.rope_rows(q, b * t * q_row + h * d, q_row, qr);
            let p: &mut [f32] = match saved.as_deref_mut() {
                Some(all) => &mut all[r * t * t..(r + 1) * t * t],
                None => p,
            };
            self.probabilities(qr, kr, p)?;
            self.causal_left(&mut out, r * t * d, p, v, kv_offset, kv_row, 1.0)?;
        }
        Ok(out)
    }

    /// Gradients of KV group `(b, g)`: `∂Q` of its query heads `[rep, seq, head_dim]`, and `∂K`,
    /// `∂V` `[seq, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn backward_group(
        &self,
        scratch: &mut Scratch,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        b: usize,
        g: usize,
        saved: Option<&[f32]>,
    ) -> Result<GroupGrads> {
        let (t, d, nh, nkv, rep) = (
            self.seq,
            self.head_dim,
            self.heads,
            self.kv_heads,
            self.rep(),
        );
        let (q_row, kv_row) = (nh * d, nkv * d);
        let kv_offset = b * t * kv_row + g * d;
        let scale = 1.0 / (d as f32).sqrt();
        let Scratch { kr, qr, p, dp } = scratch;
        self.rope_rows(k, kv_offset, kv_row, kr);
        let mut dq = vec![0f32; rep * t * d];
        let mut dk = vec![0f32; t * d];
        let mut dv = vec![0f32; t * d];
        for r in 0..rep {
            let h = g * rep + r;
            let q_offset = b * t * q_row + h * d;
            self.rope_rows(q, q_offset, q_row, qr);
            let p: &[f32] = match saved {
                Some(all) => &all[r * t * t..(r + 1) * t * t],
                None => {
                    self.probabilities(qr, kr, p)?;
                    p
                }
            };
            // ∂V += Pᵀ·∂O
            self.causal_left_t(&mut dv, p, dout, q_offset, q_row, 1.0)?;
            // ∂P = ∂O·Vᵀ on the visible blocks, then ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)).
            for (rows, keys) in self.query_blocks() {
                matmul(
                    &mut MatMut::new(dp, rows.start * t + keys.start, rows.len(), keys.len(), t)?,
                    MatRef::new(dout, q_offset + rows.start * q_row, rows.len(), d, q_row)?,
                    MatRef::new(v, kv_offset + keys.start * kv_row, keys.len(), d, kv_row)?.t(),
                    1.0,
                    false,
                )?;
            }
            for (i, (dp_row, p_row)) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
                let lo = self.visible_from(i);
                let (seen, probs) = (&mut dp_row[lo..=i], &p_row[lo..=i]);
                let dot: f32 = seen.iter().zip(probs).map(|(a, b)| a * b).sum();
                for (x, &pv) in seen.iter_mut().zip(probs) {
                    *x = pv * (*x - dot);
                }
                dp_row[..lo].fill(0.0);
                dp_row[i + 1..].fill(0.0);
            }
            // ∂Qᵣ = scale · ∂S·Kᵣ, ∂Kᵣ += scale · ∂Sᵀ·Qᵣ
            self.causal_left(&mut dq, r * t * d, dp, kr, 0, d, scale)?;
            self.causal_left_t(&mut dk, dp, qr, 0, d, scale)?;
        }
        self.unrope_rows(&mut dq);
        self.unrope_rows(&mut dk);
        Ok(GroupGrads { dq, dk, dv })
    }

    fn check_sizes(&self, q: usize, k: usize, v: usize) -> Result<()> {
        let tokens = self.batch * self.seq;
        let want_q = tokens * self.heads * self.head_dim;
        let want_kv = tokens * self.kv_heads * self.head_dim;
        if q != want_q || k != want_kv || v != want_kv {
            candle_core::bail!(
                "fused attention over {} x {} tokens: Q, K, V hold {q}, {k}, {v} values, \
                 expected {want_q}, {want_kv}, {want_kv}",
                self.batch,
                self.seq
            );
        }
        Ok(())
    }

    /// Copies per-group results (`[rows, seq, head_dim]` each, in `(batch, group)` order) into a
    /// `[batch · seq, groups · rows · head_dim]` tensor buffer.
    fn scatter(&self, groups: &[&[f32]], rows: usize, n_groups: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.batch * self.seq * n_groups * rows * self.head_dim];
        self.scatter_into(groups, rows, n_groups, &mut out);
        out
    }

    /// [`Self::scatter`] into `out` (of that size), every value of which it overwrites.
    fn scatter_into(&self, groups: &[&[f32]], rows: usize, n_groups: usize, out: &mut [f32]) {
        let (t, d) = (self.seq, self.head_dim);
        let width = n_groups * rows * d;
        out.par_chunks_mut(t * width)
            .enumerate()
            .for_each(|(b, batch_out)| {
                for (g, src) in groups[b * n_groups..(b + 1) * n_groups].iter().enumerate() {
                    for r in 0..rows {
                        for s in 0..t {
                            let from = &src[(r * t + s) * d..][..d];
                            batch_out[s * width + (g * rows + r) * d..][..d].copy_from_slice(from);
                        }
                    }
                }
            });
    }
}

/// Per-thread buffers of the head loops, reused across the groups a thread takes.
struct Scratch {
    /// Rotated keys and queries of one head, `[seq, head_dim]`.
    kr: Vec<f32>,
    qr: Vec<f32>,
    /// Probabilities and their gradient, `[seq, seq]`.
    p: Vec<f32>,
    dp: Vec<f32>,
}

impl Scratch {
    fn new(seq: usize, head_dim: usize, backward: bool) -> Self {
        Self {
            kr: vec![0f32; seq * head_dim],
            qr: vec![0f32; seq * head_dim],
            p: vec![0f32; seq * seq],
            dp: if backward {
                vec![0f32; seq * seq]
            } else {
                Vec::new()
            },
        }
    }
}

struct GroupGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl CausalSelfAttention {
    /// Values in the attention probabilities of one call (`[batch, heads, seq, seq]`).
    pub(crate) fn probs_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }

    /// The forward pass over Q, K, V in the projections' layout: the output, shaped like Q,
    /// written over `out` (of Q's size; its contents are irrelevant, so a caller may pass a
    /// reused buffer). With `probs` (of [`Self::probs_len`] values, contents irrelevant) the
    /// probabilities are written there for [`Self::backward_f32`], which then need not
    /// recompute them.
    pub(crate) fn forward_f32(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        probs: Option<&mut [f32]>,
        out: &mut [f32],
    ) -> Result<()> {
        self.check_sizes(q.len(), k.len(), v.len())?;
        if out.len() != q.len() {
            candle_core::bail!(
                "fused attention: output buffer of {} for {}",
                out.len(),
                q.len()
            );
        }
        let scratch = || Scratch::new(self.seq, self.head_dim, false);
        let nkv = self.kv_heads;
        let groups: Vec<Vec<f32>> = match probs {
            Some(probs) => {
                if probs.len() != self.probs_len() {
                    candle_core::bail!("fused attention: probability buffer of {}", probs.len());
                }
                probs
                    .par_chunks_mut(self.rep() * self.seq * self.seq)
                    .enumerate()
                    .map_init(scratch, |s, (i, p)| {
                        self.forward_group(s, q, k, v, i / nkv, i % nkv, Some(p))
                    })
                    .collect::<Result<_>>()?
            }
            None => (0..self.batch * nkv)
                .into_par_iter()
                .map_init(scratch, |s, i| {
                    self.forward_group(s, q, k, v, i / nkv, i % nkv, None)
                })
                .collect::<Result<_>>()?,
        };
        let refs: Vec<&[f32]> = groups.iter().map(Vec::as_slice).collect();
        self.scatter_into(&refs, self.rep(), self.kv_heads, out);
        Ok(())
    }

    /// The backward pass for the output gradient `dout`: `∂Q`, `∂K`, `∂V`; `probs` are those
    /// the forward pass saved, if it did.
    pub(crate) fn backward_f32(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        probs: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        self.check_sizes(q.len(), k.len(), v.len())?;
        if probs.is_some_and(|p| p.len() != self.probs_len()) {
            candle_core::bail!("fused attention: saved probabilities of the wrong size");
        }
        let per_group = self.rep() * self.seq * self.seq;
        let grads: Vec<GroupGrads> = (0..self.batch * self.kv_heads)
            .into_par_iter()
            .map_init(
                || Scratch::new(self.seq, self.head_dim, true),
                |scratch, i| {
                    let (b, g) = (i / self.kv_heads, i % self.kv_heads);
                    let saved = probs.map(|p| &p[i * per_group..(i + 1) * per_group]);
                    self.backward_group(scratch, q, k, v, dout, b, g, saved)
                },
            )
            .collect::<Result<_>>()?;
        let pick = |f: fn(&GroupGrads) -> &[f32]| grads.iter().map(f).collect::<Vec<_>>();
        Ok((
            self.scatter(&pick(|g| &g.dq), self.rep(), self.kv_heads),
            self.scatter(&pick(|g| &g.dk), 1, self.kv_heads),
            self.scatter(&pick(|g| &g.dv), 1, self.kv_heads),
        ))
    }
}

impl CustomOp3 for CausalSelfAttention {
    fn name(&self) -> &'static str {
        "kiln-causal-self-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(s1, l1, "fused attention: Q")?;
        let k = contiguous_f32(s2, l2, "fused attention: K")?;
        let v = contiguous_f32(s3, l3, "fused attention: V")?;
        let mut out = vec![0f32; q.len()];
        self.forward_f32(q, k, v, None, &mut out)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = with_cpu_f32(q, "Q", |q| {
            with_cpu_f32(k, "K", |k| {
                with_cpu_f32(v, "V", |v| {
                    with_cpu_f32(grad_res, "the output gradient", |dout| {
                        self.backward_f32(q, k, v, dout, None)
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Whether the fused op can serve tensors of this dtype on this device.
pub fn supported(dtype: DType, device: &candle_core::Device) -> bool {
    dtype == DType::F32 && device.is_cpu()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rope::RotaryEmbedding;
    use crate::test_util::{assert_matches_finite_differences, max_diff, weighted_sum};
    use candle_core::{Device, Var};
    use kiln_core::{RopeConfig, RopeScaling};

    struct Case {
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
    }

    /// The same attention from differentiable candle ops, as the model composes it.
    fn composed(c: &Case, rope: &RopeTables, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, s, d) = (c.batch, c.seq, c.head_dim);
        let heads = |x: &Tensor, n: usize| x.reshape((b, s, n, d))?.transpose(1, 2)?.contiguous();
        let rep = c.heads / c.kv_heads;
        let repeat = |x: Tensor| -> Result<Tensor> {
            let x = x.unsqueeze(2)?.repeat((1, 1, rep, 1, 1))?;
            x.reshape((b, c.heads, s, d))
        };
        let q = rope.apply(&heads(q, c.heads)?)?;
        let k = repeat(rope.apply(&heads(k, c.kv_heads)?)?)?;
        let v = repeat(heads(v, c.kv_heads)?)?;
        let mask: Vec<f32> = (0..s)
            .flat_map(|i| {
                (0..s).map(move |j| {
                    let visible = j <= i && c.window.is_none_or(|w| i - j < w);
                    if visible { 0.0 } else { f32::NEG_INFINITY }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (s, s), q.device())?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
        let probs = crate::ops::softmax_last_dim(&scores)?;
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b * s, c.heads * d))
    }

    fn check(c: Case) -> Result<()> {
        let dev = Device::Cpu;
        let rope_cfg = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None,
        };
        let rope =
            RotaryEmbedding::new(&rope_cfg, c.head_dim, &dev)?.tables(0, c.seq, DType::F32)?;
        let tokens = c.batch * c.seq;
        let var =
            |n: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (tokens, n * c.head_dim), &dev)?);
        let (q, k, v) = (var(c.heads)?, var(c.kv_heads)?, var(c.kv_heads)?);
        let op = CausalSelfAttention::new(
            c.batch, c.seq, c.heads, c.kv_heads, c.head_dim, c.window, &rope,
        )?;
        let fused = op.apply(q.as_tensor(), k.as_tensor(), v.as_tensor())?;
        let reference = composed(&c, &rope, q.as_tensor(), k.as_tensor(), v.as_tensor())?;
        assert!(
            max_diff(&fused, &reference) < 1e-5,
            "forward {}",
            max_diff(&fused, &reference)
        );

        let w = Tensor::randn(0f32, 1.0, fused.shape(), &dev)?;
        let gf = (&fused * &w)?.sum_all()?.backward()?;
        let gc = (&reference * &w)?.sum_all()?.backward()?;
        for (name, x) in [("Q", &q), ("K", &k), ("V", &v)] {
            let (a, b) = (
                gf.get(x).expect("fused grad"),
                gc.get(x).expect("composed grad"),
            );
            assert!(
                max_diff(a, b) < 1e-4,
                "∂{name} differs by {}",
                max_diff(a, b)
            );
        }

        assert_matches_finite_differences(&[&q, &k, &v], &gf, |x| {
            weighted_sum(&op.apply(&x[0], &x[1], &x[2])?, &w)
        })?;
        Ok(())
    }

    #[test]
    fn matches_composed_attention_and_finite_differences() -> Result<()> {
        check(Case {
            batch: 2,
            seq: 7,
            heads: 2,
            kv_heads: 2,
            head_dim: 8,
            window: None,
        })
    }

    #[test]
    fn grouped_query_heads_share_kv_gradients() -> Result<()> {
        check(Case {
            batch: 2,
            seq: 6,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            window: None,
        })
    }

    #[test]
    fn sliding_window_masks_like_mistral() -> Result<()> {
        check(Case {
            batch: 1,
            seq: 9,
            heads: 2,
            kv_heads: 1,
            head_dim: 6,
            window: Some(3),
        })
    }

    #[test]
    fn blocks_of_a_long_sequence_cover_every_visible_key() -> Result<()> {
        let long = |window| Case {
            batch: 1,
            seq: 2 * BLOCK + 22,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            window,
        };
        check(long(None))?;
        check(long(Some(BLOCK + 5)))
    }

    #[test]
    fn mismatched_inputs_are_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let rope_cfg = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None,
        };
        let rope = RotaryEmbedding::new(&rope_cfg, 4, &dev)?.tables(0, 3, DType::F32)?;
        let op = CausalSelfAttention::new(1, 3, 2, 2, 4, None, &rope)?;
        let q = Tensor::zeros((3, 8), DType::F32, &dev)?;
        let short = Tensor::zeros((3, 4), DType::F32, &dev)?;
        let err = op.apply(&q, &short, &short).unwrap_err();
        assert!(err.to_string().contains("expected 24, 24, 24"), "{err}");
        Ok(())
    }
}
