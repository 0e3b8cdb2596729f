//! Batched inference over a paged KV cache: one forward pass serves many sequences of different
//! lengths, each at its own position, each with its own LoRA adapter or none.
//!
//! The tokens of every sequence in the step are laid end to end as one `[tokens, hidden]` matrix,
//! so every linear layer runs as one GEMM over the whole batch, whatever the sequences' lengths
//! (a decode step contributes one row, a prefill chunk many). Only attention is per sequence: it
//! reads the sequence's past keys and values from fixed-size blocks of a shared pool through the
//! sequence's block table, as vLLM's PagedAttention does (Kwon et al., 2023,
//! <https://arxiv.org/abs/2309.06180>), so a sequence holds memory for the positions it has, not
//! for the longest context it might reach.
//!
//! Different adapters share a batch as in S-LoRA/Punica: the base weight multiplies every row
//! once, and each adapter's low-rank update is added to its own run of rows.

use std::ops::Range;

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use crate::linear::{Linear, LoraLayer};
use crate::transformer::CausalLm;

/// Keys and values of every layer in blocks of `block_size` positions. A block is the unit a
/// scheduler hands out; which sequence owns which block is the scheduler's business — the model
/// only reads and writes through block tables.
#[derive(Debug)]
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Per layer, `[num_blocks, block_size, kv_heads, head_dim]` f32.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl PagedKvCache {
    /// A cache of `num_blocks` blocks of `block_size` positions for `model`.
    pub fn new(model: &CausalLm, num_blocks: usize, block_size: usize) -> Self {
        let cfg = model.config();
        let per_layer = num_blocks * block_size * cfg.num_kv_heads * cfg.head_dim;
        Self {
            block_size,
            num_blocks,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            keys: (0..cfg.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            values: (0..cfg.num_layers).map(|_| vec![0.0; per_layer]).collect(),
        }
    }

    /// Bytes one block takes across all layers (keys and values, f32).
    pub fn bytes_per_block(model: &CausalLm, block_size: usize) -> usize {
        let cfg = model.config();
        2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * 4
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Offset of position `pos` of a sequence with `table` in a layer's buffer.
    fn offset(&self, table: &[u32], pos: usize) -> usize {
        let block = table[pos / self.block_size] as usize;
        (block * self.block_size + pos % self.block_size) * self.kv_heads * self.head_dim
    }
}

/// One sequence's share of a forward pass.
#[derive(Debug, Clone)]
pub struct PagedSeq<'a> {
    /// The tokens to run now: a whole prompt, a prefill chunk, or one decode token.
    pub tokens: &'a [u32],
    /// Positions already in the cache: the position of `tokens[0]`.
    pub start: usize,
    /// The blocks holding positions `0..start + tokens.len()`, in order.
    pub block_table: &'a [u32],
    /// Which of the forward pass's adapter models applies; `None` for the base.
    pub adapter: Option<usize>,
}

/// Where each token of the step sits: its row, sequence and position.
struct StepLayout<'a> {
    seqs: &'a [PagedSeq<'a>],
    /// Row range of each sequence.
    rows: Vec<Range<usize>>,
    /// Position of each row.
    positions: Vec<usize>,
    /// Runs of consecutive rows sharing an adapter.
    adapter_runs: Vec<(Range<usize>, usize)>,
}

impl<'a> StepLayout<'a> {
    fn new(seqs: &'a [PagedSeq<'a>]) -> Self {
        let mut rows = Vec::with_capacity(seqs.len());
        let mut positions = Vec::new();
        for s in seqs {
            rows.push(positions.len()..positions.len() + s.tokens.len());
            positions.extend(s.start..s.start + s.tokens.len());
        }
        let adapter_runs = adapter_runs(seqs, &rows);
        Self {
            seqs,
            rows,
            positions,
            adapter_runs,
        }
    }

    /// `linear` over every row, with each adapter's update (`lora_of(adapter)`) added to its rows.
    fn linear<'m>(
        &self,
        linear: &Linear,
        x: &Tensor,
        lora_of: impl Fn(usize) -> Option<&'m LoraLayer>,
    ) -> Result<Tensor> {
        let y = linear.forward(x)?;
        let updates: Vec<(Range<usize>, &LoraLayer)> = self
            .adapter_runs
            .iter()
            .filter_map(|(rows, a)| lora_of(*a).map(|l| (rows.clone(), l)))
            .collect();
        if updates.is_empty() {
            return Ok(y);
        }
        let mut pieces = Vec::with_capacity(2 * updates.len() + 1);
        let mut at = 0;
        for (rows, lora) in updates {
            if rows.start > at {
                pieces.push(y.narrow(0, at, rows.start - at)?);
            }
            let xs = x.narrow(0, rows.start, rows.len())?;
            let update = xs.matmul(&lora.a.t()?)?.matmul(&lora.b.t()?)?;
            pieces.push((y.narrow(0, rows.start, rows.len())? + (update * lora.scale)?)?);
            at = rows.end;
        }
        let total = y.dim(0)?;
        if at < total {
            pieces.push(y.narrow(0, at, total - at)?);
        }
        Tensor::cat(&pieces, 0)
    }
}

