//! `measure --report FILE.html`: one self-contained page to attach to a ticket. No script,
//! font, style sheet or image from anywhere: the style is inline, the charts are SVG.
//!
//! What it holds: how the probe was run, what to do (the fixes in plain words, from the
//! verdicts), the firewall table with the addresses each host resolved to, each path's
//! figures, and an RTT (and, when measured, bandwidth) chart per region.

use std::fmt::Write as _;

use crate::regions::Region;
use turnpike_proto::advice::Phrase;

use crate::report::{FirewallRow, Verdict, RELAYED};
use crate::select::{Candidate, PathResult};

/// How the run was made, for the report's first lines.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// UTC, `YYYY-MM-DD HH:MM:SS`.
    pub time: String,
    pub version: String,
    pub host: String,
    pub proxy: Option<String>,
    pub regions_file: String,
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn class(v: Verdict) -> &'static str {
    match v {
        Verdict::Open => "ok",
        Verdict::NotTested => "none",
        Verdict::RelayRefused
        | Verdict::NotAnswering
        | Verdict::NotTurn
        | Verdict::Unknown
        | Verdict::RelayedLost
        | Verdict::Untrusted
        | Verdict::Local
        | Verdict::ProxyUnreachable
        | Verdict::BehindProxy => "warn",
        Verdict::Blocked
        | Verdict::Refused
        | Verdict::Inspected
        | Verdict::Silent
        | Verdict::ProxyRefused => "fail",
    }
}

/// How a row's path is named in a sentence: `UDP 3478`, `TLS 443`.
fn path_name(r: &FirewallRow) -> String {
    let proto = match r.protocol {
        "TCP/TLS" => "TLS",
        "HTTP CONNECT" => "TLS through the proxy",
        p => p,
    };
    format!("{proto} {}", r.port)
}

/// Whether a row's verdict shows the host itself is up: something that speaks TURN or TLS
/// for it answered (a refusal or an accepted connection may be a firewall's).
fn host_up(v: Verdict) -> bool {
    matches!(
        v,
        Verdict::Open
            | Verdict::RelayRefused
            | Verdict::RelayedLost
            | Verdict::Untrusted
            | Verdict::NotTurn
    )
}

/// The fixes, in the order to try them: for a host that answered on no path, that the relay
/// be checked first (once per host); then one per row that needs one.
fn fixes(rows: &[FirewallRow]) -> Vec<String> {
    let mut out = Vec::new();
    let mut silent: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.verdict == Verdict::Silent) {
        if silent.contains(&r.region.as_str()) {
            continue;
        }
        silent.push(&r.region);
        let paths: Vec<String> = rows
            .iter()
            .filter(|o| o.region == r.region && o.verdict == Verdict::Silent)
            .map(path_name)
            .collect();
        out.push(Phrase::FixSilent.say(&[("host", &r.destination), ("paths", &paths.join(", "))]));
    }
    out.extend(rows.iter().filter_map(|r| fix(r, rows)));
    out
}

