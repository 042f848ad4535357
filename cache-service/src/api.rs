//! The HTTP API: routes, the bearer token, and the handlers (contract section 7).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http_body_util::LengthLimitError;
use serde_json::json;

use crate::store::{Store, StoreError};

const DEFAULT_TTL_SECONDS: u64 = 3600;
const MAX_KEY_LEN: usize = 512;

pub struct App {
    pub store: Store,
    pub token: Option<String>,
    /// Bound on reading a whole PUT body.
    pub read_timeout: Duration,
    pub max_entry_bytes: usize,
}

pub fn router(app: Arc<App>) -> Router {
    let protected = Router::new()
        .route("/v1/cache/{key}", get(get_entry).put(put_entry).delete(delete_entry))
        .route("/v1/stats", get(stats))
        .layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new().route("/healthz", get(|| async { "ok" })).merge(protected).with_state(app)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], json!({"error": message}).to_string()).into_response()
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::TooLarge => error(StatusCode::PAYLOAD_TOO_LARGE, "entry larger than the store"),
        StoreError::Unavailable(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("store error: {e}")),
        StoreError::Io(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("store error: {e}")),
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        }
    }
    next.run(req).await
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b))
}

async fn get_entry(State(app): State<Arc<App>>, Path(key): Path<String>) -> Response {
    if !valid_key(&key) {
        return error(StatusCode::BAD_REQUEST, "invalid key");
    }
    match app.store.get(&key).await {
        Ok(Some(v)) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/octet-stream")], v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "miss"),
        Err(e) => store_error(e),
    }
}

/// Reads a whole body, at most `limit` bytes, within `timeout`.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize, timeout: Duration) -> Result<Bytes, Response> {
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, "entry larger than --max-entry-bytes");
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(timeout, to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(if e.into_inner().is::<LengthLimitError>() {
            too_large()
        } else {
            error(StatusCode::BAD_REQUEST, "cannot read the request body")
        }),
        Err(_) => {
            let mut r = error(StatusCode::REQUEST_TIMEOUT, "the request body took too long");
            r.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            Err(r)
        }
    }
}

async fn put_entry(State(app): State<Arc<App>>, Path(key): Path<String>, headers: HeaderMap, body: Body) -> Response {
    if !valid_key(&key) {
        return error(StatusCode::BAD_REQUEST, "invalid key");
    }
    let ttl =
        match headers.get("x-cache-ttl-seconds").map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok())) {
            None => DEFAULT_TTL_SECONDS,
            Some(Some(t)) if t > 0 => t,
            Some(_) => return error(StatusCode::BAD_REQUEST, "x-cache-ttl-seconds must be a positive integer"),
        };
    let value = match read_body(body, &headers, app.max_entry_bytes, app.read_timeout).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app.store.put(&key, value, ttl).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => store_error(e),
    }
}

async fn delete_entry(State(app): State<Arc<App>>, Path(key): Path<String>) -> Response {
    if !valid_key(&key) {
        return error(StatusCode::BAD_REQUEST, "invalid key");
    }
    match app.store.delete(&key).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, "miss"),
        Err(e) => store_error(e),
    }
}

async fn stats(State(app): State<Arc<App>>) -> Response {
    match app.store.stats().await {
        Ok(s) => {
            let body = json!({
                "store": app.store.kind(), "entries": s.entries, "bytes": s.bytes,
                "hits": s.hits, "misses": s.misses, "evictions": s.evictions,
            });
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
        }
        Err(e) => store_error(e),
    }
}
