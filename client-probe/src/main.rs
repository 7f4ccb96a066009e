use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use turnpike_probe::probe::{Options, Proxy};
use turnpike_probe::select::{Selector, DEFAULT_PREFERENCE};
use turnpike_probe::{load, regions, report, select, watch};

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
        /// Write every packet the probe sent and received to this pcapng file (Wireshark).
        #[arg(long, value_name = "FILE.pcapng")]
        capture: Option<std::path::PathBuf>,
        /// Check that each TURN path carries this rate through the relay (bits per second:
        /// 6M, 500k), up and down at once.
        #[arg(long, value_name = "RATE")]
        bandwidth: Option<String>,
        /// Seconds each bandwidth test lasts (1 to 10).
        #[arg(long = "bandwidth-secs", default_value_t = 3)]
        bandwidth_secs: u64,
        /// Write a self-contained HTML report (firewall table, figures, charts, fixes).
        #[arg(long, value_name = "FILE.html")]
        report: Option<std::path::PathBuf>,
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
    /// Load-test one relay: many allocations sending at a set rate; loss, RTT and jitter.
    Load(LoadArgs),
}

#[derive(Args)]
struct LoadArgs {
    /// The relay, HOST:PORT.
    #[arg(long)]
    relay: String,
    /// udp, tcp or tls to the relay (raw: bare UDP to a forwarder at PORT+i, no TURN).
    #[arg(long, default_value = "udp", value_parser = ["udp", "tcp", "tls", "raw"])]
    transport: String,
    /// Long-term credential user name.
    #[arg(long)]
    user: Option<String>,
    /// Long-term credential password.
    #[arg(long)]
    password: Option<String>,
    /// Shared secret: mint coturn-style ephemeral credentials (`expiry:user`, HMAC-SHA1).
    #[arg(long, env = "TURNPIKE_LOAD_SECRET")]
    secret: Option<String>,
    /// Accept any TLS certificate (self-signed test relays).
    #[arg(long)]
    insecure: bool,
    /// CA certificates (PEM) to trust for TLS instead of the public web roots.
    #[arg(long = "ca-file", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// TLS server name (default: the relay's host).
    #[arg(long = "tls-name")]
    tls_name: Option<String>,
    /// Concurrent allocations.
    #[arg(long, short = 'n', default_value_t = 10)]
    allocations: usize,
    /// Packets per second per allocation (0: hold the allocations idle).
    #[arg(long, default_value_t = 50.0, conflicts_with = "bitrate")]
    rate: f64,
    /// Bits per second per allocation (payload), instead of --rate.
    #[arg(long)]
    bitrate: Option<f64>,
    /// Payload bytes per packet.
    #[arg(long, default_value_t = 172)]
    size: usize,
    /// Seconds of sending (at most 3600).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// peer: echo peers run by the generator; c2c: allocations in pairs echo each other.
    #[arg(long, default_value = "peer", value_parser = ["peer", "c2c"])]
    mode: String,
    /// Send indications instead of channels.
    #[arg(long = "send-indications")]
    send_indications: bool,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Address the generator's peers bind (default: the one the kernel uses to the relay).
    #[arg(long = "peer-ip")]
    peer_ip: Option<std::net::IpAddr>,
    /// Address the allocations' UDP client sockets bind (default: any); several generators on
    /// 127.0.0.2, 127.0.0.3... reach past one source address's ports.
    #[arg(long = "client-ip")]
    client_ip: Option<std::net::IpAddr>,
    /// raw transport: the peer's port, where the forwarder sends.
    #[arg(long = "peer-port", default_value_t = 0)]
    peer_port: u16,
    /// peer mode: a peer socket of its own for each allocation (a relay multiplexing relayed
    /// addresses on one port refuses a peer address two allocations share).
    #[arg(long = "peer-per-allocation")]
    peer_per_allocation: bool,
    /// Allocations set up at once.
    #[arg(long = "setup-concurrency", default_value_t = 64)]
    setup_concurrency: usize,
    /// Milliseconds to wait for each answer or connection during setup.
    #[arg(long = "timeout-ms", default_value_t = 5000)]
    timeout_ms: u64,
    /// Seconds between refreshes of each allocation and its channel or permission (at most
    /// 240: permissions last 300 s).
    #[arg(long = "refresh-secs", default_value_t = 240)]
    refresh_secs: u64,
    /// With --secret: seconds the minted credential is valid (default: an hour beyond the
    /// run). A shorter one expires during the run: later refreshes get 401 and the relay
    /// ends the allocations at their lifetime instead.
    #[arg(long = "credential-ttl")]
    credential_ttl: Option<u64>,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

impl LoadArgs {
    fn options(&self) -> Result<load::Options, String> {
        use std::net::ToSocketAddrs;
        let relay = self
            .relay
            .to_socket_addrs()
            .map_err(|e| format!("--relay {}: {e}", self.relay))?
            .next()
            .ok_or_else(|| format!("--relay {}: no address", self.relay))?;
        let (username, password) = match (&self.secret, &self.user, &self.password) {
            (Some(secret), user, _) => turnpike_probe::probe::ephemeral_credentials(
                secret,
                user.as_deref().unwrap_or("load"),
                self.credential_ttl.unwrap_or(3600 + self.duration as u64),
            ),
            (None, Some(u), Some(p)) => (u.clone(), p.clone()),
            (None, _, _) if self.transport == "raw" => (String::new(), String::new()),
            (None, _, _) => return Err("give --user and --password, or --secret".into()),
        };
        let rate = match self.bitrate {
            Some(bps) => bps / (self.size.max(1) * 8) as f64,
            None => self.rate,
        };
        if !(self.duration.is_finite() && self.duration > 0.0) {
            return Err("--duration: more than 0 seconds".into());
        }
        let opts = load::Options {
            relay,
            transport: match self.transport.as_str() {
                "tcp" => load::Transport::Tcp,
                "tls" => load::Transport::Tls,
                "raw" => load::Transport::Raw,
                _ => load::Transport::Udp,
            },
            tls_name: self.tls_name.clone().unwrap_or_else(|| {
                self.relay
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
                    .unwrap_or_default()
            }),
            insecure: self.insecure,
            ca_file: self.ca_file.clone(),
            username,
            password,
            allocations: self.allocations,
            rate,
            size: self.size,
            duration: Duration::from_secs_f64(self.duration.min(load::MAX_DURATION_SECS + 1.0)),
            mode: if self.mode == "c2c" {
                load::Mode::C2c
            } else {
                load::Mode::Peer
            },
            send_indications: self.send_indications,
            threads: self
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
                .clamp(1, 64),
            peer_ip: self.peer_ip,
            client_ip: self.client_ip,
            peer_port: self.peer_port,
            peer_per_allocation: self.peer_per_allocation,
            setup_concurrency: self.setup_concurrency.clamp(1, 4096),
            timeout: Duration::from_millis(self.timeout_ms.max(1)),
            refresh: Duration::from_secs(self.refresh_secs),
        };
        opts.validate()?;
        Ok(opts)
    }
}

/// The multi-threaded runtime, with `threads` workers (default: one per core).
fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n);
    }
    b.enable_all().build().map_err(|e| {
        eprintln!("turnpike-probe: {e}");
        ExitCode::FAILURE
    })
}

