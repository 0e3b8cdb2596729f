//! GGUF, llama.cpp's (and Ollama's) model file: kiln writes one from a model directory
//! ([`export_gguf`]) and loads one as a model ([`load_gguf`]).
//!
//! A GGUF file is self-contained: hyperparameters, the tokenizer and the chat template travel as
//! metadata beside the tensors, under llama.cpp's names (`general.*`, `llama.*` / `qwen2.*`,
//! `tokenizer.ggml.*`). candle reads and writes the container (`gguf_file`, version 2, 32-byte
//! alignment) and quantizes the blocks; this module decides what goes in and how it maps onto
//! kiln's model:
//!
//! - **Names and layout.** Tensors take llama.cpp's names (`blk.0.attn_q.weight`, …). For the
//!   `llama` architecture (Llama and Mistral) the rows of `q_proj` and `k_proj` are permuted as
//!   llama.cpp's converter does: Hugging Face rotates halves of each head (`rotate_half`), ggml's
//!   `llama` RoPE rotates adjacent pairs, and the permutation turns one into the other. The
//!   import undoes it. `qwen2` uses the NeoX (halves) RoPE in ggml too and is stored as is.
//! - **Types** ([`GgufType`]): llama-quantize's mixes, including its per-tensor fallbacks when a
//!   row is not a whole number of blocks (see [`tensor_type`]).
//! - **Import.** Q8_0, Q4_0, Q5_0, Q4_K and Q6_K weights become kiln's packed 4-/8-bit form
//!   exactly (`blocks`); any other type (F16, F32, the rest of the k-quants) is dequantized to a
//!   dense weight. The config is resolved through the same code as `config.json`, so a GGUF
//!   model is validated like any other.

mod blocks;
mod export;
mod import;
mod vocab;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::quantized::GgmlDType;

pub use export::{export_gguf, export_loaded};
pub use import::load_gguf;

/// What `kiln export gguf --type` offers: llama.cpp's file types of the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// Every matrix F16; norms and biases F32.
    F16,
    /// Matrices Q8_0 (8.5 bits per weight).
    Q8_0,
    /// Matrices Q4_0, the output matrix Q6_K (as llama-quantize does).
    Q4_0,
    /// Q4_K with Q6_K for the output matrix and for `attn_v`/`ffn_down` on a subset of layers.
    Q4KM,
}

impl GgufType {
    pub const ALL: [Self; 4] = [Self::F16, Self::Q8_0, Self::Q4_0, Self::Q4KM];

    /// llama.cpp's `LLAMA_FTYPE_MOSTLY_*`, written as `general.file_type`.
    pub fn file_type(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4KM => "q4_k_m",
        }
    }
}

impl fmt::Display for GgufType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GgufType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown GGUF type `{s}` (expected f16, q8_0, q4_0 or q4_k_m)"))
    }
}

/// llama.cpp's name of a tensor type (`Q4_K`, not candle's `Q4K`).
pub fn ggml_type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// A tensor stored in another type than its mix asks for, because its rows are not whole
/// blocks of the wanted type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeFallback {
    pub tensor: String,
    pub wanted: GgmlDType,
    pub used: GgmlDType,
}

/// One step of an export, for a progress display: `done` of `total` tensors are quantized.
#[derive(Debug, Clone, Copy)]
pub struct ExportProgress<'a> {
    pub done: usize,
    pub total: usize,
    pub tensor: &'a str,
}

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub path: PathBuf,
    /// `general.architecture`: `llama` or `qwen2`.
    pub architecture: &'static str,
    pub file_type: GgufType,
    /// Tensor count per stored type, by llama.cpp's type name.
    pub tensors_by_type: BTreeMap<&'static str, usize>,
    pub fallbacks: Vec<TypeFallback>,
    /// Values stored in all tensors.
    pub elements: u64,
    /// Bytes of tensor data (without metadata and padding).
    pub tensor_bytes: u64,
    /// The file's size on disk.
    pub file_bytes: u64,
}

impl ExportReport {
    pub fn tensors(&self) -> usize {
        self.tensors_by_type.values().sum()
    }

    /// Bits per stored value over all tensors, as llama-quantize reports it.
    pub fn bits_per_weight(&self) -> f64 {
        if self.elements == 0 {
            return 0.0;
        }
        self.tensor_bytes as f64 * 8.0 / self.elements as f64
    }
}

/// The role of a tensor in llama-quantize's type choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Norm weights, biases, RoPE factors: always F32.
    Vector,
    /// `token_embd.weight` of a model with its own output matrix.
    Embedding,
    /// `output.weight`, or `token_embd.weight` when the head is tied to it.
    Output,
    /// `blk.N.attn_v.weight` and `blk.N.ffn_down.weight`: more bits on some layers in Q4_K_M.
    MoreBitsCandidate { layer: usize },
    /// Every other matrix.
    Matrix,
}

