//! Relay ports in use: one registry per relay address and transport, so that a port belongs to
//! one allocation at a time, whichever shard made it.
//!
//! The kernel alone cannot promise this for TCP: an RFC 6062 allocation's listening socket
//! and its outgoing peer connections share one local port, which Linux allows only with
//! SO_REUSEPORT, and a second socket with SO_REUSEPORT could then join the same port. So the
//! relay takes a port here before it binds, and gives it back only once the allocation (and its
//! reservation, for EVEN-PORT) is gone: a [`PortLease`] releases its port when dropped.
//!
//! Touched when allocations are made and freed, never per packet.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use rand::RngCore;

/// The transport of a relayed address: UDP ports and TCP ports are separate spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayTransport {
    Udp,
    Tcp,
}

/// Ports in use on one relay address and transport: a bit per port.
struct PortSet {
    used: Box<[u64; 1024]>,
    count: u32,
}

impl PortSet {
    fn new() -> Self {
        PortSet {
            used: Box::new([0; 1024]),
            count: 0,
        }
    }

    fn is_used(&self, port: u16) -> bool {
        self.used[usize::from(port / 64)] & (1 << (port % 64)) != 0
    }

    fn set(&mut self, port: u16, used: bool) {
        let (word, bit) = (usize::from(port / 64), 1u64 << (port % 64));
        match (self.used[word] & bit != 0, used) {
            (false, true) => {
                self.used[word] |= bit;
                self.count += 1;
            }
            (true, false) => {
                self.used[word] &= !bit;
                self.count -= 1;
            }
            (true, true) | (false, false) => {}
        }
    }
}

/// The relay ports of every relay address, shared by the shards.
pub struct RelayPorts {
    range: (u16, u16),
    sets: Mutex<HashMap<(RelayTransport, IpAddr), PortSet>>,
}

impl std::fmt::Debug for RelayPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayPorts")
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

/// A relay port taken from the registry; dropping it gives the port back.
#[derive(Debug)]
pub struct PortLease {
    ports: Arc<RelayPorts>,
    transport: RelayTransport,
    ip: IpAddr,
    port: u16,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.ports.release(self.transport, self.ip, self.port);
    }
}

impl RelayPorts {
    /// A registry for the relay port range `lo..=hi`.
    pub fn new(range: (u16, u16)) -> Arc<Self> {
        Arc::new(RelayPorts {
            range: (range.0.min(range.1), range.0.max(range.1)),
            sets: Mutex::new(HashMap::new()),
        })
    }

    pub fn range(&self) -> (u16, u16) {
        self.range
    }

    fn sets(&self) -> std::sync::MutexGuard<'_, HashMap<(RelayTransport, IpAddr), PortSet>> {
        self.sets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a free port of the range chosen at random (an even one when `even`), or None when
    /// every port (every even port) is taken.
    pub fn take(
        self: &Arc<Self>,
        transport: RelayTransport,
        ip: IpAddr,
        even: bool,
        rng: &mut dyn RngCore,
    ) -> Option<PortLease> {
        let (lo, hi) = self.range;
        let span = u32::from(hi - lo) + 1;
        let mut sets = self.sets();
        let set = sets.entry((transport, ip)).or_insert_with(PortSet::new);
        if set.count >= span {
            return None;
        }
        // From a random start, the first free port onwards (wrapping): one pass at most.
        let start = rng.next_u32() % span;
        let port = (0..span)
            .map(|i| lo + ((start + i) % span) as u16)
            .find(|p| (!even || p % 2 == 0) && !set.is_used(*p))?;
        set.set(port, true);
        drop(sets);
        Some(self.lease(transport, ip, port))
    }

    /// Takes the lowest free port of the range (the shared relay ports, so that they are the
    /// same from one start to the next and a firewall rule can name them).
    pub fn take_lowest(
        self: &Arc<Self>,
        transport: RelayTransport,
        ip: IpAddr,
    ) -> Option<PortLease> {
        let (lo, hi) = self.range;
        let mut sets = self.sets();
        let set = sets.entry((transport, ip)).or_insert_with(PortSet::new);
        let port = (lo..=hi).find(|p| !set.is_used(*p))?;
        set.set(port, true);
        drop(sets);
        Some(self.lease(transport, ip, port))
    }

    /// Takes `port` if it is in the range and free (EVEN-PORT's reservation of the next port).
    pub fn take_port(
        self: &Arc<Self>,
        transport: RelayTransport,
        ip: IpAddr,
        port: u16,
    ) -> Option<PortLease> {
        if !(self.range.0..=self.range.1).contains(&port) {
            return None;
        }
        let mut sets = self.sets();
        let set = sets.entry((transport, ip)).or_insert_with(PortSet::new);
        if set.is_used(port) {
            return None;
        }
        set.set(port, true);
        drop(sets);
        Some(self.lease(transport, ip, port))
    }

