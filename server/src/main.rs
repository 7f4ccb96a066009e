use clap::Parser;
use turnpike::config::{check, Cli, Command, Settings};

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("admin") {
        return turnpike::admin_cli::main(args.skip(1));
    }
    let mut cli = Cli::parse();
    // `admin` after flags (`turnpike -c FILE admin ...`): the flags are the relay's, unused.
    if let Some(Command::Admin { args }) = cli.command.take() {
        return turnpike::admin_cli::main(args);
    }
    let settings = match Settings::load(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("turnpike: {e}");
            if cli.check_config {
                eprintln!("turnpike: configuration refused");
            }
            return std::process::ExitCode::from(2);
        }
    };
    if cli.check_config {
        return check_config(&settings);
    }
    turnpike::app::init_logging(settings.log_format);
    match turnpike::app::run(&cli, settings) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Once, through the log (which is on stderr, in the configured format).
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--check-config`: the effective configuration as TOML on stdout, its warnings as comments,
/// and one verdict line; exit status 2 when the relay could not start with it.
fn check_config(settings: &Settings) -> std::process::ExitCode {
    let elsewhere = match turnpike::app::check(settings) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("turnpike: {e}");
            eprintln!("turnpike: configuration refused");
            return std::process::ExitCode::from(2);
        }
    };
    print!("{}", check::effective_toml(settings));
    println!();
    let warnings: Vec<&String> = settings.warnings.iter().chain(&elsewhere).collect();
    for w in &warnings {
        println!("# warning: {w}");
    }
    let n = warnings.len();
    let verdict = match n {
        0 => "configuration OK".to_owned(),
        1 => "configuration OK, with 1 warning".to_owned(),
        n => format!("configuration OK, with {n} warnings"),
    };
    println!("# {}: {verdict}", settings.source);
    std::process::ExitCode::SUCCESS
}