impl CausalLm {
    /// Runs one step for `seqs` and returns the logits of each sequence's last token,
    /// `[seqs.len(), vocab]` f32. Each sequence's keys and values for its `tokens` are written to
    /// `cache` through its block table. `adapters[i]` is this model with adapter `i` attached
    /// (sharing this model's base weights); this model itself should carry no adapter.
    pub fn forward_paged(
        &self,
        seqs: &[PagedSeq],
        cache: &mut PagedKvCache,
        adapters: &[&CausalLm],
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        if seqs.is_empty() {
            candle_core::bail!("forward_paged: no sequences");
        }
        if cache.keys.len() != self.layers.len()
            || cache.kv_heads != cfg.num_kv_heads
            || cache.head_dim != cfg.head_dim
        {
            candle_core::bail!("forward_paged: the KV cache was built for another model");
        }
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                candle_core::bail!("forward_paged: sequence {i} has no tokens");
            }
            let needed = (s.start + s.tokens.len()).div_ceil(cache.block_size);
            if s.block_table.len() < needed {
                candle_core::bail!(
                    "forward_paged: sequence {i} needs {needed} blocks, its table has {}",
                    s.block_table.len()
                );
            }
            if let Some(&b) = s
                .block_table
                .iter()
                .find(|&&b| b as usize >= cache.num_blocks)
            {
                candle_core::bail!("forward_paged: block {b} is outside the cache");
            }
            if let Some(a) = s.adapter.filter(|&a| a >= adapters.len()) {
                candle_core::bail!(
                    "forward_paged: adapter {a} requested, {} given",
                    adapters.len()
                );
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                candle_core::bail!("token id {t} is outside the vocabulary");
            }
        }
        let layout = StepLayout::new(seqs);
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let ids = Tensor::new(ids.as_slice(), self.device())?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?;
        let rope = RopeRows::new(self, &layout.positions);
        let dtype = x.dtype();

        for (i, layer) in self.layers.iter().enumerate() {
            let adapter_layer = |a: usize| adapters.get(a).and_then(|m| m.layers.get(i));
            let lora =
                |k: usize| move |a: usize| adapter_layer(a).and_then(|l| l.linears()[k].lora());
            let attn = &layer.self_attn;
            let h = layer.input_layernorm.forward(&x)?;
            let q = layout.linear(&attn.q_proj, &h, lora(0))?;
            let k = layout.linear(&attn.k_proj, &h, lora(1))?;
            let v = layout.linear(&attn.v_proj, &h, lora(2))?;
            let to_vec = |t: Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            let (mut q, mut k, v) = (to_vec(q)?, to_vec(k)?, to_vec(v)?);
            rope.apply(&mut q, attn.num_heads);
            rope.apply(&mut k, attn.num_kv_heads);
            cache.write(i, &layout, &k, &v);
            let window = cfg.sliding_window.filter(|_| cfg.sliding_layers[i]);
            let out = cache.attend(i, &layout, &q, attn.num_heads, window);
            let out = Tensor::from_vec(
                out,
                (ids.dim(0)?, attn.num_heads * attn.head_dim),
                x.device(),
            )?
            .to_dtype(dtype)?;
            x = (x + layout.linear(&attn.o_proj, &out, lora(3))?)?;
            let h = layer.post_attention_layernorm.forward(&x)?;
            let mlp = &layer.mlp;
            let gate = layout.linear(&mlp.gate_proj, &h, lora(4))?;
            let up = layout.linear(&mlp.up_proj, &h, lora(5))?;
            let act = crate::ops::swiglu(&gate, &up)?;
            x = (x + layout.linear(&mlp.down_proj, &act, lora(6))?)?;
        }
        // Only each sequence's last row is projected onto the vocabulary.
        let last: Vec<u32> = layout.rows.iter().map(|r| (r.end - 1) as u32).collect();
        let last_rows = x.index_select(&Tensor::new(last.as_slice(), x.device())?, 0)?;
        let hidden = self.norm.forward(&last_rows)?;
        let last_layout = StepLayout::new_last_rows(&layout);
        let head_lora = |a: usize| adapters.get(a).and_then(|m| m.lm_head.lora());
        last_layout
            .linear(&self.lm_head, &hidden, head_lora)?
            .to_dtype(DType::F32)
    }
}

