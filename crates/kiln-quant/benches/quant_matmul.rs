//! Quantized versus f32 matrix products at 1, 8, 64 and 512 activation rows.
//!
//! `cargo bench -p kiln-quant --bench quant_matmul` times `y = x · Wᵀ` for one 2048 × 2048
//! weight (a mid-size model's projection), f32 against kiln's packed 4-bit (group 128) and 8-bit
//! (group 128) kernels and candle's GGML Q4_0 / Q8_0 `QMatMul` (the peer). The f32 weight is
//! stored transposed, as `kiln serve` stores it, so the GEMM does not re-pack it each call.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln_model::Linear;
use kiln_model::quant::{PackedWeight, QuantizedMatrix};
use kiln_quant::{QuantSpec, rtn_quantize};

const DIM: usize = 2048;

fn rtn(w: &[f32], bits: u8, group: usize) -> QuantizedMatrix {
    let spec = QuantSpec {
        bits,
        group_size: Some(group),
        sym: false,
    };
    rtn_quantize(w, DIM, DIM, &spec)
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (DIM, DIM), &dev).unwrap();
    let w_data: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let mut dense = Linear::new(w.clone(), None).unwrap();
    dense.store_transposed().unwrap();
    let q4 = Linear::from_packed(
        PackedWeight::from_quantized(&rtn(&w_data, 4, 128)).unwrap(),
        None,
    );
    let q8 = Linear::from_packed(
        PackedWeight::from_quantized(&rtn(&w_data, 8, 128)).unwrap(),
        None,
    );
    let ggml_q4 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_0).unwrap()).unwrap();
    let ggml_q8 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();

    let mut group = c.benchmark_group("quant_matmul_2048");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(3));
    for rows in [1usize, 8, 16, 32, 64, 512] {
        let x = Tensor::randn(0f32, 1.0, (rows, DIM), &dev).unwrap();
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_with_input(BenchmarkId::new("f32", rows), &x, |b, x| {
            b.iter(|| dense.forward(x).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("kiln_int4_g128", rows), &x, |b, x| {
            b.iter(|| q4.forward(x).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("kiln_int8_g128", rows), &x, |b, x| {
            b.iter(|| q8.forward(x).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("candle_q4_0", rows), &x, |b, x| {
            b.iter(|| ggml_q4.forward(x).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("candle_q8_0", rows), &x, |b, x| {
            b.iter(|| ggml_q8.forward(x).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
