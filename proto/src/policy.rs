//! Which peers a relay may send to. Secure by default: internal, special-purpose and the relay's
//! own service addresses are refused unless the operator allows them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Ranges refused by default (IANA special-purpose registries, RFC 6890 and successors).
const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",       // "this network", unspecified
    "10.0.0.0/8",      // RFC 1918
    "100.64.0.0/10",   // CGNAT, RFC 6598
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local, cloud metadata (169.254.169.254)
    "172.16.0.0/12",   // RFC 1918
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // TEST-NET-1
    "192.88.99.0/24",  // 6to4 relay anycast
    "192.168.0.0/16",  // RFC 1918
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // TEST-NET-2
    "203.0.113.0/24",  // TEST-NET-3
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, and 255.255.255.255 broadcast
    "::/128",          // unspecified
    "::1/128",         // loopback
    "::ffff:0:0:0/96", // SIIT (RFC 6052), IPv4 space behind the back of this policy
    "64:ff9b::/96",    // NAT64, likewise
    "64:ff9b:1::/48",  // local-use NAT64
    "100::/64",        // discard-only
    "2001::/32",       // Teredo
    "2001:db8::/32",   // documentation
    "2002::/16",       // 6to4
    "fc00::/7",        // unique local
    "fe80::/10",       // link-local
    "fec0::/10",       // deprecated site-local
    "ff00::/8",        // multicast
];

/// Why a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// In a range the operator denied.
    Operator,
    /// In a range refused by default.
    Default,
    /// One of the relay's own service (listening) addresses: relaying there would loop.
    OwnService,
    /// The relay's own host outside the relay port range: its other services (DNS, NTP,
    /// SNMP…) would be reachable from inside, behind any firewall.
    OwnHost,
}

#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    defaults: Vec<IpNet>,
    /// Listening addresses; an unspecified IP stands for every address of the host.
    own_service: Vec<SocketAddr>,
    /// The host's own non-loopback addresses (relay, advertised, listener) and the relay port
    /// range: on these IPs only relay ports, that is other allocations, may be peers.
    own_ips: Vec<IpAddr>,
    relay_ports: (u16, u16),
    /// Only other allocations of this relay may be peers (the browser test page's tenant).
    relay_only: bool,
    /// The relay's own addresses, loopback included, for `relay_only`.
    relay_ips: Vec<IpAddr>,
}

impl PeerPolicy {
    pub fn new(allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        let defaults = DEFAULT_DENY.iter().filter_map(|s| s.parse().ok()).collect();
        PeerPolicy {
            allow,
            deny,
            defaults,
            own_service: Vec::new(),
            own_ips: Vec::new(),
            relay_ports: (0, u16::MAX),
            relay_only: false,
            relay_ips: Vec::new(),
        }
    }

    /// A policy that lets allocations reach only other allocations of this relay (its own
    /// addresses, relay port range): credentials under it relay nothing anywhere else.
    pub fn relay_only(mut self) -> Self {
        self.relay_only = true;
        self
    }

    pub fn is_relay_only(&self) -> bool {
        self.relay_only
    }

    /// Tells the policy where the relay listens and which addresses and ports are its own,
    /// once the sockets are bound.
    pub fn set_own_addresses(
        &mut self,
        listeners: Vec<SocketAddr>,
        own_ips: Vec<IpAddr>,
        relay_ports: (u16, u16),
    ) {
        self.relay_ips = own_ips
            .iter()
            .copied()
            .map(normalize)
            .filter(|ip| !ip.is_unspecified())
            .collect();
        self.own_ips = listeners
            .iter()
            .map(SocketAddr::ip)
            .chain(own_ips)
            .map(normalize)
            .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
            .collect();
        self.own_service = listeners;
        self.relay_ports = relay_ports;
    }

