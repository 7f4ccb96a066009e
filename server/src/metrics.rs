//! Prometheus metrics and the health endpoints. Label values come from fixed lists (methods,
//! result codes, failure reasons, directions): never a username or an address.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::proto::auth::AuthError;
use crate::proto::server::{CoreStats, METHODS, RESULTS};
use crate::proto::Shared;

pub const ALLOCATIONS_ACTIVE: &str = "turnpike_allocations_active";
pub const ALLOCATIONS_TOTAL: &str = "turnpike_allocations_total";
pub const REQUESTS_TOTAL: &str = "turnpike_requests_total";
pub const AUTH_FAILURES_TOTAL: &str = "turnpike_auth_failures_total";
pub const PEER_DENIED_TOTAL: &str = "turnpike_peer_denied_total";
pub const RELAYED_PACKETS_TOTAL: &str = "turnpike_relayed_packets_total";
pub const RELAYED_BYTES_TOTAL: &str = "turnpike_relayed_bytes_total";
pub const DROPPED_PACKETS_TOTAL: &str = "turnpike_dropped_packets_total";
pub const DRAINING: &str = "turnpike_draining";
pub const ALLOCATIONS_LIMIT: &str = "turnpike_allocations_limit";
pub const RELAY_PORTS: &str = "turnpike_relay_ports";
pub const BUILD_INFO: &str = "turnpike_build_info";
pub const ECHO_PACKETS_TOTAL: &str = "turnpike_echo_packets_total";
pub const ECHO_DROPPED_TOTAL: &str = "turnpike_echo_dropped_total";

/// The echo services, the `transport` label of the echo metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoTransport {
    Udp,
    Tcp,
    WebSocket,
    LongPoll,
}

impl EchoTransport {
    pub const ALL: [EchoTransport; 4] = [
        EchoTransport::Udp,
        EchoTransport::Tcp,
        EchoTransport::WebSocket,
        EchoTransport::LongPoll,
    ];

    pub fn label(self) -> &'static str {
        match self {
            EchoTransport::Udp => "udp",
            EchoTransport::Tcp => "tcp",
            EchoTransport::WebSocket => "websocket",
            EchoTransport::LongPoll => "long_poll",
        }
    }
}

const DIRECTIONS: [&str; 2] = ["client_to_peer", "peer_to_client"];

