//! The GPTQ checkpoint layout (AutoGPTQ's `checkpoint_format: "gptq"`, the "v1" format that
//! transformers, AutoGPTQ, GPTQModel, vLLM and TGI read), packed from and unpacked to a
//! [`QuantizedMatrix`].
//!
//! Per linear layer (AutoGPTQ `qlinear_cuda_old.pack`; `/work/shared/reference/quant.md` §3.1):
//!
//! | tensor    | dtype | shape                       | content                                        |
//! |-----------|-------|-----------------------------|------------------------------------------------|
//! | `qweight` | i32   | `[in·bits/32, out]`         | 32/bits consecutive *input* rows per word, LSB first |
//! | `qzeros`  | i32   | `[n_groups, out·bits/32]`   | zero points packed along the *output*, LSB first, stored as `zero − 1` |
//! | `scales`  | f16   | `[n_groups, out]`           |                                                |
//! | `g_idx`   | i32   | `[in]`                      | group of each input (`i / group_size` without act-order) |
//!
//! The `zero − 1` is v1's historical quirk: its CUDA kernels add the 1 back. A zero point of 0
//! is stored as `(0 − 1) & mask` (15 at 4 bits), which AutoGPTQ's own packer gets wrong (its
//! unmasked −1 spills into the neighbouring values) but every reader decodes right, since they
//! all add 1 and mask. GPTQModel's `gptq_v2` stores true zero points; [`unpack_as`] reads both.
//!
//! 4 and 8 bits only: that is what kiln quantizes to, and 3-bit packing crosses word
//! boundaries (32 values in 3 words) for no benefit kiln's kernels could use.

use candle_core::Result;
use half::f16;

use super::QuantizedMatrix;

/// The four packed tensors of one GPTQ layer, row-major, in the shapes [`GptqShapes`] gives.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqTensors {
    /// `[in_features · bits / 32, out_features]`.
    pub qweight: Vec<i32>,
    /// `[n_groups, out_features · bits / 32]`.
    pub qzeros: Vec<i32>,
    /// `[n_groups, out_features]`.
    pub scales: Vec<f16>,
    /// `[in_features]`.
    pub g_idx: Vec<i32>,
}

/// How a GPTQ checkpoint stores its zero points (`quantization_config.checkpoint_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroConvention {
    /// `"gptq"` (v1): `zero − 1`, masked to `bits`.
    #[default]
    MinusOne,
    /// `"gptq_v2"` (GPTQModel): the zero points themselves.
    Exact,
}

/// The shapes of a layer's GPTQ tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptqShapes {
    pub qweight: [usize; 2],
    pub qzeros: [usize; 2],
    pub scales: [usize; 2],
    pub g_idx: [usize; 1],
}

/// Values per 32-bit word at `bits`, or an error for widths kiln does not pack.
fn per_word(bits: u8) -> Result<usize> {
    match bits {
        4 | 8 => Ok(32 / usize::from(bits)),
        3 => candle_core::bail!(
            "3-bit GPTQ packs 32 values across 3 int32 words; kiln reads and writes 4- and 8-bit GPTQ"
        ),
        b => candle_core::bail!("{b}-bit GPTQ: kiln reads and writes 4- and 8-bit GPTQ"),
    }
}

/// The tensor shapes of an `out × in` layer quantized to `bits` in groups of `group_size`
/// inputs (`in_features` for one group per row). Errors when the dimensions do not fill whole
/// int32 words.
pub fn shapes(
    bits: u8,
    group_size: usize,
    in_features: usize,
    out_features: usize,
) -> Result<GptqShapes> {
    let per = per_word(bits)?;
    if group_size == 0 {
        candle_core::bail!("GPTQ group size 0");
    }
    if !in_features.is_multiple_of(per) || !out_features.is_multiple_of(per) {
        candle_core::bail!(
            "a {bits}-bit GPTQ layer packs {per} values per int32 along both dimensions: \
             {out_features}x{in_features} does not divide"
        );
    }
    let n_groups = in_features.div_ceil(group_size);
    Ok(GptqShapes {
        qweight: [in_features / per, out_features],
        qzeros: [n_groups, out_features / per],
        scales: [n_groups, out_features],
        g_idx: [in_features],
    })
}

