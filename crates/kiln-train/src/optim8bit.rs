//! 8-bit AdamW with block-wise quantized moments, after bitsandbytes' `bnb.optim.AdamW8bit`
//! (Dettmers et al., "8-bit Optimizers via Block-wise Quantization",
//! <https://arxiv.org/abs/2110.02861>; reference implementation `bitsandbytes/optim/optimizer.py`
//! `Optimizer2State` and the CUDA kernel `kOptimizerStatic8bit2StateBlockwise` in
//! `csrc/kernels.cu`).
//!
//! Both Adam moments are stored as one byte per element plus one f32 `absmax` per block of
//! [`BLOCK_SIZE`] = 256 elements: the first moment `m` with the signed dynamic map
//! ([`create_dynamic_map`]`(true)`), the second moment `v` with the unsigned one. An element is
//! `map[code] · absmax` of its block. That is 2 bytes per parameter instead of AdamW's 8 (plus
//! 8 bytes per 256 elements), about 75% less optimizer state. The dynamic map spends its codes on
//! a decimal exponent, so small moments keep relative precision next to a block's large ones.
//!
//! One step, per block and in parallel over blocks (as bnb's kernel does in registers):
//! dequantize the block's `m` and `v` to f32, update them with the gradient, update the parameter
//! from the **unquantized** new moments, take each block's new absmax, and requantize to the
//! nearest map value. Tensors with fewer than [`MIN_8BIT_SIZE`] = 4096 elements keep f32 moments
//! and take exactly [`AdamW`](crate::optim::AdamW)'s update, as bnb keeps them in 32 bits.
//!
//! Deviations from bnb, all below the quantization noise:
//! * Weight decay and the ε term follow `torch.optim.AdamW`, as the f32 path does:
//!   `p ← p·(1 − lr·wd) − lr/(1 − β1ᵗ) · m / (√v/√(1 − β2ᵗ) + ε)`. bnb's kernel multiplies by
//!   `(1 − lr·wd)` *after* the Adam step and writes ε as `√(1 − β2ᵗ)·ε` next to `√v`; the first
//!   differs by `lr·wd` times the step (a relative 1e-5 of it at lr 1e-3, wd 1e-2), the second
//!   is the same expression rearranged.
//! * Quantization picks the nearest map value by a binary search over the midpoints between
//!   neighbouring values; an exact tie goes to the lower value (bnb's search settles ties on its
//!   pivot). As in bnb, a negative first moment never quantizes to +0: it moves one code down,
//!   so `m` keeps its sign.
//! * No percentile clipping or `max_unorm` (both off in bnb's defaults and in the HF Trainer).
//!
//! As in bnb's kernel, a non-finite gradient element leaves its weight alone and zeroes its two
//! moments in the 8-bit path, so one NaN cannot spread through a block's absmax.
//!
//! `tests/bnb_parity.rs` checks all of it against bitsandbytes 0.50 itself (its CPU backend):
//! the maps to an ulp, block-wise codes, and five steps whose weights agree to 5e-4 of a 5e-2
//! move, the codes equal or one apart (bnb's CPU search settles a few values on a neighbour of
//! the nearest code; kiln always takes the nearest, as the CUDA kernel does).
//!
//! Parameters that are not CPU f32 tensors keep f32 moments and take AdamW's composed update
//! (correct, but neither quantized nor fused); kiln trains on the CPU in f32, where every large
//! tensor takes the 8-bit path.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Result, Tensor, Var};
use kiln_model::ops::contiguous_f32;
use rayon::prelude::*;

use crate::optim::{self, AdamWConfig, Moments, NamedVar, Scalars, cpu_f32_mut};

/// Elements sharing one absmax (bnb's 8-bit optimizers since PR #1365; 2048 before, as in the
/// paper).
pub const BLOCK_SIZE: usize = 256;

