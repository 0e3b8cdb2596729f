//! Weight quantization for kiln models: RTN, GPTQ and AWQ at 4 and 8 bits, calibrated through
//! the model itself, with reports of size, bits per weight and perplexity before and after.
//!
//! The algorithms produce [`kiln_model::quant::QuantizedMatrix`] per linear layer; the formats
//! that store them (GPTQ and AWQ checkpoints, GGUF) and the kernels that run them live in
//! `kiln_model::quant`, so that every command that loads a model can load a quantized one.

pub mod awq;
pub mod calib;
pub mod gptq;
pub mod pipeline;
pub mod quantizer;
pub mod run;

pub use gptq::{GptqOptions, Hessian, gptq_quantize, rtn_quantize};
pub use pipeline::{Method, QuantizeOptions, QuantizedLayer, QuantizedModel, quantize_model};
pub use quantizer::QuantSpec;
pub use run::{QuantizeDirOptions, QuantizeReport, quantize_dir};
