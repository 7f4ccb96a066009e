//! What a failed TLS handshake means, in words: the relay's certificate not trusted here (and
//! what its operator changes), or TLS inspected on the way, which is claimed only with
//! evidence of it.
//!
//! The probe verifies certificates as usual and also notes the chain it was shown: issuer,
//! subject, the SHA-256 of the key (SPKI), whether it is self-signed or a CA, the names it
//! carries, how many intermediates came with it. Evidence of inspection is one of:
//!
//! - `tls_spki` pinned in `regions.toml`, and a key that is not it;
//! - an issuer that is a TLS-inspection product's CA (Zscaler, FortiGate, mitmproxy...);
//! - the same relay showing another key on another path of the same run (the direct TLS path
//!   against the one through the proxy), compared by [`compare_paths`].
//!
//! Anything else that fails verification is the relay's certificate not being trusted here:
//! self-signed, an intermediate missing from the chain, a CA certificate used as a server's, a
//! name it does not carry, expired. That is for the relay's operator, not for IT's firewall.

use std::sync::{Arc, Mutex};

use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::regions::Region;
use crate::select::PathResult;
use crate::turn::Failure;

/// The certificate a TLS server presented.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Seen {
    pub issuer: String,
    pub subject: String,
    /// `sha256/BASE64` of the SubjectPublicKeyInfo, as `tls_spki` and curl's
    /// `--pinnedpubkey` write it.
    pub spki: String,
    /// Issued by itself.
    pub self_signed: bool,
    /// Marked as a CA (basicConstraints CA:TRUE).
    pub ca: bool,
    /// The DNS names and IP addresses it is for.
    pub names: Vec<String>,
    /// Intermediate certificates sent with it.
    pub intermediates: usize,
}

