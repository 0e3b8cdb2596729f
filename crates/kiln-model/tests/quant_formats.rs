//! GPTQ and AWQ checkpoints: the packings round-trip, match the bit patterns AutoGPTQ and
//! AutoAWQ produce, and a saved directory loads back as packed layers computing what the
//! dequantized weights compute.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use kiln_model::quant::checkpoint::{Format, QuantizationConfig, QuantizeMeta, save_quantized_dir};
use kiln_model::quant::gptq_format::{self, ZeroConvention};
use kiln_model::quant::{QuantizedMatrix, awq_format};
use kiln_model::{LinearWeight, LoadOptions, LoadedModel};
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

/// Groups formed in a shuffled order of the inputs, as GPTQ's act-order does.
fn act_order_g_idx(inp: usize, group: usize, seed: u64) -> Vec<u32> {
    let mut order: Vec<usize> = (0..inp).collect();
    let mut r = rng(seed);
    for i in (1..inp).rev() {
        order.swap(i, r.random_range(0..=i));
    }
    let mut g_idx = vec![0u32; inp];
    for (k, &i) in order.iter().enumerate() {
        g_idx[i] = (k / group) as u32;
    }
    g_idx
}

fn random_matrix(bits: u8, group: usize, out: usize, inp: usize, seed: u64) -> QuantizedMatrix {
    let mut r = rng(seed);
    let maxq = (1u16 << bits) - 1;
    let g_n = inp.div_ceil(group);
    let f16 = |v: f32| half::f16::from_f32(v).to_f32();
    QuantizedMatrix {
        bits,
        group_size: group,
        out_features: out,
        in_features: inp,
        q: (0..out * inp)
            .map(|_| r.random_range(0..=maxq) as u8)
            .collect(),
        scales: (0..out * g_n)
            .map(|_| f16(r.random_range(0.001..0.1)))
            .collect(),
        // The full range, so 0 and the maximum (the v1 wrap) both occur.
        zeros: (0..out * g_n)
            .map(|_| r.random_range(0..=maxq) as u8)
            .collect(),
        g_idx: None,
    }
}

#[test]
fn gptq_round_trips_every_width_group_and_act_order() {
    let (out, inp) = (48, 256);
    for bits in [4u8, 8] {
        for group in [32, 64, 128, inp] {
            let mut m = random_matrix(bits, group, out, inp, u64::from(bits) * 1000 + group as u64);
            let back = gptq_format::unpack(&gptq_format::pack(&m).unwrap(), bits, group, inp, out)
                .unwrap();
            assert_eq!(back, m, "{bits} bits, group {group}");
            if group < inp {
                m.g_idx = Some(act_order_g_idx(inp, group, group as u64));
                let t = gptq_format::pack(&m).unwrap();
                let back = gptq_format::unpack(&t, bits, group, inp, out).unwrap();
                assert_eq!(back, m, "{bits} bits, group {group}, act-order");
            }
        }
    }
}

#[test]
fn gptq_zero_points_at_both_ends_survive_the_minus_one() {
    for (bits, edge) in [(4u8, 0u8), (4, 15), (8, 0), (8, 255)] {
        let mut m = random_matrix(bits, 32, 16, 64, 3);
        m.zeros.iter_mut().for_each(|z| *z = edge);
        let t = gptq_format::pack(&m).unwrap();
        // v1 stores zero − 1 masked to the width: 0 wraps to all ones.
        let stored = u32::from(edge.wrapping_sub(1)) & ((1u32 << bits) - 1);
        let per = 32 / u32::from(bits);
        let word = (0..per).fold(0u32, |w, j| w | stored << (j * u32::from(bits)));
        assert!(t.qzeros.iter().all(|&z| z as u32 == word), "{bits}/{edge}");
        assert_eq!(gptq_format::unpack(&t, bits, 32, 64, 16).unwrap(), m);
    }
}

#[test]
fn gptq_symmetric_4_bit_qzeros_are_0x77777777() {
    let mut m = random_matrix(4, 32, 16, 64, 4);
    m.zeros.iter_mut().for_each(|z| *z = 8);
    let t = gptq_format::pack(&m).unwrap();
    assert_eq!(t.qzeros.len(), 2 * 2);
    assert!(
        t.qzeros.iter().all(|&z| z == 0x7777_7777),
        "{:x?}",
        t.qzeros
    );
}

