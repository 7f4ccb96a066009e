//! The built-in HTTP endpoints' server: one HTTP/1.1 connection served within time limits
//! (slow headers close it, a slow body gets 408), the connection's admission carried with each
//! request, and the accept loop of the metrics listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::admission::{AcceptBackoff, Admission, Refused, Ticket};

/// Whether an HTTP request came over TLS: a request extension the built-in endpoints read.
#[derive(Debug, Clone, Copy)]
pub struct Secure(pub bool);

/// How long an HTTP client may take: to send a request's headers (and, between requests of a
/// kept-alive connection, to start the next), and to send the rest of a request so it can be
/// answered; the long-poll echo's hold comes on top of the latter.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub headers: Duration,
    /// A path whose answer may be held this much longer (the long-poll echo).
    pub long: Option<(&'static str, Duration)>,
    /// How long the connection is served: then it closes once its request in progress is
    /// answered (an HTTP connection never holds an allocation, and must not hold its place
    /// among those that do not for ever). A WebSocket it upgraded to lives by its own limits.
    pub lifetime: Duration,
}

/// How an HTTP connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpEnd {
    /// The client closed it, or it was upgraded.
    Done,
    /// It reached its lifetime.
    Lifetime,
}

/// Serves `router` on one HTTP/1.1 connection within `limits`: slow headers close the
/// connection, a slow request body gets 408, and the connection closes at its lifetime. Each request carries the connection's `ticket`
/// (a WebSocket handler keeps it for as long as the upgraded connection lives).
pub async fn serve_http_stream<S>(
    router: axum::Router,
    stream: S,
    client: SocketAddr,
    tls: bool,
    client_tls: Option<crate::tls_seen::ClientTls>,
    limits: HttpLimits,
    ticket: Ticket,
) -> std::io::Result<HttpEnd>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use axum::response::IntoResponse;
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(client));
            req.extensions_mut().insert(Secure(tls));
            if let Some(c) = client_tls {
                req.extensions_mut().insert(c);
            }
            req.extensions_mut().insert(ticket.clone());
            let answer_within = match limits.long {
                Some((path, hold)) if req.uri().path() == path => limits.headers + hold,
                Some(_) | None => limits.headers,
            };
            let mut router = router.clone();
            let call = tower_service::Service::call(&mut router, req);
            async move {
                match tokio::time::timeout(answer_within, call).await {
                    Ok(answer) => answer,
                    Err(_) => Ok((
                        axum::http::StatusCode::REQUEST_TIMEOUT,
                        "request too slow\n",
                    )
                        .into_response()),
                }
            }
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.headers)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r.map(|()| HttpEnd::Done).map_err(std::io::Error::other),
        _ = tokio::time::sleep(limits.lifetime) => {
            conn.as_mut().graceful_shutdown();
            conn.await.map_err(std::io::Error::other)?;
            Ok(HttpEnd::Lifetime)
        }
    }
}

/// Serves `app` (the metrics endpoints, plus any echo routes) on a bound listener until the process ends, under the same admission and time limits as the HTTP on
/// the relay's stream listeners. Handlers see the client address as `ConnectInfo`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    admission: Arc<Admission>,
    limits: HttpLimits,
    refused: impl Fn(Refused),
) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                backoff.failed(&e, "metrics").await;
                continue;
            }
        };
        backoff.reset();
        let admitted = match admission.admit(from.ip()) {
            Ok(a) => a,
            Err(why) => {
                refused(why);
                continue;
            }
        };
        let app = app.clone();
        let ticket = Ticket(Arc::new(admitted));
        tokio::spawn(async move {
            let _ = serve_http_stream(app, tcp, from, false, None, limits, ticket).await;
        });
    }
}