/// Packs `m` in the GPTQ v1 layout. `g_idx` is always written (`i / group_size` without
/// act-order), as AutoGPTQ does.
pub fn pack(m: &QuantizedMatrix) -> Result<GptqTensors> {
    m.validate()?;
    let (bits, inp, out) = (m.bits, m.in_features, m.out_features);
    let sh = shapes(bits, m.group_size, inp, out)?;
    let per = per_word(bits)?;
    let b = u32::from(bits);
    let mask = (1u32 << b) - 1;
    let g_n = m.n_groups();

    let mut qweight = vec![0u32; sh.qweight[0] * out];
    for o in 0..out {
        let row = &m.q[o * inp..(o + 1) * inp];
        for (i, &q) in row.iter().enumerate() {
            let shift = b * (i % per) as u32;
            qweight[(i / per) * out + o] |= u32::from(q) << shift;
        }
    }
    let mut qzeros = vec![0u32; g_n * sh.qzeros[1]];
    let mut scales = vec![f16::ZERO; g_n * out];
    for o in 0..out {
        let shift = b * (o % per) as u32;
        for g in 0..g_n {
            let z = u32::from(m.zeros[o * g_n + g]).wrapping_sub(1) & mask;
            qzeros[g * sh.qzeros[1] + o / per] |= z << shift;
            scales[g * out + o] = f16::from_f32(m.scales[o * g_n + g]);
        }
    }
    let g_idx = (0..inp).map(|i| m.group_of(i) as i32).collect();
    Ok(GptqTensors {
        qweight: qweight.into_iter().map(|w| w as i32).collect(),
        qzeros: qzeros.into_iter().map(|w| w as i32).collect(),
        scales,
        g_idx,
    })
}

/// Unpacks a v1 (`checkpoint_format: "gptq"`) layer; see [`unpack_as`].
pub fn unpack(
    t: &GptqTensors,
    bits: u8,
    group_size: usize,
    in_features: usize,
    out_features: usize,
) -> Result<QuantizedMatrix> {
    unpack_as(
        t,
        bits,
        group_size,
        in_features,
        out_features,
        ZeroConvention::MinusOne,
    )
}

/// Unpacks a GPTQ layer of `out_features × in_features` weights quantized to `bits` in groups
/// of `group_size` inputs (`in_features` for `group_size: -1`). A `g_idx` equal to
/// `i / group_size` becomes `None`.
pub fn unpack_as(
    t: &GptqTensors,
    bits: u8,
    group_size: usize,
    in_features: usize,
    out_features: usize,
    zeros: ZeroConvention,
) -> Result<QuantizedMatrix> {
    let (inp, out) = (in_features, out_features);
    let sh = shapes(bits, group_size, inp, out)?;
    let per = per_word(bits)?;
    let b = u32::from(bits);
    let mask = (1u32 << b) - 1;
    let g_n = sh.scales[0];
    let lens = [
        ("qweight", t.qweight.len(), sh.qweight[0] * sh.qweight[1]),
        ("qzeros", t.qzeros.len(), sh.qzeros[0] * sh.qzeros[1]),
        ("scales", t.scales.len(), sh.scales[0] * sh.scales[1]),
        ("g_idx", t.g_idx.len(), inp),
    ];
    for (name, got, want) in lens {
        if got != want {
            candle_core::bail!(
                "GPTQ {out}x{inp} layer ({bits} bits, group {group_size}): `{name}` has {got} \
                 values, expected {want}"
            );
        }
    }

    let mut q = vec![0u8; out * inp];
    for (r, words) in t.qweight.chunks(out).enumerate() {
        for (o, &w) in words.iter().enumerate() {
            let w = w as u32;
            for j in 0..per {
                q[o * inp + r * per + j] = ((w >> (b * j as u32)) & mask) as u8;
            }
        }
    }
    let mut zs = vec![0u8; out * g_n];
    let mut scales = vec![0f32; out * g_n];
    for g in 0..g_n {
        for o in 0..out {
            let word = t.qzeros[g * sh.qzeros[1] + o / per] as u32;
            let stored = (word >> (b * (o % per) as u32)) & mask;
            let z = match zeros {
                ZeroConvention::MinusOne => stored.wrapping_add(1) & mask,
                ZeroConvention::Exact => stored,
            };
            zs[o * g_n + g] = z as u8;
            scales[o * g_n + g] = t.scales[g * out + o].to_f32();
        }
    }
    let mut g_idx = Vec::with_capacity(inp);
    for (i, &g) in t.g_idx.iter().enumerate() {
        if g < 0 || g as usize >= g_n {
            candle_core::bail!("GPTQ `g_idx[{i}]` = {g}, outside the layer's {g_n} groups");
        }
        g_idx.push(g as u32);
    }
    let natural = g_idx
        .iter()
        .enumerate()
        .all(|(i, &g)| g as usize == i / group_size);
    let m = QuantizedMatrix {
        bits,
        group_size,
        out_features: out,
        in_features: inp,
        q,
        scales,
        zeros: zs,
        g_idx: (!natural).then_some(g_idx),
    };
    m.validate()?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_input_row_lands_in_the_low_nibble() -> Result<()> {
        // 1 output, 8 inputs: one qweight word holding inputs 0..8, input 0 lowest.
        let m = QuantizedMatrix {
            bits: 4,
            group_size: 8,
            out_features: 8,
            in_features: 8,
            q: (0..64).map(|v| (v % 8) as u8).collect(),
            scales: vec![1.0; 8],
            zeros: vec![0; 8],
            g_idx: None,
        };
        let t = pack(&m)?;
        assert_eq!(t.qweight[0] as u32, 0x7654_3210);
        // Zero 0 is stored as 15 in every nibble.
        assert_eq!(t.qzeros, vec![-1]);
        assert_eq!(unpack(&t, 4, 8, 8, 8)?, m);
        Ok(())
    }
}