#[test]
fn gptq_qweight_packs_consecutive_inputs_lsb_first() {
    // Output 0 holds codes 1..=8 on inputs 0..8; output 1 holds 15 everywhere.
    let mut m = random_matrix(4, 8, 8, 8, 5);
    for i in 0..8 {
        m.q[i] = (i + 1) as u8;
        m.q[8 + i] = 15;
    }
    let t = gptq_format::pack(&m).unwrap();
    assert_eq!(t.qweight.len(), 8); // [1, 8]
    assert_eq!(t.qweight[0] as u32, 0x8765_4321);
    assert_eq!(t.qweight[1], -1);
    let m8 = QuantizedMatrix {
        bits: 8,
        q: (0..64).map(|v| v as u8).collect(),
        ..random_matrix(8, 8, 8, 8, 6)
    };
    let t = gptq_format::pack(&m8).unwrap();
    // Output 0, inputs 0..4 (codes 0..4) in qweight[0, 0]; inputs 4..8 in qweight[1, 0].
    assert_eq!(t.qweight[0] as u32, 0x0302_0100);
    assert_eq!(t.qweight[8] as u32, 0x0706_0504);
    // Default g_idx is written: i / group_size.
    assert_eq!(t.g_idx, vec![0; 8]);
}

#[test]
fn gptq_v2_stores_exact_zeros() {
    let m = random_matrix(4, 32, 16, 64, 7);
    let mut t = gptq_format::pack(&m).unwrap();
    // GPTQModel's v1 -> v2 conversion: add 1 to every nibble (no carries: masked per nibble).
    for w in &mut t.qzeros {
        let v = *w as u32;
        *w = (0..8).fold(0u32, |acc, j| {
            acc | ((((v >> (4 * j)) & 0xf) + 1) & 0xf) << (4 * j)
        }) as i32;
    }
    let back = gptq_format::unpack_as(&t, 4, 32, 64, 16, ZeroConvention::Exact).unwrap();
    assert_eq!(back, m);
}

#[test]
fn gptq_three_bits_is_refused_by_name() {
    let err = gptq_format::shapes(3, 128, 256, 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("3-bit") && err.contains("4- and 8-bit"),
        "{err}"
    );
}

#[test]
fn awq_round_trips_every_group_and_zero_edge() {
    let (out, inp) = (64, 256);
    for group in [32, 64, 128, inp] {
        let m = random_matrix(4, group, out, inp, 100 + group as u64);
        let back = awq_format::unpack(&awq_format::pack(&m).unwrap(), 4, group, inp, out).unwrap();
        assert_eq!(back, m, "group {group}");
    }
    for edge in [0u8, 15] {
        let mut m = random_matrix(4, 64, out, inp, 9);
        m.zeros.iter_mut().for_each(|z| *z = edge);
        let t = awq_format::pack(&m).unwrap();
        // No −1 offset: every nibble is the zero itself.
        let word = (0..8).fold(0u32, |w, j| w | u32::from(edge) << (4 * j));
        assert!(t.qzeros.iter().all(|&z| z as u32 == word));
        assert_eq!(awq_format::unpack(&t, 4, 64, inp, out).unwrap(), m);
    }
}

#[test]
fn awq_word_interleaves_columns_0_2_4_6_1_3_5_7() {
    // One input row, 8 output columns with codes 1..=8 (column c holds c + 1).
    let mut m = random_matrix(4, 8, 8, 8, 10);
    for c in 0..8 {
        m.q[c * 8] = (c + 1) as u8;
    }
    let t = awq_format::pack(&m).unwrap();
    assert_eq!(t.qweight.len(), 8); // [in 8, out/8 1]
    // Nibble slots, low to high, hold columns 0,2,4,6,1,3,5,7: codes 1,3,5,7,2,4,6,8.
    assert_eq!(t.qweight[0] as u32, 0x8642_7531);
    // Zero points: one group, column c zero = c.
    for c in 0..8 {
        m.zeros[c] = c as u8;
    }
    let t = awq_format::pack(&m).unwrap();
    assert_eq!(t.qzeros, vec![0x7531_6420]);
}

#[test]
fn awq_refuses_act_order_and_8_bits() {
    let mut m = random_matrix(4, 32, 16, 64, 11);
    m.g_idx = Some(act_order_g_idx(64, 32, 1));
    let err = awq_format::pack(&m).unwrap_err().to_string();
    assert!(err.contains("g_idx"), "{err}");
    let err = awq_format::pack(&random_matrix(8, 32, 16, 64, 12))
        .unwrap_err()
        .to_string();
    assert!(err.contains("8 bits"), "{err}");
}

// ---- Saved directories ------------------------------------------------------------------------

