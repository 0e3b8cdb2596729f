//! The decoder of Llama (Touvron et al., 2023, <https://arxiv.org/abs/2302.13971>), Mistral and
//! Qwen2, following `transformers.models.llama.modeling_llama`: pre-norm blocks of grouped-query
//! attention with rotary embeddings and a SwiGLU MLP, RMSNorm, an LM head.
//!
//! One implementation serves training and inference. Every op is differentiable; candle's fused
//! kernels (RMSNorm, RoPE, softmax), which record no backward, are taken only when the input
//! carries no gradient (`Tensor::track_op`), so inference is fast and training is exact.

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use kiln_core::ModelConfig;

use crate::attention::CausalSelfAttention;
use crate::fused_layer::{FusedDecoderLayer, FusedLora, FusedState, LayerWeights};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::linear::LinearWeight;
use crate::rope::{RopeTables, RotaryEmbedding};

/// Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in f32 as transformers does.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub(crate) weight: Tensor,
    pub(crate) eps: f64,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            eps: self.eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == DType::F32
            && x.device().is_cpu()
            && (x.track_op() || self.weight.track_op())
        {
            crate::ops::rms_norm(x, &self.weight, self.eps)
        } else if x.track_op() || self.weight.track_op() {
            let dtype = x.dtype();
            let x32 = x.to_dtype(DType::F32)?;
            let inv_rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
                .sqrt()?
                .recip()?;
            x32.broadcast_mul(&inv_rms)?
                .to_dtype(dtype)?
                .broadcast_mul(&self.weight)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
        }
    }
}

/// Softmax over the last dimension in f32: candle's kernel when no gradient is needed, kiln's
/// fused kernel with its own backward when one is.
fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let p = if x.track_op() {
        crate::ops::softmax_last_dim(&x)?
    } else {
        candle_nn::ops::softmax_last_dim(&x)?
    };
    p.to_dtype(dtype)
}

#[derive(Debug, Clone)]
pub(crate) struct Attention {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &ModelConfig, linear: LinearLoader) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        Ok(Self {
            q_proj: linear(vb.pp("q_proj"), h, cfg.num_heads * d, cfg.qkv_bias)?,
            k_proj: linear(vb.pp("k_proj"), h, cfg.num_kv_heads * d, cfg.qkv_bias)?,
            v_proj: linear(vb.pp("v_proj"), h, cfg.num_kv_heads * d, cfg.qkv_bias)?,
            o_proj: linear(vb.pp("o_proj"), cfg.num_heads * d, h, cfg.o_bias)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: d,
        })
    }

    /// `x` is `[batch · seq, hidden]`; so is the result.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &LayerContext,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, s) = (ctx.batch, ctx.seq);
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        if let (Some(fused), None) = (ctx.fused, &cache) {
            let out = fused.apply(
                &self.q_proj.forward(x)?,
                &self.k_proj.forward(x)?,
                &self.v_proj.forward(x)?,
            )?;
            return self.o_proj.forward(&out);
        }
        let (rope, mask) = (ctx.rope, ctx.mask);
        if let Some(observe) = ctx.observe {
            for name in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] {
                observe(name, x);
            }
        }
        let heads = |t: Tensor, n: usize| t.reshape((b, s, n, hd))?.transpose(1, 2);
        let q = rope.apply(&heads(self.q_proj.forward(x)?, nh)?)?;
        let k = rope.apply(&heads(self.k_proj.forward(x)?, nkv)?)?;
        let v = heads(self.v_proj.forward(x)?, nkv)?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v)?,
            // Without a cache, make K/V contiguous once; cached views already have a layout the
            // batched matmul reads in place.
            None => (k.contiguous()?, v.contiguous()?),
        };
        let t = k.dim(2)?;

        // Grouped-query attention without copying K/V: the `rep` query heads sharing a KV head
        // are stacked along the sequence axis, so one batched matmul per KV head serves them all.
        let rep = nh / nkv;
        let q = q.contiguous()?.reshape((b, nkv, rep * s, hd))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = scores.reshape((b, nh, s, t))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last_dim(&scores)?.reshape((b, nkv, rep * s, t))?;
        let out = probs.matmul(&v)?;
        let out = out
            .reshape((b, nh, s, hd))?
            .transpose(1, 2)?
            .reshape((b * s, nh * hd))?;
        if let Some(observe) = ctx.observe {
            observe("self_attn.o_proj", &out);
        }
        self.o_proj.forward(&out)
    }
}

