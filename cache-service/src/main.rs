//! cache-service: the L2 cache of gemini-image-filter (contract section 7).
//!
//! ```text
//! cache-service --listen 127.0.0.1:PORT --dir PATH --max-bytes N
//! cache-service --listen 127.0.0.1:PORT --redis redis://127.0.0.1:6379/0
//! ```
//!
//! `GET|PUT|DELETE /v1/cache/{key}` (PUT takes `x-cache-ttl-seconds`), `GET /v1/stats`,
//! `GET /healthz`. With `IMAGE_CACHE_TOKEN` set, cache and stats calls need
//! `authorization: Bearer <token>`. Slow or stuck clients are cut off and connections capped
//! (see `args` and `server`); Redis calls are bounded (see `redis_store`).

mod api;
mod args;
mod disk;
mod redis_store;
mod server;
mod store;
mod write_timeout;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api::App;
use args::Backend;
use disk::DiskStore;
use redis_store::{RedisStore, Timeouts};
use store::Store;

#[tokio::main]
async fn main() {
    let args = args::parse();
    let token = std::env::var("IMAGE_CACHE_TOKEN").ok().filter(|t| !t.is_empty());
    let (store, described) = match &args.backend {
        Backend::Disk(dir) => match DiskStore::open_keeping(dir, args.max_bytes, args.memory_bytes.min(args.max_bytes))
        {
            Ok(s) => {
                let (n, b) = s.size();
                (
                    Store::Disk(s),
                    format!(
                        "disk {} (max {} bytes, {n} entries / {b} bytes kept, up to {} bytes of them in memory)",
                        dir.display(),
                        args.max_bytes,
                        args.memory_bytes.min(args.max_bytes)
                    ),
                )
            }
            Err(e) => {
                eprintln!("cache-service: cannot open {}: {e}", dir.display());
                std::process::exit(1)
            }
        },
        Backend::Redis(url) => {
            let timeouts = Timeouts { connect: args.redis_connect_timeout, response: args.redis_timeout };
            match RedisStore::connect(url, &args.redis_prefix, &timeouts).await {
                Ok(s) => (Store::Redis(s), format!("redis (prefix {})", args.redis_prefix)),
                Err(e) => {
                    eprintln!("cache-service: cannot reach Redis: {e}");
                    std::process::exit(1)
                }
            }
        }
    };
    let auth = if token.is_some() { "bearer token required" } else { "no token (IMAGE_CACHE_TOKEN unset)" };
    let app = Arc::new(App { store, token, read_timeout: args.read_timeout, max_entry_bytes: args.max_entry_bytes });

    if let Store::Disk(d) = &app.store {
        let d = d.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                d.sweep();
            }
        });
    }

    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cache-service: cannot listen on {}: {e}", args.listen);
            std::process::exit(1)
        }
    };
    let addr: SocketAddr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cache-service: no local address: {e}");
            std::process::exit(1)
        }
    };
    println!("cache-service ready on {addr}: store {described}, {auth}");
    let limits = server::Limits {
        header_timeout: args.read_timeout,
        write_timeout: args.write_timeout,
        max_connections: args.max_connections,
    };
    server::serve(listener, api::router(app), limits, shutdown_signal()).await;
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}
