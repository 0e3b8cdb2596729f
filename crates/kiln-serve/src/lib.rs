//! kiln's inference service: an engine that batches every running request into one forward pass
//! per step over a paged KV cache, and the OpenAI-compatible HTTP API in front of it.

pub mod api;
pub mod bench;
mod blocks;
pub mod engine;
pub mod metrics;
pub mod openapi;
mod scheduler;
pub mod server;

pub use engine::{
    EngineConfig, EngineHandle, EngineStats, SeqEvent, SeqFinish, SeqRequest, SeqStream,
    SubmitError, TokenOutput,
};
pub use metrics::ServeMetrics;
pub use scheduler::start_engine;