/// Tensors with fewer elements keep f32 moments (bnb's `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`
/// (`bitsandbytes/functional.py`): 256 sorted values in `[-1, 1]` (signed) or `[0, 1]`.
///
/// For each decimal exponent `i` in `0..7` the map holds the midpoints of
/// `linspace(0.1, 1, n)` scaled by `10^(i−6)`, with `n = 2^i + 1` (signed, mirrored to the
/// negative side) or `2^(i+1) + 1` (unsigned); then 0 and 1. bnb computes `non_sign_bits` as
/// `total_bits − 1` for both signs, so its extra linear range (`additional_items`) is empty at
/// these widths. Consequences worth knowing: the signed map holds 1.0 but not −1.0 (its lowest
/// value is −0.99296875), and each map holds 0 exactly once.
///
/// The arithmetic is f32, as torch's: `linspace` by torch's scalar formula (`start + step·i`
/// for the first half, `end − step·(n−1−i)` for the second), midpoints as `(a + b) / 2`, scaled
/// by the f32 of `10^(i−6)`. torch's vectorised `linspace` loop may round a few entries one
/// ulp differently depending on the CPU's vector width.
pub fn create_dynamic_map(signed: bool) -> [f32; 256] {
    const MAX_EXPONENT_BITS: u32 = 7;
    const NON_SIGN_BITS: u32 = 8 - 1;
    // 10^(i − (max_exponent_bits − 1)), as the Python float torch casts to f32.
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = Vec::with_capacity(256);
    for (i, scale) in (0..MAX_EXPONENT_BITS).zip(SCALES) {
        let fraction_items = if signed {
            (1usize << (i + NON_SIGN_BITS - MAX_EXPONENT_BITS)) + 1
        } else {
            (1usize << (i + NON_SIGN_BITS - MAX_EXPONENT_BITS + 1)) + 1
        };
        let boundaries = torch_linspace_f32(0.1, 1.0, fraction_items);
        let scale = scale as f32;
        for pair in boundaries.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0f32; 256];
    // 254 midpoints plus 0 and 1: exactly 256 for both signs (bnb asserts the same).
    map.iter_mut().zip(&data).for_each(|(m, d)| *m = *d);
    debug_assert_eq!(data.len(), 256);
    map
}

/// `torch.linspace(start, end, steps, dtype=float32)` by torch's scalar CPU formula.
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// A sorted 256-value quantization map with its decision boundaries.
#[derive(Debug, Clone)]
pub struct Codebook {
    values: [f32; 256],
    /// `(values[i] + values[i+1]) / 2`: `x` quantizes to the number of midpoints below it.
    midpoints: [f32; 255],
    signed: bool,
}

impl Codebook {
    fn new(values: [f32; 256], signed: bool) -> Self {
        let mut midpoints = [0f32; 255];
        for (m, pair) in midpoints.iter_mut().zip(values.windows(2)) {
            *m = (pair[0] + pair[1]) * 0.5;
        }
        Self {
            values,
            midpoints,
            signed,
        }
    }

    /// bnb's signed dynamic map (`qmap1`, for the first moment).
    pub fn signed() -> &'static Codebook {
        static MAP: LazyLock<Codebook> =
            LazyLock::new(|| Codebook::new(create_dynamic_map(true), true));
        &MAP
    }

    /// bnb's unsigned dynamic map (`qmap2`, for the second moment).
    pub fn unsigned() -> &'static Codebook {
        static MAP: LazyLock<Codebook> =
            LazyLock::new(|| Codebook::new(create_dynamic_map(false), false));
        &MAP
    }

    pub fn values(&self) -> &[f32; 256] {
        &self.values
    }

    /// The code of the map value nearest to `x` (a value already divided by its block's
    /// absmax). For the signed map a negative `x` never lands on +0 (bnb's sign fix).
    #[inline]
    pub fn quantize(&self, x: f32) -> u8 {
        let mut code = self.midpoints.partition_point(|&m| m < x);
        if self.signed && x.is_sign_negative() && !self.values[code].is_sign_negative() {
            code = code.saturating_sub(1);
        }
        // partition_point over 255 midpoints is at most 255.
        code.min(255) as u8
    }

    #[inline]
    pub fn value(&self, code: u8) -> f32 {
        self.values[usize::from(code)]
    }
}

