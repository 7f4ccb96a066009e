//! Telling a relay's TLS certificate from a proxy's: corporate proxies that inspect TLS end
//! the connection themselves and re-sign it with their own CA, which breaks TURN over TLS
//! unless the relay's host is on their bypass list.
//!
//! The probe verifies certificates as usual and also notes the certificate it was shown: its
//! issuer and the SHA-256 of its public key (SPKI). A certificate from an issuer the probe does
//! not trust, or, with `tls_spki` pinned in `regions.toml`, a key that is not the relay's, is
//! reported as TLS inspection with the issuer seen and what to ask the proxy's owners.

use std::sync::{Arc, Mutex};

use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// The certificate a TLS server presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub issuer: String,
    /// `sha256/BASE64` of the SubjectPublicKeyInfo, as `tls_spki` and curl's
    /// `--pinnedpubkey` write it.
    pub spki: String,
}

/// The SPKI pin of a DER certificate, and its issuer.
pub fn seen(cert: &[u8]) -> Option<Seen> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    let spki = Sha256::digest(c.public_key().raw);
    Some(Seen {
        issuer: c.issuer().to_string(),
        spki: format!(
            "sha256/{}",
            base64::engine::general_purpose::STANDARD.encode(spki)
        ),
    })
}

/// Verifies as webpki does, records what it was shown, and checks the pin.
#[derive(Debug)]
pub struct Verifier {
    inner: Arc<WebPkiServerVerifier>,
    pin: Option<String>,
    seen: Mutex<Option<Seen>>,
}

impl Verifier {
    pub fn new(inner: Arc<WebPkiServerVerifier>, pin: Option<String>) -> Arc<Self> {
        Arc::new(Verifier {
            inner,
            pin,
            seen: Mutex::new(None),
        })
    }

    /// The certificate of the last handshake, once one was presented.
    pub fn last_seen(&self) -> Option<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
        let s = seen(end_entity);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = s.clone();
        if let Some(pin) = &self.pin {
            // A certificate whose key cannot be read cannot match the pin either.
            if s.as_ref().is_none_or(|s| *pin != s.spki) {
                return Err(rustls::Error::General(PIN_MISMATCH.into()));
            }
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
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

/// What a failed handshake means, when it means inspection: the message for the probe's
/// result, naming the issuer seen and the fix.
/// A certificate whose key is the pinned one is the relay's, trusted or not: no inspection.
pub fn diagnose(
    error: &std::io::Error,
    host: &str,
    seen: Option<&Seen>,
    pin: Option<&str>,
) -> Option<String> {
    let text = error.to_string();
    let untrusted = text.contains("UnknownIssuer") || text.contains("unknown issuer");
    let mismatch = text.contains(PIN_MISMATCH);
    if !(untrusted || mismatch) {
        return None;
    }
    let seen = seen?;
    if pin == Some(seen.spki.as_str()) {
        return None;
    }
    let why = if mismatch {
        "its key is not the relay's (tls_spki)"
    } else {
        "an issuer this machine does not trust for the relay"
    };
    Some(format!(
        "the certificate presented for {host} was issued by \"{}\" ({}), {why}: something on the \
         way, usually a proxy inspecting TLS, re-signs the connection. Ask its owners to add \
         {host} to the TLS-inspection bypass list (as for other real-time media services)",
        seen.issuer, seen.spki
    ))
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
    }
}
