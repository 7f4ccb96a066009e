//! The regions file: which relays to probe and how.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionsFile {
    #[serde(rename = "region")]
    pub regions: Vec<Region>,
}

/// One relay (or the DNS name of a region's relays).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub name: String,
    pub host: String,
    /// STUN and TURN over UDP; 0 or absent skips those paths.
    #[serde(default)]
    pub udp_port: u16,
    /// TURN over TCP.
    #[serde(default)]
    pub tcp_port: u16,
    /// TURN over TLS (and the WebSocket echo on the same port, when `websocket` is set).
    #[serde(default)]
    pub tls_port: u16,
    /// Static user and password...
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// ...or the shared secret ephemeral credentials are minted from.
    #[serde(default)]
    pub secret: Option<String>,
    /// The relay's UDP relay ports, as the firewall table lists them: the few shared relay
    /// ports of a relay with `shared_relay_ports` (numbers or "MIN-MAX"), or its
    /// `relay_ports` range; empty: the relay's default range, 49152-65535.
    #[serde(default)]
    pub relay_ports: Vec<RelaySpec>,
    /// UDP echo ports: numbers or "MIN-MAX" ranges.
    #[serde(default)]
    pub echo_udp: Vec<PortSpec>,
    /// TCP echo ports.
    #[serde(default)]
    pub echo_tcp: Vec<PortSpec>,
    /// Probe the WebSocket echo (`/echo/ws`) over TLS on `tls_port`.
    #[serde(default)]
    pub websocket: bool,
    /// Name the TLS certificate must carry; defaults to `host`.
    #[serde(default)]
    pub tls_name: Option<String>,
    /// The relay's TLS key, `sha256/BASE64` of its SubjectPublicKeyInfo (as curl's
    /// `--pinnedpubkey`): a certificate with another key is reported as TLS inspection even
    /// when this machine trusts its issuer (a company CA installed for its proxy).
    #[serde(default)]
    pub tls_spki: Option<String>,
    /// PEM file of the CA to trust for this region instead of the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// A port or an inclusive range of ports.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    One(u16),
    Range(String),
}

/// Relay ports: a port, or a range of any length (unlike the echo ports, which are probed one
/// by one).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RelaySpec {
    One(u16),
    Range(String),
}

impl RelaySpec {
    /// The ports as the firewall table prints them: `50000` or `50000-50007`.
    pub fn describe(&self) -> Result<String, String> {
        match self {
            RelaySpec::One(p) => Ok(p.to_string()),
            RelaySpec::Range(r) => {
                let bad = || format!("{r:?}: expected a port or MIN-MAX");
                let (a, b) = r.split_once('-').ok_or_else(bad)?;
                let a: u16 = a.trim().parse().map_err(|_| bad())?;
                let b: u16 = b.trim().parse().map_err(|_| bad())?;
                if a > b {
                    return Err(format!("{r:?}: MIN above MAX"));
                }
                Ok(if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                })
            }
        }
    }
}

impl PortSpec {
    pub fn ports(&self) -> Result<Vec<u16>, String> {
        match self {
            PortSpec::One(p) => Ok(vec![*p]),
            PortSpec::Range(r) => {
                let (a, b) = r
                    .split_once('-')
                    .ok_or_else(|| format!("{r:?}: expected MIN-MAX"))?;
                let a: u16 = a
                    .trim()
                    .parse()
                    .map_err(|_| format!("{r:?}: expected MIN-MAX"))?;
                let b: u16 = b
                    .trim()
                    .parse()
                    .map_err(|_| format!("{r:?}: expected MIN-MAX"))?;
                if a > b || b - a > 64 {
                    return Err(format!("{r:?}: at most 65 ports, MIN <= MAX"));
                }
                Ok((a..=b).collect())
            }
        }
    }
}

impl Region {
    pub fn tls_name(&self) -> &str {
        self.tls_name.as_deref().unwrap_or(&self.host)
    }
}

pub fn load(path: &Path) -> Result<Vec<Region>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
        file: path.display().to_string(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(&path.display().to_string(), &text)
}

pub fn parse(source: &str, text: &str) -> Result<Vec<Region>, Error> {
    let bad = |reason: String| Error::Config {
        file: source.to_owned(),
        reason,
    };
    let de = toml::de::Deserializer::parse(text).map_err(|e| bad(e.message().to_owned()))?;
    let file: RegionsFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        bad(format!("key `{path}`: {}", e.into_inner().message()))
    })?;
    if file.regions.is_empty() {
        return Err(bad("no [[region]]".into()));
    }
    for (i, r) in file.regions.iter().enumerate() {
        let at = |k: &str| format!("key `region[{i}].{k}` ({})", r.name);
        if r.secret.is_none() && (r.username.is_none() || r.password.is_none()) {
            return Err(bad(format!(
                "{}: give username and password, or secret",
                at("username")
            )));
        }
        if let Some(pin) = &r.tls_spki {
            use base64::Engine;
            let ok = pin.strip_prefix("sha256/").is_some_and(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .is_ok_and(|d| d.len() == 32)
            });
            if !ok {
                return Err(bad(format!(
                    "{}: {pin:?}: expected sha256/ and the base64 of 32 bytes",
                    at("tls_spki")
                )));
            }
        }
        for p in &r.relay_ports {
            p.describe()
                .map_err(|e| bad(format!("{}: {e}", at("relay_ports"))))?;
        }
        for p in r.echo_udp.iter().chain(&r.echo_tcp) {
            p.ports()
                .map_err(|e| bad(format!("{}: {e}", at("echo_udp/echo_tcp"))))?;
        }
        if r.udp_port == 0 && r.tcp_port == 0 && r.tls_port == 0 {
            return Err(bad(format!(
                "{}: no udp_port, tcp_port or tls_port",
                at("udp_port")
            )));
        }
    }
    Ok(file.regions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_form_parses() {
        let r = parse(
            "t",
            r#"
[[region]]
name = "eu-west"
host = "relay-eu.example.org"
udp_port = 3478
tcp_port = 3478
tls_port = 443
username = "user"       # or: secret = "shared-secret" for ephemeral credentials
password = "pass"

[[region]]
name = "us-east"
host = "relay-us.example.org"
udp_port = 3478
secret = "s"
echo_udp = [5055, "5056-5058"]
relay_ports = ["50000-50007"]
"#,
        )
        .expect("parses");
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[1].echo_udp
                .iter()
                .flat_map(|p| p.ports().expect("ports"))
                .collect::<Vec<_>>(),
            vec![5055, 5056, 5057, 5058]
        );
    }

    #[test]
    fn mistakes_name_the_key() {
        let e = parse(
            "r.toml",
            "[[region]]\nname = \"x\"\nhost = \"h\"\nudp_port = 1\n",
        )
        .expect_err("no creds");
        assert!(e.to_string().contains("region[0].username"), "{e}");
        let e = parse(
            "r.toml",
            "[[region]]\nname = \"x\"\nhost = \"h\"\nudp_prot = 1\n",
        )
        .expect_err("typo");
        assert!(e.to_string().contains("udp_prot"), "{e}");
    }
}