/// Block-wise quantization of `x` with `code`: one byte per element and one absmax per block of
/// [`BLOCK_SIZE`] (the last block may be shorter). An all-zero block has absmax 0.
pub fn quantize_blockwise(x: &[f32], code: &Codebook) -> (Vec<u8>, Vec<f32>) {
    let mut codes = vec![0u8; x.len()];
    let mut absmax = vec![0f32; x.len().div_ceil(BLOCK_SIZE)];
    codes
        .par_chunks_mut(BLOCK_SIZE)
        .zip(x.par_chunks(BLOCK_SIZE))
        .zip(absmax.par_iter_mut())
        .for_each(|((c, x), a)| {
            *a = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            quantize_block(x, *a, code, c);
        });
    (codes, absmax)
}

/// The inverse of [`quantize_blockwise`]: `code[c] · absmax` of each element's block.
pub fn dequantize_blockwise(codes: &[u8], absmax: &[f32], code: &Codebook) -> Vec<f32> {
    codes
        .chunks(BLOCK_SIZE)
        .zip(absmax)
        .flat_map(|(c, a)| c.iter().map(move |c| code.value(*c) * a))
        .collect()
}

#[inline]
fn quantize_block(x: &[f32], absmax: f32, code: &Codebook, out: &mut [u8]) {
    for (c, x) in out.iter_mut().zip(x) {
        *c = code.quantize(if absmax > 0.0 { x / absmax } else { 0.0 });
    }
}

/// The 8-bit moments of one parameter, laid out as bnb's `state1`/`absmax1`/`state2`/`absmax2`.
#[derive(Debug, Clone)]
struct Quantized {
    state1: Vec<u8>,
    absmax1: Vec<f32>,
    state2: Vec<u8>,
    absmax2: Vec<f32>,
}

impl Quantized {
    /// bnb's initial state: zero codes and zero absmax, so every moment dequantizes to 0.
    fn zeros(n: usize) -> Self {
        let blocks = n.div_ceil(BLOCK_SIZE);
        Self {
            state1: vec![0; n],
            absmax1: vec![0.0; blocks],
            state2: vec![0; n],
            absmax2: vec![0.0; blocks],
        }
    }

    fn bytes(&self) -> usize {
        self.state1.len() + self.state2.len() + 4 * (self.absmax1.len() + self.absmax2.len())
    }
}

#[derive(Debug)]
enum State {
    /// No gradient seen yet.
    Empty,
    Quantized(Quantized),
    /// f32 moments: tensors under [`MIN_8BIT_SIZE`], and parameters off the CPU or not in f32.
    Full(Moments),
}

/// Whether a parameter takes the 8-bit path: a contiguous CPU f32 tensor of at least
/// [`MIN_8BIT_SIZE`] elements.
fn quantized_path(var: &Var) -> bool {
    let t = var.as_tensor();
    t.elem_count() >= MIN_8BIT_SIZE
        && t.dtype() == DType::F32
        && t.device().is_cpu()
        && t.is_contiguous()
}

/// bitsandbytes' `AdamW8bit` (and `PagedAdamW8bit`, which differs only in where CUDA keeps the
/// state): see the module documentation.
#[derive(Debug)]
pub struct AdamW8bit {
    params: Vec<NamedVar>,
    config: AdamWConfig,
    states: Vec<State>,
    step: u64,
    paged: bool,
}

impl AdamW8bit {
    /// `bnb.optim.AdamW8bit` with `config` (bnb's defaults are [`AdamWConfig::default`]'s: lr
    /// 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2).
    pub fn new(params: Vec<NamedVar>, config: AdamWConfig) -> Self {
        let states = params.iter().map(|_| State::Empty).collect();
        Self {
            params,
            config,
            states,
            step: 0,
            paged: false,
        }
    }

    /// `bnb.optim.PagedAdamW8bit`: the same optimizer. In bitsandbytes "paged" means the state
    /// lives in CUDA unified memory, which the driver moves to host RAM only when the GPU runs
    /// out of memory; on the CPU there is nothing to page, so only [`AdamW8bit::name`] differs.
    pub fn new_paged(params: Vec<NamedVar>, config: AdamWConfig) -> Self {
        Self {
            paged: true,
            ..Self::new(params, config)
        }
    }