/// The SPKI pin of a DER certificate, its issuer and the rest of [`Seen`].
pub fn seen(cert: &[u8]) -> Option<Seen> {
    use x509_parser::extensions::GeneralName;
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    let spki = Sha256::digest(c.public_key().raw);
    let names = c
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => Some(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
                        16 => <[u8; 16]>::try_from(*b)
                            .ok()
                            .map(|o| std::net::Ipv6Addr::from(o).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Seen {
        issuer: c.issuer().to_string(),
        subject: c.subject().to_string(),
        spki: format!(
            "sha256/{}",
            base64::engine::general_purpose::STANDARD.encode(spki)
        ),
        self_signed: c.issuer() == c.subject(),
        ca: c.is_ca(),
        names,
        intermediates: 0,
    })
}

/// Verifies as webpki does, records what it was shown and what verification said, and
/// checks the pin.
#[derive(Debug)]
pub struct Verifier {
    inner: Arc<WebPkiServerVerifier>,
    pin: Option<String>,
    last: Mutex<(Option<Seen>, Option<rustls::Error>)>,
}

impl Verifier {
    pub fn new(inner: Arc<WebPkiServerVerifier>, pin: Option<String>) -> Arc<Self> {
        Arc::new(Verifier {
            inner,
            pin,
            last: Mutex::new((None, None)),
        })
    }

    /// The certificate of the last handshake, once one was presented.
    pub fn last_seen(&self) -> Option<Seen> {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Why the last certificate was refused, when it was.
    pub fn last_error(&self) -> Option<rustls::Error> {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

/// The error message a pin mismatch carries, so the caller can tell it from other failures.
pub const PIN_MISMATCH: &str = "the certificate's key is not the pinned tls_spki";

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let s = seen(end_entity).map(|s| Seen {
            intermediates: intermediates.len(),
            ..s
        });
        let pinned = match (&self.pin, &s) {
            // A certificate whose key cannot be read cannot match the pin either.
            (Some(pin), s) if s.as_ref().is_none_or(|s| *pin != s.spki) => {
                Err(rustls::Error::General(PIN_MISMATCH.into()))
            }
            _ => Ok(()),
        };
        let result = pinned.and_then(|()| {
            self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            )
        });
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = (s, result.as_ref().err().cloned());
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Words in the names of the CAs TLS-inspection products re-sign with (matched in lower
/// case): a certificate from one of them is inspection, whatever else is known.
const INSPECTION_PRODUCTS: &[&str] = &[
    "mitmproxy",
    "zscaler",
    "fortinet",
    "fortigate",
    "palo alto",
    "paloalto",
    "blue coat",
    "bluecoat",
    "netskope",
    "cisco umbrella",
    "sophos",
    "forcepoint",
    "websense",
    "check point",
    "checkpoint",
    "barracuda",
    "skyhigh",
    "mcafee web gateway",
    "kaspersky",
    "eset ssl filter",
    "bitdefender",
    "avast",
    "sonicwall",
    "watchguard",
    "iboss",
    "lightspeed",
    "smoothwall",
    "contentkeeper",
    "untangle",
    "fiddler",
    "portswigger",
    "charles proxy",
];

/// The inspection product whose CA issued a certificate, by a word of its issuer's name.
fn product(issuer: &str) -> Option<&'static str> {
    let lower = issuer.to_lowercase();
    INSPECTION_PRODUCTS
        .iter()
        .copied()
        .find(|p| lower.contains(p))
}

/// The bypass advice that goes with every claim of inspection.
fn inspected(host: &str, evidence: String) -> Failure {
    Failure::Inspected(format!(
        "{evidence}: something on the way, usually a proxy inspecting TLS, re-signs the \
         connection. Ask its owners to add {host} to the TLS-inspection bypass list (as for \
         other real-time media services)"
    ))
}

/// What a failed handshake means: `error` is what the connection returned, `refused` what
/// certificate verification said (when it refused), `seen` the certificate shown.
pub fn diagnose(
    error: &std::io::Error,
    refused: Option<&rustls::Error>,
    host: &str,
    seen: Option<&Seen>,
) -> Failure {
    let Some(refused) = refused else {
        return handshake(error);
    };
    let Some(seen) = seen else {
        return Failure::Untrusted(format!("the certificate could not be read: {refused}"));
    };
    let shown = format!(
        "the certificate presented for {host} was issued by \"{}\" ({})",
        seen.issuer, seen.spki
    );
    if let rustls::Error::General(m) = refused {
        if m == PIN_MISMATCH {
            return inspected(
                host,
                format!("{shown}, and its key is not the relay's (tls_spki)"),
            );
        }
    }
    let rustls::Error::InvalidCertificate(why) = refused else {
        return Failure::Untrusted(format!("{shown}: refused: {refused}"));
    };
    if let Some(p) = product(&seen.issuer) {
        return inspected(
            host,
            format!("{shown}, the CA of a TLS-inspection product ({p})"),
        );
    }
    let names = if seen.names.is_empty() {
        "no name".to_owned()
    } else {
        seen.names.join(", ")
    };
    let text = match why {
        CertificateError::UnknownIssuer if seen.self_signed => format!(
            "the relay's certificate for {host} is self-signed (\"{}\"), and this machine does \
             not trust it: give the probe that certificate as ca_file in regions.toml (a test \
             relay), or give the relay one from a public CA",
            seen.subject
        ),
        CertificateError::UnknownIssuer if seen.intermediates == 0 => format!(
            "{shown}, a CA this machine does not know, and the relay sent no intermediate \
             certificate with it: the relay should serve its full chain (fullchain.pem, not \
             cert.pem); if that CA is a private one, give the probe its certificate as ca_file"
        ),
        CertificateError::UnknownIssuer => format!(
            "{shown}, under a root this machine does not trust: a private CA (give the probe \
             its certificate as ca_file), or the relay serves a chain to the wrong root"
        ),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "the relay's certificate is for {names}, not {host}: set tls_name in \
                 regions.toml to a name it carries, or give the relay a certificate for {host}"
            )
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
            "the relay's certificate (\"{}\") has expired: its operator must renew it",
            seen.subject
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
            "the relay's certificate (\"{}\") is not valid yet: check this machine's clock and \
             the relay's",
            seen.subject
        ),
        CertificateError::Other(e) if format!("{e:?}").contains("CaUsedAsEndEntity") => format!(
            "the relay's certificate (\"{}\") is a CA certificate (basicConstraints CA:TRUE), \
             which TLS clients refuse as a server's: make it with -addext \
             \"basicConstraints=critical,CA:FALSE\" (openssl req -x509 marks it a CA by default)",
            seen.subject
        ),
        other => format!("{shown}, refused: {other:?}"),
    };
    Failure::Untrusted(text)
}

/// A handshake that failed for another reason than the certificate.
fn handshake(error: &std::io::Error) -> Failure {
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return Failure::Tls(format!("handshake: {error}"));
    };
    match tls {
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            Failure::NotTurn(format!(
                "what answered does not speak TLS ({tls}): a plain TCP service on the TLS port?"
            ))
        }
        rustls::Error::AlertReceived(alert) => {
            Failure::Tls(format!("the far end ended the handshake ({alert:?})"))
        }
        rustls::Error::NoApplicationProtocol => Failure::Tls(
            "the far end offers neither stun.turn nor http/1.1 (ALPN): not a TURN relay's \
             TLS listener"
                .into(),
        ),
        other => Failure::Tls(format!("handshake: {other}")),
    }
}

