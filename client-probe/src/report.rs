//! What the probe prints: a table for people, JSON for programs, a WebRTC `iceServers`
//! configuration, and the firewall table for IT departments.

use serde_json::json;
use turnpike_proto::advice::Phrase;

use crate::probe::credentials;
use crate::regions::Region;
use crate::select::{Candidate, PathResult};

fn num(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into())
}

/// A fixed-width table, one line per region and path, the selection last.
pub fn table(results: &[PathResult], selected: Option<&Candidate>) -> String {
    let mut out = format!(
        "{:<12} {:<16} {:<5} {:>7} {:>7} {:>7} {:>7} {:>6} {:>4} {:>7} {:>7}  {}\n",
        "REGION",
        "PATH",
        "OK",
        "MIN",
        "MEDIAN",
        "P95",
        "JITTER",
        "LOSS",
        "MOS",
        "TLS",
        "ALLOC",
        "DETAIL"
    );
    for r in results {
        let rtt = r.rtt_ms;
        let detail = match (&r.error, &r.mapped) {
            (Some(e), _) => e.clone(),
            (None, Some(m)) => format!("seen as {m}"),
            (None, None) => String::new(),
        };
        out += &format!(
            "{:<12} {:<16} {:<5} {:>7} {:>7} {:>7} {:>7} {:>6} {:>4} {:>7} {:>7}  {}\n",
            r.region,
            r.path,
            if r.reachable { "yes" } else { "NO" },
            num(rtt.map(|x| x.min)),
            num(rtt.map(|x| x.median)),
            num(rtt.map(|x| x.p95)),
            num(r.jitter_ms),
            r.loss
                .map(|l| format!("{:.0}%", l * 100.0))
                .unwrap_or_else(|| "-".into()),
            r.voice
                .map(|v| format!("{:.1}", v.mos))
                .unwrap_or_else(|| "-".into()),
            num(r.tls_handshake_ms),
            num(r.allocation_ms),
            detail
        );
    }
    out += "(milliseconds; TURN paths time a datagram sent through the relay from one allocation to another; MOS: a voice call's estimated score, 1 to 4.4, ITU-T G.107)\n";
    for r in results {
        if let Some(b) = r.bandwidth {
            out += &format!(
                "bandwidth: {} {}: {}\n",
                r.region,
                r.path,
                bandwidth_text(&b)
            );
        }
    }
    match selected {
        Some(c) => {
            out += &format!(
                "selected: {} via {} ({:.1} ms median)\n",
                c.region, c.path, c.median_ms
            )
        }
        None => out += "selected: none (no region reachable over TURN)\n",
    }
    out
}

/// What a bandwidth test found, in one sentence: the rate kept up (and over the whole
/// arrival window when a burst made that higher), loss, delay, the verdict, and the relay's
/// own limit when it is what held the rate.
pub fn bandwidth_text(b: &crate::bandwidth::Bandwidth) -> String {
    let whole = if b.received_mbps > 1.05 * b.sustained_mbps {
        format!(
            " ({:.2} over all {:.1} s of arrivals, a burst first)",
            b.received_mbps, b.window_s
        )
    } else {
        String::new()
    };
    let limit = match (b.limited_by_relay, b.relay_limit_mbps) {
        (true, Some(l)) => format!(
            "; limited by the relay's bandwidth quota of {l:.2} Mbit/s per allocation, which it \
             reported: not by the network"
        ),
        _ => String::new(),
    };
    format!(
        "{:.2} of {:.2} Mbit/s kept up through the relay{whole}, loss {:.1}%, {} ms under load: {} (video up to {}){limit}",
        b.sustained_mbps,
        b.required_mbps,
        b.loss * 100.0,
        b.rtt_ms.map_or("-".into(), |v| format!("{v:.1}")),
        if b.meets { Phrase::Meets } else { Phrase::MeetsNot }.text(),
        b.video
    )
}

