//! Results, their statistics, and the choice of the nearest relay. No IO here.

use serde::Serialize;

/// Round-trip statistics over the samples that came back, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rtt {
    pub min: f64,
    pub median: f64,
    pub p95: f64,
}

/// What one path of one region looked like.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PathResult {
    pub region: String,
    /// `stun-udp`, `turn-udp`, `turn-tcp`, `turn-tls`, `turn-tls-proxy`, `echo-udp:PORT`,
    /// `echo-tcp:PORT`, `websocket`.
    pub path: String,
    pub reachable: bool,
    pub rtt_ms: Option<Rtt>,
    pub jitter_ms: Option<f64>,
    /// Fraction of samples that did not come back.
    pub loss: Option<f64>,
    pub tls_handshake_ms: Option<f64>,
    pub allocation_ms: Option<f64>,
    /// Median time for a datagram to go from the probe through the relay back to the probe
    /// (one allocation to another on the same relay).
    pub relay_rtt_ms: Option<f64>,
    /// The address the relay or echo saw the probe at.
    pub mapped: Option<String>,
    /// Why the path failed: dns, timeout, refused, reset, tls, 401, 403, proxy…, with
    /// details.
    pub error: Option<String>,
    /// `measure --bandwidth`: what the path carried through the relay at the rate asked for.
    pub bandwidth: Option<crate::bandwidth::Bandwidth>,
    /// The voice-call score these figures predict (see [`crate::quality`]).
    pub voice: Option<crate::quality::Voice>,
    /// `turn-udp`: a peer that does not use TURN, on this network, and the relayed address.
    pub peer: Option<PeerCheck>,
    /// Whether the probe got through to the host: a TCP connection was accepted, or the relay
    /// answered at all (an error response counts). A timeout of a path that was reached is a
    /// service not answering, not a firewall dropping packets.
    pub reached: bool,
    /// The TLS certificate the path was shown (TLS paths), verified or not.
    pub tls_certificate: Option<crate::inspect::Seen>,
    /// Why the path failed, as a kind the verdicts tell apart (`error` is its text).
    #[serde(skip)]
    pub failure: Option<crate::turn::Failure>,
}

/// Whether a plain UDP socket where the probe runs, as a peer that does not use TURN would,
/// exchanged datagrams with an allocation's relayed address: what the relay ports row of the
/// firewall table reports. (The two allocations' own round trip stays inside the relay.)
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PeerCheck {
    /// The relayed address tried.
    pub relayed: String,
    /// A datagram from here reached the allocation through the relayed address.
    pub inbound: bool,
    /// The allocation's answer, sent from the relayed address, came back here.
    pub outbound: bool,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// Where the relay saw this machine's plain UDP socket (the peer it was asked to permit).
    pub seen_as: Option<String>,
}

impl PathResult {
    pub fn new(region: &str, path: &str) -> Self {
        PathResult {
            region: region.to_owned(),
            path: path.to_owned(),
            ..Default::default()
        }
    }

    pub fn failed(mut self, failure: crate::turn::Failure) -> Self {
        self.reachable = false;
        self.error = Some(failure.to_string());
        self.failure = Some(failure);
        self
    }

    /// Whether the host (or something at its address) answered on this path in any way: a
    /// path that worked, an accepted connection, a refusal, a reset, a TLS or STUN answer.
    /// Proxy paths say nothing of the host: the proxy answered them.
    pub fn host_answered(&self) -> bool {
        self.path != "turn-tls-proxy"
            && (self.reachable
                || self.reached
                || self.failure.as_ref().is_some_and(|f| f.answered()))
    }

    /// Fills RTT, jitter and loss from the samples that came back out of `sent`.
    pub fn with_samples(mut self, samples: &[f64], sent: usize) -> Self {
        self.reachable = !samples.is_empty();
        self.reached |= self.reachable;
        self.rtt_ms = rtt(samples);
        self.jitter_ms = jitter(samples);
        self.loss = (sent > 0).then(|| 1.0 - samples.len() as f64 / sent as f64);
        self.voice = self.rtt_ms.map(|r| {
            crate::quality::voice(
                r.median,
                self.jitter_ms.unwrap_or(0.0),
                self.loss.unwrap_or(0.0),
            )
        });
        if samples.is_empty() && self.failure.is_none() {
            let f = crate::turn::Failure::Timeout("no answer".into());
            self.error = Some(f.to_string());
            self.failure = Some(f);
        }
        self
    }
}

pub fn rtt(samples: &[f64]) -> Option<Rtt> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| s[(((s.len() as f64) * q).ceil() as usize).clamp(1, s.len()) - 1];
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    Some(Rtt {
        min: s[0],
        median,
        p95: at(0.95),
    })
}

/// Mean absolute difference of consecutive samples (RFC 3550's interarrival jitter, unsmoothed).
pub fn jitter(samples: &[f64]) -> Option<f64> {
    if samples.len() < 2 {
        return None;
    }
    let sum: f64 = samples.windows(2).map(|w| (w[1] - w[0]).abs()).sum();
    Some(sum / (samples.len() - 1) as f64)
}

/// The TURN paths in the default order of preference.
pub const DEFAULT_PREFERENCE: [&str; 4] = ["turn-udp", "turn-tcp", "turn-tls", "turn-tls-proxy"];

/// A region's standing: its best usable path by preference, and that path's median RTT.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub region: String,
    pub path: String,
    pub median_ms: f64,
}