const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Round-to-nearest, asymmetric per group (range widened to include 0, as GPTQ's quantizer
/// does), scales rounded to f16 first so that the saved checkpoint holds them exactly.
fn rtn(w: &Tensor, bits: u8, group: usize, g_idx: Option<Vec<u32>>) -> QuantizedMatrix {
    let (out, inp) = w.dims2().unwrap();
    let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let maxq = f32::from((1u16 << bits) - 1);
    let g_n = inp.div_ceil(group);
    let group_of = |i: usize| g_idx.as_ref().map_or(i / group, |g| g[i] as usize);
    let mut m = QuantizedMatrix {
        bits,
        group_size: group,
        out_features: out,
        in_features: inp,
        q: vec![0; out * inp],
        scales: vec![0.0; out * g_n],
        zeros: vec![0; out * g_n],
        g_idx: g_idx.clone(),
    };
    for o in 0..out {
        let row = &w[o * inp..(o + 1) * inp];
        for g in 0..g_n {
            let members = (0..inp).filter(|&i| group_of(i) == g);
            let (lo, hi) =
                members.fold((0f32, 0f32), |(lo, hi), i| (lo.min(row[i]), hi.max(row[i])));
            let mut scale = half::f16::from_f32((hi - lo) / maxq).to_f32();
            if scale == 0.0 {
                scale = 1.0;
            }
            let zero = (-lo / scale).round().clamp(0.0, maxq);
            m.scales[o * g_n + g] = scale;
            m.zeros[o * g_n + g] = zero as u8;
        }
        for (i, &w) in row.iter().enumerate() {
            let k = o * g_n + group_of(i);
            let q = (w / m.scales[k]).round() + f32::from(m.zeros[k]);
            m.q[o * inp + i] = q.clamp(0.0, maxq) as u8;
        }
    }
    m
}

/// Quantizes every decoder linear of the llama fixture and saves the result in `format` under
/// `out`; returns the matrices by layer path.
fn save_fixture(
    out: &Path,
    format: Format,
    bits: u8,
    group: Option<usize>,
    act_order: bool,
) -> Vec<(String, QuantizedMatrix)> {
    let src = llama_dir();
    let tensors = read_tensors(&src.join("model.safetensors"));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let mut layers = Vec::new();
    let mut quantized = Vec::new();
    for l in 0..2 {
        for (k, name) in LINEARS.iter().enumerate() {
            let path = format!("model.layers.{l}.{name}");
            let w = &tensors[&format!("{path}.weight")];
            let inp = w.dims2().unwrap().1;
            let g = group.unwrap_or(inp);
            let g_idx = (act_order && k % 2 == 0).then(|| act_order_g_idx(inp, g, k as u64));
            let m = rtn(w, bits, g, g_idx);
            quantized.push((path.clone(), m.clone()));
            layers.push((path, m, None));
        }
    }
    let mut dense: Vec<(String, Tensor)> = tensors
        .into_iter()
        .filter(|(name, _)| {
            !layers
                .iter()
                .any(|(p, _, _)| *name == format!("{p}.weight"))
        })
        .collect();
    dense.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = QuantizeMeta {
        sym: false,
        ..QuantizeMeta::default()
    };
    let saved = save_quantized_dir(out, &src, &config, &dense, &layers, format, &meta).unwrap();
    assert_eq!(saved.quantized_layers, 14);
    assert!(saved.weights_bytes > 0);
    assert!(
        saved
            .files
            .iter()
            .any(|(name, bytes)| name == "tokenizer.json" && *bytes > 0)
    );
    quantized
}

fn logits(model: &kiln_model::CausalLm) -> Vec<f32> {
    let ids = Tensor::new(&[[1u32, 17, 42, 99, 7, 300, 5]], &Device::Cpu).unwrap();
    model
        .forward(&ids, None)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Loads the saved directory and checks every layer against the matrix saved, and the logits
/// against the dense model holding the dequantized weights.
fn check_reload(out: &Path, quantized: &[(String, QuantizedMatrix)]) -> LoadedModel {
    let loaded = load(out);
    let by_path: HashMap<String, &kiln_model::Linear> =
        loaded.model.linears().into_iter().collect();
    for (path, m) in quantized {
        let LinearWeight::Packed(p) = by_path[path].weight() else {
            panic!("`{path}` did not load as a packed weight");
        };
        for o in 0..m.out_features {
            assert_eq!(
                p.codes_of_row(o),
                m.q[o * m.in_features..(o + 1) * m.in_features],
                "`{path}` row {o}"
            );
        }
        let (a, b) = (p.dequantize(), m.dequantize());
        assert!(
            max_abs_diff(&a, &b) < 1e-6,
            "`{path}` dequantizes differently"
        );
    }
    assert!(matches!(
        by_path["lm_head"].weight(),
        LinearWeight::Dense(_)
    ));

    let mut dense = load(&llama_dir());
    for (path, linear) in dense.model.linears_mut() {
        if let Some((_, m)) = quantized.iter().find(|(p, _)| *p == path) {
            let w = Tensor::from_vec(
                m.dequantize(),
                (m.out_features, m.in_features),
                &Device::Cpu,
            )
            .unwrap();
            linear.set_dense(w).unwrap();
        }
    }
    let (got, want) = (logits(&loaded.model), logits(&dense.model));
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "logits differ by {diff}");
    // And quantization did change the model (the comparison is not vacuous).
    let original = logits(&load(&llama_dir()).model);
    assert!(max_abs_diff(&got, &original) > 1e-4);
    loaded
}

fn config_of(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn saved_gptq_4_bit_act_order_dir_reloads_packed_with_the_same_logits() {
    let out = tempfile::tempdir().unwrap();
    let quantized = save_fixture(out.path(), Format::Gptq, 4, Some(32), true);
    let loaded = check_reload(out.path(), &quantized);
    assert!(loaded.tokenizer.vocab_size() > 0);

    let q = &config_of(out.path())["quantization_config"];
    for key in [
        "quant_method",
        "bits",
        "group_size",
        "desc_act",
        "sym",
        "damp_percent",
        "true_sequential",
        "static_groups",
        "checkpoint_format",
        "lm_head",
        "meta",
    ] {
        assert!(
            q.get(key).is_some(),
            "quantization_config lacks `{key}`: {q}"
        );
    }
    assert_eq!(q["quant_method"], "gptq");
    assert_eq!(q["bits"], 4);
    assert_eq!(q["group_size"], 32);
    assert_eq!(q["desc_act"], true);
    assert_eq!(q["checkpoint_format"], "gptq");
    assert!(
        q["meta"]["quantizer"][0]
            .as_str()
            .unwrap()
            .starts_with("kiln:")
    );
    let qc: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("quantize_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(qc["bits"], 4);
    assert_eq!(qc["model_file_base_name"], "model");

    // The tensors are where and what transformers expects.
    let t = read_tensors(&out.path().join("model.safetensors"));
    let p = "model.layers.0.mlp.down_proj";
    assert_eq!(t[&format!("{p}.qweight")].dims(), &[128 / 8, 64]);
    assert_eq!(t[&format!("{p}.qweight")].dtype(), DType::I32);
    assert_eq!(t[&format!("{p}.qzeros")].dims(), &[4, 64 / 8]);
    assert_eq!(t[&format!("{p}.scales")].dtype(), DType::F16);
    assert_eq!(t[&format!("{p}.scales")].dims(), &[4, 64]);
    assert_eq!(t[&format!("{p}.g_idx")].dims(), &[128]);
    assert!(!t.contains_key(&format!("{p}.weight")));
    assert!(t.contains_key("lm_head.weight"));
}

#[test]
fn saved_gptq_8_bit_per_row_dir_reloads_packed_with_the_same_logits() {
    let out = tempfile::tempdir().unwrap();
    let quantized = save_fixture(out.path(), Format::Gptq, 8, None, false);
    check_reload(out.path(), &quantized);
    let q = &config_of(out.path())["quantization_config"];
    assert_eq!(q["bits"], 8);
    assert_eq!(q["group_size"], -1);
    assert_eq!(q["desc_act"], false);
}

#[test]
fn saved_awq_dir_reloads_packed_with_the_same_logits() {
    let out = tempfile::tempdir().unwrap();
    let quantized = save_fixture(out.path(), Format::Awq, 4, Some(64), false);
    check_reload(out.path(), &quantized);
    let config = config_of(out.path());
    let q = &config["quantization_config"];
    assert_eq!(
        q,
        &serde_json::json!({
            "quant_method": "awq", "zero_point": true, "group_size": 64, "bits": 4,
            "version": "gemm", "modules_to_not_convert": null
        })
    );
    // The source config is kept around it.
    assert_eq!(config["hidden_size"], 64);
    assert!(!out.path().join("quantize_config.json").exists());
    let t = read_tensors(&out.path().join("model.safetensors"));
    assert_eq!(
        t["model.layers.1.mlp.down_proj.qweight"].dims(),
        &[128, 64 / 8]
    );
    assert!(!t.contains_key("model.layers.1.mlp.down_proj.g_idx"));
}

#[test]
fn adapter_on_a_quantized_model_stays_unmerged_when_merging_is_asked() {
    let out = tempfile::tempdir().unwrap();
    save_fixture(out.path(), Format::Gptq, 4, Some(32), false);
    let options = LoadOptions {
        adapter: Some(lora_dir()),
        merge_adapter: true,
        ..LoadOptions::default()
    };
    let loaded = LoadedModel::load(out.path().to_str().unwrap(), &options).unwrap();
    let with_lora: Vec<_> = loaded
        .model
        .linears()
        .into_iter()
        .filter(|(_, l)| l.lora().is_some())
        .collect();
    assert!(!with_lora.is_empty(), "the adapter's updates were dropped");
    assert!(
        with_lora
            .iter()
            .all(|(_, l)| matches!(l.weight(), LinearWeight::Packed(_))),
        "LoRA stays beside packed weights"
    );
    // Unmerged, it still changes the output.
    let plain = load(out.path());
    assert!(max_abs_diff(&logits(&loaded.model), &logits(&plain.model)) > 1e-4);
}

#[test]
fn layouts_the_packed_kernels_cannot_hold_load_dense_with_the_same_values() {
    // 4-bit groups of 16 are not whole 32-input blocks.
    let out = tempfile::tempdir().unwrap();
    let quantized = save_fixture(out.path(), Format::Gptq, 4, Some(16), false);
    let loaded = load(out.path());
    let by_path: HashMap<String, &kiln_model::Linear> =
        loaded.model.linears().into_iter().collect();
    for (path, m) in &quantized {
        let LinearWeight::Dense(w) = by_path[path].weight() else {
            panic!("`{path}` should have fallen back to a dense weight");
        };
        let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(w, m.dequantize(), "`{path}`");
    }
}

fn load_err(dir: &Path) -> String {
    LoadedModel::load(dir.to_str().unwrap(), &LoadOptions::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn missing_qzeros_is_named() {
    let out = tempfile::tempdir().unwrap();
    save_fixture(out.path(), Format::Gptq, 4, Some(32), false);
    let file = out.path().join("model.safetensors");
    let mut t = read_tensors(&file);
    t.remove("model.layers.1.self_attn.v_proj.qzeros").unwrap();
    write_tensors(&t, &file);
    let err = load_err(out.path());
    assert!(
        err.contains("model.layers.1.self_attn.v_proj.qzeros"),
        "{err}"
    );
}

#[test]
fn awq_gemv_version_is_named() {
    let out = tempfile::tempdir().unwrap();
    save_fixture(out.path(), Format::Awq, 4, Some(32), false);
    edit_json(&out.path().join("config.json"), |c| {
        c["quantization_config"]["version"] = "gemv".into();
    });
    let err = load_err(out.path());
    assert!(err.contains("`gemv`") && err.contains("gemm"), "{err}");
}

#[test]
fn misshaped_qweight_names_the_tensor_and_both_shapes() {
    let out = tempfile::tempdir().unwrap();
    save_fixture(out.path(), Format::Gptq, 4, Some(32), false);
    let file = out.path().join("model.safetensors");
    let mut t = read_tensors(&file);
    let name = "model.layers.0.mlp.down_proj.qweight";
    t.insert(
        name.into(),
        Tensor::zeros((8, 64), DType::I32, &Device::Cpu).unwrap(),
    );
    write_tensors(&t, &file);
    let err = load_err(out.path());
    assert!(
        err.contains(name) && err.contains("[16, 64]") && err.contains("[8, 64]"),
        "{err}"
    );
}

#[test]
fn unsupported_quant_methods_and_widths_are_named() {
    let path = Path::new("config.json");
    let err =
        QuantizationConfig::from_json(&serde_json::json!({"quant_method": "bitsandbytes"}), path)
            .unwrap_err()
            .to_string();
    assert!(err.contains("`bitsandbytes`"), "{err}");
    let err = QuantizationConfig::from_json(
        &serde_json::json!({"quant_method": "gptq", "bits": 3, "group_size": 128}),
        path,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("3-bit"), "{err}");
    // AutoAWQ's own names for the fields are accepted.
    let q = QuantizationConfig::from_json(
        &serde_json::json!({"quant_method": "awq", "w_bit": 4, "q_group_size": 128,
                            "zero_point": true, "version": "GEMM"}),
        path,
    )
    .unwrap();
    assert_eq!(
        (q.format, q.bits, q.group_size),
        (Format::Awq, 4, Some(128))
    );
    let q = QuantizationConfig::from_json(
        &serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": -1,
                            "checkpoint_format": "gptq_v2"}),
        path,
    )
    .unwrap();
    assert_eq!(q.group_size, None);
    assert_eq!(q.zeros, ZeroConvention::Exact);
}