pub fn json(results: &[PathResult], selected: Option<&Candidate>) -> serde_json::Value {
    json!({
        "selected": selected.map(|c| c.region.clone()),
        "selected_path": selected.map(|c| c.path.clone()),
        "results": results,
    })
}

/// A WebRTC `iceServers` array for a region, with fresh ephemeral credentials where the
/// region has a secret.
pub fn ice_servers(region: &Region) -> serde_json::Value {
    let (username, credential) = credentials(region);
    let mut urls = Vec::new();
    if region.udp_port != 0 {
        urls.push(format!(
            "turn:{}:{}?transport=udp",
            region.host, region.udp_port
        ));
    }
    if region.tcp_port != 0 {
        urls.push(format!(
            "turn:{}:{}?transport=tcp",
            region.host, region.tcp_port
        ));
    }
    if region.tls_port != 0 {
        urls.push(format!(
            "turns:{}:{}?transport=tcp",
            region.tls_name(),
            region.tls_port
        ));
    }
    let mut servers = Vec::new();
    if region.udp_port != 0 {
        servers.push(json!({ "urls": format!("stun:{}:{}", region.host, region.udp_port) }));
    }
    servers.push(json!({ "urls": urls, "username": username, "credential": credential }));
    serde_json::Value::Array(servers)
}

/// What the probe found on one path, for the firewall table: told apart so that IT reads
/// only what was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The path works.
    Open,
    /// Packets or connections are dropped or cut on the way (timeout without any answer
    /// while the host answers elsewhere, a reset).
    Blocked,
    /// A TCP reset to the connection attempt or ICMP port unreachable: nothing listens
    /// there, or a firewall rejects (the two look the same).
    Refused,
    /// Something accepted the connection but gave no TURN answer.
    NotAnswering,
    /// Something answered, and it is not a TURN relay (an echo, a web server).
    NotTurn,
    /// The relay answered and refused (401, 403...): the network is open, the credentials or
    /// the relay's policy are not.
    RelayRefused,
    /// The relay's certificate is not trusted here (self-signed, incomplete chain...): for
    /// the relay's operator, not the network.
    Untrusted,
    /// A TLS certificate that is not the relay's, with evidence: a proxy on the way
    /// inspects TLS.
    Inspected,
    /// The relay allocated, but data relayed through it did not come back: this network
    /// reaches the relay; its relay ports or peer policy are the relay operator's to check.
    RelayedLost,
    /// The name does not resolve.
    Unknown,
    /// Not tested from here (the path was not probed, or what it depends on failed first).
    NotTested,
    /// The host answered on no path at all: down, or everything to it blocked.
    Silent,
    /// This machine could not send (no route, no network, its own firewall).
    Local,
    /// The web proxy given to the probe cannot be reached.
    ProxyUnreachable,
    /// The web proxy refused CONNECT.
    ProxyRefused,
    /// The web proxy took CONNECT (or said it could not connect), and no relay answered.
    BehindProxy,
}

impl Verdict {
    /// The words the firewall table, the capture and the HTML report use.
    pub fn label(self) -> &'static str {
        self.phrase().text()
    }

    fn phrase(self) -> Phrase {
        match self {
            Verdict::Open => Phrase::Open,
            Verdict::Blocked => Phrase::Blocked,
            Verdict::Refused => Phrase::Refused,
            Verdict::NotAnswering => Phrase::NotAnswering,
            Verdict::NotTurn => Phrase::NotTurn,
            Verdict::RelayRefused => Phrase::RelayRefused,
            Verdict::Untrusted => Phrase::Untrusted,
            Verdict::Inspected => Phrase::Inspected,
            Verdict::RelayedLost => Phrase::RelayedLost,
            Verdict::Unknown => Phrase::Unknown,
            Verdict::NotTested => Phrase::NotTested,
            Verdict::Silent => Phrase::Silent,
            Verdict::Local => Phrase::Local,
            Verdict::ProxyUnreachable => Phrase::ProxyUnreachable,
            Verdict::ProxyRefused => Phrase::ProxyRefused,
            Verdict::BehindProxy => Phrase::BehindProxy,
        }
    }
}