/// Raises the soft open-files limit to the hard one: a socket per allocation.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn load_main(args: LoadArgs) -> ExitCode {
    let opts = match args.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("turnpike-probe load: {e}");
            return ExitCode::from(2);
        }
    };
    raise_nofile();
    let rt = match runtime(Some(opts.threads)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let result = rt.block_on(load::run(&opts, &bar, |setup| {
        // A line other programs (the benchmark) wait for before measuring idle allocations.
        eprintln!(
            "turnpike-probe load: {} allocations ready ({:.0}/s)",
            opts.allocations, setup.per_second
        );
    }));
    // Flows that did not stop in time must not keep the process alive.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                print!("{}", load::table(&report));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("turnpike-probe load: {e}");
            if args.json {
                let doc = serde_json::json!({ "error": e.to_string(), "failure": e.failure().to_string() });
                println!("{doc}");
            }
            ExitCode::FAILURE
        }
    }
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
            progress: false,
            capture: None,
            bandwidth: None,
        };
        Ok((regions, opts, prefer))
    }
}

/// Each region's host and the addresses it resolves to from here, once per host.
fn resolve_hosts(
    rt: &tokio::runtime::Runtime,
    regions: &[regions::Region],
) -> Vec<(String, Vec<String>)> {
    let mut resolved: Vec<(String, Vec<String>)> = Vec::new();
    for r in regions {
        if resolved.iter().any(|(h, _)| *h == r.host) {
            continue;
        }
        let addrs = rt
            .block_on(tokio::net::lookup_host((r.host.as_str(), 0)))
            .map(|a| {
                let mut v: Vec<String> = a.map(|s| s.ip().to_string()).collect();
                v.dedup();
                v
            })
            // The row's verdict says why (UNKNOWN: dns ...).
            .unwrap_or_default();
        resolved.push((r.host.clone(), addrs));
    }
    resolved
}

