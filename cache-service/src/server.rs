//! The accept loop: HTTP/1.1 through hyper with a header read timeout, writes that may not
//! stall, and a cap on connections served at once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::write_timeout::WriteTimeout;

pub struct Limits {
    /// Bound on reading a request's headers, counted from the first byte of a new connection
    /// or from the end of the previous answer (so it also closes idle keep-alive connections).
    pub header_timeout: Duration,
    /// Bound on a response write that makes no progress.
    pub write_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

/// How long connections in flight get to finish once shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What a connection over the cap gets before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
content-length: 33\r\nconnection: close\r\n\r\n{\"error\":\"too many connections\"}\n";

/// Serves `router` until `shutdown` completes. A connection beyond `max_connections` is not
/// queued: it is answered 503 at once and closed, so a client never waits on a full server.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS)));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors, or a connection gone before it was accepted:
                    // pause rather than spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refuse(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(WriteTimeout::new(stream, limits.write_timeout));
        let conn = graceful.watch(http.serve_connection(io, TowerToHyperService::new(router.clone())));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}

/// Answers 503 without reading the request, if the socket takes it at once, and closes.
fn refuse(stream: TcpStream) {
    let _ = stream.try_write(BUSY);
}