    /// Checks a peer address. The relay's listening ports, and its own host outside the relay
    /// port range, are always refused; then operator denies win over operator allows, which
    /// win over the defaults.
    pub fn check(&self, peer: SocketAddr) -> Result<(), Denied> {
        let ip = normalize(peer.ip());
        let own_host = self.own_ips.contains(&ip);
        if self.own_service.iter().any(|s| {
            s.port() == peer.port()
                && (normalize(s.ip()) == ip
                    || (s.ip().is_unspecified() && (own_host || ip.is_loopback())))
        }) {
            return Err(Denied::OwnService);
        }
        let relay_port = (self.relay_ports.0..=self.relay_ports.1).contains(&peer.port());
        if own_host && !relay_port {
            return Err(Denied::OwnHost);
        }
        if self.relay_only {
            return if relay_port && self.relay_ips.contains(&ip) {
                Ok(())
            } else {
                Err(Denied::Operator)
            };
        }
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Err(Denied::Operator);
        }
        // Another allocation of this relay, even where the relay's own address is in a range
        // refused by default (a relay on an office network): two relay-only clients of one
        // relay reach each other this way.
        if self.allow.iter().any(|n| n.contains(&ip)) || (own_host && relay_port) {
            return Ok(());
        }
        if self.defaults.iter().any(|n| n.contains(&ip)) {
            return Err(Denied::Default);
        }
        Ok(())
    }
}

impl PeerPolicy {
    /// Whether `peer` may be one of this relay's allocations: one of its relay addresses
    /// (loopback included) and a port of the relay range. On loopback, which [`Self::check`]
    /// refuses by default, the caller admits it only while the relay holds that port for an
    /// allocation: a relay tried on one machine relays between its own clients, and never to
    /// another program that happens to use a port of the range.
    pub fn may_be_allocation(&self, peer: SocketAddr) -> bool {
        (self.relay_ports.0..=self.relay_ports.1).contains(&peer.port())
            && self.relay_ips.contains(&normalize(peer.ip()))
    }
}

/// IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d) forms become IPv4, so they
/// meet the IPv4 rules.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let o = v6.octets();
            if o[..12] == [0; 12] && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST {
                return IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            ip
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn internal_ranges_are_refused_by_default() {
        let p = PeerPolicy::new(vec![], vec![]);
        for peer in [
            "127.0.0.1:1",
            "10.1.2.3:1",
            "172.16.0.1:1",
            "192.168.1.1:1",
            "100.64.0.1:1",
            "169.254.169.254:80",
            "0.0.0.0:1",
            "224.0.0.1:1",
            "255.255.255.255:1",
            "198.18.0.1:1",
            "240.0.0.1:1",
            "[::1]:1",
            "[::]:1",
            "[fc00::1]:1",
            "[fd00::1]:1",
            "[fe80::1]:1",
            "[ff02::1]:1",
            "[64:ff9b::a00:1]:1",
            "[2001::1]:1",
            "[2002::1]:1",
            "[::ffff:127.0.0.1]:1",
            "[::ffff:10.0.0.1]:1",
            "[::10.0.0.1]:1",
            "[::ffff:169.254.169.254]:80",
        ] {
            assert_eq!(p.check(sa(peer)), Err(Denied::Default), "{peer}");
        }
        for peer in ["8.8.8.8:53", "[2606:4700::1]:443", "[::ffff:8.8.8.8]:53"] {
            assert_eq!(p.check(sa(peer)), Ok(()), "{peer}");
        }
    }

    #[test]
    fn operator_rules_override_defaults_and_deny_wins() {
        let p = PeerPolicy::new(
            vec!["127.0.0.0/8".parse().expect("net")],
            vec![
                "127.0.0.9/32".parse().expect("net"),
                "8.8.0.0/16".parse().expect("net"),
            ],
        );
        assert_eq!(p.check(sa("127.0.0.1:5000")), Ok(()));
        assert_eq!(p.check(sa("[::ffff:127.0.0.1]:5000")), Ok(()));
        assert_eq!(p.check(sa("127.0.0.9:5000")), Err(Denied::Operator));
        assert_eq!(p.check(sa("8.8.8.8:53")), Err(Denied::Operator));
        assert_eq!(p.check(sa("10.0.0.1:53")), Err(Denied::Default));
    }

    #[test]
    fn own_service_ports_are_refused_even_when_allowed() {
        let mut p = PeerPolicy::new(vec!["127.0.0.0/8".parse().expect("net")], vec![]);
        p.set_own_addresses(
            vec![sa("127.0.0.1:3478"), sa("0.0.0.0:5349")],
            vec![],
            (49152, 65535),
        );
        assert_eq!(p.check(sa("127.0.0.1:3478")), Err(Denied::OwnService));
        assert_eq!(p.check(sa("127.0.0.2:5349")), Err(Denied::OwnService));
        assert_eq!(p.check(sa("127.0.0.1:50000")), Ok(()));
        assert_eq!(
            p.check(sa("127.0.0.1:40000")),
            Ok(()),
            "an allowed loopback service"
        );
        // An unspecified listener does not make that port refused on other hosts.
        assert_eq!(p.check(sa("8.8.8.8:5349")), Ok(()));
    }

    #[test]
    fn own_host_is_reachable_only_on_relay_ports() {
        let mut p = PeerPolicy::new(vec![], vec![]);
        p.set_own_addresses(
            vec![sa("0.0.0.0:3478")],
            vec![
                "198.51.100.7".parse().expect("ip"),
                "8.8.4.4".parse().expect("ip"),
            ],
            (49152, 65535),
        );
        assert_eq!(p.check(sa("8.8.4.4:50000")), Ok(()), "another allocation");
        assert_eq!(p.check(sa("8.8.4.4:53")), Err(Denied::OwnHost));
        assert_eq!(p.check(sa("[::ffff:8.8.4.4]:161")), Err(Denied::OwnHost));
        assert_eq!(p.check(sa("8.8.4.4:3478")), Err(Denied::OwnService));
        assert_eq!(p.check(sa("8.8.8.8:53")), Ok(()));
    }

    #[test]
    fn other_allocations_are_reachable_on_a_private_relay_address() {
        let mut p = PeerPolicy::new(vec![], vec!["10.0.0.9/32".parse().expect("net")]);
        p.set_own_addresses(
            vec![sa("0.0.0.0:3478")],
            vec!["10.0.0.5".parse().expect("ip")],
            (49152, 65535),
        );
        assert_eq!(p.check(sa("10.0.0.5:50000")), Ok(()), "another allocation");
        assert_eq!(p.check(sa("10.0.0.5:22")), Err(Denied::OwnHost));
        assert_eq!(
            p.check(sa("10.0.0.6:50000")),
            Err(Denied::Default),
            "another host of the LAN"
        );
    }

    #[test]
    fn a_loopback_relay_names_what_may_be_its_allocations() {
        let mut p = PeerPolicy::new(vec![], vec![]);
        p.set_own_addresses(
            vec![sa("127.0.0.1:3478")],
            vec!["127.0.0.1".parse().expect("ip")],
            (49152, 65535),
        );
        // Refused by the ranges; the core admits a port it holds for an allocation.
        assert_eq!(p.check(sa("127.0.0.1:50000")), Err(Denied::Default));
        assert!(p.may_be_allocation(sa("127.0.0.1:50000")));
        assert!(
            !p.may_be_allocation(sa("127.0.0.1:3480")),
            "outside the relay ports"
        );
        assert!(
            !p.may_be_allocation(sa("127.0.0.2:50000")),
            "not a relay address"
        );
    }

    #[test]
    fn relay_only_reaches_nothing_but_this_relays_allocations() {
        let mut p = PeerPolicy::new(vec!["0.0.0.0/0".parse().expect("net")], vec![]).relay_only();
        p.set_own_addresses(
            vec![sa("0.0.0.0:3478")],
            vec![
                "10.99.0.1".parse().expect("ip"),
                "127.0.0.1".parse().expect("ip"),
            ],
            (49152, 65535),
        );
        assert_eq!(p.check(sa("10.99.0.1:50000")), Ok(()));
        assert_eq!(p.check(sa("127.0.0.1:50000")), Ok(()));
        assert_eq!(p.check(sa("10.99.0.1:53")), Err(Denied::OwnHost));
        assert_eq!(p.check(sa("10.99.0.1:3478")), Err(Denied::OwnService));
        assert_eq!(p.check(sa("203.0.113.5:50000")), Err(Denied::Operator));
        assert_eq!(p.check(sa("10.99.0.2:50000")), Err(Denied::Operator));
    }
}
