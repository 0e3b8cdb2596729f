//! The AWQ checkpoint layout: AutoAWQ's `version: "gemm"` (`WQLinear_GEMM`), the layout of
//! nearly every AWQ model on the Hub and the one transformers, vLLM and TGI read.
//!
//! Per linear layer (AutoAWQ `awq/modules/linear/gemm.py`, `awq/utils/packing_utils.py`;
//! `/work/shared/reference/quant.md` §3.2):
//!
//! | tensor    | dtype | shape                  | content                                        |
//! |-----------|-------|------------------------|------------------------------------------------|
//! | `qweight` | i32   | `[in, out/8]`          | 8 *output* columns per word, interleaved       |
//! | `qzeros`  | i32   | `[n_groups, out/8]`    | zero points, same interleave, no offset        |
//! | `scales`  | f16   | `[n_groups, out]`      |                                                |
//!
//! The interleave is `AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`: nibble slot `i` of a word (bits
//! `4i..4i+4`) holds column `AWQ_ORDER[i]` of its 8-column group, so that the GEMM kernel's
//! shift-and-mask dequantizes straight into the order its f16x2 registers want. Unpacking
//! applies the reverse order `[0, 4, 1, 5, 2, 6, 3, 7]`.
//!
//! GEMM is 4-bit only and has no `g_idx`: act-order matrices cannot be written as AWQ.

use candle_core::Result;
use half::f16;

use super::QuantizedMatrix;

/// Nibble slot `i` holds column `AWQ_ORDER[i]` of an 8-column group.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// Column `c` of an 8-column group sits in nibble slot `AWQ_REVERSE_ORDER[c]`.
pub const AWQ_REVERSE_ORDER: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// The three packed tensors of one AWQ GEMM layer, row-major, in the shapes [`AwqShapes`] gives.
#[derive(Debug, Clone, PartialEq)]
pub struct AwqTensors {
    /// `[in_features, out_features / 8]`.
    pub qweight: Vec<i32>,
    /// `[n_groups, out_features / 8]`.
    pub qzeros: Vec<i32>,
    /// `[n_groups, out_features]`.
    pub scales: Vec<f16>,
}

/// The shapes of a layer's AWQ tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwqShapes {
    pub qweight: [usize; 2],
    pub qzeros: [usize; 2],
    pub scales: [usize; 2],
}

/// The tensor shapes of an `out × in` 4-bit layer in groups of `group_size` inputs
/// (`in_features` for one group per row). AutoAWQ requires whole groups and whole words.
pub fn shapes(
    bits: u8,
    group_size: usize,
    in_features: usize,
    out_features: usize,
) -> Result<AwqShapes> {
    if bits != 4 {
        candle_core::bail!("AWQ GEMM checkpoints are 4-bit; got {bits} bits (use GPTQ for 8-bit)");
    }
    if group_size == 0 || !in_features.is_multiple_of(group_size) {
        candle_core::bail!(
            "AWQ needs whole groups: {in_features} inputs in groups of {group_size}"
        );
    }
    if !out_features.is_multiple_of(8) {
        candle_core::bail!(
            "AWQ packs 8 output columns per int32: {out_features} outputs do not divide"
        );
    }
    let n_groups = in_features / group_size;
    Ok(AwqShapes {
        qweight: [in_features, out_features / 8],
        qzeros: [n_groups, out_features / 8],
        scales: [n_groups, out_features],
    })
}

/// Packs 8 values (one per column of an 8-column group) into a word, column `AWQ_ORDER[i]` in
/// nibble slot `i`.
fn pack_word(cols: impl Fn(usize) -> u8) -> i32 {
    let mut w = 0u32;
    for (slot, &col) in AWQ_ORDER.iter().enumerate() {
        w |= u32::from(cols(col) & 0x0f) << (4 * slot);
    }
    w as i32
}

/// The value of column `col` (0..8) of a packed word.
fn unpack_nibble(word: i32, col: usize) -> u8 {
    ((word as u32 >> (4 * AWQ_REVERSE_ORDER[col])) & 0x0f) as u8
}