/// What every layer of one forward pass shares.
struct LayerContext<'a> {
    batch: usize,
    seq: usize,
    rope: &'a RopeTables,
    /// The additive mask of the composed path.
    mask: Option<&'a Tensor>,
    /// The fused attention op, when it serves this pass.
    fused: Option<&'a CausalSelfAttention>,
    /// Gradient sink and buffer pool of fused layers; `None` when layers run composed.
    fused_state: Option<&'a FusedState>,
    /// Sees the input of every linear layer (calibration for quantization); composed path only.
    observe: Option<Observer<'a>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &ModelConfig, linear: LinearLoader) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(vb.pp("gate_proj"), h, i, bias)?,
            up_proj: linear(vb.pp("up_proj"), h, i, bias)?,
            down_proj: linear(vb.pp("down_proj"), i, h, bias)?,
        })
    }

    fn forward(&self, x: &Tensor, observe: Option<Observer>) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        let act = crate::ops::swiglu(&gate, &up)?;
        if let Some(observe) = observe {
            observe("mlp.gate_proj", x);
            observe("mlp.up_proj", x);
            observe("mlp.down_proj", &act);
        }
        self.down_proj.forward(&act)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct DecoderLayer {
    pub(crate) self_attn: Attention,
    pub(crate) mlp: Mlp,
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &ModelConfig, linear: LinearLoader) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), cfg, linear)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, linear)?,
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &LayerContext,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        if let (Some(attention), Some(state), None) = (ctx.fused, ctx.fused_state, &cache)
            && (x.track_op() || self.has_trainable())
            && let Some(weights) = self.fusable_weights()
        {
            return FusedDecoderLayer::new(weights, attention.clone(), state.clone())?.apply(x);
        }
        let h = (x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, ctx, cache)?)?;
        &h + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?, ctx.observe)?
    }

    fn detached(&self) -> Self {
        let a = &self.self_attn;
        let m = &self.mlp;
        Self {
            self_attn: Attention {
                q_proj: a.q_proj.detached(),
                k_proj: a.k_proj.detached(),
                v_proj: a.v_proj.detached(),
                o_proj: a.o_proj.detached(),
                ..a.clone()
            },
            mlp: Mlp {
                gate_proj: m.gate_proj.detached(),
                up_proj: m.up_proj.detached(),
                down_proj: m.down_proj.detached(),
            },
            input_layernorm: self.input_layernorm.detached(),
            post_attention_layernorm: self.post_attention_layernorm.detached(),
        }
    }

    pub(crate) fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// Whether any weight of the layer (adapters included) is being trained.
    fn has_trainable(&self) -> bool {
        let norms = [
            &self.input_layernorm.weight,
            &self.post_attention_layernorm.weight,
        ];
        norms.iter().any(|w| w.track_op())
            || self.linears().iter().any(|l| {
                matches!(l.weight(), LinearWeight::Dense(w) if w.track_op())
                    || l.lora().is_some_and(|a| a.is_training())
            })
    }

    /// The weights, when the whole layer can run as one fused training op: dense f32 linears
    /// without bias, with or without f32 LoRA adapters. Draws this pass's dropout masks.
    fn fusable_weights(&self) -> Option<LayerWeights> {
        let dense = |l: &Linear| match (l.weight(), l.bias()) {
            (LinearWeight::Dense(w), None) if w.dtype() == DType::F32 => Some(w.clone()),
            _ => None,
        };
        let linears = self.linears();
        if linears.iter().any(|l| {
            l.lora()
                .is_some_and(|a| a.a.dtype() != DType::F32 || a.b.dtype() != DType::F32)
        }) {
            return None;
        }
        let (attn, mlp) = (&self.self_attn, &self.mlp);
        let eps = self.input_layernorm.eps;
        if eps != self.post_attention_layernorm.eps {
            return None;
        }
        let weights = LayerWeights {
            input_norm: self.input_layernorm.weight.clone(),
            q: dense(&attn.q_proj)?,
            k: dense(&attn.k_proj)?,
            v: dense(&attn.v_proj)?,
            o: dense(&attn.o_proj)?,
            post_norm: self.post_attention_layernorm.weight.clone(),
            gate: dense(&mlp.gate_proj)?,
            up: dense(&mlp.up_proj)?,
            down: dense(&mlp.down_proj)?,
            eps: eps as f32,
            lora: linears.map(|l| {
                l.lora().map(|a| FusedLora {
                    a: a.a.clone(),
                    b: a.b.clone(),
                    scale: a.scale as f32,
                    dropout: a.dropout,
                    mask_seed: a.next_mask_seed(),
                })
            }),
        };
        Some(weights)
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            ("self_attn.q_proj", &mut self.self_attn.q_proj),
            ("self_attn.k_proj", &mut self.self_attn.k_proj),
            ("self_attn.v_proj", &mut self.self_attn.v_proj),
            ("self_attn.o_proj", &mut self.self_attn.o_proj),
            ("mlp.gate_proj", &mut self.mlp.gate_proj),
            ("mlp.up_proj", &mut self.mlp.up_proj),
            ("mlp.down_proj", &mut self.mlp.down_proj),
        ]
    }
}

