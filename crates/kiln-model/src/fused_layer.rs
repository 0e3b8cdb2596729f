//! A whole pre-norm decoder layer as one differentiable op, for training dense f32 models on
//! the CPU.
//!
//! candle's backward pass zero-fills a fresh gradient for every input of every graph node and
//! adds the incoming one to it. For the two dozen nodes of a composed layer that is about four
//! passes over 45 MB of activations per layer and step, which cost more than the layer's
//! matmuls' own backward. As one node, the layer costs candle a single such pass (over its
//! input); inside it, activations are saved once in the forward pass and every gradient is
//! written exactly once, with the same kernels as the separate fused ops (RMSNorm, attention,
//! SwiGLU) and the GEMM behind candle's matmul.
//!
//! Weight gradients do not travel through candle's graph (a custom op has at most three
//! inputs): the op hands them to the model's [`FusedState`], and [`crate::CausalLm::backward`]
//! moves them into the `GradStore`. The first-step zero-gradient guard of the trainer catches
//! any path that would forget to.

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor};

use crate::attention::CausalSelfAttention;
use crate::gemm::{MatMut, MatRef, matmul_threaded};
use crate::ops::{
    contiguous_f32, rms_norm_backward_rows, rms_norm_rows, swiglu_backward_slices, swiglu_slices,
    with_cpu_f32,
};

/// What fused layers share across calls: the weight gradients they computed, waiting to join
/// the `GradStore` of the backward pass that produced them, and a pool of activation buffers
/// reused from step to step (as PyTorch's caching allocator does), so no step zero-fills
/// memory it is about to overwrite.
#[derive(Debug, Clone, Default)]
pub struct FusedState {
    grads: Arc<Mutex<Vec<(Tensor, Tensor)>>>,
    pool: Arc<Mutex<Vec<Vec<f32>>>>,
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("fused layer state poisoned".into())
}

impl FusedState {
    fn push_grad(&self, weight: &Tensor, grad: Tensor) -> Result<()> {
        self.grads
            .lock()
            .map_err(|_| poisoned())?
            .push((weight.clone(), grad));
        Ok(())
    }

    /// Drops pending gradients: left only by a backward pass that went around
    /// [`crate::CausalLm::backward`], they must not leak into the next one.
    pub(crate) fn discard_pending(&self) -> Result<()> {
        self.grads.lock().map_err(|_| poisoned())?.clear();
        Ok(())
    }

    /// Adds every pending gradient to `grads` (summing with one already there) and empties
    /// the sink.
    pub fn drain_into(&self, grads: &mut GradStore) -> Result<()> {
        let pending = std::mem::take(&mut *self.grads.lock().map_err(|_| poisoned())?);
        for (weight, grad) in pending {
            let total = match grads.remove(&weight) {
                Some(prev) => (prev + grad)?,
                None => grad,
            };
            grads.insert(&weight, total);
        }
        Ok(())
    }

    /// A buffer of exactly `len` values whose contents are unspecified (left from an earlier
    /// use): every caller overwrites all of it.
    ///
    /// Sequence lengths change from batch to batch, so a pooled buffer is reused whatever its
    /// size: the smallest that holds `len`, or else the largest, grown. Every call thus takes a
    /// pooled buffer when there is one, and the pool never holds more buffers than were once in
    /// use together (matching sizes exactly instead let a new buffer join the pool at every new
    /// length: memory grew step after step).
    fn take(&self, len: usize) -> Vec<f32> {
        let reused = self.pool.lock().ok().and_then(|mut pool| {
            let fits = pool
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity());
            let i = fits
                .or_else(|| pool.iter().enumerate().max_by_key(|(_, b)| b.capacity()))?
                .0;
            Some(pool.swap_remove(i))
        });
        match reused {
            // Shrinking keeps the old values; growing fills only the new tail.
            Some(mut buffer) => {
                buffer.resize(len, 0.0);
                buffer
            }
            None => vec![0f32; len],
        }
    }

    /// Returns buffers to the pool. The pool never holds more than the most buffers that were
    /// in use at once, provided every buffer given back was lent by [`FusedState::take`]: one
    /// allocated elsewhere and given here stays in the pool for good, a net gain of one buffer
    /// per call (and memory that grows step after step).
    fn give(&self, buffers: impl IntoIterator<Item = Vec<f32>>) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.extend(buffers);
        }
    }

    /// Buffers in the pool.
    #[cfg(test)]
    pub(crate) fn pooled(&self) -> usize {
        self.pool.lock().map(|p| p.len()).unwrap_or(usize::MAX)
    }
}