/// Each reachable region's first reachable TURN path in `prefer` order (a transport
/// preference: UDP before TCP before TLS unless told otherwise).
pub fn candidates(results: &[PathResult], prefer: &[String]) -> Vec<Candidate> {
    let mut regions: Vec<&str> = Vec::new();
    for r in results {
        if !regions.contains(&r.region.as_str()) {
            regions.push(&r.region);
        }
    }
    regions
        .into_iter()
        .filter_map(|region| {
            prefer.iter().find_map(|p| {
                let r = results
                    .iter()
                    .find(|r| r.region == region && &r.path == p && r.reachable)?;
                Some(Candidate {
                    region: region.to_owned(),
                    path: p.clone(),
                    median_ms: r.rtt_ms?.median,
                })
            })
        })
        .collect()
}

/// The nearest: reachable first, then the lowest median RTT on its preferred path.
pub fn nearest(results: &[PathResult], prefer: &[String]) -> Option<Candidate> {
    candidates(results, prefer)
        .into_iter()
        .min_by(|a, b| a.median_ms.total_cmp(&b.median_ms))
}

/// Keeps a choice until another region is clearly better, so a watcher does not flap between
/// two relays of nearly the same distance.
#[derive(Debug, Clone)]
pub struct Selector {
    current: Option<Candidate>,
    /// A challenger must be faster by at least this many milliseconds...
    pub margin_ms: f64,
    /// ...and by at least this fraction of the current RTT.
    pub margin_ratio: f64,
}

impl Selector {
    pub fn new(margin_ms: f64, margin_ratio: f64) -> Self {
        Selector {
            current: None,
            margin_ms,
            margin_ratio,
        }
    }

    pub fn current(&self) -> Option<&Candidate> {
        self.current.as_ref()
    }

    /// Takes a new round of results; returns the selection.
    pub fn update(&mut self, results: &[PathResult], prefer: &[String]) -> Option<&Candidate> {
        let all = candidates(results, prefer);
        let best = all
            .iter()
            .min_by(|a, b| a.median_ms.total_cmp(&b.median_ms))
            .cloned();
        let still = self
            .current
            .as_ref()
            .and_then(|c| all.iter().find(|x| x.region == c.region))
            .cloned();
        self.current = match (still, best) {
            (None, best) => best,
            (Some(cur), Some(best)) => {
                let gain = cur.median_ms - best.median_ms;
                if best.region != cur.region
                    && gain > self.margin_ms
                    && gain > cur.median_ms * self.margin_ratio
                {
                    Some(best)
                } else {
                    Some(cur)
                }
            }
            (Some(cur), None) => Some(cur),
        };
        self.current.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(region: &str, path: &str, median: Option<f64>) -> PathResult {
        let mut r = PathResult::new(region, path);
        if let Some(m) = median {
            r = r.with_samples(&[m, m], 2);
        } else {
            r = r.failed(crate::turn::Failure::Timeout("no answer".into()));
        }
        r
    }

    fn prefer() -> Vec<String> {
        DEFAULT_PREFERENCE.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn statistics() {
        let r = rtt(&[5.0, 1.0, 3.0, 2.0, 4.0]).expect("rtt");
        assert_eq!((r.min, r.median, r.p95), (1.0, 3.0, 5.0));
        let r = rtt(&[1.0, 2.0]).expect("rtt");
        assert_eq!(r.median, 1.5);
        assert_eq!(jitter(&[10.0, 12.0, 11.0]), Some(1.5));
        let p = PathResult::new("r", "p").with_samples(&[1.0, 2.0, 3.0], 4);
        assert_eq!(p.loss, Some(0.25));
        assert!(PathResult::new("r", "p")
            .with_samples(&[], 4)
            .error
            .is_some());
    }

    #[test]
    fn nearest_reachable_region_by_preferred_path() {
        let results = vec![
            result("far", "turn-udp", Some(60.0)),
            result("near", "turn-udp", None),
            result("near", "turn-tcp", Some(5.0)),
            result("down", "turn-udp", None),
        ];
        let n = nearest(&results, &prefer()).expect("one");
        assert_eq!(
            (n.region.as_str(), n.path.as_str(), n.median_ms),
            ("near", "turn-tcp", 5.0)
        );
        assert!(nearest(&[result("down", "turn-udp", None)], &prefer()).is_none());
    }

    #[test]
    fn hysteresis_keeps_a_close_choice() {
        let mut s = Selector::new(5.0, 0.2);
        let round = |a: f64, b: f64| {
            vec![
                result("a", "turn-udp", Some(a)),
                result("b", "turn-udp", Some(b)),
            ]
        };
        assert_eq!(
            s.update(&round(20.0, 21.0), &prefer())
                .map(|c| c.region.clone()),
            Some("a".into())
        );
        // b slightly better: stay on a.
        assert_eq!(
            s.update(&round(20.0, 18.0), &prefer())
                .map(|c| c.region.clone()),
            Some("a".into())
        );
        // b clearly better: switch.
        assert_eq!(
            s.update(&round(20.0, 10.0), &prefer())
                .map(|c| c.region.clone()),
            Some("b".into())
        );
        // b unreachable: switch back whatever the margin.
        let r = vec![
            result("a", "turn-udp", Some(20.0)),
            result("b", "turn-udp", None),
        ];
        assert_eq!(
            s.update(&r, &prefer()).map(|c| c.region.clone()),
            Some("a".into())
        );
    }
}
