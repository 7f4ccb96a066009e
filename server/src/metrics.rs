//! Prometheus metrics and the health endpoints. Label values come from fixed lists (methods,
//! result codes, failure reasons, directions) and the configured tenant names: never a
//! username or an address.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::admission::Refused;
use crate::io::Close;
use turnpike_proto::auth::AuthError;
use turnpike_proto::core::{CoreStats, METHODS, RESULTS};
use turnpike_proto::tenant::NO_TENANT;
use turnpike_proto::Shared;

pub const ALLOCATIONS_ACTIVE: &str = "turnpike_allocations_active";
pub const ALLOCATIONS_TOTAL: &str = "turnpike_allocations_total";
pub const REQUESTS_TOTAL: &str = "turnpike_requests_total";
pub const AUTH_FAILURES_TOTAL: &str = "turnpike_auth_failures_total";
pub const PEER_DENIED_TOTAL: &str = "turnpike_peer_denied_total";
pub const RELAYED_PACKETS_TOTAL: &str = "turnpike_relayed_packets_total";
pub const RELAYED_BYTES_TOTAL: &str = "turnpike_relayed_bytes_total";
pub const DROPPED_PACKETS_TOTAL: &str = "turnpike_dropped_packets_total";
pub const DRAINING: &str = "turnpike_draining";
pub const STORE_UP: &str = "turnpike_store_up";
pub const STORE_LOADED: &str = "turnpike_store_loaded_timestamp_seconds";
pub const STORE_TENANTS: &str = "turnpike_store_tenants";
pub const REDIRECTING: &str = "turnpike_redirecting";
pub const ALLOCATIONS_LIMIT: &str = "turnpike_allocations_limit";
pub const RELAY_PORTS: &str = "turnpike_relay_ports";
pub const SHARED_PORT_CONFLICTS_TOTAL: &str = "turnpike_shared_port_conflicts_total";
pub const SHARED_PORT_ENDPOINT_LIMIT_TOTAL: &str = "turnpike_shared_port_endpoint_limit_total";
pub const SHARED_PORT_FALLBACKS_TOTAL: &str = "turnpike_shared_port_fallbacks_total";
pub const BUILD_INFO: &str = "turnpike_build_info";
pub const ECHO_PACKETS_TOTAL: &str = "turnpike_echo_packets_total";
pub const ECHO_DROPPED_TOTAL: &str = "turnpike_echo_dropped_total";
pub const TENANT_ALLOCATIONS_ACTIVE: &str = "turnpike_tenant_allocations_active";
pub const CONNECTIONS_REFUSED_TOTAL: &str = "turnpike_connections_refused_total";
pub const CONNECTIONS_CLOSED_TOTAL: &str = "turnpike_connections_closed_total";
pub const SESSION_RECORDS_DROPPED_TOTAL: &str = "turnpike_session_records_dropped_total";

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
    families: TenantFamilies,
    /// Counters per tenant id, made when a tenant is first seen.
    tenants: std::sync::Mutex<Vec<TenantCounters>>,
    dropped_no_route: IntCounter,
    dropped_malformed: IntCounter,
    dropped_reply_rate: IntCounter,
    dropped_oversized: IntCounter,
    dropped_unmatched: IntCounter,
    dropped_send_buffer: IntCounter,
    shared_port_conflicts: IntCounter,
    shared_port_endpoint_limit: IntCounter,
    shared_port_fallbacks: IntCounter,
    draining: IntGauge,
    allocations_limit: IntGauge,
    relay_ports: IntGauge,
    /// The tenant store's state, when one is configured.
    store: std::sync::OnceLock<Arc<crate::store::Status>>,
    store_up: IntGauge,
    store_loaded: IntGauge,
    store_tenants: IntGauge,
    redirecting: IntGauge,
    echo_packets: [IntCounter; 4],
    echo_dropped: [IntCounter; 4],
    connections_refused: [IntCounter; 2],
    connections_closed: [IntCounter; Close::ALL.len()],
    session_records_dropped: IntCounter,
}

/// The metric families with a `tenant` label.
struct TenantFamilies {
    allocations_total: IntCounterVec,
    allocations_active: IntGaugeVec,
    requests: IntCounterVec,
    auth_failures: IntCounterVec,
    peer_denied: IntCounterVec,
    relayed_packets: IntCounterVec,
    relayed_bytes: IntCounterVec,
    dropped: IntCounterVec,
}

