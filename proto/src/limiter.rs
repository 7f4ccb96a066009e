//! A per-source rate limit, sans IO (time is passed in): the echo services, the credential
//! service's wrong keys, the test page's sessions and the relay's search for a tenant by secret.
//!
//! A token bucket per source, for packets and for bytes, each holding two seconds' worth
//! (with the defaults: bursts of 200 packets and 2 MB, then 100 packets/s and 1 MB/s). An
//! IPv4 source is one address; an IPv6 source is its /64, since one host commonly holds a
//! whole /64. The table is bounded: when it is full, buckets that have refilled completely
//! (sources quiet for two seconds, which lose nothing by being forgotten) are swept out at
//! most once a second, and while it stays full new sources are refused. So a flood of spoofed
//! sources costs a fixed amount of memory and cannot buy anyone more than their own rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Default bound on the number of sources tracked.
pub const MAX_SOURCES: usize = 65_536;
/// A bucket holds this many seconds of its rate.
const BURST_SECS: f64 = 2.0;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The allowed rates per source.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub packets_per_sec: f64,
    pub bytes_per_sec: f64,
}

impl Rates {
    /// The largest message a full bucket can pass.
    pub fn max_bytes(&self) -> usize {
        (self.bytes_per_sec * BURST_SECS) as usize
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    packets: f64,
    bytes: f64,
    last: Instant,
}

/// Token buckets per source.
#[derive(Debug)]
pub struct Limiter {
    rates: Rates,
    max_sources: usize,
    table: HashMap<u128, Bucket>,
    last_sweep: Option<Instant>,
    /// What to do when the table is full of active sources: refuse new ones (the default), or
    /// forget every source and start again (at most once a second).
    forget_when_full: bool,
}

/// The key of a source: IPv4 as its IPv4-mapped IPv6 form, IPv6 as its /64 (one host commonly
/// holds a whole /64, so limits per IPv6 address would limit nothing).
pub fn source_key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6) & !u128::from(u64::MAX),
    }
}

impl Limiter {
    pub fn new(rates: Rates, max_sources: usize) -> Self {
        Limiter {
            rates,
            max_sources: max_sources.max(1),
            table: HashMap::new(),
            last_sweep: None,
            forget_when_full: false,
        }
    }

    /// A limiter that, when its table is full of active sources, forgets them all (at most
    /// once a second) rather than refusing new ones. For a limit whose refusal locks a client
    /// out (its 401 challenge): a flood of spoofed sources then delays new clients by a second
    /// at most, and any one source still gets no more than a burst a second plus its rate.
    pub fn forgetting_when_full(rates: Rates, max_sources: usize) -> Self {
        Limiter {
            forget_when_full: true,
            ..Limiter::new(rates, max_sources)
        }
    }