/// What to do about one firewall row, in plain words (the shared [`Phrase`] table); None when
/// nothing is to be done. A blocked TURN path says which other path carries calls meanwhile.
fn fix(r: &FirewallRow, rows: &[FirewallRow]) -> Option<String> {
    let (h, p, d) = (r.destination.as_str(), r.port.as_str(), r.detail.as_str());
    let at = [("host", h), ("port", p), ("detail", d)];
    let text = match r.verdict {
        Verdict::Open | Verdict::NotTested | Verdict::Silent => return None,
        Verdict::Blocked if r.purpose == RELAYED => {
            Phrase::FixRelayPorts.say(&[("host", h), ("ports", p)])
        }
        Verdict::Blocked => {
            let fix = match r.protocol {
                "UDP" => Phrase::FixUdp,
                "TCP/TLS" => Phrase::FixTls,
                "HTTP CONNECT" => Phrase::FixProxy,
                _ => Phrase::FixTcp,
            };
            let fallback = rows
                .iter()
                .filter(|o| o.destination == r.destination && o.verdict == Verdict::Open)
                .find_map(|o| match o.protocol {
                    "TCP/TLS" => Some(format!("TLS on port {}", o.port)),
                    "TCP" if o.purpose.starts_with("TURN") => {
                        Some(format!("TCP on port {}", o.port))
                    }
                    "UDP" if o.purpose.starts_with("STUN") => {
                        Some(format!("UDP on port {}", o.port))
                    }
                    _ => None,
                });
            let then = match (
                r.purpose.starts_with("STUN") || r.purpose.starts_with("TURN"),
                fallback,
            ) {
                (false, _) => String::new(),
                (true, Some(other)) => format!(" {}", Phrase::Fallback.say(&[("other", &other)])),
                (true, None) => format!(" {}", Phrase::NoFallback.text()),
            };
            fix.say(&at) + &then
        }
        Verdict::Refused => {
            let others: Vec<String> = rows
                .iter()
                .filter(|o| o.region == r.region && o.purpose != RELAYED && host_up(o.verdict))
                .map(path_name)
                .collect();
            let up = if others.is_empty() {
                String::new()
            } else {
                format!(" (the host is up: it answered on {})", others.join(", "))
            };
            Phrase::FixRefused.say(&[("host", h), ("port", p), ("up", &up)])
        }
        Verdict::NotAnswering => Phrase::FixNotAnswering.say(&at),
        Verdict::NotTurn => Phrase::FixNotTurn.say(&at),
        Verdict::RelayRefused => Phrase::FixRelayRefused.say(&at),
        Verdict::RelayedLost => Phrase::FixRelayedLost.say(&at),
        Verdict::Inspected => Phrase::FixInspected.say(&at),
        Verdict::Untrusted => Phrase::FixUntrusted.say(&at),
        Verdict::Unknown => Phrase::FixUnknown.say(&at),
        Verdict::Local => Phrase::FixLocal.say(&at),
        Verdict::ProxyUnreachable => Phrase::FixProxyUnreachable.say(&at),
        Verdict::ProxyRefused if d.contains(" 407") => Phrase::FixProxyAuth.say(&at),
        Verdict::ProxyRefused => Phrase::FixProxy.say(&at),
        Verdict::BehindProxy => Phrase::FixBehindProxy.say(&at),
    };
    Some(text)
}

/// A horizontal bar chart: one labelled bar per (label, value), scaled to the largest.
fn bars(title: &str, unit: &str, items: &[(String, f64)]) -> String {
    let max = items
        .iter()
        .map(|(_, v)| *v)
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let (w, row, left) = (640.0, 26.0, 170.0);
    let h = 30.0 + row * items.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\"><title>{}</title><text x=\"0\" y=\"16\" class=\"ct\">{}</text>",
        esc(title),
        esc(title)
    );
    for (i, (label, v)) in items.iter().enumerate() {
        let y = 26.0 + row * i as f64;
        let len = (w - left - 90.0) * v / max;
        let _ = write!(
            svg,
            "<text x=\"0\" y=\"{:.0}\" class=\"cl\">{}</text>\
             <rect x=\"{left}\" y=\"{:.0}\" width=\"{len:.1}\" height=\"16\" class=\"bar\"/>\
             <text x=\"{:.1}\" y=\"{:.0}\" class=\"cl\">{v:.2} {unit}</text>",
            y + 13.0,
            esc(label),
            y,
            left + len + 6.0,
            y + 13.0
        );
    }
    svg + "</svg>"
}

