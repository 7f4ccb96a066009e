//! `turnpike-probe watch`: probes on an interval and serves Prometheus metrics per region and
//! path, as a blackbox exporter in each office or region. Labels are region names and path
//! names from the regions file, never addresses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Encoder, GaugeVec, IntCounter, Opts, Registry, TextEncoder};

use crate::probe::Options;
use crate::regions::Region;
use crate::select::{PathResult, Selector};

pub struct ProbeMetrics {
    registry: Registry,
    up: GaugeVec,
    rtt: GaugeVec,
    jitter: GaugeVec,
    mos: GaugeVec,
    loss: GaugeVec,
    allocation: GaugeVec,
    tls: GaugeVec,
    selected: GaugeVec,
    rounds: IntCounter,
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

impl ProbeMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let rp = &["region", "path"];
        let rounds = IntCounter::new("turnpike_probe_rounds_total", "Probe rounds completed.")
            .unwrap_or_else(|e| panic!("{e}"));
        registry
            .register(Box::new(rounds.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        ProbeMetrics {
            up: gauge(
                &registry,
                "turnpike_probe_up",
                "1 when the path answered in the last round.",
                rp,
            ),
            rtt: gauge(
                &registry,
                "turnpike_probe_rtt_ms",
                "Round-trip time in the last round, milliseconds.",
                &["region", "path", "stat"],
            ),
            jitter: gauge(
                &registry,
                "turnpike_probe_jitter_ms",
                "Jitter in the last round, milliseconds.",
                rp,
            ),
            loss: gauge(
                &registry,
                "turnpike_probe_loss_ratio",
                "Fraction of samples lost in the last round.",
                rp,
            ),
            mos: gauge(
                &registry,
                "turnpike_probe_mos",
                "Estimated voice-call MOS (ITU-T G.107 E-model, G.711) from the last round's RTT, jitter and loss; NaN when nothing came back.",
                rp,
            ),
            allocation: gauge(
                &registry,
                "turnpike_probe_allocation_ms",
                "Time to allocate, milliseconds.",
                rp,
            ),
            tls: gauge(
                &registry,
                "turnpike_probe_tls_handshake_ms",
                "TLS handshake time, milliseconds.",
                rp,
            ),
            selected: gauge(
                &registry,
                "turnpike_probe_selected",
                "1 for the region the probe selects.",
                &["region"],
            ),
            rounds,
            registry,
        }
    }

    pub fn record(&self, results: &[PathResult], regions: &[Region], selected: Option<&str>) {
        for r in results {
            let l = [r.region.as_str(), r.path.as_str()];
            self.up
                .with_label_values(&l)
                .set(if r.reachable { 1.0 } else { 0.0 });
            for (stat, v) in [
                ("min", r.rtt_ms.map(|x| x.min)),
                ("median", r.rtt_ms.map(|x| x.median)),
                ("p95", r.rtt_ms.map(|x| x.p95)),
            ] {
                let g = self.rtt.with_label_values(&[&r.region, &r.path, stat]);
                g.set(v.unwrap_or(f64::NAN));
            }
            self.jitter
                .with_label_values(&l)
                .set(r.jitter_ms.unwrap_or(f64::NAN));
            self.loss.with_label_values(&l).set(r.loss.unwrap_or(1.0));
            self.mos
                .with_label_values(&l)
                .set(r.voice.map_or(f64::NAN, |v| v.mos));
            if let Some(a) = r.allocation_ms {
                self.allocation.with_label_values(&l).set(a);
            }
            if let Some(t) = r.tls_handshake_ms {
                self.tls.with_label_values(&l).set(t);
            }
        }
        for region in regions {
            let v = if Some(region.name.as_str()) == selected {
                1.0
            } else {
                0.0
            };
            self.selected.with_label_values(&[&region.name]).set(v);
        }
        self.rounds.inc();
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for ProbeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Probes every `every`, forever (or `rounds` times), serving `/metrics` on `listener`.
pub async fn run(
    regions: Vec<Region>,
    opts: Options,
    prefer: Vec<String>,
    mut selector: Selector,
    listener: tokio::net::TcpListener,
    every: Duration,
    rounds: u64,
) -> std::io::Result<()> {
    let metrics = Arc::new(ProbeMetrics::new());
    let served = Arc::clone(&metrics);
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let body = served.render();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        body,
                    )
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!("metrics on http://{addr}/metrics");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let mut n = 0u64;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let results = crate::measure(&regions, &opts).await;
        let chosen = selector.update(&results, &prefer).map(|c| c.region.clone());
        metrics.record(&results, &regions, chosen.as_deref());
        tracing::info!(
            selected = chosen.as_deref().unwrap_or("none"),
            "probe round done"
        );
        n += 1;
        if rounds != 0 && n >= rounds {
            return Ok(());
        }
    }
}
