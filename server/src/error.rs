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
    /// An error of the value under `key` in `file` ("command line" for a flag).
    #[error("{file}: key `{key}`: {source}")]
    At {
        file: String,
        key: String,
        source: Box<Error>,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// This error, placed at `key` of `file`.
    pub fn at(self, (file, key): (&str, &str)) -> Error {
        Error::At {
            file: file.to_owned(),
            key: key.to_owned(),
            source: Box::new(self),
        }
    }
}
