//! The wire types: OpenAI's request and response bodies as kiln accepts and writes them, plus
//! vLLM's `/tokenize` and `/detokenize`.
//!
//! Requests mirror the JSON loosely (every field optional, numbers wide, unknown fields ignored as
//! vLLM ignores them); [`super::validate`] turns them into a checked [`super::validate::ValidRequest`].
//! Responses are written exactly in OpenAI's shape, plus one `kiln` object (see
//! [`KilnExtension`]).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// The served model name or an adapter name (`GET /v1/models`); absent: the base model.
    #[schema(example = "llama")]
    pub model: Option<String>,
    /// The conversation, rendered with the model's chat template and a generation prompt.
    pub messages: Vec<ChatMessage>,
    /// New tokens at most (deprecated by OpenAI in favour of `max_completion_tokens`, which wins
    /// when both are given). Default: the rest of the context.
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    /// 0 to 2; 0 is greedy. Default 1.
    pub temperature: Option<f32>,
    /// Nucleus sampling, in (0, 1]. Default 1.
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens; 0 or -1 keeps all (vLLM extension).
    pub top_k: Option<i64>,
    /// Drop tokens less likely than `min_p` times the most likely one, in [0, 1] (vLLM extension).
    pub min_p: Option<f32>,
    /// Same seed, same text. Absent: a random seed. Choice `i` of `n` uses `seed + i`.
    pub seed: Option<i64>,
    /// Up to 8 strings that end generation; the matched string is not returned.
    pub stop: Option<StopSpec>,
    /// Choices to generate, 1 to 8.
    pub n: Option<i64>,
    /// In [-2, 2].
    pub presence_penalty: Option<f32>,
    /// In [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// CTRL's penalty on tokens already present; > 0, 1 is off (vLLM extension).
    pub repetition_penalty: Option<f32>,
    /// Return the log-prob of each generated token.
    pub logprobs: Option<bool>,
    /// Alternatives to list per token, 0 to 20; needs `logprobs: true`.
    pub top_logprobs: Option<i64>,
    /// Keep generating past EOS until the token limit (vLLM extension).
    pub ignore_eos: Option<bool>,
    /// Send the answer as server-sent events (`chat.completion.chunk`).
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Not supported: must be absent or empty.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// Only `{"type": "text"}` is supported.
    pub response_format: Option<ResponseFormat>,
    /// Not supported: must be absent or empty.
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// The served model name or an adapter name (`GET /v1/models`); absent: the base model.
    #[schema(example = "llama")]
    pub model: Option<String>,
    /// Encoded as `tokenizer(prompt)` encodes it (special tokens such as BOS added), or given as
    /// token ids.
    pub prompt: Prompt,
    /// New tokens at most. Default: the rest of the context.
    pub max_tokens: Option<i64>,
    /// 0 to 2; 0 is greedy. Default 1.
    pub temperature: Option<f32>,
    /// Nucleus sampling, in (0, 1]. Default 1.
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens; 0 or -1 keeps all (vLLM extension).
    pub top_k: Option<i64>,
    /// In [0, 1] (vLLM extension).
    pub min_p: Option<f32>,
    /// Same seed, same text. Absent: a random seed. Choice `i` of `n` uses `seed + i`.
    pub seed: Option<i64>,
    /// Up to 8 strings that end generation; the matched string is not returned.
    pub stop: Option<StopSpec>,
    /// Choices to generate, 1 to 8.
    pub n: Option<i64>,
    /// In [-2, 2].
    pub presence_penalty: Option<f32>,
    /// In [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// > 0, 1 is off (vLLM extension).
    pub repetition_penalty: Option<f32>,
    /// Return each token's log-prob and this many alternatives (0 to 20).
    pub logprobs: Option<i64>,
    /// Keep generating past EOS until the token limit (vLLM extension).
    pub ignore_eos: Option<bool>,
    /// Send the answer as server-sent events (`text_completion` chunks).
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Not supported: must be absent or false.
    pub echo: Option<bool>,
    /// Not supported: must be absent or equal to `n`.
    pub best_of: Option<i64>,
    /// Not supported: must be absent.
    pub suffix: Option<String>,
    /// Not supported: must be absent or empty.
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
}

/// One message of a conversation.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    #[schema(example = "user")]
    pub role: String,
    /// Required except for `assistant` messages.
    pub content: Option<MessageContent>,
    pub name: Option<String>,
}

/// A message's text, or its parts (text parts only).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged, expecting = "a string or an array of content parts")]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// `{"type": "text", "text": ...}`; other part types are refused.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    #[schema(example = "text")]
    pub kind: String,
    pub text: Option<String>,
}

/// A prompt: text, a one-element array of text, or token ids (a flat array, or a one-element
/// array of one). Batches of several prompts are refused.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = "a string, an array of strings, an array of token ids or an array of arrays of token ids"
)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

