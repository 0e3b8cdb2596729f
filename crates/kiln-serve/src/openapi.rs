//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations and the wire
//! types' `ToSchema` derives. `docs/openapi.json` is this document committed; a test fails when
//! the two drift (`UPDATE_SNAPSHOTS=1 cargo test -p kiln-serve --test openapi` rewrites it).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::types;
use crate::api::{admin, handlers};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kiln serve",
        description = "kiln's OpenAI-compatible inference API, with vLLM's extensions (top_k, min_p, repetition_penalty, ignore_eos, /tokenize, /detokenize) and a `kiln` object on each completion carrying the mean token log-prob and entropy of every choice."
    ),
    paths(
        handlers::chat_completions,
        handlers::completions,
        handlers::list_models,
        handlers::tokenize,
        handlers::detokenize,
        handlers::health,
        handlers::live,
        handlers::ready,
        handlers::metrics,
        handlers::openapi_json,
        admin::load_adapter,
        admin::list_adapters,
    ),
    components(schemas(
        types::ChatCompletionRequest,
        types::CompletionRequest,
        types::ChatCompletionResponse,
        types::ChatCompletionChunk,
        types::CompletionResponse,
        types::CompletionChunk,
        types::ModelList,
        types::TokenizeRequest,
        types::TokenizeResponse,
        types::DetokenizeRequest,
        types::DetokenizeResponse,
        types::ErrorResponse,
        types::AdapterLoadRequest,
        types::AdapterLoadResponse,
        types::AdapterList,
        types::AdapterInfo,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "openai", description = "OpenAI's API"),
        (name = "vllm", description = "vLLM's additions"),
        (name = "ops", description = "Health, metrics and this document"),
        (name = "admin", description = "Swapping adapters without a restart (needs --admin-key)"),
    )
)]
struct ApiDoc;

/// `Authorization: Bearer <key>`: the `--api-key` for the API (`bearer`), the `--admin-key` for
/// `/admin/*` (`admin`).
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "admin",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The server's --admin-key"))
                    .build(),
            ),
        );
    }
}

/// The API's OpenAPI 3.1 document.
pub fn spec() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// [`spec`] as the pretty JSON committed in `docs/openapi.json` (with a final newline).
pub fn spec_json() -> String {
    let mut json = spec().to_pretty_json().unwrap_or_default();
    json.push('\n');
    json
}