/// llama-quantize's `use_more_bits`: the first and last eighth of the layers, and every third
/// in between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The type a tensor is stored in, and the type the mix wanted when a fallback replaced it.
///
/// The mixes follow llama.cpp's `llama_tensor_get_type`: the output matrix is Q6_K unless the
/// mix is Q8_0 or F16; Q4_K_M promotes `attn_v` and `ffn_down` to Q6_K on [`use_more_bits`]
/// layers. A row length (`cols`) that is not whole blocks falls back as llama.cpp's
/// `tensor_type_fallback` does: Q4_K → Q5_0, Q6_K → Q8_0, and F16 when not even whole 32-value
/// blocks.
pub(crate) fn tensor_type(
    ty: GgufType,
    role: Role,
    n_layers: usize,
    cols: usize,
) -> (GgmlDType, Option<GgmlDType>) {
    let wanted = match (ty, role) {
        (_, Role::Vector) => return (GgmlDType::F32, None),
        (GgufType::F16, _) => GgmlDType::F16,
        (GgufType::Q8_0, _) => GgmlDType::Q8_0,
        (_, Role::Output) => GgmlDType::Q6K,
        (GgufType::Q4_0, _) => GgmlDType::Q4_0,
        (GgufType::Q4KM, Role::MoreBitsCandidate { layer }) if use_more_bits(layer, n_layers) => {
            GgmlDType::Q6K
        }
        (GgufType::Q4KM, _) => GgmlDType::Q4K,
    };
    let mut used = wanted;
    if !cols.is_multiple_of(used.block_size()) {
        used = match used {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            other => other,
        };
    }
    if !cols.is_multiple_of(used.block_size()) {
        used = GgmlDType::F16;
    }
    (used, (used != wanted).then_some(wanted))
}

/// The GGUF name of a Hugging Face module path (`model.layers.3.self_attn.q_proj` →
/// `blk.3.attn_q`), for the modules kiln's decoder has.
pub(crate) fn gguf_module(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens" => return Some("token_embd".into()),
        "model.norm" => return Some("output_norm".into()),
        "lm_head" => return Some("output".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let name = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}"))
}

/// The row order llama.cpp's converter gives q/k projections of the `llama` architecture:
/// GGUF row `r` holds Hugging Face row `from[r]`. Within each head of `head_dim` rows, HF's
/// halves `[x_0 … x_{d/2−1} | y_0 … y_{d/2−1}]` become pairs `[x_0 y_0 x_1 y_1 …]`
/// (`reshape(n_head, 2, d/2, …).swapaxes(1, 2)` in `convert_hf_to_gguf.py`).
pub(crate) fn rope_permutation(rows: usize, n_head: usize) -> Vec<usize> {
    let head_dim = rows / n_head.max(1);
    let half = head_dim / 2;
    (0..rows)
        .map(|r| {
            let (h, j) = (r / head_dim, r % head_dim);
            h * head_dim + (j % 2) * half + j / 2
        })
        .collect()
}

/// The inverse of a permutation given as `from`.
pub(crate) fn invert(from: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; from.len()];
    for (r, &src) in from.iter().enumerate() {
        inv[src] = r;
    }
    inv
}

/// An f32 read back from a GGUF as the decimal it was written from (`1e-5f32` → `1e-5`), so
/// that configs survive the f32 round trip unchanged.
pub(crate) fn f32_as_written(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn permutation_interleaves_halves_per_head() {
        // 2 heads of 4 rows: HF [a0 a1 b0 b1 | c0 c1 d0 d1] → GGUF [a0 b0 a1 b1 | c0 d0 c1 d1].
        assert_eq!(rope_permutation(8, 2), vec![0, 2, 1, 3, 4, 6, 5, 7]);
        let p = rope_permutation(48, 3);
        let inv = invert(&p);
        assert!((0..48).all(|r| inv[p[r]] == r));
    }

    #[test]
    fn q4_k_m_mix_follows_llama_quantize() {
        let t = |role, cols| tensor_type(GgufType::Q4KM, role, 8, cols);
        assert_eq!(t(Role::Matrix, 4096), (GgmlDType::Q4K, None));
        assert_eq!(t(Role::Output, 4096), (GgmlDType::Q6K, None));
        // Layers 0 and 7 (first and last eighth) and 3, 6 ((i − 1) % 3 == 2) get more bits.
        let more: Vec<usize> = (0..8)
            .filter(|&layer| t(Role::MoreBitsCandidate { layer }, 4096).0 == GgmlDType::Q6K)
            .collect();
        assert_eq!(more, vec![0, 3, 6, 7]);
        assert_eq!(t(Role::Matrix, 64), (GgmlDType::Q5_0, Some(GgmlDType::Q4K)));
        assert_eq!(t(Role::Output, 64), (GgmlDType::Q8_0, Some(GgmlDType::Q6K)));
        assert_eq!(t(Role::Matrix, 40), (GgmlDType::F16, Some(GgmlDType::Q4K)));
        assert_eq!(t(Role::Vector, 64), (GgmlDType::F32, None));
        assert_eq!(
            tensor_type(GgufType::Q8_0, Role::Output, 2, 64),
            (GgmlDType::Q8_0, None)
        );
        assert_eq!(
            tensor_type(GgufType::F16, Role::Embedding, 2, 7),
            (GgmlDType::F16, None)
        );
    }

    #[test]
    fn module_names_map_to_llama_cpp() {
        assert_eq!(
            gguf_module("model.layers.12.self_attn.o_proj").as_deref(),
            Some("blk.12.attn_output")
        );
        assert_eq!(gguf_module("lm_head").as_deref(), Some("output"));
        assert_eq!(gguf_module("model.layers.x.mlp.up_proj"), None);
        assert_eq!("Q4_K_M".parse::<GgufType>(), Ok(GgufType::Q4KM));
        assert!("q5_k".parse::<GgufType>().is_err());
        assert_eq!(f32_as_written(1e-5f32), 1e-5);
    }
}
