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
use turnpike_proto::core::{AllocId, AllocationInfo, Alternate, Redirects, Session};
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
    /// Allocations to end, by shard, each with where to say whether it was there.
    ends: Mutex<Vec<(u32, AllocId, tokio::sync::oneshot::Sender<bool>)>>,
    shards: AtomicU64,
}

impl Board {
    pub fn set_shards(&self, n: usize) {
        self.shards.store(n as u64, Ordering::Relaxed);
    }

    /// A shard's turn (at its tick): what to end, each with where to say whether it was
    /// there.
    pub fn ends_for(&self, shard: u32) -> Vec<(AllocId, tokio::sync::oneshot::Sender<bool>)> {
        let mut ends = lock(&self.ends);
        let (mine, others) = std::mem::take(&mut *ends)
            .into_iter()
            .partition::<Vec<_>, _>(|(s, _, _)| *s == shard);
        *ends = others;
        mine.into_iter().map(|(_, a, tx)| (a, tx)).collect()
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

    /// Ends an allocation: its shard does at its next tick, and says whether it was there.
    /// False for an id no live allocation has.
    pub async fn end(&self, id: &str) -> bool {
        let Some((shard, alloc)) = id.split_once('.') else {
            return false;
        };
        let (Ok(shard), Some(alloc)) = (shard.parse::<u32>(), AllocId::from_text(alloc)) else {
            return false;
        };
        if u64::from(shard) >= self.shards.load(Ordering::Relaxed) {
            return false;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.ends).push((shard, alloc, tx));
        matches!(
            tokio::time::timeout(Duration::from_secs(2), rx).await,
            Ok(Ok(true))
        )
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

/// Session records on their way out: each a JSON line on stdout, written by a thread of its
/// own (a slow pipe never stalls a shard: at most [`RECORD_QUEUE`] wait, beyond which they are
/// dropped and counted), and added to the hourly usage [`Fleet::flush_usage`] writes to the
/// store, kept in `[store] state_dir` until it is in.
pub struct Sessions {
    log: Option<std::sync::mpsc::SyncSender<String>>,
    usage: Mutex<Pending>,
    keep_usage: bool,
    local: Option<store::local::Local>,
}

/// Records that may wait for the writer; beyond, they are dropped and counted.
pub const RECORD_QUEUE: usize = 8192;

/// Usage on its way to the store.
#[derive(Default)]
struct Pending {
    /// The flush key, the flush in flight and what came after (saved as is).
    spool: store::local::Spool,
    /// What came after the flush in flight, by tenant and hour.
    open: HashMap<(String, i64), UsageRow>,
    /// Changed since it was last saved.
    dirty: bool,
}

impl Sessions {
    fn new(log: bool, keep_usage: bool, local: Option<store::local::Local>, relay: &str) -> Self {
        let sink = log.then(|| {
            (
                RECORD_QUEUE,
                Box::new(std::io::stdout()) as Box<dyn std::io::Write + Send>,
            )
        });
        Self::with_sink(sink, keep_usage, local, relay)
    }

    /// Records written to `sink` (at most its queue's length waiting), or none.
    fn with_sink(
        sink: Option<(usize, Box<dyn std::io::Write + Send>)>,
        keep_usage: bool,
        local: Option<store::local::Local>,
        relay: &str,
    ) -> Self {
        let log = sink.map(|(queue, out)| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<String>(queue);
            std::thread::Builder::new()
                .name("session-records".into())
                .spawn(move || write_records(rx, out))
                .map(|_| tx)
        });
        let mut pending = Pending::default();
        if let Some(spool) = local.as_ref().and_then(|l| l.load_spool()) {
            let rows: i64 = spool
                .flushing
                .iter()
                .flat_map(|(_, r)| r)
                .chain(&spool.open)
                .map(|r| r.sessions)
                .sum();
            tracing::info!(
                sessions = rows,
                "usage not yet in the store, kept from the last run"
            );
            for r in &spool.open {
                add_row(&mut pending.open, r);
            }
            pending.spool = store::local::Spool {
                open: Vec::new(),
                ..spool
            };
        } else {
            pending.spool.relay = format!("{relay}:{:016x}", rand::random::<u64>());
        }
        Sessions {
            log: log.and_then(Result::ok),
            usage: Mutex::new(pending),
            keep_usage,
            local,
        }
    }

    /// Records an ended allocation; false when its log line was dropped (the writer is
    /// behind by [`RECORD_QUEUE`] lines).
    pub fn record(&self, r: &SessionRecord) -> bool {
        let mut written = true;
        if let Some(log) = &self.log {
            if let Ok(line) = serde_json::to_string(r) {
                written = log.try_send(line).is_ok();
            }
        }
        if self.keep_usage {
            let hour = (r.end as i64 / 3600) * 3600;
            let row = UsageRow {
                tenant: r.tenant.clone(),
                hour,
                sessions: 1,
                packets_up: r.packets_up as i64,
                packets_down: r.packets_down as i64,
                bytes_up: r.bytes_up as i64,
                bytes_down: r.bytes_down as i64,
            };
            let mut p = lock(&self.usage);
            add_row(&mut p.open, &row);
            p.dirty = true;
        }
        written
    }

    /// The flush to write now (its key and rows): the one in flight, else what came after,
    /// which becomes the one in flight. The spool is saved first when it changed.
    fn next_flush(&self) -> Option<(String, u64, Vec<UsageRow>)> {
        let mut p = lock(&self.usage);
        if p.spool.flushing.is_none() && !p.open.is_empty() {
            let seq = p.spool.next;
            p.spool.next += 1;
            let rows = p.open.drain().map(|(_, v)| v).collect();
            p.spool.flushing = Some((seq, rows));
            p.dirty = true;
        }
        self.save(&mut p);
        let (seq, rows) = p.spool.flushing.clone()?;
        Some((p.spool.relay.clone(), seq, rows))
    }

    /// The flush `seq` is in the store.
    fn flushed(&self, seq: u64) {
        let mut p = lock(&self.usage);
        if p.spool.flushing.as_ref().is_some_and(|(s, _)| *s == seq) {
            p.spool.flushing = None;
            p.dirty = true;
        }
        self.save(&mut p);
    }

    /// Saves the spool (the flush in flight and what came after) where it changed.
    fn save(&self, p: &mut Pending) {
        let Some(local) = &self.local else {
            return;
        };
        if !p.dirty {
            return;
        }
        let spool = store::local::Spool {
            open: p.open.values().cloned().collect(),
            ..p.spool.clone()
        };
        match local.save_spool(&spool) {
            Ok(()) => p.dirty = false,
            Err(e) => {
                tracing::warn!(dir = %local.dir().display(), error = %e, "usage spool not saved")
            }
        }
    }
}

/// Adds `r` to the row of its tenant and hour.
fn add_row(rows: &mut HashMap<(String, i64), UsageRow>, r: &UsageRow) {
    let e = rows
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

/// Writes the records that arrive to `out`, a line each, flushed whenever none waits.
fn write_records(rx: std::sync::mpsc::Receiver<String>, out: Box<dyn std::io::Write + Send>) {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(out);
    while let Ok(line) = rx.recv() {
        let _ = writeln!(out, "{line}");
        while let Ok(line) = rx.try_recv() {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
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
    /// This relay's own listener addresses, which no redirect may name.
    own: Alternate,
    /// Where siblings reach its admin API.
    admin: Option<String>,
}

/// Whether two sibling descriptions name one address.
fn shares_address(a: &Alternate, b: &Alternate) -> bool {
    let all = |x: &Alternate| -> Vec<std::net::SocketAddr> {
        x.udp.iter().chain(&x.tcp).chain(&x.tls).copied().collect()
    };
    let b = all(b);
    all(a).iter().any(|x| b.contains(x))
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
    /// `local`: the state folder, where usage waits until it is in the store.
    pub fn new(
        settings: &FleetSettings,
        store: Option<Arc<Store>>,
        local: Option<store::local::Local>,
    ) -> Arc<Self> {
        let status = Arc::new(store::Status::default());
        status.configured.store(store.is_some(), Ordering::Relaxed);
        Arc::new(Fleet {
            sessions: Sessions::new(
                settings.session_log,
                store.is_some(),
                local,
                &settings.relay_name,
            ),
            store,
            status,
            board: Board::default(),
            merge: arc_swap::ArcSwap::from_pointee(Default::default()),
            settings: Mutex::new(Self::config_of(settings, Alternate::default())),
        })
    }

    fn config_of(s: &FleetSettings, own: Alternate) -> FleetConfig {
        FleetConfig {
            relay_name: s.relay_name.clone(),
            max_allocations: s.max_allocations,
            siblings: s.siblings.clone(),
            advertise: s.advertise.clone(),
            own,
            admin: s.admin_advertise.clone(),
        }
    }

    /// After a reload.
    pub fn reload(&self, s: &FleetSettings) {
        let mut c = lock(&self.settings);
        let own = std::mem::take(&mut c.own);
        *c = Self::config_of(s, own);
    }

    /// This relay's listener addresses (as bound), which no redirect may name.
    pub fn set_own_addresses(&self, own: Alternate) {
        lock(&self.settings).own = own;
    }

    /// Writes the hourly usage gathered: the flush in flight (retried under its key until it
    /// is in, so it counts once), then what came after. Kept on disk meanwhile.
    pub async fn flush_usage(&self) {
        let Some(store) = &self.store else {
            return;
        };
        for _ in 0..2 {
            let Some((relay, seq, rows)) = self.sessions.next_flush() else {
                return;
            };
            match store.add_usage(&relay, seq, &rows).await {
                Ok(written) => {
                    if !written {
                        tracing::info!(seq, "usage flush was in the store already");
                    }
                    self.sessions.flushed(seq);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "usage not written; kept for the next try");
                    return;
                }
            }
        }
    }

    /// Chooses where Allocate requests go when this relay cannot take them, from the loads
    /// the siblings publish in the store (fresh, not this relay, not draining, with room by
    /// what they say): the least loaded of those takes a full relay's clients; a draining
    /// relay's clients go to it too, else to the first `[redirect] siblings` entry that is not
    /// this relay and that the store does not say is draining or full. Never this relay, and
    /// never a sibling known to refuse them, so a client is sent on at most once; with no
    /// such sibling the client gets 508.
    pub async fn update_redirect(&self, shared: &Shared) {
        let config = lock(&self.settings).clone();
        shared
            .quotas
            .set_redirect_at(u32::try_from(config.max_allocations).unwrap_or(u32::MAX));
        let mine = |a: &Alternate| {
            let own = config.advertise.iter().chain(std::iter::once(&config.own));
            own.into_iter().any(|o| shares_address(o, a))
        };
        let mut with_room = None;
        let mut refusing: Vec<Alternate> = Vec::new();
        if let Some(store) = &self.store {
            let since = store::unix_now() as i64 - FRESH_SECS;
            if let Ok(relays) = store.relays(since).await {
                for r in relays.iter().filter(|r| r.name != config.relay_name) {
                    let addresses = alternate_of(&r.doc["addresses"]);
                    if addresses == Alternate::default() {
                        // It publishes its admin address only: no relay to send clients to.
                        continue;
                    }
                    let max = r.doc["max_allocations"].as_i64().unwrap_or(0);
                    let room = max == 0 || r.allocations < max;
                    let draining = r.doc["draining"].as_bool().unwrap_or(false);
                    if room && !draining && !mine(&addresses) {
                        // The store lists them least loaded first.
                        with_room.get_or_insert(addresses);
                    } else {
                        refusing.push(addresses);
                    }
                }
            }
        }
        let fallback = config
            .siblings
            .iter()
            .find(|s| !mine(s) && !refusing.iter().any(|r| shares_address(r, s)))
            .cloned();
        shared.set_redirect(Redirects {
            draining: with_room.clone().or(fallback),
            full: with_room,
        });
    }

    /// The relays publishing their admin address now (fresh), this one left out: name and
    /// address.
    pub async fn admin_siblings(&self) -> Result<Vec<(String, String)>, String> {
        let Some(store) = &self.store else {
            return Err("no [store]: the fleet's relays publish themselves there".into());
        };
        let me = lock(&self.settings).relay_name.clone();
        let since = store::unix_now() as i64 - FRESH_SECS;
        let relays = store.relays(since).await.map_err(|e| e.to_string())?;
        Ok(relays
            .into_iter()
            .filter(|r| r.name != me)
            .filter_map(|r| Some((r.name, r.doc["admin"].as_str()?.to_owned())))
            .collect())
    }

    /// This relay's name in the store.
    pub fn relay_name(&self) -> String {
        lock(&self.settings).relay_name.clone()
    }

    /// Publishes this relay's addresses and load for its siblings.
    pub async fn publish(&self, shared: &Shared) {
        let (Some(store), config) = (&self.store, lock(&self.settings).clone()) else {
            return;
        };
        if config.advertise.is_none() && config.admin.is_none() {
            return;
        }
        let doc = serde_json::json!({
            "addresses": config.advertise.as_ref().map(alternate_json),
            "draining": shared.is_draining(),
            "max_allocations": config.max_allocations,
            "admin": config.admin,
        });
        if let Err(e) = store
            .publish(&config.relay_name, &doc, shared.quotas.active() as i64)
            .await
        {
            tracing::debug!(error = %e, "load not published");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar, Mutex};

    /// A sink that takes nothing until it is opened, as a pipe nobody reads.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<GateState>, Condvar)>);

    /// Whether it is open, what it took, whether a writer waits in it.
    type GateState = (bool, Vec<u8>, bool);

    impl std::io::Write for Gate {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (m, cv) = &*self.0;
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            while !g.0 {
                g.2 = true;
                cv.notify_all();
                g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.1.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(n: u64) -> SessionRecord {
        SessionRecord {
            record: "session",
            tenant: "acme".into(),
            user_id: format!("u{n}"),
            transport: "udp",
            start: 1_800_000_000,
            end: 1_800_000_060,
            duration_secs: 60.0,
            packets_up: 1,
            packets_down: 1,
            bytes_up: n,
            bytes_down: 0,
            peers: 1,
            reason: "released",
        }
    }

    #[test]
    fn records_queue_off_the_caller_and_are_dropped_and_counted_when_the_sink_stalls() {
        let gate = Gate::default();
        let s = Sessions::with_sink(Some((4, Box::new(gate.clone()))), true, None, "r");
        // The writer takes the first line and blocks on the closed sink.
        assert!(s.record(&record(0)));
        {
            let (m, cv) = &*gate.0;
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            while !g.2 {
                g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
        // Four more wait for it; the rest are dropped, at once, never waited for.
        let took = std::time::Instant::now();
        let queued: Vec<bool> = (1..21).map(|n| s.record(&record(n))).collect();
        assert!(
            took.elapsed() < std::time::Duration::from_secs(1),
            "the caller waited"
        );
        assert_eq!(queued.iter().filter(|q| **q).count(), 4, "{queued:?}");
        let kept = 5;
        // Every session counts in the usage, logged or not.
        let p = lock(&s.usage);
        let row = p.open.values().next().expect("a row");
        assert_eq!(
            (row.sessions, row.bytes_up),
            (21, (0..21).sum::<u64>() as i64)
        );
        drop(p);
        // Once the sink takes again, the queued lines come out whole.
        {
            let (m, cv) = &*gate.0;
            m.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
            cv.notify_all();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = {
                let g = gate.0 .0.lock().unwrap_or_else(|e| e.into_inner());
                String::from_utf8_lossy(&g.1).into_owned()
            };
            if text.lines().count() == kept {
                assert!(text
                    .lines()
                    .all(|l| l.starts_with("{\"record\":\"session\"")));
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
