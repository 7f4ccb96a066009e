//! `measure --report FILE.html`: one self-contained page to attach to a ticket. No script,
//! font, style sheet or image from anywhere: the style is inline, the charts are SVG.
//!
//! What it holds: how the probe was run, what to do (the fixes in plain words, from the
//! verdicts), the firewall table with the addresses each host resolved to, each path's
//! figures, and an RTT (and, when measured, bandwidth) chart per region.

use std::fmt::Write as _;

use crate::regions::Region;
use crate::report::{FirewallRow, Verdict};
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
    /// Each region's host and the addresses it resolved to.
    pub resolved: Vec<(String, Vec<String>)>,
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
        Verdict::RelayRefused | Verdict::NotAnswering | Verdict::Unknown => "warn",
        Verdict::RelayedLost => "warn",
        Verdict::Blocked | Verdict::Refused | Verdict::Inspected => "fail",
    }
}

/// What to do about one firewall row, in plain words; None when nothing is to be done.
fn fix(r: &FirewallRow) -> Option<String> {
    let (h, p, proto) = (&r.destination, &r.port, r.protocol);
    Some(match r.verdict {
        Verdict::Open | Verdict::NotTested => return None,
        Verdict::Blocked if proto == "UDP" => format!(
            "Allow UDP from this network to {h} port {p}, and the replies back in. Until then \
             calls fall back to TURN over TCP or TLS, which adds delay."
        ),
        Verdict::Blocked => format!("Allow {proto} connections from this network to {h} port {p}."),
        Verdict::Refused => format!(
            "{h} port {p} answered that nothing listens there: the relay is not running there or \
             the port is wrong (or a firewall rejects the connection rather than dropping it): \
             tell the relay's operator first."
        ),
        Verdict::NotAnswering => format!(
            "Something at {h} port {p} accepts connections but does not answer as a TURN relay \
             (a proxy, or another service on that address): check the address and the proxy."
        ),
        Verdict::RelayRefused => format!(
            "The relay at {h} refused the request ({}): check the user name, password or shared \
             secret. The network is open.",
            r.detail
        ),
        Verdict::RelayedLost => format!(
            "The relay at {h} answered on port {p}, but data relayed through it did not come \
             back: ask the relay's operator to check its relay ports and peer policy."
        ),
        Verdict::Inspected => format!(
            "A proxy inspects TLS to {h}: add {h} to its TLS-inspection bypass list, or TURN over \
             TLS cannot work."
        ),
        Verdict::Unknown => format!("{h} does not resolve: check the name and the DNS servers."),
    })
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
    let mut fixes: Vec<String> = rows.iter().filter_map(fix).collect();
    for r in results {
        if let Some(bw) = r.bandwidth.filter(|bw| !bw.meets) {
            fixes.push(format!(
                "{} over {} carried {:.2} of the {:.2} Mbit/s required ({:.1}% lost): allow more \
                 bandwidth to the relay, or expect video at {} at most.",
                r.region,
                r.path,
                bw.received_mbps,
                bw.required_mbps,
                bw.loss * 100.0,
                bw.video
            ));
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
        let addresses = info
            .resolved
            .iter()
            .find(|(h, _)| *h == r.destination)
            .map(|(_, a)| a.join(", "))
            .unwrap_or_default();
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
            let bw = r.bandwidth.map_or("-".to_owned(), |bw| {
                format!(
                    "{:.2} of {:.2} Mbit/s, {}",
                    bw.received_mbps,
                    bw.required_mbps,
                    if bw.meets { "meets" } else { "does not meet" }
                )
            });
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
            .filter_map(|r| Some((r.path.clone(), r.bandwidth?.received_mbps)))
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
