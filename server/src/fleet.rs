//! The relay's side of fleet operations, between the shards and the admin API: the board
//! through which an operator lists and ends live allocations (the shards answer at their
//! next tick, four times a second), session records (a JSON line each, and hourly usage in
//! the store), and the redirect controller (300 Try Alternate to a sibling while draining or
//! beyond the configured load, the sibling chosen by the load the store publishes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use turnpike_proto::core::{AllocId, AllocationInfo, Alternate, Session};
use turnpike_proto::Shared;

use crate::config::fleet::FleetSettings;
use crate::store::{self, Store, UsageRow};

/// A live allocation as the admin API lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LiveAllocation {
    /// `SHARD.SLOT.GENERATION`: what `DELETE /v1/admin/allocations/ID` takes.
    pub id: String,
    pub tenant: String,
    pub username: String,
    pub user_id: String,
    pub transport: &'static str,
    pub client: String,
    pub relayed: Vec<String>,
    pub age_secs: u64,
    pub packets_up: u64,
    pub packets_down: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub permissions: Vec<String>,
}

fn transport(stream: bool, tls: bool, tcp_relay: bool) -> &'static str {
    match (stream, tls, tcp_relay) {
        (false, _, _) => "udp",
        (true, false, false) => "tcp",
        (true, true, false) => "tls",
        (true, false, true) => "tcp (RFC 6062)",
        (true, true, true) => "tls (RFC 6062)",
    }
}

impl LiveAllocation {
    pub fn of(shard: u32, a: &AllocationInfo, tenants: &[String]) -> Self {
        LiveAllocation {
            id: format!("{shard}.{}", a.id.to_text()),
            tenant: tenants.get(a.tenant as usize).cloned().unwrap_or_default(),
            username: a.username.clone(),
            user_id: a.user_id.clone(),
            transport: transport(a.client.is_stream(), a.tls, a.tcp),
            client: a.client.addr.to_string(),
            relayed: [a.relayed.v4, a.relayed.v6]
                .into_iter()
                .flatten()
                .map(|r| r.to_string())
                .collect(),
            age_secs: a.age.as_secs(),
            packets_up: a.usage.packets[0],
            packets_down: a.usage.packets[1],
            bytes_up: a.usage.bytes[0],
            bytes_down: a.usage.bytes[1],
            permissions: a.permissions.iter().map(|p| p.to_string()).collect(),
        }
    }
}

/// Where the admin API and the shards meet.
#[derive(Default)]
pub struct Board {
    /// Bumped by each list request; a shard answers when it has not answered this one.
    asked: AtomicU64,
    answers: Mutex<HashMap<u32, (u64, Vec<LiveAllocation>)>>,
    /// Allocations to end, by shard.
    ends: Mutex<Vec<(u32, AllocId)>>,
    shards: AtomicU64,
}

impl Board {
    pub fn set_shards(&self, n: usize) {
        self.shards.store(n as u64, Ordering::Relaxed);
    }

    /// A shard's turn (at its tick): what to end, and whether to answer a list request.
    pub fn ends_for(&self, shard: u32) -> Vec<AllocId> {
        let mut ends = lock(&self.ends);
        let mine: Vec<AllocId> = ends
            .iter()
            .filter(|(s, _)| *s == shard)
            .map(|(_, a)| *a)
            .collect();
        ends.retain(|(s, _)| *s != shard);
        mine
    }

    /// The request a shard should answer now, if any.
    pub fn wanted(&self, shard: u32) -> Option<u64> {
        let asked = self.asked.load(Ordering::Acquire);
        let answered = lock(&self.answers).get(&shard).map_or(0, |a| a.0);
        (asked > answered).then_some(asked)
    }

    pub fn answer(&self, shard: u32, request: u64, list: Vec<LiveAllocation>) {
        lock(&self.answers).insert(shard, (request, list));
    }

