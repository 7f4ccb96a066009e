//! The crate's error type.

/// Why the relay could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad configuration file or flag: where, which key, and why.
    #[error("{file}: {}{reason}", if key.is_empty() { String::new() } else { format!("key `{key}`: ") })]
    Config {
        file: String,
        key: String,
        reason: String,
    },
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