/// One stop string or several.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send `"usage": null` on every chunk and one last chunk with no choices and the usage.
    pub include_usage: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ResponseFormat {
    /// Only `text`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// `POST /tokenize` (vLLM): a prompt, or messages rendered with the chat template.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    /// Text to encode; give this or `messages`.
    pub prompt: Option<String>,
    /// A conversation to render with the chat template and encode.
    pub messages: Option<Vec<ChatMessage>>,
    /// Add the tokenizer's special tokens (BOS). Default: true for `prompt`, false for `messages`
    /// (the template writes them).
    pub add_special_tokens: Option<bool>,
    /// With `messages`: end with the assistant's turn opener. Default true.
    pub add_generation_prompt: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

/// `POST /detokenize` (vLLM).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DetokenizeResponse {
    /// The tokens decoded, special tokens included.
    pub prompt: String,
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// Why a choice ended: `stop` (EOS or a stop string) or `length` (the token limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

impl From<kiln_model::FinishReason> for FinishReason {
    fn from(r: kiln_model::FinishReason) -> Self {
        match r {
            kiln_model::FinishReason::Stop => Self::Stop,
            kiln_model::FinishReason::Length => Self::Length,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub enum ChatCompletionObject {
    #[serde(rename = "chat.completion")]
    ChatCompletion,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub enum ChatCompletionChunkObject {
    #[serde(rename = "chat.completion.chunk")]
    ChatCompletionChunk,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub enum TextCompletionObject {
    #[serde(rename = "text_completion")]
    TextCompletion,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AssistantRole {
    Assistant,
}

/// The response to a non-streaming chat completion.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionResponse {
    /// `chatcmpl-` and 32 hex digits.
    pub id: String,
    pub object: ChatCompletionObject,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub kiln: KilnExtension,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatResponseMessage,
    /// Present when the request asked for `logprobs`.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatResponseMessage {
    pub role: AssistantRole,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatTokenLogprob {
    /// The token's text (U+FFFD where it holds part of a character; `bytes` is exact).
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position, best first.
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// The prompt's tokens, counted once however many choices.
    pub prompt_tokens: usize,
    /// Tokens generated over all choices (an EOS that ended a choice counts).
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// kiln's addition to every completion: how confident the model was in what it wrote, for
/// monitoring. Non-streaming responses carry one entry per choice; a stream carries each
/// choice's entry on that choice's last chunk (the one with its `finish_reason`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KilnExtension {
    pub choices: Vec<KilnChoiceStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KilnChoiceStats {
    pub index: usize,
    /// Mean log-prob of the generated tokens (EOS and any tokens past a stop string included)
    /// under the model's own distribution, before penalties and temperature; null with no tokens.
    pub mean_logprob: Option<f32>,
    /// Mean entropy, in nats, of the distributions those tokens were drawn from.
    pub mean_entropy: Option<f32>,
    /// Milliseconds the sequence waited before joining the running batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
    /// Milliseconds from arrival to the first generated token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
}

/// The response to a non-streaming text completion.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionResponse {
    /// `cmpl-` and 32 hex digits.
    pub id: String,
    pub object: TextCompletionObject,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
    pub kiln: KilnExtension,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    /// Present when the request asked for `logprobs`.
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: FinishReason,
}

/// The legacy completions log-prob layout: parallel arrays, one entry per token.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Token text → log-prob: the `logprobs` most likely tokens plus the chosen one.
    #[schema(value_type = Vec<std::collections::HashMap<String, f32>>)]
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Where each token starts in the completion's text, in characters.
    pub text_offset: Vec<usize>,
}

/// One server-sent event of a streaming chat completion.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: ChatCompletionChunkObject,
    pub created: u64,
    pub model: String,
    /// One choice per chunk; empty on the usage chunk.
    pub choices: Vec<ChatChunkChoice>,
    /// Present (null, then the totals on the last chunk) with `stream_options.include_usage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
    /// On the chunk that carries a choice's `finish_reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kiln: Option<KilnExtension>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// The new text: the first chunk of each choice carries the role and empty content, the last
/// chunk is empty.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<AssistantRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One server-sent event of a streaming text completion.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionChunk {
    pub id: String,
    pub object: TextCompletionObject,
    pub created: u64,
    pub model: String,
    /// One choice per chunk; empty on the usage chunk.
    pub choices: Vec<CompletionChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kiln: Option<KilnExtension>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionChunkChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListObject {
    List,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelObject {
    Model,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub object: ListObject,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    /// What requests put in `model`.
    pub id: String,
    pub object: ModelObject,
    /// When the server started, Unix seconds.
    pub created: u64,
    pub owned_by: String,
    /// For an adapter: the base model it attaches to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub max_model_len: usize,
}

/// Every error, whatever the status.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub message: String,
    /// `invalid_request_error`, `rate_limit_exceeded`, `server_error` or `service_unavailable`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, as a path (`messages[1].role`).
    pub param: Option<String>,
    /// A stable code where one applies: `model_not_found`, `invalid_api_key`,
    /// `rate_limit_exceeded`, `context_length_exceeded`.
    pub code: Option<String>,
}

/// `POST /admin/adapters`: serve the PEFT adapter in `path` as model `name`, replacing the
/// adapter of that name if there is one.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdapterLoadRequest {
    /// The model name requests use for the adapter.
    pub name: String,
    /// The PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`), absolute
    /// or relative to the server's working directory.
    pub path: String,
}

/// What `POST /admin/adapters` did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdapterLoadResponse {
    pub name: String,
    /// The directory loaded, as given.
    pub path: String,
    /// The directory of the adapter replaced; `null` when the name is new.
    pub previous_path: Option<String>,
    /// Whether an adapter of this name was replaced (false: added).
    pub replaced: bool,
    /// Milliseconds spent reading the adapter and attaching it to the base model.
    pub load_ms: u64,
}

/// `GET /admin/adapters`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdapterList {
    pub object: ListObject,
    pub data: Vec<AdapterInfo>,
}

/// An adapter being served.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdapterInfo {
    pub name: String,
    /// The directory it was loaded from, as given at startup (`--adapter`) or to
    /// `POST /admin/adapters`.
    pub path: String,
    /// When its current weights were loaded, Unix seconds.
    pub loaded_at: u64,
    /// How many times the name has been given new weights since startup.
    pub swaps: u64,
}