/// The purpose of the relay ports' row.
pub const RELAYED: &str = "relayed media, to and from peers that do not use TURN";

/// One row of the firewall table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FirewallRow {
    /// The region (of `regions.toml`) the row is for.
    pub region: String,
    pub destination: String,
    /// The addresses the destination resolved to from where the probe ran.
    pub addresses: Vec<String>,
    pub port: String,
    pub protocol: &'static str,
    pub direction: &'static str,
    pub purpose: &'static str,
    pub verdict: Verdict,
    /// What was seen: the error, or why it was not tested.
    pub detail: String,
}

/// The verdict on a path from its result (before the host-wide view of [`firewall_rows`]).
fn verdict(r: Option<&PathResult>) -> (Verdict, String) {
    use crate::turn::Failure as F;
    let Some(r) = r else {
        return (Verdict::NotTested, "not probed".into());
    };
    if r.reachable {
        return (Verdict::Open, String::new());
    }
    let e = r.error.clone().unwrap_or_default();
    if r.allocation_ms.is_some() {
        // The relay answered and allocated: this network reaches it.
        return (Verdict::RelayedLost, e);
    }
    let proxied = r.path == "turn-tls-proxy";
    let quiet = if r.reached {
        Verdict::NotAnswering
    } else {
        Verdict::Blocked
    };
    let v = match &r.failure {
        None => quiet,
        Some(f) => match f {
            F::Dns(_) => Verdict::Unknown,
            F::Inspected(_) => Verdict::Inspected,
            F::Untrusted(_) => Verdict::Untrusted,
            F::NotTurn(_) => Verdict::NotTurn,
            F::Refused(_) => Verdict::Refused,
            F::Local(_) => Verdict::Local,
            F::ProxyUnreachable(_) => Verdict::ProxyUnreachable,
            // 500 and 502-504: the proxy could not connect to the relay (tinyproxy, squid).
            F::Proxy(500 | 502..=504, _) => Verdict::BehindProxy,
            F::Proxy(..) => Verdict::ProxyRefused,
            F::Timeout(_) if proxied && r.reached => Verdict::BehindProxy,
            F::Status(..) => Verdict::RelayRefused,
            F::Reset(_) | F::Unreachable(_) => Verdict::Blocked,
            F::Timeout(_) | F::Tls(_) | F::Other(_) => quiet,
        },
    };
    (v, e)
}

/// A path's verdict in words, as the firewall table and the capture's comments give it, in
/// the light of the host's other paths (a host silent on all of them is said to be).
pub fn path_verdict(results: &[PathResult], region: &str, path: &str) -> String {
    let r = results
        .iter()
        .find(|r| r.region == region && r.path == path);
    let (mut v, detail) = verdict(r);
    if v == Verdict::Blocked && path != "turn-tls-proxy" && silent(results, region) {
        v = Verdict::Silent;
    }
    if detail.is_empty() {
        v.label().to_owned()
    } else {
        format!("{}: {detail}", v.label())
    }
}

/// Whether nothing of `region`'s host answered on any of its direct paths.
fn silent(results: &[PathResult], region: &str) -> bool {
    let mine: Vec<&PathResult> = results
        .iter()
        .filter(|r| r.region == region && r.path != "turn-tls-proxy")
        .collect();
    !mine.is_empty() && mine.iter().all(|r| !r.host_answered())
}