/// The paths that go through the web proxy: their TLS is the proxy's to inspect.
fn via_proxy(r: &PathResult, proxied: bool) -> bool {
    r.path == "turn-tls-proxy" || (r.path == "websocket" && proxied)
}

/// Across the paths of one run: a relay whose certificate was shown with one key on a direct
/// path and another through the proxy has that proxy re-signing its connections. A proxy
/// path whose certificate was refused becomes inspection, with both keys named.
pub fn compare_paths(results: &mut [PathResult], regions: &[Region], proxied: bool) {
    let direct: Vec<(String, Seen)> = results
        .iter()
        .filter(|r| !via_proxy(r, proxied))
        .filter_map(|r| Some((r.region.clone(), r.tls_certificate.clone()?)))
        .collect();
    for r in results.iter_mut().filter(|r| via_proxy(r, proxied)) {
        let Some(theirs) = &r.tls_certificate else {
            continue;
        };
        let Some((_, mine)) = direct
            .iter()
            .find(|(region, s)| *region == r.region && s.spki != theirs.spki)
        else {
            continue;
        };
        let host = regions
            .iter()
            .find(|g| g.name == r.region)
            .map_or(r.region.as_str(), |g| g.tls_name());
        let f = match &r.failure {
            Some(Failure::Untrusted(_)) => inspected(
                host,
                format!(
                    "through the proxy the certificate for {host} has the key {}, issued by \
                     \"{}\"; connected directly, the relay shows the key {}, issued by \"{}\"",
                    theirs.spki, theirs.issuer, mine.spki, mine.issuer
                ),
            ),
            // Evidence already, and more of it.
            Some(Failure::Inspected(text)) => Failure::Inspected(format!(
                "{text}. Connected directly, the relay shows another key, {}, issued by \"{}\"",
                mine.spki, mine.issuer
            )),
            _ => continue,
        };
        r.error = Some(f.to_string());
        r.failure = Some(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_is_the_sha256_of_the_public_key_in_base64() {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["relay.test".into()]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let s = seen(cert.der()).expect("parses");
        let want = Sha256::digest(key.public_key_der());
        assert_eq!(
            s.spki,
            format!(
                "sha256/{}",
                base64::engine::general_purpose::STANDARD.encode(want)
            )
        );
        assert!(s.issuer.contains("rcgen"), "{}", s.issuer);
        assert!(s.self_signed && !s.ca, "{s:?}");
        assert_eq!(s.names, ["relay.test"]);
    }

    #[test]
    fn inspection_products_are_known_by_their_issuers() {
        assert_eq!(product("CN=Zscaler Intermediate Root CA"), Some("zscaler"));
        assert_eq!(product("O=mitmproxy, CN=mitmproxy"), Some("mitmproxy"));
        assert_eq!(product("CN=R11, O=Let's Encrypt, C=US"), None);
    }
}
