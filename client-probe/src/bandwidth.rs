//! `measure --bandwidth RATE`: does a TURN path carry a stated bit rate through the relay?
//!
//! Over each TURN path, the first allocation sends paced Send indications at the rate asked
//! for to the second one's relayed address for a few seconds: the stream goes up from the
//! probe to the relay and back down through it, so both directions carry the rate at once, as
//! they do in a call. The second allocation counts what arrives and how long each datagram
//! took from the probe through the relay back to the probe. The relay's own bandwidth quotas
//! (`quota.allocation_bytes_per_sec`, `user_bytes_per_sec`) apply as to any client. Bounded:
//! at most [`MAX_BPS`] for at most [`MAX_SECS`] seconds.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Highest rate the probe sends, bits per second.
pub const MAX_BPS: f64 = 100e6;
/// Longest test, seconds.
pub const MAX_SECS: u64 = 10;
/// Payload bytes of each datagram: a video packet's size.
pub const PAYLOAD: usize = 1000;
/// Share of the rate that must arrive, and most loss, for the path to meet the requirement.
const MEETS_SHARE: f64 = 0.95;
const MEETS_LOSS: f64 = 0.02;

/// `6M`, `500k`, `2.5M` or plain bits per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('g' | 'G') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: a rate in bits per second, e.g. 6M or 500k"))?;
    let bps = v * mult;
    if !(bps.is_finite() && bps > 0.0 && bps <= MAX_BPS) {
        return Err(format!("{s:?}: more than 0, at most 100M"));
    }
    Ok(bps)
}

/// What one path carried.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bandwidth {
    /// The requirement, Mbit/s (payload bits).
    pub required_mbps: f64,
    /// What arrived through the relay, Mbit/s, over the time datagrams arrived in (first to
    /// last).
    pub received_mbps: f64,
    /// What arrived over the second half of that time, Mbit/s: the rate the path keeps up,
    /// after any burst a policer lets through first. The verdict goes by it.
    pub sustained_mbps: f64,
    /// Seconds from the first datagram's arrival to the last one's.
    pub window_s: f64,
    pub loss: f64,
    /// Median time from the probe through the relay back to the probe under that load, ms.
    pub rtt_ms: Option<f64>,
    pub meets: bool,
    /// The bandwidth limit the relay said the allocations have (its BANDWIDTH attribute),
    /// Mbit/s of payload.
    pub relay_limit_mbps: Option<f64>,
    /// The relay's limit is what held the rate: it is below the requirement and the path
    /// carried about that much.
    pub limited_by_relay: bool,
    /// The highest common WebRTC video resolution the sustained rate carries.
    pub video: &'static str,
}

/// The datagrams to send: count and spacing.
pub fn plan(bps: f64, secs: u64) -> (usize, Duration) {
    let per_sec = (bps / (PAYLOAD as f64 * 8.0)).max(1.0);
    let count = (per_sec * secs as f64).ceil() as usize;
    (count, Duration::from_secs_f64(1.0 / per_sec))
}