/// The relay ports row follows the UDP TURN path's peer check: a plain UDP socket here
/// exchanged datagrams with a relayed address both ways (open, for the port tried), they were
/// dropped one way (blocked), or nothing was sent (the relay refused this machine as a peer,
/// or no allocation was made). Returns the row's port text too: the range the report names,
/// or the port tried when it lies outside it.
fn relayed_verdict(r: Option<&PathResult>, range: &str) -> (String, Verdict, String) {
    let Some(r) = r else {
        return (range.into(), Verdict::NotTested, "not probed".into());
    };
    let Some(p) = &r.peer else {
        let why = if r.allocation_ms.is_some() {
            "the relay allocated, but the peer check did not run"
        } else {
            "no UDP allocation was made; see the turn-udp path"
        };
        return (range.into(), Verdict::NotTested, why.into());
    };
    let tried: Option<u16> = p
        .relayed
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.port());
    let inside = tried.is_some_and(|port| in_ranges(range, port));
    let (port, flag) = match tried {
        Some(t) if !inside => (
            t.to_string(),
            format!(
                "; the relay gave port {t}, outside {range}, the range this report names: ask \
                 its operator for its relay_ports and list them in regions.toml"
            ),
        ),
        _ => (range.to_owned(), String::new()),
    };
    let tested = tried.map_or("a relay port".to_owned(), |t| format!("port {t}"));
    let e = p.error.clone().unwrap_or_default();
    if p.inbound && p.outbound {
        return (
            port,
            Verdict::Open,
            format!(
                "{tested} tried: datagrams crossed {} both ways (the other ports of the range were not tried){flag}",
                p.relayed
            ),
        );
    }
    if !p.inbound && e.starts_with(|c: char| c.is_ascii_digit()) {
        // The relay refused the permission: nothing went to the relay ports.
        let me = p.seen_as.as_deref().unwrap_or("this machine's address");
        return (
            port,
            Verdict::NotTested,
            format!(
                "the relay's peer policy refuses {me} as a peer ({e}), so no datagram was \
                 sent to the relay ports{flag}"
            ),
        );
    }
    (port, Verdict::Blocked, format!("{tested} tried: {e}{flag}"))
}

/// Whether `port` lies in `ranges` (`49152-65535`, or `50000,50002-50003`).
fn in_ranges(ranges: &str, port: u16) -> bool {
    ranges.split(',').any(|r| match r.trim().split_once('-') {
        Some((lo, hi)) => matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&port)),
        None => r.trim().parse() == Ok(port),
    })
}

/// Destination, port, protocol, direction, purpose, and what the probe found from where it
/// ran: the table enterprise firewall documents give IT departments.
pub fn firewall_rows(regions: &[Region], results: &[PathResult]) -> Vec<FirewallRow> {
    let result = |region: &str, path: &str| {
        results
            .iter()
            .find(|r| r.region == region && r.path == path)
    };
    let mut rows = Vec::new();
    let mut row = |r: &Region,
                   port: String,
                   protocol: &'static str,
                   direction: &'static str,
                   purpose: &'static str,
                   (verdict, detail): (Verdict, String)| {
        rows.push(FirewallRow {
            region: r.name.clone(),
            destination: r.host.clone(),
            addresses: Vec::new(),
            port,
            protocol,
            direction,
            purpose,
            verdict,
            detail,
        })
    };
    const OUT: &str = "out";
    for r in regions {
        if r.udp_port != 0 {
            row(
                r,
                r.udp_port.to_string(),
                "UDP",
                OUT,
                "STUN and TURN (best call quality); replies must get in",
                verdict(result(&r.name, "turn-udp")),
            );
            // The relay's shared ports when regions.toml names them, else its default range.
            let relay_ports: Vec<String> = r
                .relay_ports
                .iter()
                .filter_map(|p| p.describe().ok())
                .collect();
            let relay_ports = if relay_ports.is_empty() {
                "49152-65535".to_owned()
            } else {
                relay_ports.join(",")
            };
            let (port, v, detail) = relayed_verdict(result(&r.name, "turn-udp"), &relay_ports);
            row(r, port, "UDP", "out and in", RELAYED, (v, detail));
        }
        if r.tcp_port != 0 {
            row(
                r,
                r.tcp_port.to_string(),
                "TCP",
                OUT,
                "TURN over TCP, where UDP is blocked",
                verdict(result(&r.name, "turn-tcp")),
            );
        }
        if r.tls_port != 0 {
            row(
                r,
                r.tls_port.to_string(),
                "TCP/TLS",
                OUT,
                "TURN over TLS: the path through strict firewalls",
                verdict(result(&r.name, "turn-tls")),
            );
            if let Some(p) = result(&r.name, "turn-tls-proxy") {
                row(
                    r,
                    r.tls_port.to_string(),
                    "HTTP CONNECT",
                    OUT,
                    "the same through the web proxy (no TLS inspection)",
                    verdict(Some(p)),
                );
            }
        }
        for p in r
            .echo_udp
            .iter()
            .flat_map(|s| s.ports().unwrap_or_default())
        {
            row(
                r,
                p.to_string(),
                "UDP",
                OUT,
                "application media port (echo test)",
                verdict(result(&r.name, &format!("echo-udp:{p}"))),
            );
        }
        for p in r
            .echo_tcp
            .iter()
            .flat_map(|s| s.ports().unwrap_or_default())
        {
            row(
                r,
                p.to_string(),
                "TCP",
                OUT,
                "application port (echo test)",
                verdict(result(&r.name, &format!("echo-tcp:{p}"))),
            );
        }
    }
    // A host that answered on no path: its blocked rows say so, the relay the first suspect.
    for row in &mut rows {
        if row.verdict == Verdict::Blocked
            && row.protocol != "HTTP CONNECT"
            && silent(results, &row.region)
        {
            row.verdict = Verdict::Silent;
        }
    }
    rows
}

