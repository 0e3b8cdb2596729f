//! Feedback on completions: `POST /v1/feedback` for clients, and the dashboard's labelling page
//! (`GET /dashboard/label`, its queue at `GET /dashboard/label/next`, its verdicts at
//! `POST /dashboard/label`) for people.
//!
//! Both write [`kiln_monitor::feedback::Feedback`] records beside the traces, synchronously:
//! feedback is rare, and a client should know its feedback was kept. A client may only give
//! feedback on its own completions — a trace whose tenant *and* key match the caller — and an id
//! that is someone else's is answered exactly like an unknown one (404 `completion_not_found`),
//! so ids never leak across callers. Traces are written off the request path, so an id not found
//! at first is looked up again after the gateway has settled its pending accounting (at most
//! [`SETTLE_FOR_FEEDBACK`]).
//!
//! Corrections are scrubbed with the same PII detectors as captured content (built from
//! `guardrails`, even when `store.capture_content` is off) before they are stored, and never
//! logged. `no_train` is copied from the trace, so exports leave such feedback out.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_monitor::feedback::{
    CompletionRef, Feedback, LabelItem, SOURCE_API, SOURCE_LABEL, Thumbs,
};
use serde_json::{Map, Value, json};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::server::GatewayState;
use crate::store::ContentRecord;
use crate::validate::too_large;

/// The longest `POST /v1/feedback` waits for pending traces before answering 404.
pub const SETTLE_FOR_FEEDBACK: Duration = Duration::from_secs(2);
/// The longest completion id accepted.
const MAX_ID_CHARS: usize = 256;
/// Items `GET /dashboard/label/next` returns without `?limit=`.
pub const DEFAULT_LABEL_LIMIT: usize = 20;
/// The most items one `GET /dashboard/label/next` returns.
pub const MAX_LABEL_LIMIT: usize = 100;
/// The key id labelling-page feedback is recorded under.
pub const DASHBOARD_KEY_ID: &str = "dashboard";

/// The fields of a `POST /v1/feedback` body.
const FEEDBACK_FIELDS: &str = "completion_id, thumbs, score, correction, preferred_index";
/// The fields that carry a signal; at least one is needed.
const SIGNAL_FIELDS: &str = "`thumbs`, `score`, `correction` or `preferred_index`";

/// A validated `POST /v1/feedback` body.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackRequest {
    /// The reply's `id`, or the gateway's `x-request-id`.
    pub completion_id: String,
    pub thumbs: Option<Thumbs>,
    /// Any finite number.
    pub score: Option<f64>,
    /// A better reply, non-empty (not yet scrubbed).
    pub correction: Option<String>,
    pub preferred_index: Option<u32>,
}

impl FeedbackRequest {
    /// Parses and checks a body: unknown fields, wrong types and bad values are 400
    /// `invalid_request_error` naming the field (`param`) and what was expected.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let body = json_object(bytes)?;
        let mut request = Self {
            completion_id: String::new(),
            thumbs: None,
            score: None,
            correction: None,
            preferred_index: None,
        };
        let mut completion_id = None;
        for (name, value) in &body {
            match name.as_str() {
                "completion_id" => completion_id = string_field(name, value)?,
                "thumbs" => {
                    request.thumbs = match string_field(name, value)?.as_deref() {
                        None => None,
                        Some("up") => Some(Thumbs::Up),
                        Some("down") => Some(Thumbs::Down),
                        Some(other) => {
                            return Err(ApiError::invalid(
                                "invalid_value",
                                name,
                                format!("`thumbs`: expected \"up\" or \"down\", got {other:?}"),
                            ));
                        }
                    }
                }
                "score" => request.score = number_field(name, value)?,
                "correction" => {
                    request.correction = string_field(name, value)?;
                    if request
                        .correction
                        .as_deref()
                        .is_some_and(|c| c.trim().is_empty())
                    {
                        return Err(ApiError::invalid(
                            "invalid_value",
                            name,
                            "`correction`: expected a better reply, got an empty string",
                        ));
                    }
                }
                "preferred_index" => request.preferred_index = index_field(name, value)?,
                other => return Err(unknown_field(other, FEEDBACK_FIELDS)),
            }
        }
        let Some(completion_id) = completion_id else {
            return Err(ApiError::invalid(
                "missing_field",
                "completion_id",
                "`completion_id` is required: the reply's `id` or the gateway's `x-request-id`",
            ));
        };
        request.completion_id = checked_id("completion_id", completion_id)?;
        if request.kinds().is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "missing_signal",
                format!("feedback needs at least one of {SIGNAL_FIELDS}"),
            ));
        }
        Ok(request)
    }

    /// The signals given, as the `kind` label of `kiln_gateway_feedback_total`.
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        match self.thumbs {
            Some(Thumbs::Up) => kinds.push("thumbs_up"),
            Some(Thumbs::Down) => kinds.push("thumbs_down"),
            None => {}
        }
        if self.score.is_some() {
            kinds.push("score");
        }
        if self.correction.is_some() {
            kinds.push("correction");
        }
        if self.preferred_index.is_some() {
            kinds.push("preferred");
        }
        kinds
    }
}