/// The whole page.
pub fn report(
    info: &RunInfo,
    regions: &[Region],
    results: &[PathResult],
    rows: &[FirewallRow],
    selected: Option<&Candidate>,
) -> String {
    let mut b = String::new();
    b += "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
          <title>Turnpike network report</title><style>\
          body{font:14px/1.45 sans-serif;margin:24px;color:#1f2328;max-width:1100px}\
          h1{font-size:22px}h2{font-size:17px;margin-top:28px}\
          table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #d0d7de;\
          padding:4px 8px;text-align:left;vertical-align:top}th{background:#f6f8fa}\
          .v{font-weight:bold;color:#fff;border-radius:4px;padding:2px 6px;white-space:nowrap}\
          .ok{background:#1a7f37}.fail{background:#cf222e}.warn{background:#9a6700}\
          .none{background:#6e7781}.bar{fill:#0969da}.ct{font-weight:bold;font-size:13px}\
          .cl{font-size:12px}li{margin:4px 0}</style></head><body>";
    b += "<h1>Turnpike network report</h1>";
    let _ = write!(
        b,
        "<p id=\"run\">Run at {} UTC from {} with turnpike-probe {}, regions from {}; {}.</p>",
        esc(&info.time),
        esc(&info.host),
        esc(&info.version),
        esc(&info.regions_file),
        match &info.proxy {
            Some(p) => format!("through the web proxy {}", esc(p)),
            None => "no web proxy".into(),
        }
    );
    let _ = write!(
        b,
        "<p id=\"summary\">{}</p>",
        match selected {
            Some(c) => format!(
                "Calls would use <b>{}</b> over <b>{}</b> ({:.1} ms median round trip).",
                esc(&c.region),
                esc(&c.path),
                c.median_ms
            ),
            None => "<b>No relay is reachable over TURN from here: calls will fail.</b>".into(),
        }
    );

    b += "<h2>What to do</h2><ul id=\"fixes\">";
    let mut fixes: Vec<String> = fixes(rows);
    for r in results {
        if let Some(bw) = r.bandwidth.filter(|bw| !bw.meets) {
            let path = format!("{} over {}", r.region, r.path);
            let (got, need) = (
                format!("{:.2}", bw.sustained_mbps),
                format!("{:.2}", bw.required_mbps),
            );
            fixes.push(match bw.relay_limit_mbps.filter(|_| bw.limited_by_relay) {
                Some(limit) => Phrase::FixQuota.say(&[
                    ("path", &path),
                    ("got", &got),
                    ("need", &need),
                    ("limit", &format!("{limit:.2}")),
                ]),
                None => Phrase::FixBandwidth.say(&[
                    ("path", &path),
                    ("got", &got),
                    ("need", &need),
                    ("loss", &format!("{:.1}", bw.loss * 100.0)),
                    ("video", bw.video),
                ]),
            });
        }
    }
    fixes.dedup();
    if fixes.is_empty() {
        b += "<li>Nothing: every path probed works.</li>";
    }
    for f in &fixes {
        let _ = write!(b, "<li>{}</li>", esc(f));
    }
    b += "</ul>";

    b += "<h2>Firewall</h2><table id=\"firewall\"><tr><th>Destination</th><th>Addresses</th>\
          <th>Port</th><th>Protocol</th><th>Direction</th><th>Purpose</th><th>Found from here</th></tr>";
    for r in rows {
        let addresses = r.addresses.join(", ");
        let _ = write!(
            b,
            "<tr data-verdict=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td><span class=\"v {}\">{}</span> {}</td></tr>",
            class(r.verdict),
            esc(&r.destination),
            esc(&addresses),
            esc(&r.port),
            esc(r.protocol),
            esc(r.direction),
            esc(r.purpose),
            class(r.verdict),
            esc(r.verdict.label()),
            esc(&r.detail)
        );
    }
    b += "</table>";

    for region in regions {
        let _ = write!(b, "<h2>{}</h2>", esc(&region.name));
        b += "<table class=\"paths\"><tr><th>Path</th><th>Works</th><th>RTT median ms</th>\
              <th>p95 ms</th><th>Jitter ms</th><th>Loss</th><th>MOS</th><th>Bandwidth</th>\
              <th>Detail</th></tr>";
        let mine: Vec<&PathResult> = results.iter().filter(|r| r.region == region.name).collect();
        for r in &mine {
            let f = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.1}"));
            let bw = r
                .bandwidth
                .map_or("-".to_owned(), |bw| crate::report::bandwidth_text(&bw));
            let _ = write!(
                b,
                "<tr><td>{}</td><td><span class=\"v {}\">{}</span></td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&r.path),
                if r.reachable { "ok" } else { "fail" },
                if r.reachable { "yes" } else { "no" },
                f(r.rtt_ms.map(|x| x.median)),
                f(r.rtt_ms.map(|x| x.p95)),
                f(r.jitter_ms),
                r.loss.map_or("-".into(), |l| format!("{:.0}%", l * 100.0)),
                r.voice
                    .map_or("-".into(), |v| format!("{:.1} ({})", v.mos, v.rating)),
                esc(&bw),
                esc(r.error.as_deref().unwrap_or(""))
            );
        }
        b += "</table>";
        let rtts: Vec<(String, f64)> = mine
            .iter()
            .filter_map(|r| Some((r.path.clone(), r.rtt_ms?.median)))
            .collect();
        if !rtts.is_empty() {
            b += &bars(&format!("{}: median round trip", region.name), "ms", &rtts);
        }
        let bws: Vec<(String, f64)> = mine
            .iter()
            .filter_map(|r| Some((r.path.clone(), r.bandwidth?.sustained_mbps)))
            .collect();
        if !bws.is_empty() {
            b += &bars(
                &format!("{}: bandwidth through the relay", region.name),
                "Mbit/s",
                &bws,
            );
        }
    }
    b += "</body></html>\n";
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }
}