/// The weights of one decoder layer, dense `[out, in]` matrices as Hugging Face stores them.
#[derive(Debug, Clone)]
pub(crate) struct LayerWeights {
    pub input_norm: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub post_norm: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    pub eps: f32,
    /// LoRA adapters of q, k, v, o, gate, up and down, in that order.
    pub lora: [Option<FusedLora>; 7],
}

/// A LoRA adapter on one of the layer's linears: `y += scale · (dropout(x)·Aᵀ)·Bᵀ`.
#[derive(Debug, Clone)]
pub(crate) struct FusedLora {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f32,
    pub dropout: f32,
    /// The dropout mask of this pass (see [`crate::ops::dropout_keep_scale`]), when it drops.
    pub mask_seed: Option<u64>,
}

/// The linears of a layer, indices into [`LayerWeights::lora`].
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

impl LayerWeights {
    /// A tensor of the layer that carries a gradient, if any: the second input of the fused op,
    /// so that candle runs its backward pass even when the layer's input needs no gradient (a
    /// LoRA run's first layer, whose input is a frozen embedding).
    fn tracked(&self) -> Option<&Tensor> {
        self.all().into_iter().find(|t| t.track_op()).or_else(|| {
            self.lora
                .iter()
                .flatten()
                .flat_map(|l| [&l.a, &l.b])
                .find(|t| t.track_op())
        })
    }

    fn all(&self) -> [&Tensor; 9] {
        [
            &self.input_norm,
            &self.q,
            &self.k,
            &self.v,
            &self.o,
            &self.post_norm,
            &self.gate,
            &self.up,
            &self.down,
        ]
    }
}

/// Activations the backward pass reads, saved by the forward pass.
struct Saved {
    n1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    h: Vec<f32>,
    n2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    /// Attention probabilities, when small enough to keep.
    probs: Option<Vec<f32>>,
    /// `dropout(x)·Aᵀ` of each adapted linear, `[rows, r]`.
    lora_down: [Option<Vec<f32>>; 7],
}

/// Borrowed f32 views of the layer's weights, in [`LayerWeights::all`] order.
struct Views<'a> {
    input_norm: &'a [f32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    post_norm: &'a [f32],
    gate: &'a [f32],
    up: &'a [f32],
    down: &'a [f32],
}

/// Attention probabilities of up to this many values (64 MiB) per layer are saved by the forward
/// pass; beyond it (long sequences) the backward pass recomputes them.
const SAVED_PROBS_MAX: usize = 16 << 20;

#[derive(Clone)]
pub(crate) struct FusedDecoderLayer {
    weights: LayerWeights,
    attention: CausalSelfAttention,
    hidden: usize,
    q_width: usize,
    kv_width: usize,
    intermediate: usize,
    saved: Arc<Mutex<Option<Saved>>>,
    state: FusedState,
}

/// `[rows, inp] · [out, inp]ᵀ` into `y` (overwritten).
fn linear_into(
    mut y: Vec<f32>,
    x: &[f32],
    w: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
) -> Result<Vec<f32>> {
    matmul_threaded(
        &mut MatMut::new(&mut y, 0, rows, out, out)?,
        MatRef::new(x, 0, rows, inp, inp)?,
        MatRef::new(w, 0, out, inp, inp)?.t(),
        1.0,
        false,
    )?;
    Ok(y)
}

/// `dx (+)= dy · w` for `y = x · wᵀ`.
fn linear_input_grad(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    accumulate: bool,
) -> Result<()> {
    matmul_threaded(
        &mut MatMut::new(dx, 0, rows, inp, inp)?,
        MatRef::new(dy, 0, rows, out, out)?,
        MatRef::new(w, 0, out, inp, inp)?,
        1.0,
        accumulate,
    )
}

/// `∂w = dyᵀ · x` for `y = x · wᵀ`, `[out, inp]`.
fn linear_weight_grad(
    dy: &[f32],
    x: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
) -> Result<Vec<f32>> {
    let mut dw = vec![0f32; out * inp];
    matmul_threaded(
        &mut MatMut::new(&mut dw, 0, out, inp, inp)?,
        MatRef::new(dy, 0, rows, out, out)?.t(),
        MatRef::new(x, 0, rows, inp, inp)?,
        1.0,
        false,
    )?;
    Ok(dw)
}

