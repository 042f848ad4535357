//! cache-service: the L2 cache of gemini-image-filter (contract section 7).
//!
//! ```text
//! cache-service --listen 127.0.0.1:PORT --dir PATH --max-bytes N
//! cache-service --listen 127.0.0.1:PORT --redis redis://127.0.0.1:6379/0
//! ```
//!
//! `GET|PUT|DELETE /v1/cache/{key}` (PUT takes `x-cache-ttl-seconds`), `GET /v1/stats`,
//! `GET /healthz`. With `IMAGE_CACHE_TOKEN` set, cache and stats calls need
//! `authorization: Bearer <token>`.

mod disk;
mod redis_store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use disk::{DiskStore, PutError};
use redis_store::RedisStore;

const DEFAULT_TTL_SECONDS: u64 = 3600;
const MAX_KEY_LEN: usize = 512;

enum Store {
    Disk(DiskStore),
    Redis(RedisStore),
}

struct App {
    store: Store,
    token: Option<String>,
}

struct Args {
    listen: String,
    dir: Option<PathBuf>,
    redis: Option<String>,
    max_bytes: u64,
    max_entry_bytes: usize,
    redis_prefix: String,
}

fn usage(msg: &str) -> ! {
    eprintln!("cache-service: {msg}");
    eprintln!("usage: cache-service --listen HOST:PORT (--dir PATH --max-bytes N | --redis URL) [--max-entry-bytes N] [--redis-prefix P]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        listen: "127.0.0.1:8090".into(),
        dir: None,
        redis: None,
        max_bytes: 1 << 30,
        max_entry_bytes: 64 << 20,
        redis_prefix: "gemini-image-cache:".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--listen" => a.listen = value(),
            "--dir" => a.dir = Some(PathBuf::from(value())),
            "--redis" => a.redis = Some(value()),
            "--max-bytes" => {
                a.max_bytes = value().parse().unwrap_or_else(|_| usage("--max-bytes takes a number of bytes"))
            }
            "--max-entry-bytes" => {
                a.max_entry_bytes =
                    value().parse().unwrap_or_else(|_| usage("--max-entry-bytes takes a number of bytes"))
            }
            "--redis-prefix" => a.redis_prefix = value(),
            "-h" | "--help" => usage("help"),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if a.dir.is_some() == a.redis.is_some() {
        usage("give exactly one of --dir or --redis");
    }
    a
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let token = std::env::var("IMAGE_CACHE_TOKEN").ok().filter(|t| !t.is_empty());
    let (store, described) = match (&args.dir, &args.redis) {
        (Some(dir), _) => match DiskStore::open(dir, args.max_bytes) {
            Ok(s) => {
                let (n, b) = s.size();
                (
                    Store::Disk(s),
                    format!("disk {} (max {} bytes, {n} entries / {b} bytes kept)", dir.display(), args.max_bytes),
                )
            }
            Err(e) => {
                eprintln!("cache-service: cannot open {}: {e}", dir.display());
                std::process::exit(1)
            }
        },
        (_, Some(url)) => match RedisStore::connect(url, &args.redis_prefix).await {
            Ok(s) => (Store::Redis(s), format!("redis (prefix {})", args.redis_prefix)),
            Err(e) => {
                eprintln!("cache-service: cannot reach Redis: {e}");
                std::process::exit(1)
            }
        },
        _ => usage("give exactly one of --dir or --redis"),
    };
    let auth = if token.is_some() { "bearer token required" } else { "no token (IMAGE_CACHE_TOKEN unset)" };
    let app = Arc::new(App { store, token });

    if let Store::Disk(_) = app.store {
        let sweeper = app.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                if let Store::Disk(d) = &sweeper.store {
                    d.sweep();
                }
            }
        });
    }

    let protected = Router::new()
        .route("/v1/cache/{key}", get(get_entry).put(put_entry).delete(delete_entry))
        .route("/v1/stats", get(stats))
        .layer(DefaultBodyLimit::max(args.max_entry_bytes))
        .layer(middleware::from_fn_with_state(app.clone(), require_token));
    let router = Router::new().route("/healthz", get(|| async { "ok" })).merge(protected).with_state(app);

    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cache-service: cannot listen on {}: {e}", args.listen);
            std::process::exit(1)
        }
    };
    let addr: SocketAddr = listener.local_addr().unwrap_or_else(|_| usage("no local address"));
    println!("cache-service ready on {addr}: store {described}, {auth}");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    let _ = axum::serve(listener, router)
        .with_graceful_shutdown(async {
            tokio::select! { _ = shutdown => {}, _ = term => {} }
        })
        .await;
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, [("content-type", "application/json")], json!({"error": message}).to_string()).into_response()
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        let given =
            req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
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
    let found = match &app.store {
        Store::Disk(d) => Ok(d.get(&key).await),
        Store::Redis(r) => r.get(&key).await.map(|v| v.map(Bytes::from)),
    };
    match found {
        Ok(Some(v)) => (StatusCode::OK, [("content-type", "application/octet-stream")], v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "miss"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("store error: {e}")),
    }
}

async fn put_entry(State(app): State<Arc<App>>, Path(key): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    if !valid_key(&key) {
        return error(StatusCode::BAD_REQUEST, "invalid key");
    }
    let ttl =
        match headers.get("x-cache-ttl-seconds").map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok())) {
            None => DEFAULT_TTL_SECONDS,
            Some(Some(t)) if t > 0 => t,
            Some(_) => return error(StatusCode::BAD_REQUEST, "x-cache-ttl-seconds must be a positive integer"),
        };
    let result = match &app.store {
        Store::Disk(d) => d.put(&key, &body, ttl).await.map_err(|e| match e {
            PutError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "entry larger than the store".to_string()),
            PutError::Io(e) => (StatusCode::INTERNAL_SERVER_ERROR, e),
        }),
        Store::Redis(r) => r.put(&key, &body, ttl).await.map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    };
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err((status, msg)) => error(status, &msg),
    }
}

async fn delete_entry(State(app): State<Arc<App>>, Path(key): Path<String>) -> Response {
    if !valid_key(&key) {
        return error(StatusCode::BAD_REQUEST, "invalid key");
    }
    let result = match &app.store {
        Store::Disk(d) => Ok(d.delete(&key).await),
        Store::Redis(r) => r.delete(&key).await,
    };
    match result {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, "miss"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("store error: {e}")),
    }
}

async fn stats(State(app): State<Arc<App>>) -> Response {
    let body = match &app.store {
        Store::Disk(d) => {
            let (entries, bytes) = d.size();
            json!({
                "store": "disk", "entries": entries, "bytes": bytes,
                "hits": d.hits.load(Ordering::Relaxed), "misses": d.misses.load(Ordering::Relaxed),
                "evictions": d.evictions.load(Ordering::Relaxed),
            })
        }
        Store::Redis(r) => match r.size().await {
            Ok((entries, bytes, evictions)) => json!({
                "store": "redis", "entries": entries, "bytes": bytes,
                "hits": r.hits.load(Ordering::Relaxed), "misses": r.misses.load(Ordering::Relaxed),
                "evictions": evictions,
            }),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("store error: {e}")),
        },
    };
    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
}