    pub fn rates(&self) -> Rates {
        self.rates
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    fn full(&self, now: Instant) -> Bucket {
        Bucket {
            packets: self.rates.packets_per_sec * BURST_SECS,
            bytes: self.rates.bytes_per_sec * BURST_SECS,
            last: now,
        }
    }

    fn refill(rates: Rates, b: &mut Bucket, now: Instant) {
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.packets =
            (b.packets + dt * rates.packets_per_sec).min(rates.packets_per_sec * BURST_SECS);
        b.bytes = (b.bytes + dt * rates.bytes_per_sec).min(rates.bytes_per_sec * BURST_SECS);
        b.last = now.max(b.last);
    }

    /// May `ip` send one message of `len` bytes now? Takes the tokens when it may; a refused
    /// message takes nothing.
    pub fn allow(&mut self, ip: IpAddr, len: usize, now: Instant) -> bool {
        let k = source_key(ip);
        let rates = self.rates;
        if !self.table.contains_key(&k) {
            if self.table.len() >= self.max_sources {
                let swept = self.sweep(now);
                if self.table.len() >= self.max_sources {
                    if !(self.forget_when_full && swept) {
                        return false;
                    }
                    self.table.clear();
                }
            }
            let b = self.full(now);
            self.table.insert(k, b);
        }
        let Some(b) = self.table.get_mut(&k) else {
            return false;
        };
        Self::refill(rates, b, now);
        let len = len as f64;
        if b.packets >= 1.0 && b.bytes >= len {
            b.packets -= 1.0;
            b.bytes -= len;
            true
        } else {
            false
        }
    }

    /// Whether `ip` has no message left now (takes nothing). While the table is full of
    /// active sources, a source it does not know counts as exhausted, as `allow` refuses it.
    pub fn exhausted(&mut self, ip: IpAddr, now: Instant) -> bool {
        let rates = self.rates;
        if !self.table.contains_key(&source_key(ip)) && self.table.len() >= self.max_sources {
            let _ = self.sweep(now);
        }
        let full = self.table.len() >= self.max_sources;
        match self.table.get_mut(&source_key(ip)) {
            None => full,
            Some(b) => {
                Self::refill(rates, b, now);
                b.packets < 1.0
            }
        }
    }

    /// Forgets the sources whose buckets are full again (at most once a second); false when
    /// it is too soon to sweep again.
    fn sweep(&mut self, now: Instant) -> bool {
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return false;
        }
        self.last_sweep = Some(now);
        let rates = self.rates;
        self.table.retain(|_, b| {
            Self::refill(rates, b, now);
            b.packets < rates.packets_per_sec * BURST_SECS
                || b.bytes < rates.bytes_per_sec * BURST_SECS
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: Rates = Rates {
        packets_per_sec: 100.0,
        bytes_per_sec: 1_000_000.0,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn bursts_then_holds_the_rate() {
        let mut l = Limiter::new(DEFAULT, MAX_SOURCES);
        let t0 = Instant::now();
        let a = ip("198.51.100.1");
        let passed = (0..1000).filter(|_| l.allow(a, 100, t0)).count();
        assert_eq!(passed, 200, "a burst of two seconds' worth");
        let t1 = t0 + Duration::from_millis(500);
        let passed = (0..1000).filter(|_| l.allow(a, 100, t1)).count();
        assert_eq!(passed, 50, "then 100 packets a second");
        assert!(
            l.allow(ip("198.51.100.2"), 100, t1),
            "sources are independent"
        );
    }

    #[test]
    fn bytes_are_limited_too() {
        let mut l = Limiter::new(DEFAULT, MAX_SOURCES);
        let t0 = Instant::now();
        let a = ip("198.51.100.1");
        let passed = (0..100).filter(|_| l.allow(a, 60_000, t0)).count();
        assert_eq!(passed, 33, "2 MB of 60 kB messages");
        assert!(!l.allow(a, 60_000, t0));
        assert!(l.allow(a, 20_000, t0), "a refusal takes nothing");
        assert!(l.allow(a, 60_000, t0 + Duration::from_millis(100)));
        assert_eq!(DEFAULT.max_bytes(), 2_000_000);
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let mut l = Limiter::new(
            Rates {
                packets_per_sec: 1.0,
                bytes_per_sec: 1e6,
            },
            MAX_SOURCES,
        );
        let t = Instant::now();
        assert!(l.allow(ip("2001:db8:1:2::1"), 1, t));
        assert!(l.allow(ip("2001:db8:1:2::2"), 1, t));
        assert!(!l.allow(ip("2001:db8:1:2:ffff::3"), 1, t), "same /64");
        assert!(l.allow(ip("2001:db8:1:3::1"), 1, t), "another /64");
        assert!(l.allow(ip("192.0.2.1"), 1, t));
        assert!(l.allow(ip("::ffff:192.0.2.1"), 1, t));
        assert!(
            !l.allow(ip("192.0.2.1"), 1, t),
            "the mapped form is the same source"
        );
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn a_forgetting_limiter_lets_new_sources_in_within_a_second_of_a_flood() {
        let rates = Rates {
            packets_per_sec: 1.0,
            bytes_per_sec: 1e6,
        };
        let mut l = Limiter::forgetting_when_full(rates, 4);
        let t0 = Instant::now();
        // A flood of spoofed sources fills the table; the first sweep forgets them all.
        for i in 1..=4 {
            assert!(l.allow(ip(&format!("198.51.100.{i}")), 1, t0));
        }
        assert!(l.allow(ip("192.0.2.1"), 1, t0), "forgotten, room made");
        for i in 5..=7 {
            assert!(l.allow(ip(&format!("198.51.100.{i}")), 1, t0));
        }
        assert!(
            !l.allow(ip("192.0.2.2"), 1, t0),
            "full again within the second"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert!(
            l.allow(ip("192.0.2.2"), 1, t1),
            "a second later, room again"
        );
        assert!(l.len() <= 4);
    }

    #[test]
    fn the_table_is_bounded_and_quiet_sources_make_room() {
        let mut l = Limiter::new(DEFAULT, 4);
        let t0 = Instant::now();
        for i in 1..=4 {
            assert!(l.allow(ip(&format!("198.51.100.{i}")), 10, t0));
        }
        assert!(
            !l.allow(ip("198.51.100.5"), 10, t0),
            "full: new sources refused"
        );
        assert!(l.allow(ip("198.51.100.1"), 10, t0), "known sources go on");
        assert_eq!(l.len(), 4);
        // Sweeps run at most once a second (one ran at t0).
        let t1 = t0 + Duration::from_millis(500);
        assert!(!l.allow(ip("198.51.100.6"), 10, t1));
        // Later every bucket has refilled: forgetting them costs nothing.
        let t2 = t0 + Duration::from_secs(2);
        assert!(l.allow(ip("198.51.100.7"), 10, t2));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn a_spoofed_flood_keeps_memory_flat() {
        let mut l = Limiter::new(DEFAULT, 1000);
        let t0 = Instant::now();
        let mut passed = 0;
        for i in 0..100_000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0A00_0000 + i));
            let t = t0 + Duration::from_micros(u64::from(i));
            passed += usize::from(l.allow(a, 100, t));
            assert!(l.len() <= 1000);
        }
        assert_eq!(passed, 1000, "only the first 1000 sources got through");
    }

    #[test]
    fn exhausted_refuses_unknown_sources_while_the_table_is_full() {
        let rates = Rates {
            packets_per_sec: 1.0,
            bytes_per_sec: 1.0,
        };
        let mut l = Limiter::new(rates, 2);
        let now = Instant::now();
        assert!(l.allow(ip("192.0.2.1"), 0, now));
        assert!(l.allow(ip("192.0.2.2"), 0, now));
        assert!(!l.exhausted(ip("192.0.2.1"), now));
        assert!(l.exhausted(ip("192.0.2.3"), now), "full of active sources");
        let later = now + Duration::from_secs(3);
        assert!(!l.exhausted(ip("192.0.2.3"), later), "quiet sources swept");
    }
}