/// An adapter's A (`[r, in]`) and B (`[out, r]`) as f32 vectors, and `r`. Adapters are small
/// (r·(in + out) values), so a copy per pass costs nothing that shows.
fn lora_matrices(l: &FusedLora) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    let r = l.a.dims2()?.0;
    let flat = |t: &Tensor| {
        t.to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    Ok((flat(&l.a)?, flat(&l.b)?, r))
}

/// `dst += src`, element-wise (the residual connections).
fn add_into(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
}

impl FusedDecoderLayer {
    pub fn new(
        weights: LayerWeights,
        attention: CausalSelfAttention,
        state: FusedState,
    ) -> Result<Self> {
        let hidden = weights.input_norm.elem_count();
        let q_width = weights.q.dims2()?.0;
        let kv_width = weights.k.dims2()?.0;
        let intermediate = weights.gate.dims2()?.0;
        let expected = [
            (&weights.q, (q_width, hidden)),
            (&weights.k, (kv_width, hidden)),
            (&weights.v, (kv_width, hidden)),
            (&weights.o, (hidden, q_width)),
            (&weights.gate, (intermediate, hidden)),
            (&weights.up, (intermediate, hidden)),
            (&weights.down, (hidden, intermediate)),
        ];
        for (w, want) in expected {
            if w.dims2()? != want {
                candle_core::bail!(
                    "fused decoder layer: weight of shape {:?}, expected {want:?}",
                    w.dims()
                );
            }
        }
        if weights.post_norm.elem_count() != hidden {
            candle_core::bail!(
                "fused decoder layer: norms of {hidden} and {}",
                weights.post_norm.elem_count()
            );
        }
        Ok(Self {
            weights,
            attention,
            hidden,
            q_width,
            kv_width,
            intermediate,
            saved: Arc::new(Mutex::new(None)),
            state,
        })
    }

