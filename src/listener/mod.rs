//! The accept loop: TCP connections in, HTTP/1.1 out through hyper, WebSocket
//! upgrades handed on, and a graceful stop.
//!
//! Warren runs its own loop rather than `warp::serve` for two reasons warp
//! offers no hook for: each accepted socket gets TCP_NODELAY (chat frames are
//! small writes that Nagle's algorithm and delayed ACKs would hold back by up to
//! 40 ms), and hyper's own answers to requests it cannot parse (a malformed,
//! negative or duplicated `Content-Length`, a request line or header block too
//! large) leave with the JSON error body every Warren error carries
//! ([`unparsable`]), not an empty one.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error};
use warp::http::Request;
use warp::reply::Response;

use crate::error::ErrorCode;

pub mod unparsable;

/// How long a client may take to send a request's head. Long enough for any
/// real client on a slow link; short enough that a slow-header attack
/// (slowloris) cannot hold connections open.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// After an accept error that is not about one connection (most often EMFILE:
/// out of file descriptors), wait this long before accepting again, so the
/// loop does not spin while sessions close and free descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serve `service` on every connection `listener` accepts until `shutdown`,
/// with at most `max_pending` of them still waiting for their first request;
/// then stop accepting, let requests in progress finish (WebSockets are no
/// longer hyper's once upgraded), and return when every connection is done.
/// `refused` is told each code hyper's own refusals are answered with.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    max_pending: usize,
    shutdown: CancellationToken,
    refused: impl Fn(ErrorCode) + Clone + Send + Sync + Unpin + 'static,
) where
    S: tower_service::Service<Request<Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let connections = TaskTracker::new();
    // Connections that have not yet sent a whole request head: a flood of
    // idle or trickling ones must not use up the node's file descriptors. A
    // connection frees its place with its first request.
    let pending = Arc::new(Semaphore::new(max_pending.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // The rewrite in `unparsable` needs a response's head and body in one
        // contiguous write.
        .writev(false);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                error!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        no_delay(&stream);
        let Ok(place) = pending.clone().try_acquire_owned() else {
            refused(ErrorCode::Unavailable);
            connections.spawn(turn_away(stream));
            continue;
        };
        let io = TokioIo::new(unparsable::ErrorBodies::new(stream, refused.clone()));
        let connection = http
            .serve_connection(
                io,
                TowerToHyperService::new(WithPeer {
                    inner: service.clone(),
                    peer: Peer(peer),
                    waiting: Arc::new(std::sync::Mutex::new(Some(place))),
                }),
            )
            .with_upgrades();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Answer a connection over the pending cap with `503 unavailable` and close
/// it, without reading its request: the node stays responsive, and the client
/// learns to come back.
async fn turn_away(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"code":"unavailable","message":"too many connections are waiting; retry shortly","retry_after_ms":1000}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The TCP peer of a request's connection, in the request's extensions
/// (`warp::ext::optional::<Peer>()`), for the per-address limits.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// A service that tells every request which peer it came from, and gives
/// back the connection's waiting place when its first request arrives.
#[derive(Clone)]
struct WithPeer<S> {
    inner: S,
    peer: Peer,
    waiting: Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>,
}

impl<S> tower_service::Service<Request<Incoming>> for WithPeer<S>
where
    S: tower_service::Service<Request<Incoming>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        self.waiting.lock().unwrap().take();
        request.extensions_mut().insert(self.peer);
        self.inner.call(request)
    }
}

/// Chat frames are small writes: with Nagle's algorithm and delayed ACKs, one
/// could wait up to 40 ms behind another.
fn no_delay(stream: &tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "TCP_NODELAY not set");
    }
}

/// Errors `accept` reports about one connection that already went away.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        no_delay(&accepted);
        assert!(
            accepted.nodelay().unwrap(),
            "Nagle would delay small frames"
        );
    }
}