/// One side of a labelling verdict: a request, and the choice when both sides are choices of
/// one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSide {
    pub request_id: String,
    pub index: Option<u32>,
}

/// A validated `POST /dashboard/label` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRequest {
    pub winner: LabelSide,
    pub loser: LabelSide,
    /// The winner as the labeller edited it (not yet scrubbed).
    pub correction: Option<String>,
}

impl LabelRequest {
    /// Parses and checks a body, like [`FeedbackRequest::parse`].
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let body = json_object(bytes)?;
        let (mut winner, mut loser, mut correction) = (None, None, None);
        for (name, value) in &body {
            match name.as_str() {
                "winner" => winner = Some(label_side(name, value)?),
                "loser" => loser = Some(label_side(name, value)?),
                "correction" => {
                    correction = string_field(name, value)?.filter(|c| !c.trim().is_empty());
                }
                other => return Err(unknown_field(other, "winner, loser, correction")),
            }
        }
        let missing = |side: &str| {
            ApiError::invalid(
                "missing_field",
                side,
                format!("`{side}` is required: {{\"request_id\": \"…\", \"index\": 0 or null}}"),
            )
        };
        Ok(Self {
            winner: winner.ok_or_else(|| missing("winner"))?,
            loser: loser.ok_or_else(|| missing("loser"))?,
            correction,
        })
    }
}

fn label_side(side: &str, value: &Value) -> Result<LabelSide, ApiError> {
    let Value::Object(fields) = value else {
        return Err(ApiError::invalid(
            "invalid_type",
            side,
            format!("`{side}`: expected an object {{\"request_id\": \"…\", \"index\": 0 or null}}"),
        ));
    };
    let (mut request_id, mut index) = (None, None);
    for (name, value) in fields {
        let param = format!("{side}.{name}");
        match name.as_str() {
            "request_id" => request_id = string_field(&param, value)?,
            "index" => index = index_field(&param, value)?,
            _ => return Err(unknown_field(&param, "request_id, index")),
        }
    }
    let param = format!("{side}.request_id");
    let Some(request_id) = request_id else {
        return Err(ApiError::invalid(
            "missing_field",
            &param,
            format!("`{param}` is required"),
        ));
    };
    Ok(LabelSide {
        request_id: checked_id(&param, request_id)?,
        index,
    })
}

/// The body as a JSON object (400 `invalid_json` / `invalid_type` otherwise).
fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid(
            "invalid_type",
            "body",
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::invalid(
            "invalid_json",
            "body",
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

fn unknown_field(param: &str, expected: &str) -> ApiError {
    ApiError::invalid(
        "unknown_field",
        param,
        format!("unknown field `{param}`; expected {expected}"),
    )
}

/// A string field; `null` reads as absent.
fn string_field(param: &str, value: &Value) -> Result<Option<String>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(ApiError::invalid(
            "invalid_type",
            param,
            format!("`{param}`: expected a string, got {}", type_name(other)),
        )),
    }
}