    /// Every shard's live allocations, fresh: asks, then waits (up to two seconds) for each
    /// shard to answer at its next tick.
    pub async fn list(&self) -> Vec<LiveAllocation> {
        let request = self.asked.fetch_add(1, Ordering::AcqRel) + 1;
        let shards = self.shards.load(Ordering::Relaxed) as usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            {
                let answers = lock(&self.answers);
                let fresh = answers.values().filter(|a| a.0 >= request).count();
                if fresh >= shards || tokio::time::Instant::now() >= deadline {
                    let mut out: Vec<LiveAllocation> =
                        answers.values().flat_map(|a| a.1.iter().cloned()).collect();
                    out.sort_by(|a, b| a.id.cmp(&b.id));
                    return out;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks the allocation's shard to end it (at its next tick).
    pub fn end(&self, id: &str) -> bool {
        let Some((shard, alloc)) = id.split_once('.') else {
            return false;
        };
        let (Ok(shard), Some(alloc)) = (shard.parse::<u32>(), AllocId::from_text(alloc)) else {
            return false;
        };
        if u64::from(shard) >= self.shards.load(Ordering::Relaxed) {
            return false;
        }
        lock(&self.ends).push((shard, alloc));
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One ended allocation, as the log line and the usage table get it. No payload, no
/// password, no peer address: the peers are only counted.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SessionRecord {
    pub record: &'static str,
    pub tenant: String,
    pub user_id: String,
    pub transport: &'static str,
    /// Unix seconds.
    pub start: u64,
    pub end: u64,
    pub duration_secs: f64,
    pub packets_up: u64,
    pub packets_down: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub peers: u32,
    pub reason: &'static str,
}

impl SessionRecord {
    pub fn of(s: &Session, tenants: &[String]) -> Self {
        let end = store::unix_now();
        SessionRecord {
            record: "session",
            tenant: tenants.get(s.tenant as usize).cloned().unwrap_or_default(),
            user_id: s.user_id.clone(),
            transport: transport(s.client.is_stream(), s.tls, s.tcp),
            start: s.started_unix,
            end: end.max(s.started_unix),
            duration_secs: (s.duration.as_secs_f64() * 1000.0).round() / 1000.0,
            packets_up: s.usage.packets[0],
            packets_down: s.usage.packets[1],
            bytes_up: s.usage.bytes[0],
            bytes_down: s.usage.bytes[1],
            peers: s.peers,
            reason: s.reason.as_str(),
        }
    }
}

/// Session records on their way out: printed at once, added to the hourly usage that
/// [`Fleet::flush_usage`] writes to the store.
#[derive(Default)]
pub struct Sessions {
    log: bool,
    usage: Mutex<HashMap<(String, i64), UsageRow>>,
    keep_usage: bool,
}

impl Sessions {
    pub fn record(&self, r: &SessionRecord) {
        if self.log {
            if let Ok(line) = serde_json::to_string(r) {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
        if self.keep_usage {
            let hour = (r.end as i64 / 3600) * 3600;
            let mut usage = lock(&self.usage);
            let row = usage
                .entry((r.tenant.clone(), hour))
                .or_insert_with(|| UsageRow {
                    tenant: r.tenant.clone(),
                    hour,
                    ..Default::default()
                });
            row.sessions += 1;
            row.packets_up += r.packets_up as i64;
            row.packets_down += r.packets_down as i64;
            row.bytes_up += r.bytes_up as i64;
            row.bytes_down += r.bytes_down as i64;
        }
    }

    fn take(&self) -> Vec<UsageRow> {
        lock(&self.usage).drain().map(|(_, v)| v).collect()
    }

    fn put_back(&self, rows: Vec<UsageRow>) {
        let mut usage = lock(&self.usage);
        for r in rows {
            let e = usage
                .entry((r.tenant.clone(), r.hour))
                .or_insert_with(|| UsageRow {
                    tenant: r.tenant.clone(),
                    hour: r.hour,
                    ..Default::default()
                });
            e.sessions += r.sessions;
            e.packets_up += r.packets_up;
            e.packets_down += r.packets_down;
            e.bytes_up += r.bytes_up;
            e.bytes_down += r.bytes_down;
        }
    }
}

/// Everything fleet operations share in one relay.
pub struct Fleet {
    pub store: Option<Arc<Store>>,
    pub status: Arc<store::Status>,
    pub board: Board,
    pub sessions: Sessions,
    /// Checks a store change the admin API is about to write (the reload keeps it current).
    pub merge: arc_swap::ArcSwap<crate::config::fleet::StoreMerge>,
    settings: Mutex<FleetConfig>,
}

/// The `[redirect]` part of the settings the controller reads.
#[derive(Debug, Clone, Default)]
struct FleetConfig {
    relay_name: String,
    max_allocations: u64,
    siblings: Vec<Alternate>,
    advertise: Option<Alternate>,
}

fn alternate_json(a: &Alternate) -> serde_json::Value {
    serde_json::json!({
        "udp": a.udp.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
        "tcp": a.tcp.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
        "tls": a.tls.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
        "domain": a.domain,
    })
}

fn alternate_of(v: &serde_json::Value) -> Alternate {
    let addrs = |k: &str| {
        v[k].as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()?.parse().ok()).collect())
            .unwrap_or_default()
    };
    Alternate {
        udp: addrs("udp"),
        tcp: addrs("tcp"),
        tls: addrs("tls"),
        domain: v["domain"].as_str().map(str::to_owned),
    }
}

/// A relay's load counts as published for this long.
const FRESH_SECS: i64 = 15;

impl Fleet {
    pub fn new(settings: &FleetSettings, store: Option<Arc<Store>>) -> Arc<Self> {
        let status = Arc::new(store::Status::default());
        status.configured.store(store.is_some(), Ordering::Relaxed);
        Arc::new(Fleet {
            sessions: Sessions {
                log: settings.session_log,
                usage: Mutex::default(),
                keep_usage: store.is_some(),
            },
            store,
            status,
            board: Board::default(),
            merge: arc_swap::ArcSwap::from_pointee(Default::default()),
            settings: Mutex::new(Self::config_of(settings)),
        })
    }

    fn config_of(s: &FleetSettings) -> FleetConfig {
        FleetConfig {
            relay_name: s.relay_name.clone(),
            max_allocations: s.max_allocations,
            siblings: s.siblings.clone(),
            advertise: s.advertise.clone(),
        }
    }

    /// After a reload.
    pub fn reload(&self, s: &FleetSettings) {
        *lock(&self.settings) = Self::config_of(s);
    }

    /// Writes the hourly usage gathered since the last call; kept for the next call when the
    /// store is down.
    pub async fn flush_usage(&self) {
        let Some(store) = &self.store else {
            return;
        };
        let rows = self.sessions.take();
        if rows.is_empty() {
            return;
        }
        if let Err(e) = store.add_usage(&rows).await {
            tracing::warn!(error = %e, "usage not written; kept for the next try");
            self.sessions.put_back(rows);
        }
    }

    /// Sets or clears the redirect: while draining or at `max_allocations`, Allocate goes to
    /// the least loaded sibling the store publishes (fresh, not this relay, under its own
    /// limit as far as it says), else to the first configured sibling.
    pub async fn update_redirect(&self, shared: &Shared) {
        let config = lock(&self.settings).clone();
        let active = shared.quotas.active() as u64;
        let busy = config.max_allocations > 0 && active >= config.max_allocations;
        if !(shared.is_draining() || busy) {
            shared.set_redirect(None);
            return;
        }
        let mut to = None;
        if let Some(store) = &self.store {
            let since = store::unix_now() as i64 - FRESH_SECS;
            if let Ok(relays) = store.relays(since).await {
                to = relays
                    .iter()
                    .filter(|r| {
                        r.name != config.relay_name && !r.doc["draining"].as_bool().unwrap_or(false)
                    })
                    .filter(|r| {
                        let max = r.doc["max_allocations"].as_i64().unwrap_or(0);
                        max == 0 || r.allocations < max
                    })
                    .map(|r| alternate_of(&r.doc["addresses"]))
                    .next();
            }
        }
        let to = to.or_else(|| config.siblings.first().cloned());
        shared.set_redirect(to);
    }

    /// Publishes this relay's addresses and load for its siblings.
    pub async fn publish(&self, shared: &Shared) {
        let (Some(store), config) = (&self.store, lock(&self.settings).clone()) else {
            return;
        };
        let Some(advertise) = &config.advertise else {
            return;
        };
        let doc = serde_json::json!({
            "addresses": alternate_json(advertise),
            "draining": shared.is_draining(),
            "max_allocations": config.max_allocations,
        });
        if let Err(e) = store
            .publish(&config.relay_name, &doc, shared.quotas.active() as i64)
            .await
        {
            tracing::debug!(error = %e, "load not published");
        }
    }
}