pub struct Metrics {
    registry: Registry,
    allocations_active: IntGauge,
    allocations_total: IntCounter,
    requests: Vec<Vec<IntCounter>>,
    auth_failures: Vec<IntCounter>,
    peer_denied: IntCounter,
    relayed_packets: [IntCounter; 2],
    relayed_bytes: [IntCounter; 2],
    dropped: [IntCounter; 3],
    draining: IntGauge,
    allocations_limit: IntGauge,
    relay_ports: IntGauge,
    echo_packets: [IntCounter; 4],
    echo_dropped: [IntCounter; 4],
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Registration fails only for duplicate or malformed names, which are constants here.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| must(registry.register(c));
        let allocations_active = must(IntGauge::new(ALLOCATIONS_ACTIVE, "Allocations held now."));
        reg(Box::new(allocations_active.clone()));
        let allocations_total = must(IntCounter::new(ALLOCATIONS_TOTAL, "Allocations created."));
        reg(Box::new(allocations_total.clone()));
        let requests_vec = must(IntCounterVec::new(
            Opts::new(
                REQUESTS_TOTAL,
                "STUN/TURN requests answered, by method and result.",
            ),
            &["method", "result"],
        ));
        reg(Box::new(requests_vec.clone()));
        let requests = METHODS
            .iter()
            .map(|m| {
                RESULTS
                    .iter()
                    .map(|r| requests_vec.with_label_values(&[*m, *r]))
                    .collect()
            })
            .collect();
        let auth_vec = must(IntCounterVec::new(
            Opts::new(
                AUTH_FAILURES_TOTAL,
                "Requests that did not authenticate, by reason.",
            ),
            &["reason"],
        ));
        reg(Box::new(auth_vec.clone()));
        let auth_failures = AuthError::ALL
            .iter()
            .map(|e| auth_vec.with_label_values(&[e.label()]))
            .collect();
        let peer_denied = must(IntCounter::new(
            PEER_DENIED_TOTAL,
            "CreatePermission and ChannelBind refused by the peer policy.",
        ));
        reg(Box::new(peer_denied.clone()));
        let packets_vec = must(IntCounterVec::new(
            Opts::new(RELAYED_PACKETS_TOTAL, "Packets relayed, by direction."),
            &["direction"],
        ));
        reg(Box::new(packets_vec.clone()));
        let bytes_vec = must(IntCounterVec::new(
            Opts::new(RELAYED_BYTES_TOTAL, "Payload bytes relayed, by direction."),
            &["direction"],
        ));
        reg(Box::new(bytes_vec.clone()));
        let dropped_vec = must(IntCounterVec::new(
            Opts::new(DROPPED_PACKETS_TOTAL, "Datagrams not relayed, by reason."),
            &["reason"],
        ));
        reg(Box::new(dropped_vec.clone()));
        let draining = must(IntGauge::new(
            DRAINING,
            "1 while the relay drains after SIGTERM.",
        ));
        reg(Box::new(draining.clone()));
        let allocations_limit = must(IntGauge::new(
            ALLOCATIONS_LIMIT,
            "The total-allocations quota; 0 when unlimited.",
        ));
        reg(Box::new(allocations_limit.clone()));
        let relay_ports = must(IntGauge::new(
            RELAY_PORTS,
            "Ports in the relay port range: the most UDP allocations per relay address.",
        ));
        reg(Box::new(relay_ports.clone()));
        let build = must(IntGaugeVec::new(
            Opts::new(BUILD_INFO, "Build information; always 1."),
            &["version"],
        ));
        reg(Box::new(build.clone()));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let echo_packets_vec = must(IntCounterVec::new(
            Opts::new(
                ECHO_PACKETS_TOTAL,
                "Echo replies sent: datagrams, TCP reads, WebSocket messages, long-polls answered.",
            ),
            &["transport"],
        ));
        reg(Box::new(echo_packets_vec.clone()));
        let echo_dropped_vec = must(IntCounterVec::new(
            Opts::new(
                ECHO_DROPPED_TOTAL,
                "Echo requests not answered (rate limit, loop protection, limits); TCP reads delayed by the rate limit.",
            ),
            &["transport"],
        ));
        reg(Box::new(echo_dropped_vec.clone()));
        Metrics {
            registry,
            allocations_active,
            allocations_total,
            requests,
            auth_failures,
            peer_denied,
            relayed_packets: DIRECTIONS.map(|d| packets_vec.with_label_values(&[d])),
            relayed_bytes: DIRECTIONS.map(|d| bytes_vec.with_label_values(&[d])),
            dropped: ["no_route", "malformed", "quota"]
                .map(|r| dropped_vec.with_label_values(&[r])),
            draining,
            allocations_limit,
            relay_ports,
            echo_packets: EchoTransport::ALL
                .map(|t| echo_packets_vec.with_label_values(&[t.label()])),
            echo_dropped: EchoTransport::ALL
                .map(|t| echo_dropped_vec.with_label_values(&[t.label()])),
        }
    }

    /// One echo reply sent.
    pub fn echo_sent(&self, t: EchoTransport) {
        self.echo_packets[t as usize].inc();
    }

    /// One echo request not answered (or, on TCP, delayed) by the echo's limits.
    pub fn echo_dropped(&self, t: EchoTransport) {
        self.echo_dropped[t as usize].inc();
    }

    /// Adds a shard's counters (taken with `Core::take_stats`).
    pub fn record(&self, s: &CoreStats) {
        for (m, row) in s.requests.iter().enumerate() {
            for (r, n) in row.iter().enumerate() {
                if *n > 0 {
                    self.requests[m][r].inc_by(*n);
                }
            }
        }
        for (i, n) in s.auth_failures.iter().enumerate() {
            self.auth_failures[i].inc_by(*n);
        }
        self.peer_denied.inc_by(s.peer_denied);
        self.allocations_total.inc_by(s.allocations_created);
        for d in 0..2 {
            self.relayed_packets[d].inc_by(s.relayed_packets[d]);
            self.relayed_bytes[d].inc_by(s.relayed_bytes[d]);
        }
        self.dropped[0].inc_by(s.dropped_packets);
        self.dropped[1].inc_by(s.malformed);
        self.dropped[2].inc_by(s.quota_dropped);
    }

    /// The Prometheus text exposition.
    /// The relay's capacity, for "near capacity" alerts.
    pub fn set_capacity(&self, total_allocations: Option<u32>, ports: (u16, u16)) {
        self.allocations_limit
            .set(i64::from(total_allocations.unwrap_or(0)));
        self.relay_ports
            .set(i64::from(ports.1) - i64::from(ports.0) + 1);
    }

    pub fn render(&self, shared: &Shared) -> String {
        self.allocations_active
            .set(i64::from(shared.quotas.active()));
        self.draining.set(i64::from(shared.is_draining()));
        let mut out = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The built-in HTTP endpoints: `/healthz`, `/readyz`, and `/metrics` when `with_metrics`.
pub fn router(metrics: Arc<Metrics>, shared: Arc<Shared>, with_metrics: bool) -> Router {
    let ready = Arc::clone(&shared);
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let draining = ready.is_draining();
                async move {
                    if draining {
                        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
                    } else {
                        (StatusCode::OK, "ready\n").into_response()
                    }
                }
            }),
        );
    if with_metrics {
        app = app.route(
            "/metrics",
            get(move || {
                let body = metrics.render(&shared);
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
            }),
        );
    }
    app
}

/// Serves the endpoints (built by [`router`] with metrics, plus any echo routes) on a bound
/// listener until the process ends. Handlers see the client address as `ConnectInfo`.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) {
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, crate::Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Bind {
            what: "metrics",
            addr,
            source,
        })
}