    /// The HF `optim` name: `adamw_8bit` or `paged_adamw_8bit`.
    pub fn name(&self) -> &'static str {
        if self.paged {
            "paged_adamw_8bit"
        } else {
            "adamw_8bit"
        }
    }

    pub fn params(&self) -> &[NamedVar] {
        &self.params
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Applies one update from `grads`. A parameter without a gradient is left alone and keeps
    /// its moments.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        for (param, state) in self.params.iter().zip(self.states.iter_mut()) {
            let Some(g) = grads.get(param.var.as_tensor()) else {
                continue;
            };
            let k = Scalars::new(&self.config, self.step, param.decay);
            *state = match std::mem::replace(state, State::Empty) {
                State::Full(m) => State::Full(optim::update(&param.var, g, Some(m), &k)?),
                State::Empty if !quantized_path(&param.var) => {
                    State::Full(optim::update(&param.var, g, None, &k)?)
                }
                State::Empty => {
                    let mut q = Quantized::zeros(param.var.elem_count());
                    step_quantized(param, g, &mut q, k)?;
                    State::Quantized(q)
                }
                State::Quantized(mut q) => {
                    step_quantized(param, g, &mut q, k)?;
                    State::Quantized(q)
                }
            };
        }
        Ok(())
    }

    /// The optimizer state as named tensors and the step count, for checkpoints. An 8-bit
    /// parameter `NAME` gives `NAME.state1` (u8, the parameter's shape), `NAME.absmax1` (f32,
    /// one per block), `NAME.state2` and `NAME.absmax2`; an f32 one gives `NAME.exp_avg` and
    /// `NAME.exp_avg_sq` as [`AdamW`](crate::optim::AdamW) does.
    pub fn state_tensors(&self) -> Result<(HashMap<String, Tensor>, u64)> {
        let mut out = HashMap::new();
        for (param, state) in self.params.iter().zip(&self.states) {
            let name = &param.name;
            match state {
                State::Empty => {}
                State::Full(s) => {
                    // Copies: the live moments are updated in place.
                    out.insert(format!("{name}.exp_avg"), s.m.copy()?);
                    out.insert(format!("{name}.exp_avg_sq"), s.v.copy()?);
                }
                State::Quantized(q) => {
                    let shape = param.var.dims();
                    let cpu = &Device::Cpu;
                    let blocks = q.absmax1.len();
                    let tensors = [
                        ("state1", Tensor::from_slice(&q.state1, shape, cpu)?),
                        ("absmax1", Tensor::from_slice(&q.absmax1, blocks, cpu)?),
                        ("state2", Tensor::from_slice(&q.state2, shape, cpu)?),
                        ("absmax2", Tensor::from_slice(&q.absmax2, blocks, cpu)?),
                    ];
                    for (suffix, t) in tensors {
                        out.insert(format!("{name}.{suffix}"), t);
                    }
                }
            }
        }
        Ok((out, self.step))
    }

    /// Restores state saved by [`AdamW8bit::state_tensors`]. Every saved tensor must belong to a
    /// parameter of this optimizer, in the layout that parameter uses here (8-bit or f32), with
    /// the right dtype and shape.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, step: u64) -> Result<()> {
        let mut states = Vec::with_capacity(self.params.len());
        for param in &self.params {
            let name = &param.name;
            let mut take = |suffix: &str| tensors.remove(&format!("{name}.{suffix}"));
            let quantized = [
                take("state1"),
                take("absmax1"),
                take("state2"),
                take("absmax2"),
            ];
            let full = [take("exp_avg"), take("exp_avg_sq")];
            let has_quantized = quantized.iter().any(Option::is_some);
            let has_full = full.iter().any(Option::is_some);
            let state = if quantized_path(&param.var) {
                if has_full {
                    candle_core::bail!(
                        "optimizer state for `{name}` holds f32 moments (`exp_avg`), but 8-bit AdamW keeps this parameter ({} elements) in 8 bits: the state was written by another optimizer or for another model",
                        param.var.elem_count()
                    );
                }
                match quantized {
                    [None, None, None, None] => State::Empty,
                    [Some(s1), Some(a1), Some(s2), Some(a2)] => {
                        State::Quantized(load_quantized(param, [&s1, &a1, &s2, &a2])?)
                    }
                    _ => candle_core::bail!(
                        "8-bit optimizer state for `{name}` is incomplete: it needs state1, absmax1, state2 and absmax2"
                    ),
                }
            } else {
                if has_quantized {
                    candle_core::bail!(
                        "optimizer state for `{name}` is 8-bit (`state1`), but this parameter ({} elements, {:?} on {:?}) keeps f32 moments",
                        param.var.elem_count(),
                        param.var.dtype(),
                        param.var.device().location()
                    );
                }
                match full {
                    [None, None] => State::Empty,
                    [Some(m), Some(v)] => State::Full(load_full(param, &m, &v)?),
                    _ => candle_core::bail!("optimizer state for `{name}` is incomplete"),
                }
            };
            states.push(state);
        }
        if let Some(extra) = tensors.keys().next() {
            candle_core::bail!("optimizer state holds `{extra}`, which matches no parameter");
        }
        self.states = states;
        self.step = step;
        Ok(())
    }

    /// Bytes of optimizer state actually held: u8 codes and f32 absmax of the 8-bit moments,
    /// plus the f32 moments of the other parameters.
    pub fn state_bytes(&self) -> usize {
        self.states
            .iter()
            .map(|s| match s {
                State::Empty => 0,
                State::Quantized(q) => q.bytes(),
                State::Full(m) => (m.m.elem_count() + m.v.elem_count()) * 4,
            })
            .sum()
    }
}