/// Packs `m` in the AWQ GEMM layout. Errors for act-order matrices (AWQ has no `g_idx`) and
/// for anything but 4 bits.
pub fn pack(m: &QuantizedMatrix) -> Result<AwqTensors> {
    m.validate()?;
    if m.g_idx.is_some() {
        candle_core::bail!(
            "AWQ checkpoints have no g_idx: an act-order (desc_act) matrix must be saved as GPTQ"
        );
    }
    let (inp, out) = (m.in_features, m.out_features);
    let sh = shapes(m.bits, m.group_size, inp, out)?;
    let g_n = m.n_groups();
    let words = out / 8;
    let mut qweight = Vec::with_capacity(inp * words);
    for i in 0..inp {
        for w in 0..words {
            qweight.push(pack_word(|c| m.q[(8 * w + c) * inp + i]));
        }
    }
    let mut qzeros = Vec::with_capacity(sh.qzeros[0] * words);
    let mut scales = Vec::with_capacity(g_n * out);
    for g in 0..g_n {
        for w in 0..words {
            qzeros.push(pack_word(|c| m.zeros[(8 * w + c) * g_n + g]));
        }
        scales.extend((0..out).map(|o| f16::from_f32(m.scales[o * g_n + g])));
    }
    Ok(AwqTensors {
        qweight,
        qzeros,
        scales,
    })
}

/// Unpacks an AWQ GEMM layer of `out_features × in_features` 4-bit weights in groups of
/// `group_size` inputs (`in_features` for `group_size: -1`).
pub fn unpack(
    t: &AwqTensors,
    bits: u8,
    group_size: usize,
    in_features: usize,
    out_features: usize,
) -> Result<QuantizedMatrix> {
    let (inp, out) = (in_features, out_features);
    let sh = shapes(bits, group_size, inp, out)?;
    let lens = [
        ("qweight", t.qweight.len(), sh.qweight[0] * sh.qweight[1]),
        ("qzeros", t.qzeros.len(), sh.qzeros[0] * sh.qzeros[1]),
        ("scales", t.scales.len(), sh.scales[0] * sh.scales[1]),
    ];
    for (name, got, want) in lens {
        if got != want {
            candle_core::bail!(
                "AWQ {out}x{inp} layer (group {group_size}): `{name}` has {got} values, \
                 expected {want}"
            );
        }
    }
    let (g_n, words) = (sh.scales[0], out / 8);
    let mut q = vec![0u8; out * inp];
    for (i, row) in t.qweight.chunks(words).enumerate() {
        for (w, &word) in row.iter().enumerate() {
            for c in 0..8 {
                q[(8 * w + c) * inp + i] = unpack_nibble(word, c);
            }
        }
    }
    let mut zeros = vec![0u8; out * g_n];
    let mut scales = vec![0f32; out * g_n];
    for g in 0..g_n {
        for w in 0..words {
            let word = t.qzeros[g * words + w];
            for c in 0..8 {
                zeros[(8 * w + c) * g_n + g] = unpack_nibble(word, c);
            }
        }
        for o in 0..out {
            scales[o * g_n + g] = t.scales[g * out + o].to_f32();
        }
    }
    let m = QuantizedMatrix {
        bits,
        group_size,
        out_features: out,
        in_features: inp,
        q,
        scales,
        zeros,
        g_idx: None,
    };
    m.validate()?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_inverse() {
        for (slot, &col) in AWQ_ORDER.iter().enumerate() {
            assert_eq!(AWQ_REVERSE_ORDER[col], slot);
        }
    }

    #[test]
    fn column_c_sits_in_its_interleaved_slot() {
        // Column c holds value c: slots read 0,2,4,6,1,3,5,7 from the low nibble up.
        let word = pack_word(|c| c as u8);
        assert_eq!(word as u32, 0x7531_6420);
        for c in 0..8 {
            assert_eq!(unpack_nibble(word, c), c as u8);
        }
    }
}
