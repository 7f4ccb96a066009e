//! What the probe prints: a table for people, JSON for programs, a WebRTC `iceServers`
//! configuration, and the firewall table for IT departments.

use serde_json::json;

use crate::probe::credentials;
use crate::regions::Region;
use crate::select::{Candidate, PathResult};

fn num(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into())
}

/// A fixed-width table, one line per region and path, the selection last.
pub fn table(results: &[PathResult], selected: Option<&Candidate>) -> String {
    let mut out = format!(
        "{:<12} {:<16} {:<5} {:>7} {:>7} {:>7} {:>7} {:>6} {:>7} {:>7}  {}\n",
        "REGION", "PATH", "OK", "MIN", "MEDIAN", "P95", "JITTER", "LOSS", "TLS", "ALLOC", "DETAIL"
    );
    for r in results {
        let rtt = r.rtt_ms;
        let detail = match (&r.error, &r.mapped) {
            (Some(e), _) => e.clone(),
            (None, Some(m)) => format!("seen as {m}"),
            (None, None) => String::new(),
        };
        out += &format!(
            "{:<12} {:<16} {:<5} {:>7} {:>7} {:>7} {:>7} {:>6} {:>7} {:>7}  {}\n",
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
            num(r.tls_handshake_ms),
            num(r.allocation_ms),
            detail
        );
    }
    out += "(milliseconds; TURN paths time a datagram sent through the relay from one allocation to another)\n";
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

/// Destination, port, protocol, purpose, and what the probe found from where it ran: the
/// table enterprise firewall documents give IT departments.
pub fn firewall(regions: &[Region], results: &[PathResult]) -> String {
    let found = |region: &str, path: &str| match results
        .iter()
        .find(|r| r.region == region && r.path == path)
    {
        Some(r) if r.reachable => "open".to_owned(),
        // A name that does not resolve says nothing about the firewall.
        Some(r) if r.error.as_deref().is_some_and(|e| e.starts_with("dns")) => {
            format!("UNKNOWN ({})", r.error.clone().unwrap_or_default())
        }
        Some(r) => format!("BLOCKED ({})", r.error.clone().unwrap_or_default()),
        None => "not probed".to_owned(),
    };
    let mut out = format!(
        "{:<28} {:<12} {:<12} {:<56} {}\n",
        "DESTINATION", "PORT", "PROTOCOL", "PURPOSE", "FOUND FROM HERE"
    );
    let mut row = |dest: &str, port: String, proto: &str, purpose: &str, status: String| {
        out += &format!("{dest:<28} {port:<12} {proto:<12} {purpose:<56} {status}\n");
    };
    for r in regions {
        if r.udp_port != 0 {
            row(
                &r.host,
                r.udp_port.to_string(),
                "UDP",
                "STUN and TURN (best call quality); replies must get in",
                found(&r.name, "turn-udp"),
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
                &r.host,
                relay_ports,
                "UDP",
                "relayed media (return traffic of the flows above)",
                found(&r.name, "turn-udp"),
            );
        }
        if r.tcp_port != 0 {
            row(
                &r.host,
                r.tcp_port.to_string(),
                "TCP",
                "TURN over TCP, where UDP is blocked",
                found(&r.name, "turn-tcp"),
            );
        }
        if r.tls_port != 0 {
            row(
                &r.host,
                r.tls_port.to_string(),
                "TCP/TLS",
                "TURN over TLS: the path through strict firewalls",
                found(&r.name, "turn-tls"),
            );
            if results.iter().any(|x| x.path == "turn-tls-proxy") {
                row(
                    &r.host,
                    r.tls_port.to_string(),
                    "HTTP CONNECT",
                    "the same through the web proxy (no TLS inspection)",
                    found(&r.name, "turn-tls-proxy"),
                );
            }
        }
        for p in r
            .echo_udp
            .iter()
            .flat_map(|s| s.ports().unwrap_or_default())
        {
            row(
                &r.host,
                p.to_string(),
                "UDP",
                "application media port (echo test)",
                found(&r.name, &format!("echo-udp:{p}")),
            );
        }
        for p in r
            .echo_tcp
            .iter()
            .flat_map(|s| s.ports().unwrap_or_default())
        {
            row(
                &r.host,
                p.to_string(),
                "TCP",
                "application port (echo test)",
                found(&r.name, &format!("echo-tcp:{p}")),
            );
        }
    }
    out
}
