//! Admission of stream connections (TURN over TCP/TLS, HTTPS, plain HTTP, the metrics
//! endpoint): at most `max_per_source` open connections per source, an IPv4 address or an
//! IPv6 /64, and at most `max_unallocated` connections that hold no allocation, across all
//! sources. A connection counts as unallocated from its accept until it holds an allocation
//! (HTTP connections never do), so strangers cannot fill the relay's descriptors with
//! connections that cost them nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use turnpike_proto::limiter::source_key;

/// Why a connection was refused, the `reason` label of the refusal counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The source holds `max_per_source` connections already.
    PerSource,
    /// `max_unallocated` connections hold no allocation already.
    Unallocated,
}

impl Refused {
    pub const ALL: [Refused; 2] = [Refused::PerSource, Refused::Unallocated];

    pub fn label(self) -> &'static str {
        match self {
            Refused::PerSource => "per_source",
            Refused::Unallocated => "unallocated",
        }
    }
}

/// The counts behind the limits, shared by every shard's stream listeners.
#[derive(Debug)]
pub struct Admission {
    max_per_source: u32,
    max_unallocated: usize,
    per_source: Mutex<HashMap<u128, u32>>,
    unallocated: AtomicUsize,
}

impl Admission {
    pub fn new(max_per_source: u32, max_unallocated: usize) -> Arc<Self> {
        Arc::new(Admission {
            max_per_source: max_per_source.max(1),
            max_unallocated: max_unallocated.max(1),
            per_source: Mutex::new(HashMap::new()),
            unallocated: AtomicUsize::new(0),
        })
    }

    /// Connections open now that hold no allocation.
    pub fn unallocated(&self) -> usize {
        self.unallocated.load(Ordering::Relaxed)
    }

    /// Counts a new connection from `ip`, or says which limit refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refused> {
        self.arrive()?.from(ip)
    }

    /// Counts a connection just accepted among those without an allocation, before its
    /// source is known (a PROXY protocol header names it later).
    pub fn arrive(self: &Arc<Self>) -> Result<Arriving, Refused> {
        let slot = self.take_unallocated().ok_or(Refused::Unallocated)?;
        Ok(Arriving(slot))
    }

    fn take_unallocated(self: &Arc<Self>) -> Option<UnallocatedSlot> {
        let taken = self
            .unallocated
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_unallocated).then_some(n + 1)
            });
        taken.ok().map(|_| UnallocatedSlot(Arc::clone(self)))
    }
}

/// A connection accepted and counted without an allocation, whose source is not known yet.
#[derive(Debug)]
pub struct Arriving(UnallocatedSlot);

impl Arriving {
    /// Its source is `ip`: counted for it too, unless the source holds its most already.
    pub fn from(self, ip: IpAddr) -> Result<Admitted, Refused> {
        let admission = Arc::clone(&self.0 .0);
        let key = source_key(ip);
        let mut m = admission
            .per_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key).or_insert(0);
        if *n >= admission.max_per_source {
            return Err(Refused::PerSource);
        }
        *n += 1;
        drop(m);
        Ok(Admitted {
            admission,
            key,
            unallocated: Some(self.0),
        })
    }
}

/// An admitted HTTP connection, shared with the requests it carries: a request upgraded to a
/// WebSocket keeps its connection counted after the HTTP server lets go of it.
#[derive(Debug, Clone)]
pub struct Ticket(pub Arc<Admitted>);

/// One of the `max_unallocated` slots.
#[derive(Debug)]
struct UnallocatedSlot(Arc<Admission>);

impl Drop for UnallocatedSlot {
    fn drop(&mut self) {
        self.0.unallocated.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An admitted connection, counted until dropped.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    key: u128,
    unallocated: Option<UnallocatedSlot>,
}

impl Admitted {
    /// The connection holds an allocation now: it leaves the unallocated count.
    pub fn allocated(&mut self) {
        self.unallocated = None;
    }

    /// The connection holds no allocation (any more): false when it cannot count as
    /// unallocated again because the limit is reached, and should be closed.
    pub fn unallocated(&mut self) -> bool {
        if self.unallocated.is_none() {
            self.unallocated = self.admission.take_unallocated();
        }
        self.unallocated.is_some()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut m = self
            .admission
            .per_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// What a listener does after a failed accept. Out of descriptors or memory (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM), the connection stays queued and an immediate retry would spin: wait,
/// from 10 ms doubling to 1 s. Other errors concern one connection (ECONNABORTED, EPROTO...):
/// accept(2) says to try again at once.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: std::time::Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { next: Self::MIN }
    }
}

impl AcceptBackoff {
    const MIN: std::time::Duration = std::time::Duration::from_millis(10);
    const MAX: std::time::Duration = std::time::Duration::from_secs(1);

    /// An accept succeeded.
    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }

    /// An accept failed with `e`; returns once the listener may try again.
    pub async fn failed(&mut self, e: &std::io::Error, what: &str) {
        let exhausted = matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        if !exhausted {
            tracing::debug!(error = %e, "{what}: accept failed; trying again");
            tokio::task::yield_now().await;
            return;
        }
        if self.next == Self::MIN {
            tracing::warn!(error = %e, "{what}: out of resources; accepting again later");
        }
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Self::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source_and_ipv4_addresses_are_apart() {
        let a = Admission::new(2, 100);
        let one = a.admit(ip("2001:db8::1")).expect("first");
        let _two = a.admit(ip("2001:db8::ffff:2")).expect("second");
        assert_eq!(
            a.admit(ip("2001:db8:0:0:1::3")).err(),
            Some(Refused::PerSource),
            "a third address of the same /64"
        );
        assert!(a.admit(ip("2001:db8:0:1::1")).is_ok(), "another /64");
        let _x = a.admit(ip("192.0.2.1")).expect("v4");
        let _y = a.admit(ip("192.0.2.1")).expect("v4");
        assert!(a.admit(ip("192.0.2.1")).is_err());
        assert!(a.admit(ip("192.0.2.2")).is_ok(), "IPv4 is per address");
        drop(one);
        assert!(
            a.admit(ip("2001:db8::9")).is_ok(),
            "a closed connection frees its place"
        );
    }

    #[test]
    fn connections_without_an_allocation_are_capped_across_sources() {
        let a = Admission::new(10, 3);
        let mut held: Vec<_> = (1..=3)
            .map(|i| a.admit(ip(&format!("192.0.2.{i}"))).expect("admitted"))
            .collect();
        assert_eq!(a.admit(ip("192.0.2.9")).err(), Some(Refused::Unallocated));
        held[0].allocated();
        assert_eq!(a.unallocated(), 2);
        let mut fourth = a.admit(ip("192.0.2.9")).expect("room again");
        assert!(!held[0].unallocated(), "no room to fall back into");
        fourth.allocated();
        assert!(held[0].unallocated());
        drop(held);
        assert_eq!(a.unallocated(), 0);
    }
}