    /// Whether `port` of `ip` is taken now (an allocation's, or reserved).
    pub fn is_taken(&self, transport: RelayTransport, ip: IpAddr, port: u16) -> bool {
        self.sets()
            .get(&(transport, ip))
            .is_some_and(|set| set.is_used(port))
    }

    /// Marks `port` taken for good: one of the relay's own listening ports, which no
    /// allocation may share (a TCP relay listener would join its SO_REUSEPORT group).
    pub fn reserve(&self, transport: RelayTransport, ip: IpAddr, port: u16) {
        if (self.range.0..=self.range.1).contains(&port) {
            self.sets()
                .entry((transport, ip))
                .or_insert_with(PortSet::new)
                .set(port, true);
        }
    }

    fn lease(self: &Arc<Self>, transport: RelayTransport, ip: IpAddr, port: u16) -> PortLease {
        PortLease {
            ports: Arc::clone(self),
            transport,
            ip,
            port,
        }
    }

    fn release(&self, transport: RelayTransport, ip: IpAddr, port: u16) {
        let mut sets = self.sets();
        if let Some(set) = sets.get_mut(&(transport, ip)) {
            set.set(port, false);
            if set.count == 0 {
                sets.remove(&(transport, ip));
            }
        }
    }

    /// Ports taken now on `ip` for `transport`.
    pub fn in_use(&self, transport: RelayTransport, ip: IpAddr) -> u32 {
        self.sets().get(&(transport, ip)).map_or(0, |s| s.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn every_port_is_handed_out_once_until_released() {
        let ports = RelayPorts::new((50000, 50099));
        let mut rng = StdRng::seed_from_u64(1);
        let leases: Vec<_> = (0..100)
            .map(|_| {
                ports
                    .take(RelayTransport::Tcp, IP, false, &mut rng)
                    .expect("free")
            })
            .collect();
        let mut seen: Vec<u16> = leases.iter().map(PortLease::port).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 100, "a port was handed out twice");
        assert!(seen.iter().all(|p| (50000..=50099).contains(p)));
        assert!(ports
            .take(RelayTransport::Tcp, IP, false, &mut rng)
            .is_none());
        // UDP and another address are other spaces.
        assert!(ports
            .take(RelayTransport::Udp, IP, false, &mut rng)
            .is_some());
        let other: IpAddr = "::1".parse().expect("ip");
        assert!(ports
            .take(RelayTransport::Tcp, other, false, &mut rng)
            .is_some());
        let freed = leases[42].port();
        drop(leases);
        assert_eq!(ports.in_use(RelayTransport::Tcp, IP), 0);
        let again = ports.take_port(RelayTransport::Tcp, IP, freed);
        assert!(again.is_some(), "a released port is free again");
        assert!(ports.take_port(RelayTransport::Tcp, IP, freed).is_none());
    }

    #[test]
    fn even_ports_and_reservations_stay_in_the_range() {
        let ports = RelayPorts::new((50001, 50010));
        let mut rng = StdRng::seed_from_u64(2);
        let evens: Vec<_> = (0..5)
            .map(|_| {
                ports
                    .take(RelayTransport::Udp, IP, true, &mut rng)
                    .expect("even")
            })
            .collect();
        assert!(evens.iter().all(|l| l.port() % 2 == 0));
        assert!(ports
            .take(RelayTransport::Udp, IP, true, &mut rng)
            .is_none());
        assert!(ports
            .take(RelayTransport::Udp, IP, false, &mut rng)
            .is_some());
        assert!(ports.take_port(RelayTransport::Udp, IP, 50011).is_none());
    }

    #[test]
    fn reserved_ports_are_never_handed_out() {
        let ports = RelayPorts::new((50000, 50003));
        ports.reserve(RelayTransport::Tcp, IP, 50001);
        ports.reserve(RelayTransport::Tcp, IP, 40000);
        let mut rng = StdRng::seed_from_u64(3);
        let got: Vec<u16> = (0..3)
            .map(|_| {
                ports
                    .take(RelayTransport::Tcp, IP, false, &mut rng)
                    .expect("free")
            })
            .map(|l| {
                let p = l.port();
                std::mem::forget(l);
                p
            })
            .collect();
        assert!(!got.contains(&50001), "{got:?}");
        assert!(ports
            .take(RelayTransport::Tcp, IP, false, &mut rng)
            .is_none());
    }
}