/// A finite number; `null` reads as absent.
fn number_field(param: &str, value: &Value) -> Result<Option<f64>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_f64().filter(|x| x.is_finite()) {
            Some(x) => Ok(Some(x)),
            None => Err(ApiError::invalid(
                "invalid_value",
                param,
                format!("`{param}`: expected a finite number"),
            )),
        },
        other => Err(ApiError::invalid(
            "invalid_type",
            param,
            format!("`{param}`: expected a number, got {}", type_name(other)),
        )),
    }
}

/// An integer ≥ 0 that fits a `u32`; `null` reads as absent.
fn index_field(param: &str, value: &Value) -> Result<Option<u32>, ApiError> {
    let expected = format!("`{param}`: expected an integer ≥ 0");
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => {
            if let Some(i) = n.as_u64() {
                return u32::try_from(i).map(Some).map_err(|_| {
                    ApiError::invalid(
                        "invalid_value",
                        param,
                        format!("{expected}, got {i}: too large"),
                    )
                });
            }
            if n.as_i64().is_some() {
                return Err(ApiError::invalid(
                    "invalid_value",
                    param,
                    format!("{expected}, got {n}"),
                ));
            }
            Err(ApiError::invalid(
                "invalid_type",
                param,
                format!("{expected}, got {n}"),
            ))
        }
        other => Err(ApiError::invalid(
            "invalid_type",
            param,
            format!("{expected}, got {}", type_name(other)),
        )),
    }
}

/// A non-empty id of at most [`MAX_ID_CHARS`] characters.
fn checked_id(param: &str, id: String) -> Result<String, ApiError> {
    if id.is_empty() || id.chars().count() > MAX_ID_CHARS {
        return Err(ApiError::invalid(
            "invalid_value",
            param,
            format!("`{param}`: expected a non-empty id of at most {MAX_ID_CHARS} characters"),
        ));
    }
    Ok(id)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// 503 `store_unavailable`; the cause is logged (it names ids, never feedback text).
fn store_error(what: &str, e: &anyhow::Error) -> ApiError {
    eprintln!("kiln gateway: {what}: {e:#}");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "api_error",
        "store_unavailable",
        format!("{what}: the request store is unavailable; try again"),
    )
}

/// The body, up to `validation.max_body_bytes` (413 `request_too_large` past it).
async fn read_body(
    state: &GatewayState,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Bytes, ApiError> {
    let max = state.max_body_bytes();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(too_large(max));
    }
    axum::body::to_bytes(body, max)
        .await
        .map_err(|_| too_large(max))
}

/// The caller's own trace named `id` (the newest, when a cached reply's id names several).
async fn own_completion(
    state: &GatewayState,
    principal: &Principal,
    id: &str,
) -> Result<Option<CompletionRef>, ApiError> {
    let found = state
        .store()
        .find_completion(id)
        .await
        .map_err(|e| store_error("looking up the completion", &e))?;
    Ok(found
        .into_iter()
        .find(|c| c.tenant == principal.tenant && c.key_id == principal.key_id))
}

