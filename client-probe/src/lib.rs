//! `turnpike-probe`: measures reachability and latency to Turnpike relays over every
//! transport, picks the nearest, reports for people, programs and IT departments, and runs as
//! a Prometheus exporter.
//!
//! - [`regions`]: the regions file.
//! - [`turn`]: a small STUN/TURN client over UDP, TCP, TLS and HTTP CONNECT proxies.
//! - [`probe`]: the paths probed for each region.
//! - [`select`]: statistics and the choice of the nearest relay (no IO).
//! - [`quality`]: the voice-call score (ITU-T G.107 E-model) a path's figures predict.
//! - [`report`]: table, JSON, `iceServers`, firewall table.
//! - [`bandwidth`]: whether a TURN path carries a stated bit rate.
//! - [`html`]: the self-contained HTML report to attach to a ticket.
//! - [`inspect`]: telling the relay's TLS certificate from an inspecting proxy's.
//! - [`capture`]: the pcapng file of what the probe sent and received.
//! - [`watch`]: the exporter.
//! - [`load`]: the load generator (`turnpike-probe load`), batching its system calls with
//!   `turnpike_udp`.

pub mod bandwidth;
pub mod capture;
pub mod html;
pub mod inspect;
pub mod load;
pub mod probe;
pub mod quality;
pub mod regions;
pub mod report;
pub mod select;
pub mod turn;
pub mod watch;

/// Why the probe could not run at all (path failures are results, not errors).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: {reason}")]
    Config { file: String, reason: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Probes every region, regions in parallel, each region's paths one after another.
pub async fn measure(
    regions: &[regions::Region],
    opts: &probe::Options,
) -> Vec<select::PathResult> {
    let runs = regions.iter().map(|r| probe::probe_region(r, opts));
    let mut results: Vec<select::PathResult> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect();
    inspect::compare_paths(&mut results, regions, opts.proxy.is_some());
    results
}
