use clap::Parser;
use turnpike::config::{Cli, Settings};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("turnpike: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    turnpike::app::init_logging(settings.log_format);
    if cli.check_config {
        if let Err(e) = turnpike::app::check(&settings) {
            eprintln!("turnpike: {e}");
            return std::process::ExitCode::from(2);
        }
        println!("{settings:#?}");
        return std::process::ExitCode::SUCCESS;
    }
    match turnpike::app::run(&cli, settings) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("turnpike: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
