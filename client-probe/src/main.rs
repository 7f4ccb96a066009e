use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use turnpike_probe::probe::{Options, Proxy};
use turnpike_probe::select::{Selector, DEFAULT_PREFERENCE};
use turnpike_probe::{regions, report, select, watch};

#[derive(Parser)]
#[command(
    name = "turnpike-probe",
    version,
    about = "Reachability, latency and relay selection for Turnpike relays"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Probe every region once and report.
    Measure {
        #[command(flatten)]
        common: Common,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Print a WebRTC iceServers configuration for the selected relay.
        #[arg(long = "ice-servers")]
        ice_servers: bool,
        /// Print the firewall table for IT (destinations, ports, protocols, what was open).
        #[arg(long)]
        firewall: bool,
    },
    /// Probe on an interval and serve Prometheus metrics.
    Watch {
        #[command(flatten)]
        common: Common,
        /// Where /metrics is served.
        #[arg(long, default_value = "127.0.0.1:9642")]
        listen: String,
        /// Seconds between rounds.
        #[arg(long, default_value_t = 30)]
        every: u64,
        /// Stop after this many rounds (0: never).
        #[arg(long, default_value_t = 0)]
        rounds: u64,
        /// Switch relays only for a gain of at least this many milliseconds...
        #[arg(long = "margin-ms", default_value_t = 10.0)]
        margin_ms: f64,
        /// ...and this fraction of the current RTT.
        #[arg(long = "margin-ratio", default_value_t = 0.2)]
        margin_ratio: f64,
    },
}

#[derive(Args)]
struct Common {
    /// TOML file of [[region]] entries.
    #[arg(long, value_name = "FILE")]
    regions: PathBuf,
    /// Samples per path.
    #[arg(long, default_value_t = 10)]
    samples: usize,
    /// Milliseconds between samples.
    #[arg(long = "interval-ms", default_value_t = 20)]
    interval_ms: u64,
    /// Milliseconds to wait for an answer or a connection.
    #[arg(long = "timeout-ms", default_value_t = 2000)]
    timeout_ms: u64,
    /// HTTP CONNECT proxy, http://[user:pass@]host:port (default: HTTPS_PROXY).
    #[arg(long, env = "HTTPS_PROXY")]
    proxy: Option<String>,
    /// Transport preference for selection, e.g. udp,tcp,tls,tls-proxy.
    #[arg(long, value_delimiter = ',', default_value = "udp,tcp,tls,tls-proxy")]
    prefer: Vec<String>,
}

impl Common {
    fn load(&self) -> Result<(Vec<regions::Region>, Options, Vec<String>), String> {
        let regions = regions::load(&self.regions).map_err(|e| e.to_string())?;
        let proxy = match self.proxy.as_deref() {
            Some(p) if !p.is_empty() => {
                Some(p.parse::<Proxy>().map_err(|e| format!("--proxy: {e}"))?)
            }
            _ => None,
        };
        let mut prefer = Vec::new();
        for p in &self.prefer {
            let path = format!("turn-{p}");
            if !DEFAULT_PREFERENCE.contains(&path.as_str()) {
                return Err(format!(
                    "--prefer: {p:?} is not one of udp, tcp, tls, tls-proxy"
                ));
            }
            prefer.push(path);
        }
        let opts = Options {
            samples: self.samples.max(1),
            interval: Duration::from_millis(self.interval_ms),
            timeout: Duration::from_millis(self.timeout_ms.max(1)),
            proxy,
        };
        Ok((regions, opts, prefer))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TURNPIKE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("turnpike-probe: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Measure {
            common,
            json,
            ice_servers,
            firewall,
        } => {
            let (regions, opts, prefer) = match common.load() {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("turnpike-probe: {e}");
                    return ExitCode::from(2);
                }
            };
            let results = rt.block_on(turnpike_probe::measure(&regions, &opts));
            let selected = select::nearest(&results, &prefer);
            let chosen = selected
                .as_ref()
                .and_then(|c| regions.iter().find(|r| r.name == c.region));
            if ice_servers && chosen.is_none() {
                eprintln!("turnpike-probe: no relay reachable; no iceServers to print");
            }
            if json {
                // One JSON document: with --ice-servers, the array is its "ice_servers" field.
                let mut doc = report::json(&results, selected.as_ref());
                if let (true, Some(r)) = (ice_servers, chosen) {
                    doc["ice_servers"] = report::ice_servers(r);
                }
                println!("{doc}");
            } else {
                print!("{}", report::table(&results, selected.as_ref()));
                if firewall {
                    println!();
                    print!("{}", report::firewall(&regions, &results));
                }
                if let (true, Some(r)) = (ice_servers, chosen) {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&report::ice_servers(r)).unwrap_or_default()
                    );
                }
            }
            if selected.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Watch {
            common,
            listen,
            every,
            rounds,
            margin_ms,
            margin_ratio,
        } => {
            let (regions, opts, prefer) = match common.load() {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("turnpike-probe: {e}");
                    return ExitCode::from(2);
                }
            };
            let result = rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(&listen).await?;
                watch::run(
                    regions,
                    opts,
                    prefer,
                    Selector::new(margin_ms, margin_ratio),
                    listener,
                    Duration::from_secs(every.max(1)),
                    rounds,
                )
                .await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("turnpike-probe: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
