//! The admin API: `POST /admin/adapters` loads a PEFT adapter and serves it under a name, adding
//! the name or replacing what it served, without a restart; `GET /admin/adapters` lists what
//! every name serves. Both need the admin key (`--admin-key`), which the API key does not
//! replace.
//!
//! A swap never drops or fails a request. The new weights go into a fresh engine slot first;
//! then the name points to that slot (requests resolved from then on use it); then the old
//! slot is retired: the sequences already on it finish there, one resolved just before the
//! swap but submitted after it is sent to the new slot, and the old weights are dropped once
//! the last of its sequences is done. Swaps hold one lock from start to end, so two never
//! interleave.

use std::path::PathBuf;
use std::sync::PoisonError;
use std::time::Instant;

use axum::Json;
use axum::extract::State;

use super::error::{ApiError, ApiJson};
use super::types::{
    AdapterInfo, AdapterList, AdapterLoadRequest, AdapterLoadResponse, ErrorResponse, ListObject,
};
use super::{AppState, ServedAdapter, unix_now};
use crate::engine::SubmitError;
use crate::server::attach_adapter;

/// Loads the PEFT adapter in `path` and serves it as model `name`: added if the name is new,
/// replaced otherwise. Requests already running on the old weights finish on them; requests
/// sent after this answers use the new ones.
#[utoipa::path(
    post,
    path = "/admin/adapters",
    tag = "admin",
    request_body = AdapterLoadRequest,
    responses(
        (status = 200, description = "The adapter is served under `name`", body = AdapterLoadResponse),
        (status = 400, description = "Empty or missing field, the base model's name, or an adapter directory that cannot be loaded; `param` names the field", body = ErrorResponse),
        (status = 401, description = "Missing or wrong admin key", body = ErrorResponse),
        (status = 404, description = "The server runs without --admin-key", body = ErrorResponse),
        (status = 503, description = "The server is shutting down", body = ErrorResponse),
    ),
    security(("admin" = [])),
)]
pub async fn load_adapter(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<AdapterLoadRequest>,
) -> Result<Json<AdapterLoadResponse>, ApiError> {
    // On a task of its own, so a client hanging up mid-swap cannot leave it half done (new
    // weights loaded that no name points to).
    tokio::spawn(async move { state.load_adapter(&request.name, &request.path).await })
        .await
        .map_err(|e| ApiError::Engine(format!("the adapter swap panicked: {e}")))?
        .map(Json)
}

/// Every adapter served, with the directory its current weights came from.
#[utoipa::path(
    get,
    path = "/admin/adapters",
    tag = "admin",
    responses(
        (status = 200, body = AdapterList),
        (status = 401, description = "Missing or wrong admin key", body = ErrorResponse),
        (status = 404, description = "The server runs without --admin-key", body = ErrorResponse),
    ),
    security(("admin" = [])),
)]
pub async fn list_adapters(State(state): State<AppState>) -> Json<AdapterList> {
    let data = state
        .served_adapters()
        .into_iter()
        .map(|a| AdapterInfo {
            name: a.name,
            path: a.path,
            loaded_at: a.loaded_at,
            swaps: a.swaps,
        })
        .collect();
    Json(AdapterList {
        object: ListObject::List,
        data,
    })
}

impl AppState {
    /// Loads the PEFT adapter in `path` (off the async runtime) and serves it as model `name`,
    /// replacing the adapter of that name if there is one; what `POST /admin/adapters` does.
    /// Waits for any swap in progress first.
    pub async fn load_adapter(
        &self,
        name: &str,
        path: &str,
    ) -> Result<AdapterLoadResponse, ApiError> {
        let invalid = |param, message| ApiError::InvalidAdapter { param, message };
        if name.trim().is_empty() {
            return Err(invalid("name", "`name` must not be empty".into()));
        }
        if path.trim().is_empty() {
            return Err(invalid("path", "`path` must not be empty".into()));
        }
        if name == self.model_name() {
            return Err(invalid(
                "name",
                format!(
                    "`name` `{name}` is the base model's served name; serve the adapter under another name"
                ),
            ));
        }
        let _swap = self.inner.swap_lock.lock().await;

        let base = self.inner.config.base_model.clone();
        let dir = PathBuf::from(path);
        let started = Instant::now();
        let model = tokio::task::spawn_blocking(move || attach_adapter(&base, &dir))
            .await
            .map_err(|e| ApiError::Engine(format!("loading an adapter panicked: {e}")))?
            .map_err(|reason| {
                invalid(
                    "path",
                    format!("Cannot load the adapter in `path` `{path}`: {reason}"),
                )
            })?;
        let load_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);

        let slot = self
            .engine()
            .add_adapter(model)
            .await
            .map_err(engine_gone)?;
        // From here on, requests naming the adapter resolve to the new slot.
        let previous = {
            let mut adapters = self
                .inner
                .adapters
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let loaded_at = unix_now();
            match adapters.iter_mut().find(|a| a.name == name) {
                Some(entry) => {
                    let previous = (entry.slot, std::mem::replace(&mut entry.path, path.into()));
                    entry.slot = slot;
                    entry.loaded_at = loaded_at;
                    entry.swaps += 1;
                    Some(previous)
                }
                None => {
                    adapters.push(ServedAdapter {
                        name: name.to_string(),
                        path: path.to_string(),
                        slot,
                        loaded_at,
                        swaps: 0,
                    });
                    None
                }
            }
        };
        let previous_path = match previous {
            Some((old_slot, old_path)) => {
                self.engine()
                    .retire_adapter(old_slot, slot)
                    .map_err(engine_gone)?;
                self.engine().metrics().adapter_swaps.inc();
                Some(old_path)
            }
            None => None,
        };
        Ok(AdapterLoadResponse {
            name: name.to_string(),
            path: path.to_string(),
            replaced: previous_path.is_some(),
            previous_path,
            load_ms,
        })
    }
}

fn engine_gone(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Stopped => ApiError::EngineStopped,
        other => ApiError::Engine(other.to_string()),
    }
}