/// A datagram's payload: its sequence number and when it was sent (µs since `base`).
pub fn payload(seq: u32, base: Instant) -> Vec<u8> {
    let mut p = vec![0u8; PAYLOAD];
    p[..4].copy_from_slice(b"TPBW");
    p[4..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(&(base.elapsed().as_micros() as u64).to_be_bytes());
    p
}

/// Reads a payload back: (sequence number, µs since `base` when it was sent).
pub fn parse_payload(p: &[u8]) -> Option<(u32, u64)> {
    if p.len() < 16 || &p[..4] != b"TPBW" {
        return None;
    }
    Some((
        u32::from_be_bytes(p[4..8].try_into().ok()?),
        u64::from_be_bytes(p[8..16].try_into().ok()?),
    ))
}

/// The verdict from what was sent and what came back: `arrivals` are the times (µs since
/// the start) each datagram arrived, `limit` the relay's bandwidth limit in bytes per second.
pub fn summarize(
    bps: f64,
    secs: u64,
    sent: usize,
    arrivals: &[u64],
    rtts: &mut [f64],
    limit: Option<u64>,
) -> Bandwidth {
    let bits = (PAYLOAD * 8) as f64;
    let received = arrivals.len();
    let (first, last) = match (arrivals.iter().min(), arrivals.iter().max()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => (0, 0),
    };
    let window_s = (last - first) as f64 / 1e6;
    // Over the arrival window (datagrams after the first, over the time they took); with too
    // few to span any time, over the test's length.
    let received_mbps = if received >= 2 && window_s > 0.0 {
        (received - 1) as f64 * bits / window_s / 1e6
    } else {
        received as f64 * bits / secs as f64 / 1e6
    };
    let mid = first + (last - first) / 2;
    let late = arrivals.iter().filter(|t| **t > mid).count();
    let sustained_mbps = if late >= 2 && window_s > 0.0 {
        late as f64 * bits / (window_s / 2.0) / 1e6
    } else {
        received_mbps
    };
    let loss = if sent == 0 {
        1.0
    } else {
        1.0 - received as f64 / sent as f64
    };
    rtts.sort_by(f64::total_cmp);
    let rtt_ms = (!rtts.is_empty()).then(|| rtts[rtts.len() / 2]);
    let required_mbps = bps / 1e6;
    let meets = sustained_mbps >= MEETS_SHARE * required_mbps && loss <= MEETS_LOSS;
    let relay_limit_mbps = limit.map(|b| b as f64 * 8.0 / 1e6);
    let limited_by_relay = !meets
        && relay_limit_mbps.is_some_and(|l| {
            l < MEETS_SHARE * required_mbps
                && sustained_mbps >= 0.8 * l
                && sustained_mbps <= 1.25 * l
        });
    Bandwidth {
        required_mbps,
        received_mbps,
        sustained_mbps,
        window_s,
        loss,
        rtt_ms,
        meets,
        relay_limit_mbps,
        limited_by_relay,
        video: video(sustained_mbps),
    }
}

/// Common WebRTC video bit rates (Mbit/s) for each resolution at 30 frames a second.
fn video(mbps: f64) -> &'static str {
    match mbps {
        m if m >= 4.0 => "1080p",
        m if m >= 2.5 => "720p",
        m if m >= 1.2 => "540p",
        m if m >= 0.6 => "360p",
        m if m >= 0.25 => "180p",
        _ => "audio only",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_their_units_and_are_bounded() {
        assert_eq!(parse_rate("6M"), Ok(6e6));
        assert_eq!(parse_rate("500k"), Ok(5e5));
        assert_eq!(parse_rate("2.5M"), Ok(2.5e6));
        assert_eq!(parse_rate("64000"), Ok(64e3));
        for bad in ["", "0", "-1M", "fast", "1G"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_verdict_needs_the_rate_and_little_loss() {
        let (n, gap) = plan(6e6, 3);
        assert_eq!((n, gap), (2250, Duration::from_secs_f64(1.0 / 750.0)));
        // Arrivals paced as sent: 750 a second for 3 s.
        let paced = |count: usize, every_us: u64| -> Vec<u64> {
            (0..count as u64).map(|i| 1_000 + i * every_us).collect()
        };
        let ok = summarize(6e6, 3, n, &paced(n, 1333), &mut [1.0, 3.0, 2.0], None);
        assert!(
            ok.meets && ok.rtt_ms == Some(2.0) && ok.video == "1080p",
            "{ok:?}"
        );
        assert!((ok.received_mbps - 6.0).abs() < 0.05, "{ok:?}");
        let lossy = summarize(6e6, 3, n, &paced(n * 9 / 10, 1481), &mut [], None);
        assert!(!lossy.meets && (lossy.loss - 0.1).abs() < 1e-9, "{lossy:?}");
        assert_eq!(
            summarize(6e6, 3, n, &paced(n / 4, 5333), &mut [], None).video,
            "540p"
        );
    }

    #[test]
    fn a_policer_burst_does_not_count_and_the_relay_limit_is_named() {
        // A relay limiting to 250 kB/s (2 Mbit/s) with a one-second bucket: a burst of 250
        // datagrams at once, then 250 a second for 3 s.
        let mut arrivals: Vec<u64> = (0..250).map(|i| 1_000 + i * 10).collect();
        arrivals.extend((0..750).map(|i| 4_000 + i * 4_000));
        let b = summarize(6e6, 3, 2250, &arrivals, &mut [], Some(250_000));
        assert!(
            b.received_mbps > 2.5,
            "the whole window counts the burst: {b:?}"
        );
        assert!((b.sustained_mbps - 2.0).abs() < 0.1, "{b:?}");
        assert!(!b.meets && b.limited_by_relay, "{b:?}");
        assert_eq!(b.relay_limit_mbps, Some(2.0));
        // The same rate without a limit from the relay: not blamed on it.
        let b = summarize(6e6, 3, 2250, &arrivals, &mut [], None);
        assert!(!b.limited_by_relay, "{b:?}");
    }
}