/// Sees `(name, input)` for each linear layer a calibration pass runs ([`CausalLm::layer_forward`]).
pub type Observer<'a> = &'a dyn Fn(&str, &Tensor);

/// Builds one linear layer: `(vb, in_features, out_features, bias)`, as [`Linear::load`].
pub type LinearLoader<'a> = &'a dyn Fn(VarBuilder, usize, usize, bool) -> Result<Linear>;

/// A decoder-only language model: `LlamaForCausalLM`, `MistralForCausalLM` or `Qwen2ForCausalLM`.
#[derive(Debug, Clone)]
pub struct CausalLm {
    pub(crate) cfg: ModelConfig,
    pub(crate) embed_tokens: Tensor,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: RmsNorm,
    pub(crate) lm_head: Linear,
    pub(crate) rope: RotaryEmbedding,
    /// Weight gradients of fused layers (collected by [`CausalLm::backward`]) and their buffers.
    pub(crate) fused_state: FusedState,
    /// Whether training passes run each decoder layer as one fused op.
    pub(crate) fused_layers: bool,
}

impl CausalLm {
    /// Builds the model from a `VarBuilder` rooted at the checkpoint's top level (`model.*`,
    /// `lm_head.*`). With a `VarMap`-backed builder the weights are trainable variables.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Self::load_with_linears(vb, cfg, &Linear::load)
    }

    /// [`CausalLm::load`] with every linear layer built by `linear(vb, in, out, bias)`, `vb`
    /// rooted at the layer (`vb.prefix()` is its module path, e.g.
    /// `model.layers.0.self_attn.q_proj`): how quantized checkpoints, whose layers store
    /// `qweight`/`scales` instead of `weight`, are read through the same model code. A tied LM
    /// head shares the embedding and is not built through `linear`.
    pub fn load_with_linears(
        vb: VarBuilder,
        cfg: &ModelConfig,
        linear: LinearLoader,
    ) -> Result<Self> {
        let base = vb.pp("model");
        let embed_tokens = base
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(base.pp("layers").pp(i), cfg, linear))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(base.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.clone(), None)?
        } else {
            linear(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: RotaryEmbedding::new(&cfg.rope, cfg.head_dim, vb.device())?,
            fused_state: FusedState::default(),
            fused_layers: true,
        })
    }

    /// Gradients of `loss` with respect to every variable it depends on. Use this rather than
    /// `loss.backward()`: layers that train as one fused op compute their weight gradients
    /// themselves, and this is where they join the store.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        self.fused_state.drain_into(&mut grads)?;
        Ok(grads)
    }

    /// The same model on the same storage with no variable in it: forward passes through it
    /// record no graph and save no activations, and still see every in-place update an
    /// optimizer makes to the trained weights. For evaluation during training.
    pub fn detached(&self) -> Self {
        Self {
            cfg: self.cfg.clone(),
            embed_tokens: self.embed_tokens.detach(),
            layers: self.layers.iter().map(DecoderLayer::detached).collect(),
            norm: self.norm.detached(),
            lm_head: self.lm_head.detached(),
            rope: self.rope.clone(),
            fused_state: FusedState::default(),
            fused_layers: self.fused_layers,
        }
    }

    /// The base model under an attached adapter: [`CausalLm::detached`] with every LoRA update
    /// removed, on the same storage as the base weights (no copy is made). This is PEFT's
    /// `disable_adapter()`, and DPO's and PPO's reference model in a LoRA run.
    pub fn without_adapters(&self) -> Self {
        let mut base = self.detached();
        for (_, linear) in base.linears_mut() {
            linear.remove_lora();
        }
        base
    }

    /// Whether any linear layer carries a LoRA update.
    pub fn has_adapters(&self) -> bool {
        self.linears().iter().any(|(_, l)| l.lora().is_some())
    }

    /// Turns the fused decoder-layer op of training passes on (the default) or off. Off, every
    /// layer is composed from separately differentiable ops: the reference the fused op is
    /// tested against, and a way to rule it out when a result looks wrong.
    pub fn set_fused_layers(&mut self, enabled: bool) {
        self.fused_layers = enabled;
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// A fresh, empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Hidden states after the final norm, `[batch, seq, hidden]`, for `input_ids` `[batch, seq]`
    /// at positions `cache.len()..` (or `0..` without a cache).
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        self.hidden_rows(input_ids, cache)?
            .reshape((b, s, self.cfg.hidden_size))
    }

    /// Next-token negative log-likelihoods: `−log p(targets[i] | input_ids up to i)` for every
    /// position of `input_ids` (`[batch, seq]`), with u32 `targets` `[batch · seq]`; `[batch · seq]`
    /// f32, differentiable. The LM head and the cross-entropy run as one op where they can, so
    /// the `[tokens, vocab]` logits are never a tensor of the graph.
    pub fn token_nll(&self, input_ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let hidden = self.hidden_rows(input_ids, None)?;
        match (
            self.lm_head.weight(),
            self.lm_head.bias(),
            self.lm_head.lora(),
        ) {
            (LinearWeight::Dense(w), None, None) => {
                crate::loss::linear_cross_entropy(&hidden, w, targets)
            }
            _ => crate::ops::cross_entropy_rows(&self.project(&hidden)?, targets),
        }
    }

    /// Hidden states after the final norm as rows, `[batch · seq, hidden]`.
    fn hidden_rows(&self, input_ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if s == 0 {
            candle_core::bail!("forward pass over an empty sequence: input_ids has shape [{b}, 0]");
        }
        let start = cache.as_ref().map_or(0, |c| c.len());
        // The hidden state stays `[batch · seq, hidden]` through the layers: every op but
        // attention is row-wise, and a reshape would be one more node in the backward graph.
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?;
        let rope = self.rope.tables(start, s, x.dtype())?;
        let cfg = &self.cfg;
        // Without a cache (training, scoring, prefill from scratch) attention runs fused.
        let fused_for = |window: Option<usize>| -> Result<Option<CausalSelfAttention>> {
            if cache.is_some() || !crate::attention::supported(x.dtype(), x.device()) {
                return Ok(None);
            }
            let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
            CausalSelfAttention::new(b, s, nh, nkv, hd, window, &rope).map(Some)
        };
        let fused_full = fused_for(None)?;
        if fused_full.is_some() && self.fused_layers {
            self.fused_state.discard_pending()?;
        }
        let fused_window = match cfg.sliding_window {
            Some(w) => fused_for(Some(w))?,
            None => None,
        };
        let (full_mask, window_mask) = if fused_full.is_some() {
            (None, None)
        } else {
            let window_mask = match cfg.sliding_window {
                Some(w) => self.attention_mask(start, s, Some(w), x.dtype())?,
                None => None,
            };
            (self.attention_mask(start, s, None, x.dtype())?, window_mask)
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let windowed = cfg.sliding_layers[i];
            let ctx = LayerContext {
                batch: b,
                seq: s,
                rope: &rope,
                mask: if windowed {
                    window_mask.as_ref()
                } else {
                    full_mask.as_ref()
                },
                fused: if windowed {
                    fused_window.as_ref()
                } else {
                    fused_full.as_ref()
                },
                fused_state: self.fused_layers.then_some(&self.fused_state),
                observe: None,
            };
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            x = layer.forward(&x, &ctx, layer_cache)?;
        }
        self.norm.forward(&x)
    }

    /// Logits for every position, `[batch, seq, vocab]`, in f32.
    pub fn forward(&self, input_ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.project(&self.forward_hidden(input_ids, cache)?)
    }

    /// Projects hidden states onto the vocabulary: logits in f32.
    pub fn project(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)?.to_dtype(DType::F32)
    }

    /// Logits of the last position only, `[batch, vocab]`, in f32: what generation needs, without
    /// projecting every prompt position onto the vocabulary.
    pub fn forward_last(&self, input_ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, cache)?;
        let s = hidden.dim(1)?;
        self.project(&hidden.narrow(1, s - 1, 1)?.squeeze(1)?)
    }

    /// The additive causal mask `[seq, start + seq]`, limited to the last `window` positions
    /// when given, or `None` when every cached position is visible (single-token decode).
    fn attention_mask(
        &self,
        start: usize,
        s: usize,
        window: Option<usize>,
        dtype: DType,
    ) -> Result<Option<Tensor>> {
        let t = start + s;
        if s == 1 && window.is_none_or(|w| t <= w) {
            return Ok(None);
        }
        let mask: Vec<f32> = (0..s)
            .flat_map(|i| {
                let pos = start + i;
                (0..t).map(move |j| {
                    let visible = j <= pos && window.is_none_or(|w| pos - j < w);
                    if visible { 0.0 } else { f32::NEG_INFINITY }
                })
            })
            .collect();
        Ok(Some(
            Tensor::from_vec(mask, (s, t), self.device())?.to_dtype(dtype)?,
        ))
    }

    /// Every linear layer with its module path as PEFT names it (`model.layers.0.self_attn.q_proj`,
    /// `lm_head`); the LM head is shared with the embedding when tied, and then not listed.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, linear) in layer.linears_mut() {
                out.push((format!("model.layers.{i}.{name}"), linear));
            }
        }
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head".to_string(), &mut self.lm_head));
        }
        out
    }

    /// Every linear layer with its module path, as [`CausalLm::linears_mut`] lists them.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (i, layer) in self.layers.iter().enumerate() {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            for (name, linear) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                out.push((format!("model.layers.{i}.{name}"), linear));
            }
        }
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head".to_string(), &self.lm_head));
        }
        out
    }

    /// The model's weights under their Hugging Face names (`model.embed_tokens.weight`,
    /// `model.layers.0.self_attn.q_proj.weight`, …), as `model.safetensors` stores them: dense
    /// weights only (an attached LoRA update is not included; merge it first to save a merged
    /// model). A tied LM head is not listed. Quantized layers are an error.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                layer.input_layernorm.weight.clone(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight.clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight.clone()));
        for (path, linear) in self.linears() {
            match linear.weight() {
                LinearWeight::Dense(w) => out.push((format!("{path}.weight"), w.clone())),
                LinearWeight::Quantized(_) | LinearWeight::Packed(_) => candle_core::bail!(
                    "`{path}` is quantized: a quantized model has no dense state dict"
                ),
            }
            if let Some(b) = linear.bias() {
                out.push((format!("{path}.bias"), b.clone()));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Folds every attached LoRA update into its base weight.
    pub fn merge_lora(&mut self) -> Result<()> {
        for (_, linear) in self.linears_mut() {
            linear.merge_lora()?;
        }
        Ok(())
    }

    /// Lays every dense linear weight out for inference with batches of rows
    /// ([`Linear::store_transposed`]): measured on a 26M-parameter Llama, a 16-row decode step
    /// went from 53 ms to a few. The LM head of a tied model gets its own transposed copy of the
    /// embedding matrix. Not for a model being trained.
    pub fn store_weights_transposed(&mut self) -> Result<()> {
        for (_, linear) in self.linears_mut() {
            linear.store_transposed()?;
        }
        if self.cfg.tie_word_embeddings {
            self.lm_head.store_transposed()?;
        }
        Ok(())
    }

    /// Quantizes every decoder linear layer in place (the embedding and LM head stay dense).
    pub fn quantize(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<()> {
        for (name, linear) in self.linears_mut() {
            if name != "lm_head" {
                linear.quantize(dtype)?;
            }
        }
        Ok(())
    }

    /// Embedding rows `[batch · seq, hidden]` for `input_ids` `[batch, seq]`: the input of
    /// decoder layer 0, for layer-by-layer calibration ([`CausalLm::layer_forward`]).
    pub fn embed_rows(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.index_select(&input_ids.flatten_all()?, 0)
    }

    /// Runs decoder layer `layer` alone over `x` (`[batch · seq, hidden]`, positions `0..seq`,
    /// causal), the composed path, outside any graph; `observe(name, input)` sees the input of
    /// each of its linear layers, named as in [`CausalLm::layer_linear_mut`]. This is what GPTQ
    /// and AWQ calibrate on, one block at a time.
    pub fn layer_forward(
        &self,
        layer: usize,
        x: &Tensor,
        batch: usize,
        seq: usize,
        observe: Option<Observer>,
    ) -> Result<Tensor> {
        let Some(block) = self.layers.get(layer) else {
            candle_core::bail!("layer {layer}: the model has {}", self.layers.len());
        };
        let window = self
            .cfg
            .sliding_window
            .filter(|_| self.cfg.sliding_layers[layer]);
        let rope = self.rope.tables(0, seq, x.dtype())?;
        let mask = self.attention_mask(0, seq, window, x.dtype())?;
        let ctx = LayerContext {
            batch,
            seq,
            rope: &rope,
            mask: mask.as_ref(),
            fused: None,
            fused_state: None,
            observe,
        };
        block.forward(x, &ctx, None)
    }

    /// The names [`CausalLm::layer_linear_mut`] takes, in the order a block computes them.
    pub const LAYER_LINEARS: [&'static str; 7] = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];

    /// One linear layer of decoder layer `layer`, by its name within the block
    /// (`self_attn.q_proj`, …, `mlp.down_proj`).
    pub fn layer_linear_mut(&mut self, layer: usize, name: &str) -> Result<&mut Linear> {
        let n = self.layers.len();
        let Some(block) = self.layers.get_mut(layer) else {
            candle_core::bail!("layer {layer}: the model has {n}");
        };
        match block
            .linears_mut()
            .into_iter()
            .find(|(path, _)| *path == name)
        {
            Some((_, linear)) => Ok(linear),
            None => candle_core::bail!("no linear layer `{name}` in a decoder block"),
        }
    }

    /// Divides the weight of decoder layer `layer`'s `input_layernorm` (or, with `post_attention`,
    /// its `post_attention_layernorm`) by `scales` per channel: AWQ folds the inverse of its
    /// input-channel scales into the norm that feeds the scaled linear layers.
    pub fn divide_layer_norm(
        &mut self,
        layer: usize,
        post_attention: bool,
        scales: &Tensor,
    ) -> Result<()> {
        let Some(block) = self.layers.get_mut(layer) else {
            candle_core::bail!("layer {layer}: the model has {}", self.cfg.num_layers);
        };
        let norm = if post_attention {
            &mut block.post_attention_layernorm
        } else {
            &mut block.input_layernorm
        };
        norm.weight = norm
            .weight
            .broadcast_div(&scales.to_dtype(norm.weight.dtype())?)?
            .detach();
        Ok(())
    }

    /// Parameters as stored (the tied LM head counted once).
    pub fn num_parameters(&self) -> usize {
        self.cfg.num_parameters()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};
    use kiln_core::ModelConfig;
    use kiln_core::config::RawConfig;

    use super::CausalLm;
    use crate::lora::{LoraConfig, TargetModules};

    fn tiny_config() -> ModelConfig {
        let raw: RawConfig = serde_json::from_str(
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 50, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64}"#,
        )
        .expect("parses");
        ModelConfig::from_raw(raw, std::path::Path::new("config.json")).expect("valid")
    }

    /// The fused layers' pool size after each of several training passes (forward and
    /// backward) over batches of changing shapes.
    fn pooled_after_passes(model: &CausalLm) -> Result<Vec<usize>> {
        let shapes = [(2, 9), (3, 5), (2, 9), (1, 12), (3, 7), (2, 9), (4, 6)];
        let mut pooled = Vec::new();
        for (i, &(b, s)) in shapes.iter().enumerate() {
            let ids: Vec<u32> = (0..b * s).map(|j| ((i * 31 + j * 7) % 50) as u32).collect();
            let ids = Tensor::from_vec(ids, (b, s), model.device())?;
            let targets = ids.narrow(1, 1, s - 1)?.flatten_all()?;
            let loss = model
                .token_nll(&ids.narrow(1, 0, s - 1)?, &targets)?
                .sum_all()?;
            model.backward(&loss)?;
            pooled.push(model.fused_state.pooled());
        }
        Ok(pooled)
    }

    /// Every buffer a training pass keeps for its backward pass returns to the pool it came from,
    /// so the pool holds as many buffers after the hundredth step as after the first. (A layer's
    /// attention output, allocated outside the pool and given to it by the backward pass, once
    /// added a buffer per layer and step: resident memory grew without bound on long runs.)
    #[test]
    fn training_passes_keep_the_buffer_pool_the_same_size() -> Result<()> {
        let cfg = tiny_config();
        let dev = Device::Cpu;
        let weights = crate::init::init_weights(&cfg, 0.02, 0, DType::F32, &dev)?;
        // Full training: every weight a variable.
        let varmap = VarMap::new();
        for (name, t) in &weights {
            varmap
                .data()
                .lock()
                .expect("variable map")
                .insert(name.clone(), Var::from_tensor(t)?);
        }
        let full = CausalLm::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
        // A frozen base with trainable adapters on every linear, with dropout.
        let mut lora = CausalLm::load(VarBuilder::from_tensors(weights, DType::F32, &dev), &cfg)?;
        let mut lora_cfg = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
        lora_cfg.lora_dropout = 0.1;
        crate::lora_train::attach_trainable_lora(&mut lora, &lora_cfg, 0)?;
        for (what, model) in [("full", &full), ("lora", &lora)] {
            let pooled = pooled_after_passes(model)?;
            assert!(pooled[0] > 0, "{what}: the fused layers did not run");
            assert!(
                pooled.iter().all(|&n| n == pooled[0]),
                "{what}: pooled buffers after each pass: {pooled:?}"
            );
        }
        Ok(())
    }
}
