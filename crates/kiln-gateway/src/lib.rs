//! kiln's API gateway: it fronts any OpenAI-compatible upstream (`kiln serve`, vLLM, TGI, a
//! hosted API) with authentication (API keys, OAuth 2.0 JWTs), rate limits shared across replicas
//! through Redis, input validation, guardrails ([`kiln_guard`]: prompt-injection defence, PII redaction, output
//! checks), a response cache, and cost metering.

pub mod auth;
pub mod cache;
pub mod config;
pub mod cost;
pub mod error;
pub mod feedback;
pub mod guard;
pub mod limits;
pub mod metrics;
pub mod monitor;
pub mod proxy;
pub mod server;
pub mod store;
pub mod validate;
