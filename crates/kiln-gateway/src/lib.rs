//! kiln's API gateway: it fronts any OpenAI-compatible upstream (`kiln serve`, vLLM, TGI, a
//! hosted API) with authentication (API keys, OAuth 2.0 JWTs), rate limits shared across replicas
//! through Redis, input validation, a response cache, and cost metering.

pub mod config;