/// One tenant's series, looked up once.
struct TenantCounters {
    allocations_total: IntCounter,
    allocations_active: IntGauge,
    requests: Vec<Vec<IntCounter>>,
    auth_failures: Vec<IntCounter>,
    peer_denied: IntCounter,
    relayed_packets: [IntCounter; 2],
    relayed_bytes: [IntCounter; 2],
    quota_dropped: IntCounter,
}

impl TenantFamilies {
    fn counters(&self, tenant: &str) -> TenantCounters {
        TenantCounters {
            allocations_total: self.allocations_total.with_label_values(&[tenant]),
            allocations_active: self.allocations_active.with_label_values(&[tenant]),
            requests: METHODS
                .iter()
                .map(|m| {
                    RESULTS
                        .iter()
                        .map(|r| self.requests.with_label_values(&[*m, *r, tenant]))
                        .collect()
                })
                .collect(),
            auth_failures: AuthError::ALL
                .iter()
                .map(|e| self.auth_failures.with_label_values(&[e.label(), tenant]))
                .collect(),
            peer_denied: self.peer_denied.with_label_values(&[tenant]),
            relayed_packets: DIRECTIONS
                .map(|d| self.relayed_packets.with_label_values(&[d, tenant])),
            relayed_bytes: DIRECTIONS.map(|d| self.relayed_bytes.with_label_values(&[d, tenant])),
            quota_dropped: self.dropped.with_label_values(&["quota", tenant]),
        }
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Registration fails only for duplicate or malformed names, which are constants here.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| must(registry.register(c));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let v = must(IntCounterVec::new(Opts::new(name, help), labels));
            reg(Box::new(v.clone()));
            v
        };
        let allocations_active = must(IntGauge::new(
            ALLOCATIONS_ACTIVE,
            "Allocations held now, all tenants.",
        ));
        reg(Box::new(allocations_active.clone()));
        let tenant_active = must(IntGaugeVec::new(
            Opts::new(
                TENANT_ALLOCATIONS_ACTIVE,
                "Allocations held now, by tenant.",
            ),
            &["tenant"],
        ));
        reg(Box::new(tenant_active.clone()));
        let families = TenantFamilies {
            allocations_total: counter_vec(ALLOCATIONS_TOTAL, "Allocations created.", &["tenant"]),
            allocations_active: tenant_active,
            requests: counter_vec(
                REQUESTS_TOTAL,
                "STUN/TURN requests answered, by method and result.",
                &["method", "result", "tenant"],
            ),
            auth_failures: counter_vec(
                AUTH_FAILURES_TOTAL,
                "Requests that did not authenticate, by reason.",
                &["reason", "tenant"],
            ),
            peer_denied: counter_vec(
                PEER_DENIED_TOTAL,
                "CreatePermission and ChannelBind refused by the peer policy.",
                &["tenant"],
            ),
            relayed_packets: counter_vec(
                RELAYED_PACKETS_TOTAL,
                "Packets relayed, by direction.",
                &["direction", "tenant"],
            ),
            relayed_bytes: counter_vec(
                RELAYED_BYTES_TOTAL,
                "Payload bytes relayed, by direction.",
                &["direction", "tenant"],
            ),
            dropped: counter_vec(
                DROPPED_PACKETS_TOTAL,
                "Datagrams not relayed or not answered, by reason: no_route, malformed, quota, oversized (too large for the client), unmatched (shared relay ports: no allocation on the port holds the peer endpoint), send_buffer (a UDP socket's send buffer was full), reply_rate (unauthenticated requests over the per-source reply limit).",
                &["reason", "tenant"],
            ),
        };
        let dropped_no_route = families.dropped.with_label_values(&["no_route", NO_TENANT]);
        let dropped_malformed = families
            .dropped
            .with_label_values(&["malformed", NO_TENANT]);
        let dropped_reply_rate = families
            .dropped
            .with_label_values(&["reply_rate", NO_TENANT]);
        let dropped_oversized = families
            .dropped
            .with_label_values(&["oversized", NO_TENANT]);
        let dropped_unmatched = families
            .dropped
            .with_label_values(&["unmatched", NO_TENANT]);
        let dropped_send_buffer = families
            .dropped
            .with_label_values(&["send_buffer", NO_TENANT]);
        let shared_port_conflicts = must(IntCounter::new(
            SHARED_PORT_CONFLICTS_TOTAL,
            "Shared relay ports: CreatePermissions and ChannelBinds refused (403), Send indications and ChannelData dropped, because another allocation of the tenant on the same port holds that peer endpoint.",
        ));
        reg(Box::new(shared_port_conflicts.clone()));
        let shared_port_endpoint_limit = must(IntCounter::new(
            SHARED_PORT_ENDPOINT_LIMIT_TOTAL,
            "Shared relay ports: requests refused (508), Send indications and ChannelData dropped, because the allocation holds allocation.max_peer_endpoints peer endpoints already.",
        ));
        reg(Box::new(shared_port_endpoint_limit.clone()));
        let shared_port_fallbacks = must(IntCounter::new(
            SHARED_PORT_FALLBACKS_TOTAL,
            "Shared relay ports: UDP allocations given a dedicated port because every shared port of their thread served other tenants.",
        ));
        reg(Box::new(shared_port_fallbacks.clone()));
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
            "Ports in the relay port range: the most UDP allocations per relay address; 0 with shared relay ports, where ports do not bound the allocations.",
        ));
        reg(Box::new(relay_ports.clone()));
        let gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let store_up = gauge(
            STORE_UP,
            "1 while the tenant store answers; 0 while it does not (the relay serves its last copy) and without a store.",
        );
        let store_loaded = gauge(
            STORE_LOADED,
            "When the tenant store's last copy was loaded (Unix seconds).",
        );
        let store_tenants = gauge(STORE_TENANTS, "Tenants in the store's last copy.");
        let redirecting = gauge(
            REDIRECTING,
            "1 while Allocate requests are redirected to a sibling (300 Try Alternate): draining, or at [redirect] max_allocations, with a sibling that takes them.",
        );
        let build = must(IntGaugeVec::new(
            Opts::new(BUILD_INFO, "Build information; always 1."),
            &["version"],
        ));
        reg(Box::new(build.clone()));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let echo_packets_vec = counter_vec(
            ECHO_PACKETS_TOTAL,
            "Echo replies sent: datagrams, TCP reads, WebSocket messages, long-polls answered.",
            &["transport"],
        );
        let echo_dropped_vec = counter_vec(
            ECHO_DROPPED_TOTAL,
            "Echo requests not answered (rate limit, loop protection, limits); TCP reads delayed by the rate limit.",
            &["transport"],
        );
        let refused_vec = counter_vec(
            CONNECTIONS_REFUSED_TOTAL,
            "Stream connections closed at once: their source holds too many, or too many hold no allocation.",
            &["reason"],
        );
        let closed_vec = counter_vec(
            CONNECTIONS_CLOSED_TOTAL,
            "Stream connections (TURN over TCP and TLS, HTTP) ended, by reason: client (closed by the client, or failed), handshake_timeout, unallocated_lifetime, idle, not_reading (a client that does not read what it is sent), malformed, unallocated_limit.",
            &["reason"],
        );
        let session_records_dropped = must(IntCounter::new(
            SESSION_RECORDS_DROPPED_TOTAL,
            "Session records not logged because the writer was behind (stdout too slow); their usage is counted all the same.",
        ));
        reg(Box::new(session_records_dropped.clone()));
        Metrics {
            registry,
            session_records_dropped,
            connections_refused: Refused::ALL.map(|r| refused_vec.with_label_values(&[r.label()])),
            connections_closed: Close::ALL.map(|c| closed_vec.with_label_values(&[c.label()])),
            allocations_active,
            families,
            tenants: std::sync::Mutex::new(Vec::new()),
            dropped_no_route,
            dropped_malformed,
            dropped_reply_rate,
            dropped_oversized,
            dropped_unmatched,
            dropped_send_buffer,
            shared_port_conflicts,
            shared_port_endpoint_limit,
            shared_port_fallbacks,
            draining,
            allocations_limit,
            relay_ports,
            store: std::sync::OnceLock::new(),
            store_up,
            store_loaded,
            store_tenants,
            redirecting,
            echo_packets: EchoTransport::ALL
                .map(|t| echo_packets_vec.with_label_values(&[t.label()])),
            echo_dropped: EchoTransport::ALL
                .map(|t| echo_dropped_vec.with_label_values(&[t.label()])),
        }
    }

    /// Makes the series of tenants not seen yet (`names` by tenant id), so that each
    /// configured tenant's counters exist, at zero, from the start.
    pub fn add_tenants(&self, names: &[String]) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        while tenants.len() < names.len() {
            let c = self.families.counters(&names[tenants.len()]);
            tenants.push(c);
        }
    }

    /// A session record's log line was dropped.
    pub fn session_record_dropped(&self) {
        self.session_records_dropped.inc();
    }

    /// A stream connection ended, for `why`.
    pub fn connection_closed(&self, why: Close) {
        self.connections_closed[why as usize].inc();
    }

    /// Datagrams a full UDP send buffer dropped.
    pub fn send_buffer_full(&self, n: u64) {
        self.dropped_send_buffer.inc_by(n);
    }

    /// A stream connection refused by [`crate::io::admission`].
    pub fn connection_refused(&self, why: Refused) {
        self.connections_refused[why as usize].inc();
    }

    /// One echo reply sent.
    pub fn echo_sent(&self, t: EchoTransport) {
        self.echo_packets[t as usize].inc();
    }

    /// One echo request not answered (or, on TCP, delayed) by the echo's limits.
    pub fn echo_dropped(&self, t: EchoTransport) {
        self.echo_dropped[t as usize].inc();
    }

    /// Adds a shard's counters (taken with `Core::take_stats`); `names` are the tenant
    /// names by id ([`Shared::tenant_names`]).
    pub fn record(&self, s: &CoreStats, names: &[String]) {
        self.add_tenants(names);
        let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        for (t, c) in s.tenants.iter().zip(tenants.iter()) {
            for (m, row) in t.requests.iter().enumerate() {
                for (r, n) in row.iter().enumerate() {
                    if *n > 0 {
                        c.requests[m][r].inc_by(*n);
                    }
                }
            }
            for (i, n) in t.auth_failures.iter().enumerate() {
                c.auth_failures[i].inc_by(*n);
            }
            c.peer_denied.inc_by(t.peer_denied);
            c.allocations_total.inc_by(t.allocations_created);
            for d in 0..2 {
                c.relayed_packets[d].inc_by(t.relayed_packets[d]);
                c.relayed_bytes[d].inc_by(t.relayed_bytes[d]);
            }
            c.quota_dropped.inc_by(t.quota_dropped);
        }
        self.dropped_no_route.inc_by(s.dropped_packets);
        self.dropped_malformed.inc_by(s.malformed);
        self.dropped_reply_rate.inc_by(s.replies_limited);
        self.dropped_oversized.inc_by(s.oversized);
        self.dropped_unmatched.inc_by(s.shared_port_unmatched);
        self.shared_port_conflicts.inc_by(s.shared_port_conflicts);
        self.shared_port_endpoint_limit
            .inc_by(s.shared_port_endpoint_limit);
        self.shared_port_fallbacks.inc_by(s.shared_port_fallbacks);
    }

    /// The Prometheus text exposition.
    /// The relay's capacity, for "near capacity" alerts.
    /// `ports`: the relay port range, None with shared relay ports.
    pub fn set_capacity(&self, total_allocations: Option<u32>, ports: Option<(u16, u16)>) {
        self.allocations_limit
            .set(i64::from(total_allocations.unwrap_or(0)));
        self.relay_ports
            .set(ports.map_or(0, |p| i64::from(p.1) - i64::from(p.0) + 1));
    }

    /// Reports the tenant store's state from now on.
    pub fn set_store(&self, status: Arc<crate::store::Status>) {
        let _ = self.store.set(status);
    }

    pub fn render(&self, shared: &Shared) -> String {
        self.allocations_active
            .set(i64::from(shared.quotas.active()));
        {
            let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
            let by_tenant = shared.quotas.active_by_tenant();
            for (id, c) in tenants.iter().enumerate() {
                let n = by_tenant
                    .iter()
                    .find(|(t, _)| *t as usize == id)
                    .map_or(0, |(_, n)| *n);
                c.allocations_active.set(i64::from(n));
            }
        }
        self.draining.set(i64::from(shared.is_draining()));
        self.redirecting
            .set(i64::from(shared.redirecting().is_some()));
        if let Some(s) = self.store.get() {
            use std::sync::atomic::Ordering::Relaxed;
            self.store_up.set(i64::from(s.up.load(Relaxed)));
            self.store_loaded.set(s.loaded_at.load(Relaxed) as i64);
            self.store_tenants.set(s.tenants.load(Relaxed) as i64);
        }
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
    let store = Arc::clone(&metrics);
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let draining = ready.is_draining();
                // A store that went away does not make the relay unready: it serves its last
                // copy (from the database, or saved on disk), and says so here. One never read
                // does: the relay would refuse the store's tenants.
                let status = store.store.get();
                let read = status.is_none_or(|s| s.ready());
                let store = status
                    .and_then(|s| s.describe())
                    .map(|d| format!("{d}\n"))
                    .unwrap_or_default();
                async move {
                    match (draining, read) {
                        (true, _) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("draining\n{store}"),
                        )
                            .into_response(),
                        (false, false) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready\n{store}"),
                        )
                            .into_response(),
                        (false, true) => {
                            (StatusCode::OK, format!("ready\n{store}")).into_response()
                        }
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