/// Fills in each row's addresses from `resolved` (host, addresses).
pub fn add_addresses(rows: &mut [FirewallRow], resolved: &[(String, Vec<String>)]) {
    for row in rows {
        if let Some((_, a)) = resolved.iter().find(|(h, _)| *h == row.destination) {
            row.addresses = a.clone();
        }
    }
}

/// The firewall table as text.
pub fn firewall(rows: &[FirewallRow]) -> String {
    let mut out = format!(
        "{:<28} {:<18} {:<12} {:<12} {:<10} {:<56} {}\n",
        "DESTINATION", "ADDRESSES", "PORT", "PROTOCOL", "DIRECTION", "PURPOSE", "FOUND FROM HERE"
    );
    for r in rows {
        let found = if r.detail.is_empty() {
            r.verdict.label().to_owned()
        } else {
            format!("{}: {}", r.verdict.label(), r.detail)
        };
        let addresses = if r.addresses.is_empty() {
            "-".to_owned()
        } else {
            r.addresses.join(",")
        };
        out += &format!(
            "{:<28} {addresses:<18} {:<12} {:<12} {:<10} {:<56} {found}\n",
            r.destination, r.port, r.protocol, r.direction, r.purpose
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::Failure as F;

    fn failed(path: &str, f: F, reached: bool, allocated: bool) -> PathResult {
        let mut r = PathResult::new("r", path).failed(f);
        r.reached = reached;
        r.allocation_ms = allocated.then_some(1.0);
        r
    }

    fn timeout() -> F {
        F::Timeout("no answer".into())
    }

    #[test]
    fn verdicts_tell_apart_what_was_seen() {
        let v = |r: PathResult| verdict(Some(&r)).0;
        let udp = "turn-udp";
        assert_eq!(v(failed(udp, timeout(), false, false)), Verdict::Blocked);
        assert_eq!(
            v(failed(udp, timeout(), true, false)),
            Verdict::NotAnswering
        );
        // The relay allocated: the network reaches it, whatever happened to the relayed data.
        assert_eq!(v(failed(udp, timeout(), true, true)), Verdict::RelayedLost);
        assert_eq!(
            v(failed(udp, F::Refused("connect".into()), false, false)),
            Verdict::Refused
        );
        assert_eq!(
            v(failed(udp, F::Reset("TLS handshake".into()), true, false)),
            Verdict::Blocked
        );
        assert_eq!(
            v(failed(
                udp,
                F::Status(401, "Unauthorized".into()),
                true,
                false
            )),
            Verdict::RelayRefused
        );
        assert_eq!(
            v(failed(udp, F::Inspected("issued by X".into()), true, false)),
            Verdict::Inspected
        );
        assert_eq!(
            v(failed(udp, F::Untrusted("self-signed".into()), true, false)),
            Verdict::Untrusted
        );
        assert_eq!(
            v(failed(udp, F::NotTurn("an echo".into()), true, false)),
            Verdict::NotTurn
        );
        assert_eq!(
            v(failed(udp, F::Local("no route".into()), false, false)),
            Verdict::Local
        );
        assert_eq!(
            v(failed(udp, F::Dns("no such host".into()), false, false)),
            Verdict::Unknown
        );
        let proxy = "turn-tls-proxy";
        assert_eq!(
            v(failed(
                proxy,
                F::ProxyUnreachable("refused".into()),
                false,
                false
            )),
            Verdict::ProxyUnreachable
        );
        assert_eq!(
            v(failed(
                proxy,
                F::Proxy(403, "Forbidden".into()),
                false,
                false
            )),
            Verdict::ProxyRefused
        );
        assert_eq!(
            v(failed(
                proxy,
                F::Proxy(502, "Bad Gateway".into()),
                false,
                false
            )),
            Verdict::BehindProxy
        );
        assert_eq!(
            v(failed(proxy, timeout(), true, false)),
            Verdict::BehindProxy
        );
        assert_eq!(verdict(None).0, Verdict::NotTested);
    }

    #[test]
    fn a_host_silent_on_every_path_is_said_to_be_and_one_that_answered_is_not() {
        let down = vec![
            failed("stun-udp", timeout(), false, false),
            failed("turn-udp", timeout(), false, false),
            failed(
                "turn-tcp",
                F::Unreachable("no route to host".into()),
                false,
                false,
            ),
        ];
        assert!(path_verdict(&down, "r", "turn-tcp").starts_with(Phrase::Silent.text()));
        let mut up = down.clone();
        up[2] = failed("turn-tcp", F::Refused("connect".into()), false, false);
        assert!(path_verdict(&up, "r", "turn-udp").starts_with(Phrase::Blocked.text()));
    }

    #[test]
    fn the_relay_ports_row_names_the_port_tried_and_flags_one_outside_the_range() {
        let mut r = failed("turn-udp", timeout(), true, true);
        let range = "49152-65535";
        assert_eq!(relayed_verdict(Some(&r), range).1, Verdict::NotTested);
        r.peer = Some(crate::select::PeerCheck {
            relayed: "192.0.2.1:50000".into(),
            inbound: true,
            outbound: false,
            error: Some("timeout: the answers did not get back in".into()),
            seen_as: None,
        });
        let (port, v, detail) = relayed_verdict(Some(&r), range);
        assert_eq!((port.as_str(), v), (range, Verdict::Blocked));
        assert!(detail.starts_with("port 50000 tried"), "{detail}");
        // Refused as a peer: nothing was sent to the relay ports, so they are not tested.
        r.peer = Some(crate::select::PeerCheck {
            relayed: "192.0.2.1:50000".into(),
            error: Some("403 Forbidden".into()),
            seen_as: Some("127.0.0.1:40000".into()),
            ..Default::default()
        });
        let (_, v, detail) = relayed_verdict(Some(&r), range);
        assert_eq!(v, Verdict::NotTested);
        assert!(
            detail.contains("refuses 127.0.0.1:40000 as a peer"),
            "{detail}"
        );
        r.peer = Some(crate::select::PeerCheck {
            relayed: "192.0.2.1:40002".into(),
            inbound: true,
            outbound: true,
            ..Default::default()
        });
        let (port, v, detail) = relayed_verdict(Some(&r), range);
        assert_eq!((port.as_str(), v), ("40002", Verdict::Open));
        assert!(detail.contains("outside 49152-65535"), "{detail}");
        assert!(in_ranges("50000,50002-50003", 50003) && !in_ranges("50000,50002-50003", 50001));
    }
}