fn load_quantized(param: &NamedVar, [s1, a1, s2, a2]: [&Tensor; 4]) -> Result<Quantized> {
    let dims = param.var.dims();
    let blocks = param.var.elem_count().div_ceil(BLOCK_SIZE);
    let codes = |t: &Tensor, what: &str| -> Result<Vec<u8>> {
        if t.dtype() != DType::U8 || t.dims() != dims {
            candle_core::bail!(
                "optimizer state `{}.{what}` is {:?} {:?}, expected u8 {dims:?} like the parameter",
                param.name,
                t.dtype(),
                t.dims()
            );
        }
        t.flatten_all()?.to_vec1::<u8>()
    };
    let absmax = |t: &Tensor, what: &str| -> Result<Vec<f32>> {
        if t.dtype() != DType::F32 || t.dims() != [blocks] {
            candle_core::bail!(
                "optimizer state `{}.{what}` is {:?} {:?}, expected f32 [{blocks}] (one per block of {BLOCK_SIZE})",
                param.name,
                t.dtype(),
                t.dims()
            );
        }
        t.to_vec1::<f32>()
    };
    Ok(Quantized {
        state1: codes(s1, "state1")?,
        absmax1: absmax(a1, "absmax1")?,
        state2: codes(s2, "state2")?,
        absmax2: absmax(a2, "absmax2")?,
    })
}

fn load_full(param: &NamedVar, m: &Tensor, v: &Tensor) -> Result<Moments> {
    let dims = param.var.dims();
    if m.dims() != dims || v.dims() != dims {
        candle_core::bail!(
            "optimizer state for `{}` has shapes {:?} and {:?}, the parameter {dims:?}",
            param.name,
            m.dims(),
            v.dims()
        );
    }
    // Own copies: the moments are updated in place, and `to_dtype`/`to_device` to the same
    // dtype and device would share the caller's storage.
    let own = |t: &Tensor| {
        t.to_dtype(DType::F32)?
            .to_device(param.var.device())?
            .copy()
    };
    Ok(Moments {
        m: own(m)?,
        v: own(v)?,
    })
}

/// One 8-bit step of a CPU f32 parameter, in place.
fn step_quantized(param: &NamedVar, g: &Tensor, q: &mut Quantized, k: Scalars) -> Result<()> {
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    if g.dims() != param.var.dims() {
        candle_core::bail!(
            "gradient of `{}` has shape {:?}, the parameter {:?}",
            param.name,
            g.dims(),
            param.var.dims()
        );
    }
    let op = Step8bit {
        state: Mutex::new(q),
        k,
    };
    param.var.as_tensor().inplace_op2(&g, &op)
}

/// The fused 8-bit AdamW step: the parameter is updated in place, the quantized moments (which
/// candle does not hold) through the mutex.
struct Step8bit<'a> {
    state: Mutex<&'a mut Quantized>,
    k: Scalars,
}

