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
                "bandwidth: {} {}: {:.2} of {:.2} Mbit/s through the relay, loss {:.1}%, {} ms under load: {} (video up to {})\n",
                r.region,
                r.path,
                b.received_mbps,
                b.required_mbps,
                b.loss * 100.0,
                b.rtt_ms.map_or("-".into(), |v| format!("{v:.1}")),
                if b.meets { Phrase::Meets } else { Phrase::MeetsNot }.text(),
                b.video
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
    /// Packets or connections are dropped or cut on the way (timeout without any answer,
    /// reset, a proxy refusing).
    Blocked,
    /// The host answered that nothing listens there (ICMP port unreachable, TCP reset to the
    /// connection attempt): the service is down or elsewhere, not a firewall.
    Refused,
    /// Something accepted the connection (or answered) but not as a TURN relay would.
    NotAnswering,
    /// The relay answered and refused (401, 403...): the network is open, the credentials or
    /// the relay's policy are not.
    RelayRefused,
    /// A TLS certificate that is not the relay's: a proxy on the way inspects TLS.
    Inspected,
    /// The relay allocated, but data relayed through it did not come back: this network
    /// reaches the relay; its relay ports or peer policy are the relay operator's to check.
    RelayedLost,
    /// The name does not resolve.
    Unknown,
    /// Not tested from here (the path was not probed, or what it depends on failed first).
    NotTested,
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
            Verdict::RelayRefused => Phrase::RelayRefused,
            Verdict::Inspected => Phrase::Inspected,
            Verdict::RelayedLost => Phrase::RelayedLost,
            Verdict::Unknown => Phrase::Unknown,
            Verdict::NotTested => Phrase::NotTested,
        }
    }
}

/// The purpose of the relay ports' row.
pub const RELAYED: &str = "relayed media, to and from peers that do not use TURN";

/// One row of the firewall table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FirewallRow {
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

/// The verdict on a path from its result.
fn verdict(r: Option<&PathResult>) -> (Verdict, String) {
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
    let kind = e.split(':').next().unwrap_or("");
    let v = match kind {
        "dns" => Verdict::Unknown,
        "tls-inspection" => Verdict::Inspected,
        "refused" => Verdict::Refused,
        "reset" | "proxy" => Verdict::Blocked,
        "timeout" if r.reached => Verdict::NotAnswering,
        "timeout" => Verdict::Blocked,
        _ if e.starts_with(|c: char| c.is_ascii_digit()) => Verdict::RelayRefused,
        _ if r.reached => Verdict::NotAnswering,
        _ => Verdict::Blocked,
    };
    (v, e)
}

/// A path's verdict in words, as the firewall table and the capture's comments give it.
pub fn path_verdict(r: Option<&PathResult>) -> String {
    let (v, detail) = verdict(r);
    if detail.is_empty() {
        v.label().to_owned()
    } else {
        format!("{}: {detail}", v.label())
    }
}

/// The relay ports row follows the UDP TURN path's peer check: a plain UDP socket here
/// exchanged datagrams with a relayed address both ways (open), they were dropped one way
/// (blocked), the relay refused this network as a peer, or no allocation was made, so the
/// relay ports were never tried.
fn relayed_verdict(r: Option<&PathResult>) -> (Verdict, String) {
    let Some(r) = r else {
        return (Verdict::NotTested, "not probed".into());
    };
    match &r.peer {
        Some(p) if p.inbound && p.outbound => (
            Verdict::Open,
            format!("datagrams crossed {} both ways", p.relayed),
        ),
        Some(p) => {
            let e = p.error.clone().unwrap_or_default();
            if e.starts_with(|c: char| c.is_ascii_digit()) {
                (
                    Verdict::RelayRefused,
                    format!("{e} (the relay's peer policy refuses this network's address)"),
                )
            } else {
                (Verdict::Blocked, e)
            }
        }
        None if r.allocation_ms.is_some() => (
            Verdict::NotTested,
            "the relay allocated, but the peer check did not run".into(),
        ),
        None => (
            Verdict::NotTested,
            "no UDP allocation was made; see the turn-udp path".into(),
        ),
    }
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
            row(
                r,
                relay_ports,
                "UDP",
                "out and in",
                RELAYED,
                relayed_verdict(result(&r.name, "turn-udp")),
            );
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

    fn failed(error: &str, reached: bool, allocated: bool) -> PathResult {
        let mut r = PathResult::new("r", "turn-udp").failed(error.into());
        r.reached = reached;
        r.allocation_ms = allocated.then_some(1.0);
        r
    }

    #[test]
    fn verdicts_tell_apart_what_was_seen() {
        let v = |r: PathResult| verdict(Some(&r)).0;
        assert_eq!(
            v(failed("timeout: no answer", false, false)),
            Verdict::Blocked
        );
        assert_eq!(
            v(failed("timeout: no answer", true, false)),
            Verdict::NotAnswering
        );
        // The relay allocated: the network reaches it, whatever happened to the relayed data.
        assert_eq!(
            v(failed("timeout: no answer", true, true)),
            Verdict::RelayedLost
        );
        assert_eq!(
            v(failed("refused: connect", false, false)),
            Verdict::Refused
        );
        assert_eq!(
            v(failed("reset: TLS handshake: reset", true, false)),
            Verdict::Blocked
        );
        assert_eq!(
            v(failed("401 Unauthorized", true, false)),
            Verdict::RelayRefused
        );
        assert_eq!(
            v(failed("tls-inspection: issued by X", true, false)),
            Verdict::Inspected
        );
        assert_eq!(
            v(failed("dns: no such host", false, false)),
            Verdict::Unknown
        );
        assert_eq!(verdict(None).0, Verdict::NotTested);
        let mut r = failed("timeout: no answer", true, true);
        assert_eq!(relayed_verdict(Some(&r)).0, Verdict::NotTested);
        r.peer = Some(crate::select::PeerCheck {
            relayed: "192.0.2.1:50000".into(),
            inbound: true,
            outbound: false,
            error: Some("timeout: the answers did not get back in".into()),
        });
        assert_eq!(relayed_verdict(Some(&r)).0, Verdict::Blocked);
        r.peer = Some(crate::select::PeerCheck {
            error: Some("403 Forbidden".into()),
            ..Default::default()
        });
        assert_eq!(relayed_verdict(Some(&r)).0, Verdict::RelayRefused);
        r.peer = Some(crate::select::PeerCheck {
            inbound: true,
            outbound: true,
            ..Default::default()
        });
        assert_eq!(relayed_verdict(Some(&r)).0, Verdict::Open);
        assert_eq!(
            relayed_verdict(Some(&failed("timeout: no answer", false, false))).0,
            Verdict::NotTested
        );
    }
}
