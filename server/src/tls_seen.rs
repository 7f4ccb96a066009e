//! What the relay saw of its TLS clients, the evidence the browser network test goes by:
//! whether a connection's ClientHello carried GREASE values (RFC 8701: Chromium always sends
//! them, a TLS-inspecting proxy that re-originates the connection usually does not), and the
//! handshakes a client ended with an alert (a certificate it does not trust).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A request extension: what the ClientHello of the request's TLS connection showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTls {
    /// It offered a GREASE cipher suite.
    pub grease: bool,
}

/// Whether a cipher suite list holds a GREASE value (0x0A0A, 0x1A1A, ... 0xFAFA).
pub fn has_grease(suites: &[rustls::CipherSuite]) -> bool {
    suites.iter().any(|s| {
        let v = u16::from(*s);
        v & 0x0F0F == 0x0A0A && v >> 8 == v & 0xFF
    })
}

/// Most sources remembered, refusals kept per source, and how long.
const SOURCES: usize = 4096;
const PER_SOURCE: usize = 8;
const KEPT: Duration = Duration::from_secs(600);

/// The TLS handshakes clients ended with an alert, by source address, for ten minutes.
#[derive(Debug, Default)]
pub struct TlsRefusals {
    by_source: Mutex<HashMap<IpAddr, Vec<(Instant, String)>>>,
}

impl TlsRefusals {
    /// Notes that `source` ended a handshake with `alert`; bounded, the oldest forgotten.
    pub fn record(&self, source: IpAddr, alert: String, now: Instant) {
        let mut m = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= SOURCES && !m.contains_key(&source) {
            m.retain(|_, v| v.last().is_some_and(|(t, _)| now.duration_since(*t) < KEPT));
            if m.len() >= SOURCES {
                return;
            }
        }
        let v = m.entry(source).or_default();
        v.retain(|(t, _)| now.duration_since(*t) < KEPT);
        if v.len() >= PER_SOURCE {
            v.remove(0);
        }
        v.push((now, alert));
    }

    /// The refusals of `source` within the last `within`: how long ago, and the alert.
    pub fn of(&self, source: IpAddr, within: Duration, now: Instant) -> Vec<(Duration, String)> {
        let m = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&source)
            .map(|v| {
                v.iter()
                    .map(|(t, a)| (now.duration_since(*t), a.clone()))
                    .filter(|(age, _)| *age <= within)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The alert a client ended a failed handshake with, when it sent one.
pub fn client_alert(e: &std::io::Error) -> Option<String> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(format!("{a:?}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grease_values_are_recognised() {
        use rustls::CipherSuite;
        assert!(has_grease(&[
            CipherSuite::from(0x3A3A),
            CipherSuite::TLS13_AES_128_GCM_SHA256
        ]));
        assert!(!has_grease(&[
            CipherSuite::TLS13_AES_128_GCM_SHA256,
            CipherSuite::from(0x3A3B)
        ]));
    }

    #[test]
    fn refusals_are_kept_per_source_bounded_and_for_a_while() {
        let r = TlsRefusals::default();
        let (a, b): (IpAddr, IpAddr) = (
            "192.0.2.1".parse().expect("ip"),
            "192.0.2.2".parse().expect("ip"),
        );
        let t0 = Instant::now();
        for i in 0..20 {
            r.record(a, format!("Alert{i}"), t0);
        }
        assert_eq!(r.of(a, KEPT, t0).len(), PER_SOURCE);
        assert!(r.of(b, KEPT, t0).is_empty());
        let later = t0 + Duration::from_secs(5);
        assert!(
            r.of(a, Duration::from_secs(1), later).is_empty(),
            "only the recent ones"
        );
    }
}