impl InplaceOp2 for Step8bit<'_> {
    fn name(&self) -> &'static str {
        "kiln-adamw-8bit-step"
    }

    fn cpu_fwd(&self, p: &mut CpuStorage, pl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let (p, g) = (cpu_f32_mut(p, pl)?, contiguous_f32(g, gl, "AdamW8bit")?);
        let mut guard = match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Quantized {
            state1,
            absmax1,
            state2,
            absmax2,
        } = &mut **guard;
        if p.len() != g.len() || p.len() != state1.len() || p.len() != state2.len() {
            candle_core::bail!(
                "AdamW8bit: parameter of {} elements, gradient {}, state {}",
                p.len(),
                g.len(),
                state1.len()
            );
        }
        let k = &self.k;
        (
            p.par_chunks_mut(BLOCK_SIZE),
            g.par_chunks(BLOCK_SIZE),
            state1.par_chunks_mut(BLOCK_SIZE),
            state2.par_chunks_mut(BLOCK_SIZE),
            absmax1.par_iter_mut(),
            absmax2.par_iter_mut(),
        )
            .into_par_iter()
            .with_min_len(16)
            .for_each(|(p, g, c1, c2, a1, a2)| update_block(k, p, g, (c1, a1), (c2, a2)));
        Ok(())
    }
}