    /// The layer's output for `x` (`[tokens, hidden]`).
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let anchor = self.weights.tracked().cloned().unwrap_or_else(|| x.clone());
        x.apply_op2(&anchor, self)
    }

    /// `dropout(x)` for the adapter's mask of this pass, in a pooled buffer; `None` when it
    /// drops nothing. The backward pass calls it again instead of keeping the forward's copy.
    fn dropped_input(&self, l: &FusedLora, x: &[f32]) -> Option<Vec<f32>> {
        l.mask_seed.map(|seed| {
            let mut xd = self.state.take(x.len());
            crate::ops::dropout_mask_into(seed, l.dropout, &mut xd, |j, m, _| x[j] * m);
            xd
        })
    }

    /// Adds the LoRA update of linear `i` to `y` (`[rows, out]`) for input `x` (`[rows, inp]`)
    /// and returns `dropout(x)·Aᵀ` for the backward pass.
    fn lora_forward(
        &self,
        i: usize,
        x: &[f32],
        y: &mut [f32],
        inp: usize,
        out: usize,
    ) -> Result<Option<Vec<f32>>> {
        let Some(l) = &self.weights.lora[i] else {
            return Ok(None);
        };
        let rows = x.len() / inp;
        let (a, b, r) = lora_matrices(l)?;
        let st = &self.state;
        let dropped = self.dropped_input(l, x);
        let mut down = st.take(rows * r);
        matmul_threaded(
            &mut MatMut::new(&mut down, 0, rows, r, r)?,
            MatRef::new(dropped.as_deref().unwrap_or(x), 0, rows, inp, inp)?,
            MatRef::new(&a, 0, r, inp, inp)?.t(),
            1.0,
            false,
        )?;
        matmul_threaded(
            &mut MatMut::new(y, 0, rows, out, out)?,
            MatRef::new(&down, 0, rows, r, r)?,
            MatRef::new(&b, 0, out, r, r)?.t(),
            l.scale,
            true,
        )?;
        st.give(dropped);
        Ok(Some(down))
    }

    /// The backward pass of linear `i`'s adapter: pushes ∂A and ∂B, and adds the adapter's share
    /// of `∂x` to `dx`.
    fn lora_backward(
        &self,
        i: usize,
        x: &[f32],
        dy: &[f32],
        down: Option<&[f32]>,
        dx: &mut [f32],
        (inp, out): (usize, usize),
    ) -> Result<()> {
        let (Some(l), Some(down)) = (&self.weights.lora[i], down) else {
            return Ok(());
        };
        let rows = x.len() / inp;
        let (a, b, r) = lora_matrices(l)?;
        let st = &self.state;
        if l.b.track_op() {
            let mut db = vec![0f32; out * r];
            matmul_threaded(
                &mut MatMut::new(&mut db, 0, out, r, r)?,
                MatRef::new(dy, 0, rows, out, out)?.t(),
                MatRef::new(down, 0, rows, r, r)?,
                l.scale,
                false,
            )?;
            st.push_grad(&l.b, Tensor::from_vec(db, (out, r), l.b.device())?)?;
        }
        // ∂(x·Aᵀ) = scale · ∂y·B
        let mut ddown = st.take(rows * r);
        matmul_threaded(
            &mut MatMut::new(&mut ddown, 0, rows, r, r)?,
            MatRef::new(dy, 0, rows, out, out)?,
            MatRef::new(&b, 0, out, r, r)?,
            l.scale,
            false,
        )?;
        let dropped = self.dropped_input(l, x);
        if l.a.track_op() {
            let mut da = vec![0f32; r * inp];
            matmul_threaded(
                &mut MatMut::new(&mut da, 0, r, inp, inp)?,
                MatRef::new(&ddown, 0, rows, r, r)?.t(),
                MatRef::new(dropped.as_deref().unwrap_or(x), 0, rows, inp, inp)?,
                1.0,
                false,
            )?;
            st.push_grad(&l.a, Tensor::from_vec(da, (r, inp), l.a.device())?)?;
        }
        // ∂x += ∂down·A, times the mask where the input was dropped (the product goes through
        // the dropped input's buffer, no longer needed).
        let product = |dst: &mut [f32], accumulate: bool| {
            matmul_threaded(
                &mut MatMut::new(dst, 0, rows, inp, inp)?,
                MatRef::new(&ddown, 0, rows, r, r)?,
                MatRef::new(&a, 0, r, inp, inp)?,
                1.0,
                accumulate,
            )
        };
        match (l.mask_seed, dropped) {
            (Some(seed), Some(mut t)) => {
                product(&mut t, false)?;
                crate::ops::dropout_mask_into(seed, l.dropout, dx, |j, m, d| d + t[j] * m);
                st.give([t]);
            }
            _ => product(dx, true)?,
        }
        st.give([ddown]);
        Ok(())
    }

    /// Runs `f` with f32 views of every weight.
    fn with_weights<R>(&self, f: impl FnOnce(&Views) -> Result<R>) -> Result<R> {
        let guards: Vec<_> = self.weights.all().map(|t| t.storage_and_layout()).into();
        let mut slices = Vec::with_capacity(guards.len());
        for (storage, layout) in &guards {
            match &**storage {
                Storage::Cpu(cpu) => {
                    slices.push(contiguous_f32(cpu, layout, "fused decoder layer")?)
                }
                _ => candle_core::bail!("fused decoder layer: weights must be on the CPU"),
            }
        }
        let views = Views {
            input_norm: slices[0],
            q: slices[1],
            k: slices[2],
            v: slices[3],
            o: slices[4],
            post_norm: slices[5],
            gate: slices[6],
            up: slices[7],
            down: slices[8],
        };
        f(&views)
    }

    fn lock_saved(&self) -> Result<std::sync::MutexGuard<'_, Option<Saved>>> {
        self.saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused decoder layer: state poisoned".into()))
    }

    fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let (hd, qw, kvw, inter) = (self.hidden, self.q_width, self.kv_width, self.intermediate);
        if !x.len().is_multiple_of(hd) {
            candle_core::bail!(
                "fused decoder layer: {} values are not rows of {hd}",
                x.len()
            );
        }
        let rows = x.len() / hd;
        let eps = self.weights.eps;
        let st = &self.state;
        let linear = |x: &[f32], w: &[f32], inp: usize, out: usize| {
            linear_into(st.take(rows * out), x, w, rows, inp, out)
        };
        self.with_weights(|w| {
            let mut n1 = st.take(x.len());
            rms_norm_rows(x, w.input_norm, eps, &mut n1);
            let mut q = linear(&n1, w.q, hd, qw)?;
            let mut k = linear(&n1, w.k, hd, kvw)?;
            let mut v = linear(&n1, w.v, hd, kvw)?;
            let q_down = self.lora_forward(Q, &n1, &mut q, hd, qw)?;
            let k_down = self.lora_forward(K, &n1, &mut k, hd, kvw)?;
            let v_down = self.lora_forward(V, &n1, &mut v, hd, kvw)?;
            // The probabilities are kept for the backward pass while they stay modest.
            let mut probs = (self.attention.probs_len() <= SAVED_PROBS_MAX)
                .then(|| st.take(self.attention.probs_len()));
            // From the pool like every buffer `Saved` holds: the backward pass gives them all
            // back, and one allocated here instead joined the pool for good at every step (a
            // layer's attention output, 0.2 MB per layer and step on a small model).
            let mut attn = st.take(rows * qw);
            self.attention
                .forward_f32(&q, &k, &v, probs.as_deref_mut(), &mut attn)?;
            let mut h = linear(&attn, w.o, qw, hd)?;
            let o_down = self.lora_forward(O, &attn, &mut h, qw, hd)?;
            add_into(&mut h, x);
            let mut n2 = st.take(x.len());
            rms_norm_rows(&h, w.post_norm, eps, &mut n2);
            let mut gate = linear(&n2, w.gate, hd, inter)?;
            let mut up = linear(&n2, w.up, hd, inter)?;
            let gate_down = self.lora_forward(GATE, &n2, &mut gate, hd, inter)?;
            let up_down = self.lora_forward(UP, &n2, &mut up, hd, inter)?;
            let mut act = st.take(gate.len());
            swiglu_slices(&gate, &up, &mut act);
            // The output leaves for candle's graph, so it is not taken from the pool.
            let mut y = linear_into(vec![0f32; rows * hd], &act, w.down, rows, inter, hd)?;
            let down_down = self.lora_forward(DOWN, &act, &mut y, inter, hd)?;
            add_into(&mut y, &h);
            *self.lock_saved()? = Some(Saved {
                n1,
                q,
                k,
                v,
                attn,
                h,
                n2,
                gate,
                up,
                act,
                probs,
                lora_down: [
                    q_down, k_down, v_down, o_down, gate_down, up_down, down_down,
                ],
            });
            Ok(y)
        })
    }

    fn backward(&self, x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        let Some(s) = self.lock_saved()?.take() else {
            candle_core::bail!("fused decoder layer: backward pass without a saved forward pass");
        };
        let (hd, qw, kvw, inter) = (self.hidden, self.q_width, self.kv_width, self.intermediate);
        let rows = x.len() / hd;
        let eps = self.weights.eps;
        let (wt, st) = (&self.weights, &self.state);
        let grad_for = |w: &Tensor, dy: &[f32], x: &[f32], inp: usize, out: usize| -> Result<()> {
            if w.track_op() {
                let dw = linear_weight_grad(dy, x, rows, inp, out)?;
                st.push_grad(w, Tensor::from_vec(dw, (out, inp), w.device())?)?;
            }
            Ok(())
        };
        let lora_down = |i: usize| s.lora_down[i].as_deref();
        let dx = self.with_weights(|w| {
            // MLP: y = h + down(swiglu(gate(n2), up(n2))), n2 = norm(h).
            let mut dact = st.take(rows * inter);
            linear_input_grad(&mut dact, dy, w.down, rows, inter, hd, false)?;
            self.lora_backward(DOWN, &s.act, dy, lora_down(DOWN), &mut dact, (inter, hd))?;
            grad_for(&wt.down, dy, &s.act, inter, hd)?;
            let mut dgate = st.take(rows * inter);
            let mut dup = st.take(rows * inter);
            swiglu_backward_slices(&s.gate, &s.up, &dact, &mut dgate, &mut dup);
            let mut dn2 = st.take(rows * hd);
            linear_input_grad(&mut dn2, &dgate, w.gate, rows, hd, inter, false)?;
            linear_input_grad(&mut dn2, &dup, w.up, rows, hd, inter, true)?;
            self.lora_backward(GATE, &s.n2, &dgate, lora_down(GATE), &mut dn2, (hd, inter))?;
            self.lora_backward(UP, &s.n2, &dup, lora_down(UP), &mut dn2, (hd, inter))?;
            grad_for(&wt.gate, &dgate, &s.n2, hd, inter)?;
            grad_for(&wt.up, &dup, &s.n2, hd, inter)?;
            let mut dh = st.take(rows * hd);
            let dpost = rms_norm_backward_rows(&s.h, w.post_norm, eps, &dn2, &mut dh);
            add_into(&mut dh, dy);
            if wt.post_norm.track_op() {
                st.push_grad(
                    &wt.post_norm,
                    Tensor::from_vec(dpost, hd, wt.post_norm.device())?,
                )?;
            }

            // Attention: h = x + o(attention(q(n1), k(n1), v(n1))), n1 = norm(x).
            let mut dattn = st.take(rows * qw);
            linear_input_grad(&mut dattn, &dh, w.o, rows, qw, hd, false)?;
            self.lora_backward(O, &s.attn, &dh, lora_down(O), &mut dattn, (qw, hd))?;
            grad_for(&wt.o, &dh, &s.attn, qw, hd)?;
            let (dq, dk, dv) =
                self.attention
                    .backward_f32(&s.q, &s.k, &s.v, &dattn, s.probs.as_deref())?;
            let mut dn1 = st.take(rows * hd);
            linear_input_grad(&mut dn1, &dq, w.q, rows, hd, qw, false)?;
            linear_input_grad(&mut dn1, &dk, w.k, rows, hd, kvw, true)?;
            linear_input_grad(&mut dn1, &dv, w.v, rows, hd, kvw, true)?;
            self.lora_backward(Q, &s.n1, &dq, lora_down(Q), &mut dn1, (hd, qw))?;
            self.lora_backward(K, &s.n1, &dk, lora_down(K), &mut dn1, (hd, kvw))?;
            self.lora_backward(V, &s.n1, &dv, lora_down(V), &mut dn1, (hd, kvw))?;
            grad_for(&wt.q, &dq, &s.n1, hd, qw)?;
            grad_for(&wt.k, &dk, &s.n1, hd, kvw)?;
            grad_for(&wt.v, &dv, &s.n1, hd, kvw)?;
            // ∂x leaves for candle's graph, so it is not taken from the pool.
            let mut dx = vec![0f32; rows * hd];
            let dinput = rms_norm_backward_rows(x, w.input_norm, eps, &dn1, &mut dx);
            add_into(&mut dx, &dh);
            if wt.input_norm.track_op() {
                st.push_grad(
                    &wt.input_norm,
                    Tensor::from_vec(dinput, hd, wt.input_norm.device())?,
                )?;
            }
            st.give([dact, dgate, dup, dn2, dh, dattn, dn1]);
            Ok(dx)
        })?;
        let Saved {
            n1,
            q,
            k,
            v,
            attn,
            h,
            n2,
            gate,
            up,
            act,
            probs,
            lora_down,
        } = s;
        st.give(
            [n1, q, k, v, attn, h, n2, gate, up, act]
                .into_iter()
                .chain(probs)
                .chain(lora_down.into_iter().flatten()),
        );
        Ok(dx)
    }
}

