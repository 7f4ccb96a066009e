//! The browser network test: `GET /test` serves one self-contained page (no external script,
//! style, font or image) that tests, from the visitor's browser, every path to this relay
//! (WebRTC through TURN over UDP, TCP and TLS with a relay-only policy), the WebSocket and
//! long-poll echoes, optionally camera and microphone, and the distance to the deployment's
//! other relays; then explains each failure in plain words.
//!
//! `POST /test/session` gives the page short-lived credentials of the `test-page` tenant
//! (small quotas, a short lifetime, peers limited to this relay's own allocations), rate
//! limited per source, so that publishing the page gives no one a relay.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::config::TestPageSettings;
use crate::http::Secure;
use crate::service::{strip_port, CredentialService};
use turnpike_proto::advice::Phrase;
use turnpike_proto::limiter::{Limiter, Rates};
use turnpike_proto::tenant::TEST_PAGE_TENANT;

/// The page as written, with `/*ADVICE*/{}` where the shared words go.
const PAGE_SOURCE: &str = include_str!("page.html");

/// The page as served: the probe's words for verdicts and fixes ([`Phrase`]) filled in, so
/// the two say the same thing the same way.
static PAGE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let table: serde_json::Map<String, serde_json::Value> = Phrase::ALL
        .iter()
        .map(|p| (p.key().to_owned(), p.text().into()))
        .collect();
    // Inside <script>: no "</" may appear in the data.
    let json = serde_json::Value::Object(table)
        .to_string()
        .replace('<', "\\u003c");
    PAGE_SOURCE.replacen("/*ADVICE*/{}", &json, 1)
});

/// Sessions a source may start: a burst of four, then two a second (the tenant's quotas
/// bound what they can hold).
const SESSION_RATE: Rates = Rates {
    packets_per_sec: 2.0,
    bytes_per_sec: 1.0,
};

pub struct TestPage {
    settings: TestPageSettings,
    credentials: Arc<CredentialService>,
    relay_ports: (u16, u16),
    websocket: bool,
    long_poll: bool,
    sessions: Mutex<Limiter>,
    /// The TLS handshakes clients refused: the page's evidence of a certificate not trusted.
    tls_refusals: Arc<crate::tls_seen::TlsRefusals>,
}

/// One path the page tests, from a TURN URL.
#[derive(Debug, PartialEq, serde::Serialize)]
pub struct TestPath {
    pub id: String,
    /// `udp`, `tcp` or `tls`.
    pub transport: &'static str,
    pub port: u16,
    pub url: String,
}

/// `https://HOST:PORT` of a `turns:HOST:PORT...` URL.
fn tls_origin(url: &str) -> Option<String> {
    let rest = url.strip_prefix("turns:")?;
    let hostport = rest.split('?').next()?;
    hostport
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        .then(|| format!("https://{hostport}"))
}

/// `turn:HOST:PORT?transport=udp` and the like; None for what the page cannot test.
pub fn path_of(url: &str) -> Option<TestPath> {
    let (scheme, rest) = url.split_once(':')?;
    let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
    let port: u16 = hostport.rsplit_once(':')?.1.parse().ok()?;
    let tcp = query.contains("transport=tcp");
    let transport = match (scheme, tcp) {
        ("turn", false) => "udp",
        ("turn", true) => "tcp",
        ("turns", _) => "tls",
        _ => return None,
    };
    Some(TestPath {
        id: format!("{transport}-{port}"),
        transport,
        port,
        url: url.to_owned(),
    })
}

impl TestPage {
    pub fn new(
        settings: TestPageSettings,
        credentials: Arc<CredentialService>,
        relay_ports: (u16, u16),
        websocket: bool,
        long_poll: bool,
        tls_refusals: Arc<crate::tls_seen::TlsRefusals>,
    ) -> Self {
        TestPage {
            settings,
            credentials,
            relay_ports,
            websocket,
            long_poll,
            sessions: Mutex::new(Limiter::new(SESSION_RATE, 16_384)),
            tls_refusals,
        }
    }

    pub fn routes(self: Arc<Self>) -> Router {
        let page = Arc::clone(&self);
        Router::new()
            .route(
                "/test",
                get(move |req: Request| {
                    let page = Arc::clone(&page);
                    async move { https_only(&req).unwrap_or_else(|| page.page(&req)) }
                }),
            )
            .route(
                "/test/session",
                post({
                    let page = Arc::clone(&self);
                    move |req: Request| {
                        let page = Arc::clone(&page);
                        async move { https_only(&req).unwrap_or_else(|| page.session(&req)) }
                    }
                }),
            )
            .route(
                "/test/tls",
                get(move |req: Request| {
                    let page = Arc::clone(&self);
                    async move { https_only(&req).unwrap_or_else(|| page.tls_seen(&req)) }
                }),
            )
    }

    /// What the relay saw of this visitor's TLS: the ClientHello of the connection this
    /// request came on (GREASE or not), and the handshakes from the visitor's address that
    /// its client ended with an alert in the last `within` seconds (at most 600).
    fn tls_seen(&self, req: &Request) -> Response {
        let Some(source) = source(req) else {
            return (StatusCode::INTERNAL_SERVER_ERROR, "no peer").into_response();
        };
        let within = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("within=")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(120)
            .min(600);
        let grease = req
            .extensions()
            .get::<crate::tls_seen::ClientTls>()
            .map(|c| c.grease);
        let refused: Vec<serde_json::Value> = self
            .tls_refusals
            .of(
                source,
                std::time::Duration::from_secs(within),
                Instant::now(),
            )
            .into_iter()
            .map(|(age, alert)| serde_json::json!({"alert": alert, "secs_ago": age.as_secs_f64()}))
            .collect();
        json(
            StatusCode::OK,
            serde_json::json!({"grease": grease, "refused": refused}),
        )
    }