/// How the run was made, for the HTML report.
fn run_info(
    opts: &Options,
    common: &Common,
    started: time::OffsetDateTime,
) -> turnpike_probe::html::RunInfo {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let host = if unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0 {
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        String::from_utf8_lossy(&name[..end]).into_owned()
    } else {
        "this machine".into()
    };
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    turnpike_probe::html::RunInfo {
        time: started.format(&format).unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").into(),
        host,
        proxy: opts
            .proxy
            .as_ref()
            .map(|p| format!("{}:{}", p.host, p.port)),
        regions_file: common.regions.display().to_string(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cli = match cli.command {
        Command::Load(args) => return load_main(args),
        command => Cli { command },
    };
    let _ = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TURNPIKE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .try_init();
    let rt = match runtime(None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match cli.command {
        Command::Measure {
            common,
            json,
            ice_servers,
            firewall,
            capture,
            bandwidth,
            bandwidth_secs,
            report: report_file,
        } => {
            let (regions, mut opts, prefer) = match common.load() {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("turnpike-probe: {e}");
                    return ExitCode::from(2);
                }
            };
            opts.progress = true;
            if let Some(rate) = &bandwidth {
                let bps = match turnpike_probe::bandwidth::parse_rate(rate) {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("turnpike-probe: --bandwidth: {e}");
                        return ExitCode::from(2);
                    }
                };
                if !(1..=turnpike_probe::bandwidth::MAX_SECS).contains(&bandwidth_secs) {
                    eprintln!("turnpike-probe: --bandwidth-secs: 1 to 10");
                    return ExitCode::from(2);
                }
                opts.bandwidth = Some((bps, bandwidth_secs));
            }
            if capture.is_some() {
                opts.capture = Some(turnpike_probe::capture::Capture::new());
            }
            let started = time::OffsetDateTime::now_utc();
            let results = rt.block_on(turnpike_probe::measure(&regions, &opts));
            if let (Some(file), Some(c)) = (&capture, &opts.capture) {
                let written = std::fs::File::create(file)
                    .map_err(|e| e.to_string())
                    .and_then(|f| {
                        c.write(std::io::BufWriter::new(f), |region, path| {
                            report::path_verdict(&results, region, path)
                        })
                    });
                match written {
                    Ok(n) => eprintln!(
                        "turnpike-probe: {n} packets written to {} (tshark -r {} -Y stun)",
                        file.display(),
                        file.display()
                    ),
                    Err(e) => {
                        eprintln!("turnpike-probe: {}: {e}", file.display());
                        return ExitCode::from(2);
                    }
                }
            }
            let selected = select::nearest(&results, &prefer);
            // The firewall rows, with the addresses each destination resolved to from here.
            let rows = if firewall || report_file.is_some() {
                let resolved = resolve_hosts(&rt, &regions);
                let mut rows = report::firewall_rows(&regions, &results);
                report::add_addresses(&mut rows, &resolved);
                Some(rows)
            } else {
                None
            };
            if let (Some(file), Some(rows)) = (&report_file, &rows) {
                let info = run_info(&opts, &common, started);
                let page = turnpike_probe::html::report(
                    &info,
                    &regions,
                    &results,
                    rows,
                    selected.as_ref(),
                );
                if let Err(e) = std::fs::write(file, page) {
                    eprintln!("turnpike-probe: {}: {e}", file.display());
                    return ExitCode::from(2);
                }
                eprintln!("turnpike-probe: report written to {}", file.display());
            }
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
                if let (true, Some(rows)) = (firewall, &rows) {
                    doc["firewall"] = serde_json::to_value(rows).unwrap_or_default();
                }
                println!("{doc}");
            } else {
                print!("{}", report::table(&results, selected.as_ref()));
                if let (true, Some(rows)) = (firewall, &rows) {
                    println!();
                    print!("{}", report::firewall(rows));
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
        Command::Load(args) => load_main(args),
    }
}