/// The op's inputs are the layer input and an "anchor": a tensor of the layer that needs a
/// gradient (see [`LayerWeights::tracked`]), read by neither pass.
impl CustomOp2 for FusedDecoderLayer {
    fn name(&self) -> &'static str {
        "kiln-decoder-layer"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        _anchor: &CpuStorage,
        _anchor_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let y = self.forward(x)?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = with_cpu_f32(x, self.name(), |x| {
            with_cpu_f32(grad_res, self.name(), |dy| self.backward(x, dy))
        })?;
        let dx = x
            .track_op()
            .then(|| Tensor::from_vec(dx, x.shape(), x.device()))
            .transpose()?;
        Ok((dx, None))
    }
}

#[cfg(test)]
mod tests {
    use super::FusedState;

    /// Batches of varying lengths reuse the pooled buffers instead of adding new ones.
    #[test]
    fn the_buffer_pool_stays_bounded_when_lengths_change() {
        let state = FusedState::default();
        for step in 0..50 {
            let lens = [100 + step * 7, 50 + step, 300 - step];
            let buffers: Vec<Vec<f32>> = lens.iter().map(|&l| state.take(l)).collect();
            for (b, &l) in buffers.iter().zip(&lens) {
                assert_eq!(b.len(), l);
            }
            state.give(buffers);
        }
        let pool = state.pooled();
        assert!(pool <= 3, "{pool} buffers pooled for 3 in use at once");
    }
}