    fn host(req: &Request) -> Option<String> {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    }

    /// The page, with a Content-Security-Policy that lets it reach this relay (and the
    /// configured regions' health endpoints) and nothing else.
    fn page(&self, req: &Request) -> Response {
        let host = Self::host(req).unwrap_or_default();
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        let mut connect = vec!["'self'".to_owned()];
        if host_ok {
            connect.push(format!("wss://{host}"));
            connect.push(format!("ws://{host}"));
        }
        connect.extend(self.settings.regions.iter().map(|r| r.url.clone()));
        // HTTPS to the TLS paths' own ports: the page's sign of TLS inspection.
        let asked = host_ok.then(|| strip_port(&host));
        connect.extend(
            self.credentials
                .uris(TEST_PAGE_TENANT, asked)
                .iter()
                .filter_map(|u| tls_origin(u)),
        );
        let csp = format!(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             img-src data: blob:; connect-src {}; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
            connect.join(" ")
        );
        let mut r = (StatusCode::OK, PAGE.as_str()).into_response();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Ok(v) = HeaderValue::from_str(&csp) {
            h.insert(header::CONTENT_SECURITY_POLICY, v);
        }
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        r
    }

    fn session(&self, req: &Request) -> Response {
        let Some(source) = source(req) else {
            return (StatusCode::INTERNAL_SERVER_ERROR, "no peer").into_response();
        };
        let allowed = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(source, 0, Instant::now());
        if !allowed {
            return json(
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"error": "too many tests from this address; wait a few seconds"}),
            );
        }
        let host = Self::host(req);
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Some(issued) = self.credentials.issue_unkeyed(
            TEST_PAGE_TENANT,
            &source_id(source),
            host.as_deref().map(strip_port),
            unix_now,
        ) else {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "the test page is not configured"}),
            );
        };
        let paths: Vec<TestPath> = issued.uris.iter().filter_map(|u| path_of(u)).collect();
        json(
            StatusCode::OK,
            serde_json::json!({
                "relay": host.as_deref().map(strip_port),
                "username": issued.username,
                "credential": issued.password,
                "ttl": issued.ttl,
                "paths": paths,
                "relay_ports": [self.relay_ports.0, self.relay_ports.1],
                "echo": {"websocket": self.websocket, "long_poll": self.long_poll},
                "regions": self.settings.regions,
                "min_mbps": self.settings.min_mbps,
                "max_mbps": self.settings.max_mbps,
            }),
        )
    }
}

/// The visitor's address (the one a PROXY header named, where there was one).
fn source(req: &Request) -> Option<std::net::IpAddr> {
    req.extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The page is served over HTTPS only (camera and microphone need a secure page, and the
/// credentials should not cross the network in clear): a refusal for plain HTTP.
fn https_only(req: &Request) -> Option<Response> {
    let secure = req.extensions().get::<Secure>().is_some_and(|s| s.0);
    (!secure).then(|| {
        (
            StatusCode::FORBIDDEN,
            "The network test is served over HTTPS only: open https://<this relay>/test\n",
        )
            .into_response()
    })
}

/// The test's user id: the visitor's address (an IPv6 /64), so the tenant's per-user quota
/// bounds what one source holds however many sessions it starts.
fn source_id(ip: std::net::IpAddr) -> String {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("v6-{:04x}{:04x}{:04x}{:04x}", s[0], s[1], s[2], s[3])
        }
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_come_from_turn_urls() {
        assert_eq!(
            path_of("turn:relay.example:3478?transport=udp"),
            Some(TestPath {
                id: "udp-3478".into(),
                transport: "udp",
                port: 3478,
                url: "turn:relay.example:3478?transport=udp".into()
            })
        );
        assert_eq!(
            path_of("turn:[2001:db8::1]:3478?transport=tcp").map(|p| p.id),
            Some("tcp-3478".into())
        );
        assert_eq!(
            path_of("turns:relay.example:443?transport=tcp").map(|p| p.transport),
            Some("tls")
        );
        assert_eq!(path_of("stun:relay.example:3478"), None);
    }

    #[test]
    fn the_page_is_self_contained() {
        // Nothing the browser would fetch from elsewhere: no external src/href, no @import.
        for needle in [
            "src=\"http",
            "href=\"http",
            "@import",
            "url(http",
            "//cdn",
            "fonts.",
        ] {
            assert!(!PAGE.contains(needle), "{needle}");
        }
    }

    #[test]
    fn the_page_carries_every_shared_phrase() {
        assert!(PAGE_SOURCE.contains("/*ADVICE*/{}"));
        for p in Phrase::ALL {
            assert!(PAGE.contains(&format!("\"{}\":", p.key())), "{}", p.key());
        }
        // Every phrase the page asks for by name exists.
        let mut rest = PAGE_SOURCE;
        while let Some(i) = rest.find("say(\"") {
            let key = &rest[i + 5..];
            let key = &key[..key.find('"').expect("closing quote")];
            assert!(
                Phrase::ALL.iter().any(|p| p.key() == key),
                "the page asks for {key}"
            );
            rest = &rest[i + 5..];
        }
    }
}