/// `POST /v1/feedback` (see the module docs).
pub async fn post_feedback(State(state): State<GatewayState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let principal = match state.authenticate(&parts.headers).await {
        Ok(p) => p,
        Err(response) => return response,
    };
    match give_feedback(&state, &principal, &parts.headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn give_feedback(
    state: &GatewayState,
    principal: &Principal,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(state, headers, body).await?;
    let request = FeedbackRequest::parse(&bytes)?;
    let mut completion = own_completion(state, principal, &request.completion_id).await?;
    if completion.is_none() {
        // Its trace may still be on its way to the store.
        state.settle(SETTLE_FOR_FEEDBACK).await;
        completion = own_completion(state, principal, &request.completion_id).await?;
    }
    let Some(completion) = completion else {
        let mut e = ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "completion_not_found",
            format!(
                "no completion `{}` of this key: give the reply's `id` or its `x-request-id`",
                request.completion_id
            ),
        );
        e.param = Some("completion_id".into());
        return Err(e);
    };
    if let Some(index) = request.preferred_index {
        let content = state
            .store()
            .content(&completion.request_id)
            .await
            .map_err(|e| store_error("reading the completion's content", &e))?;
        // Without captured content the number of choices is unknown: the index is kept as given.
        if let Some(content) = content {
            let choices = content.choices.len().max(1);
            if usize::try_from(index).map_or(true, |i| i >= choices) {
                return Err(ApiError::invalid(
                    "invalid_value",
                    "preferred_index",
                    format!(
                        "`preferred_index`: expected an integer below {choices}, the number of choices of the completion; got {index}"
                    ),
                ));
            }
        }
    }
    let kinds = request.kinds();
    let feedback = Feedback {
        feedback_id: Feedback::new_id(),
        at: SystemTime::now(),
        request_id: completion.request_id.clone(),
        completion_id: completion.completion_id.clone(),
        tenant: principal.tenant.clone(),
        key_id: principal.key_id.clone(),
        source: SOURCE_API.to_string(),
        thumbs: request.thumbs,
        score: request.score,
        correction: request
            .correction
            .as_deref()
            .map(|c| state.scrubber().scrub(c)),
        preferred_index: request.preferred_index,
        compared_with: None,
        no_train: completion.no_train,
    };
    state
        .store()
        .record_feedback(&feedback)
        .await
        .map_err(|e| store_error("keeping the feedback", &e))?;
    for kind in kinds {
        state.metrics().feedback(kind);
    }
    Ok(axum::Json(json!({
        "id": feedback.feedback_id,
        "object": "feedback",
        "completion_id": request.completion_id,
        "request_id": completion.request_id,
    }))
    .into_response())
}

/// `GET /dashboard/label`: the labelling page (its assets are inside it).
pub async fn label_page(State(state): State<GatewayState>) -> Response {
    if !state.dashboard_on() {
        return ApiError::not_found("the dashboard is off (monitor.dashboard)").into_response();
    }
    (
        [
            (header::CONTENT_TYPE, kiln_monitor::dashboard::CONTENT_TYPE),
            (
                header::CONTENT_SECURITY_POLICY,
                kiln_monitor::dashboard::LABEL_CONTENT_SECURITY_POLICY,
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        kiln_monitor::dashboard::LABEL_PAGE,
    )
        .into_response()
}

/// `GET /dashboard/label/next?limit=N`: pairs to label, `{"object": "list", "data": […]}`.
pub async fn label_next(
    State(state): State<GatewayState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(e) = state.dashboard_access(&headers) {
        return e.into_response();
    }
    let limit = match query.get("limit") {
        None => DEFAULT_LABEL_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 => n.min(MAX_LABEL_LIMIT),
            _ => {
                return ApiError::invalid(
                    "invalid_value",
                    "limit",
                    format!("`limit`: expected an integer from 1 to {MAX_LABEL_LIMIT}, got {v:?}"),
                )
                .into_response();
            }
        },
    };
    let items: Vec<LabelItem> = match state.store().label_queue(limit).await {
        Ok(items) => items,
        Err(e) => return store_error("reading the labelling queue", &e).into_response(),
    };
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(json!({"object": "list", "data": items})),
    )
        .into_response()
}

/// `POST /dashboard/label`: a person's verdict on a pair, kept as one feedback record.
pub async fn post_label(State(state): State<GatewayState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if let Err(e) = state.dashboard_access(&parts.headers) {
        return e.into_response();
    }
    match record_label(&state, &parts.headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// The captured content of one side (404 `content_not_found` without it).
async fn side_content(
    state: &GatewayState,
    side: &str,
    request_id: &str,
) -> Result<ContentRecord, ApiError> {
    let content = state
        .store()
        .content(request_id)
        .await
        .map_err(|e| store_error("reading captured content", &e))?;
    content.ok_or_else(|| {
        let mut e = ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "content_not_found",
            format!(
                "request `{request_id}` has no captured content (unknown, or answered while store.capture_content was off)"
            ),
        );
        e.param = Some(format!("{side}.request_id"));
        e
    })
}

async fn record_label(
    state: &GatewayState,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(state, headers, body).await?;
    let label = LabelRequest::parse(&bytes)?;
    let (winner, loser) = (&label.winner, &label.loser);
    let won = side_content(state, "winner", &winner.request_id).await?;
    let lost = if loser.request_id == winner.request_id {
        None
    } else {
        Some(side_content(state, "loser", &loser.request_id).await?)
    };
    let (preferred_index, compared_with) = match &lost {
        // Two choices of one request.
        None => {
            let choices = won.choices.len().max(1);
            let mut indexes = [0u32; 2];
            for (slot, (name, side)) in indexes
                .iter_mut()
                .zip([("winner", winner), ("loser", loser)])
            {
                let param = format!("{name}.index");
                let Some(index) = side.index else {
                    return Err(ApiError::invalid(
                        "missing_field",
                        &param,
                        format!(
                            "`{param}` is required when both replies are choices of one request"
                        ),
                    ));
                };
                if usize::try_from(index).map_or(true, |i| i >= choices) {
                    return Err(ApiError::invalid(
                        "invalid_value",
                        &param,
                        format!(
                            "`{param}`: expected an integer below {choices}, the number of choices; got {index}"
                        ),
                    ));
                }
                *slot = index;
            }
            if indexes[0] == indexes[1] {
                return Err(ApiError::invalid(
                    "invalid_value",
                    "loser.index",
                    "`loser.index`: the winner and the loser are the same choice",
                ));
            }
            (Some(indexes[0]), None)
        }
        // The replies of two requests.
        Some(other) => {
            for (name, side) in [("winner", winner), ("loser", loser)] {
                if side.index.is_some() {
                    let param = format!("{name}.index");
                    return Err(ApiError::invalid(
                        "invalid_value",
                        &param,
                        format!("`{param}`: expected null when the replies are of two requests"),
                    ));
                }
            }
            if other.tenant != won.tenant {
                return Err(ApiError::invalid(
                    "invalid_value",
                    "loser.request_id",
                    "`loser.request_id`: the two requests belong to different tenants",
                ));
            }
            (None, Some(other.request_id.clone()))
        }
    };
    let feedback = Feedback {
        feedback_id: Feedback::new_id(),
        at: SystemTime::now(),
        request_id: won.request_id.clone(),
        completion_id: won.completion_id.clone(),
        tenant: won.tenant.clone(),
        key_id: DASHBOARD_KEY_ID.to_string(),
        source: SOURCE_LABEL.to_string(),
        thumbs: None,
        score: None,
        correction: label
            .correction
            .as_deref()
            .map(|c| state.scrubber().scrub(c)),
        preferred_index,
        compared_with,
        no_train: won.no_train || lost.as_ref().is_some_and(|c| c.no_train),
    };
    state
        .store()
        .record_feedback(&feedback)
        .await
        .map_err(|e| store_error("keeping the label", &e))?;
    state.metrics().feedback("label");
    Ok(axum::Json(json!({"id": feedback.feedback_id, "object": "feedback"})).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn parse(body: &str) -> Result<FeedbackRequest, ApiError> {
        FeedbackRequest::parse(body.as_bytes())
    }

    #[test]
    fn every_signal_combination_parses() {
        let r = parse(
            r#"{"completion_id": "c1", "thumbs": "down", "score": -0.5, "correction": "Better.", "preferred_index": 1}"#,
        )
        .unwrap();
        assert_eq!(r.completion_id, "c1");
        assert_eq!(r.thumbs, Some(Thumbs::Down));
        assert_eq!(r.score, Some(-0.5));
        assert_eq!(r.correction.as_deref(), Some("Better."));
        assert_eq!(r.preferred_index, Some(1));
        assert_eq!(
            r.kinds(),
            ["thumbs_down", "score", "correction", "preferred"]
        );
        let r = parse(r#"{"completion_id": "c1", "score": 3, "thumbs": null}"#).unwrap();
        assert_eq!((r.score, r.thumbs), (Some(3.0), None));
    }

    #[test]
    fn mistakes_name_the_field_and_what_was_expected() {
        for (body, param, code, needle) in [
            (
                r#"{"thumbs": "up"}"#,
                Some("completion_id"),
                "missing_field",
                "required",
            ),
            (
                r#"{"completion_id": "c"}"#,
                None,
                "missing_signal",
                "`preferred_index`",
            ),
            (
                r#"{"completion_id": "c", "thumbs": "sideways"}"#,
                Some("thumbs"),
                "invalid_value",
                "\"up\" or \"down\"",
            ),
            (
                r#"{"completion_id": "c", "thumbs": true}"#,
                Some("thumbs"),
                "invalid_type",
                "a string",
            ),
            (
                r#"{"completion_id": "c", "score": "high"}"#,
                Some("score"),
                "invalid_type",
                "a number",
            ),
            (
                r#"{"completion_id": "c", "correction": "  "}"#,
                Some("correction"),
                "invalid_value",
                "empty",
            ),
            (
                r#"{"completion_id": "c", "preferred_index": -1}"#,
                Some("preferred_index"),
                "invalid_value",
                "≥ 0",
            ),
            (
                r#"{"completion_id": "c", "preferred_index": 1.5}"#,
                Some("preferred_index"),
                "invalid_type",
                "integer",
            ),
            (
                r#"{"completion_id": "c", "preferred_index": 4294967296}"#,
                Some("preferred_index"),
                "invalid_value",
                "too large",
            ),
            (
                r#"{"completion_id": 7, "thumbs": "up"}"#,
                Some("completion_id"),
                "invalid_type",
                "a string",
            ),
            (
                r#"{"completion_id": "", "thumbs": "up"}"#,
                Some("completion_id"),
                "invalid_value",
                "non-empty",
            ),
            (
                r#"{"completion_id": "c", "thumbs": "up", "rating": 5}"#,
                Some("rating"),
                "unknown_field",
                "expected completion_id",
            ),
            (r#"[1]"#, Some("body"), "invalid_type", "object"),
            (
                r#"{"completion_id": "#,
                Some("body"),
                "invalid_json",
                "not valid JSON",
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.kind, "invalid_request_error", "{body}");
            assert_eq!(e.code, code, "{body}: {e}");
            assert_eq!(e.param.as_deref(), param, "{body}: {e}");
            assert!(e.message.contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn label_bodies_parse_and_name_their_mistakes() {
        let l = LabelRequest::parse(
            br#"{"winner": {"request_id": "a", "index": 1}, "loser": {"request_id": "a", "index": 0}, "correction": "x"}"#,
        )
        .unwrap();
        assert_eq!(l.winner.index, Some(1));
        assert_eq!(l.loser.index, Some(0));
        assert_eq!(l.correction.as_deref(), Some("x"));
        let l = LabelRequest::parse(
            br#"{"winner": {"request_id": "a", "index": null}, "loser": {"request_id": "b"}, "correction": ""}"#,
        )
        .unwrap();
        assert_eq!(
            (l.winner.index, l.loser.index, l.correction),
            (None, None, None)
        );
        for (body, param) in [
            (r#"{"winner": {"request_id": "a"}}"#, "loser"),
            (r#"{"winner": "a", "loser": {"request_id": "b"}}"#, "winner"),
            (
                r#"{"winner": {"request_id": "a", "idx": 1}, "loser": {"request_id": "b"}}"#,
                "winner.idx",
            ),
            (
                r#"{"winner": {"index": 1}, "loser": {"request_id": "b"}}"#,
                "winner.request_id",
            ),
            (
                r#"{"winner": {"request_id": "a"}, "loser": {"request_id": "b"}, "why": 1}"#,
                "why",
            ),
        ] {
            let e = LabelRequest::parse(body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
        }
    }
}