/// bnb's per-block update: dequantize, update the moments, update the weights from the f32
/// moments, requantize against the new absmax.
#[inline]
fn update_block(
    k: &Scalars,
    p: &mut [f32],
    g: &[f32],
    (c1, a1): (&mut [u8], &mut f32),
    (c2, a2): (&mut [u8], &mut f32),
) {
    let (map1, map2) = (Codebook::signed(), Codebook::unsigned());
    let n = p.len();
    let (mut m, mut v) = ([0f32; BLOCK_SIZE], [0f32; BLOCK_SIZE]);
    let (mut max1, mut max2) = (0f32, 0f32);
    for ((((m, v), g), c1), c2) in m.iter_mut().zip(v.iter_mut()).zip(g).zip(&*c1).zip(&*c2) {
        if g.is_finite() {
            *m = map1.value(*c1) * *a1 * k.beta1 + g * (1.0 - k.beta1);
            *v = map2.value(*c2) * *a2 * k.beta2 + g * g * (1.0 - k.beta2);
        }
        max1 = max1.max(m.abs());
        max2 = max2.max(*v);
    }
    for (((p, g), m), v) in p.iter_mut().zip(g).zip(&m).zip(&v) {
        if g.is_finite() {
            let denom = v.sqrt() / k.bias_correction2_sqrt + k.eps;
            *p = *p * k.decay - m / denom * k.step_size;
        }
    }
    quantize_block(&m[..n], max1, map1, c1);
    quantize_block(&v[..n], max2, map2, c2);
    *a1 = max1;
    *a2 = max2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_maps_have_bnb_shape() {
        for signed in [true, false] {
            let map = create_dynamic_map(signed);
            assert!(map.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
            assert_eq!(map[255], 1.0);
            assert_eq!(map.iter().filter(|v| **v == 0.0).count(), 1);
        }
        assert_eq!(create_dynamic_map(true)[127], 0.0);
        assert_eq!(create_dynamic_map(false)[0], 0.0);
    }

    #[test]
    fn quantize_picks_the_nearest_value() {
        for code in [Codebook::signed(), Codebook::unsigned()] {
            let lo = if code.signed { -1.0f32 } else { 0.0 };
            for i in 0..=2000 {
                let x = lo + (1.0 - lo) * i as f32 / 2000.0;
                let q = code.quantize(x);
                let err = (code.value(q) - x).abs();
                let best = code
                    .values()
                    .iter()
                    .map(|v| (v - x).abs())
                    .fold(f32::INFINITY, f32::min);
                // Nearest up to the f32 rounding of a midpoint, unless the sign fix moved a
                // small negative value off +0.
                let sign_fixed = code.signed && x < 0.0 && code.value(q) < 0.0 && err > best;
                assert!(
                    err <= best + 1e-7 || sign_fixed,
                    "x {x}: code {q} err {err} best {best}"
                );
            }
        }
    }

    #[test]
    fn negative_first_moments_keep_their_sign() {
        let code = Codebook::signed();
        let q = code.quantize(-1e-9);
        assert!(code.value(q) < 0.0, "{}", code.value(q));
        assert_eq!(code.value(code.quantize(1e-9)), 0.0);
        assert_eq!(code.value(code.quantize(0.0)), 0.0);
    }

    /// The fused kernel is exactly: dequantize, update m and v, update p from the f32 moments,
    /// requantize against the new absmax (here on a tensor with a ragged last block).
    #[test]
    fn one_step_is_dequantize_update_requantize() -> Result<()> {
        let n = MIN_8BIT_SIZE + 300;
        let p0: Vec<f32> = (0..n)
            .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let var = Var::from_vec(p0, n, &Device::Cpu)?;
        let cfg = AdamWConfig {
            lr: 0.01,
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW8bit::new(vec![NamedVar::new("w", var.clone())], cfg);
        let grads = |var: &Var| {
            let t = var.as_tensor();
            (t * t.sin()?)?.sum_all()?.backward()
        };
        opt.step(&grads(&var)?)?;
        let State::Quantized(before) = &opt.states[0] else {
            panic!("a 4396-element CPU f32 tensor takes the 8-bit path");
        };
        let before = before.clone();
        let p1 = var.as_tensor().to_vec1::<f32>()?;
        let g = grads(&var)?;
        let gv = g
            .get(var.as_tensor())
            .map(|g| g.to_vec1::<f32>())
            .transpose()?
            .unwrap_or_default();
        opt.step(&g)?;

        let k = Scalars::new(&cfg, 2, true);
        let m0 = dequantize_blockwise(&before.state1, &before.absmax1, Codebook::signed());
        let v0 = dequantize_blockwise(&before.state2, &before.absmax2, Codebook::unsigned());
        let m: Vec<f32> = m0
            .iter()
            .zip(&gv)
            .map(|(m, g)| m * k.beta1 + g * (1.0 - k.beta1))
            .collect();
        let v: Vec<f32> = v0
            .iter()
            .zip(&gv)
            .map(|(v, g)| v * k.beta2 + g * g * (1.0 - k.beta2))
            .collect();
        let p2: Vec<f32> = p1
            .iter()
            .zip(m.iter().zip(&v))
            .map(|(p, (m, v))| {
                p * k.decay - m / (v.sqrt() / k.bias_correction2_sqrt + k.eps) * k.step_size
            })
            .collect();
        let (c1, a1) = quantize_blockwise(&m, Codebook::signed());
        let (c2, a2) = quantize_blockwise(&v, Codebook::unsigned());
        let State::Quantized(after) = &opt.states[0] else {
            panic!("still 8-bit");
        };
        assert!(var.as_tensor().to_vec1::<f32>()? == p2, "parameters");
        assert!(after.state1 == c1 && after.absmax1 == a1, "first moment");
        assert!(after.state2 == c2 && after.absmax2 == a2, "second moment");
        assert!(before.state1 != after.state1, "the codes change");
        Ok(())
    }

    #[test]
    fn blockwise_round_trip_keeps_lengths_and_zero_blocks() {
        let mut x = vec![0f32; 3 * BLOCK_SIZE + 10];
        x[BLOCK_SIZE + 3] = -2.0;
        x[3 * BLOCK_SIZE + 1] = 0.5;
        let (codes, absmax) = quantize_blockwise(&x, Codebook::signed());
        assert_eq!(absmax, vec![0.0, 2.0, 0.0, 0.5]);
        let back = dequantize_blockwise(&codes, &absmax, Codebook::signed());
        assert_eq!(back.len(), x.len());
        // The lowest signed value is −0.99296875: bnb's map has no −1.
        assert_eq!(back[BLOCK_SIZE + 3], 2.0 * Codebook::signed().value(0));
        assert_eq!(back[3 * BLOCK_SIZE + 1], 0.5);
        assert!(back[..BLOCK_SIZE].iter().all(|v| *v == 0.0));
    }
}
