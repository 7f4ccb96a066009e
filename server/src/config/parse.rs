//! The string values of the file and the flags: listener URLs, addresses, port ranges,
//! networks, echo specs.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::{Listener, LogFormat, Transport, MAX_ECHO_PORTS};

/// An echo port or range: `IP:PORT` or `IP:MIN-MAX`, IPv6 in brackets (`[::]:5055-5058`).
/// Port 0 (ephemeral) only alone.
pub fn parse_echo_spec(s: &str) -> Result<Vec<SocketAddr>, String> {
    let bad = |why: &str| format!("{s:?}: {why} (expected IP:PORT or IP:MIN-MAX)");
    let (host, ports) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.contains(':') && !s.starts_with('[') {
        return Err(bad("an IPv6 address needs brackets"));
    }
    let ip: IpAddr = host.parse().map_err(|_| bad("not an IP address"))?;
    let port = |p: &str| p.trim().parse::<u16>().map_err(|_| bad("not a port"));
    let (min, max) = match ports.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a == 0 || a > b {
                return Err(bad("a range needs 1 <= MIN <= MAX"));
            }
            (a, b)
        }
        None => {
            let p = port(ports)?;
            (p, p)
        }
    };
    if usize::from(max - min) >= MAX_ECHO_PORTS {
        return Err(bad(&format!("more than {MAX_ECHO_PORTS} ports")));
    }
    Ok((min..=max).map(|p| SocketAddr::new(ip, p)).collect())
}

pub(super) fn parse_all<T>(
    items: &[String],
    f: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    items.iter().map(|s| f(s)).collect()
}

/// `udp://IP:PORT`, `tcp://IP:PORT` or `tls://IP:PORT`, optionally `?proxy-protocol`.
pub fn parse_listen(s: &str) -> Result<Listener, String> {
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err(format!(
            "{s:?}: expected udp://IP:PORT, tcp://IP:PORT or tls://IP:PORT"
        ));
    };
    let transport = match scheme {
        "udp" => Transport::Udp,
        "tcp" => Transport::Tcp,
        "tls" => Transport::Tls,
        other => {
            return Err(format!(
                "{s:?}: unsupported transport {other:?} (supported: udp, tcp, tls)"
            ))
        }
    };
    let (addr, proxy_protocol) = match rest.split_once('?') {
        None => (rest, false),
        Some((a, "proxy-protocol")) if transport != Transport::Udp => (a, true),
        Some((_, q)) => {
            return Err(format!(
                "{s:?}: unknown option {q:?} (stream listeners take ?proxy-protocol)"
            ))
        }
    };
    let addr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Ok(Listener {
        transport,
        addr,
        proxy_protocol,
    })
}

pub(super) fn parse_external(s: &str) -> Result<(IpAddr, Option<IpAddr>), String> {
    let (public, private) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let public = public.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let private = private
        .map(|p| p.parse().map_err(|e| format!("{s:?}: {e}")))
        .transpose()?;
    Ok((public, private))
}

pub(super) fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?}: expected MIN-MAX, 1024 <= MIN <= MAX <= 65535");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a < 1024 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

pub(super) fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?}: not a CIDR (e.g. 203.0.113.0/24) or an IP address"))
}

pub(super) fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("{other:?}: expected text or json")),
    }
}