impl<'a> StepLayout<'a> {
    /// The layout of a matrix holding only each sequence's last row (for the LM head).
    fn new_last_rows(full: &StepLayout<'a>) -> StepLayout<'a> {
        let rows: Vec<Range<usize>> = (0..full.seqs.len()).map(|i| i..i + 1).collect();
        StepLayout {
            seqs: full.seqs,
            adapter_runs: adapter_runs(full.seqs, &rows),
            rows,
            positions: Vec::new(),
        }
    }
}

/// Runs of consecutive rows whose sequences share an adapter (`rows[i]` are sequence `i`'s).
fn adapter_runs(seqs: &[PagedSeq], rows: &[Range<usize>]) -> Vec<(Range<usize>, usize)> {
    let mut runs: Vec<(Range<usize>, usize)> = Vec::new();
    for (s, r) in seqs.iter().zip(rows) {
        let Some(a) = s.adapter else { continue };
        match runs.last_mut() {
            Some((run, last)) if *last == a && run.end == r.start => run.end = r.end,
            _ => runs.push((r.clone(), a)),
        }
    }
    runs
}

/// Rotary angles for each row's position, in the f32 arithmetic transformers uses.
struct RopeRows {
    /// `[rows, head_dim / 2]`
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeRows {
    fn new(model: &CausalLm, positions: &[usize]) -> Self {
        let cfg = model.config();
        let inv_freq: Vec<f32> = crate::rope::inverse_frequencies(&cfg.rope, cfg.head_dim)
            .into_iter()
            .map(|f| f as f32)
            .collect();
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { cos, sin, half }
    }

    /// Rotates `x` (`[rows, heads, head_dim]`) in place, "rotate half" layout.
    fn apply(&self, x: &mut [f32], heads: usize) {
        let (half, d) = (self.half, 2 * self.half);
        x.par_chunks_mut(heads * d)
            .enumerate()
            .for_each(|(row, chunk)| {
                let cos = &self.cos[row * half..(row + 1) * half];
                let sin = &self.sin[row * half..(row + 1) * half];
                for head in chunk.chunks_mut(d) {
                    let (x1, x2) = head.split_at_mut(half);
                    for j in 0..half {
                        let (a, b) = (x1[j], x2[j]);
                        x1[j] = a * cos[j] - b * sin[j];
                        x2[j] = b * cos[j] + a * sin[j];
                    }
                }
            });
    }
}

impl PagedKvCache {
    /// Stores the step's keys and values (`[rows, kv_heads, head_dim]`) of `layer`.
    fn write(&mut self, layer: usize, layout: &StepLayout, k: &[f32], v: &[f32]) {
        let width = self.kv_heads * self.head_dim;
        for (s, rows) in layout.seqs.iter().zip(&layout.rows) {
            for (j, row) in rows.clone().enumerate() {
                let at = self.offset(s.block_table, s.start + j);
                self.keys[layer][at..at + width]
                    .copy_from_slice(&k[row * width..(row + 1) * width]);
                self.values[layer][at..at + width]
                    .copy_from_slice(&v[row * width..(row + 1) * width]);
            }
        }
    }

    /// Causal attention of every row's query heads (`q`, `[rows, heads, head_dim]`) over its
    /// sequence's cached positions up to its own (the last `window` of them on sliding layers).
    fn attend(
        &self,
        layer: usize,
        layout: &StepLayout,
        q: &[f32],
        heads: usize,
        window: Option<usize>,
    ) -> Vec<f32> {
        let d = self.head_dim;
        let rep = heads / self.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let (keys, values) = (&self.keys[layer], &self.values[layer]);
        // Row → sequence.
        let mut seq_of = Vec::with_capacity(layout.positions.len());
        for (i, rows) in layout.rows.iter().enumerate() {
            seq_of.extend(std::iter::repeat_n(i, rows.len()));
        }
        let mut out = vec![0.0f32; q.len()];
        out.par_chunks_mut(d).enumerate().for_each_init(
            Vec::new,
            |scores: &mut Vec<f32>, (item, out)| {
                let (row, head) = (item / heads, item % heads);
                let seq = &layout.seqs[seq_of[row]];
                let pos = layout.positions[row];
                let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let kv_head = head / rep;
                let query = &q[item * d..(item + 1) * d];
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for j in first..=pos {
                    let at = self.offset(seq.block_table, j) + kv_head * d;
                    let key = &keys[at..at + d];
                    let s = dot(query, key) * scale;
                    max = max.max(s);
                    scores.push(s);
                }
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                for (j, p) in (first..=pos).zip(scores.iter()) {
                    let at = self.offset(seq.block_table, j) + kv_head * d;
                    let value = &values[at..at + d];
                    let w = p * inv;
                    for (o, v) in out.iter_mut().zip(value) {
                        *o += w * v;
                    }
                }
            },
        );
        out
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums let the compiler keep several vector lanes busy.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (x, y) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in a[chunks..].iter().zip(&b[chunks..]) {
        sum += x * y;
    }
    sum
}
