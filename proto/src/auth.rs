//! Long-term credentials (RFC 8489 §9.2), coturn-compatible shared-secret ephemeral credentials
//! (the "TURN REST API" draft) and stateless nonces.

use std::collections::HashMap;
use std::net::SocketAddr;

use base64::Engine;
use hmac::{Hmac, Mac};
use md5::digest;
use md5::{Digest, Md5};
use sha1::Sha1;
use sha2::Sha256;

use crate::stun::{attr, Message};

/// RFC 8489 §18.3.4 nonce cookie, followed by the security feature set: bit 0 (password
/// algorithms), and bit 1 (username anonymity) where static users exist, since USERHASH can
/// name only them. Base64 of 0xC00000 and 0x800000.
const NONCE_COOKIE_USERHASH: &str = "obMatJos2wAAA";
const NONCE_COOKIE: &str = "obMatJos2gAAA";
pub const ALGORITHM_MD5: u16 = 0x0001;
pub const ALGORITHM_SHA256: u16 = 0x0002;
/// The PASSWORD-ALGORITHMS value the server offers: MD5 then SHA-256, no parameters.
pub const PASSWORD_ALGORITHMS: [u8; 8] = [0, 1, 0, 0, 0, 2, 0, 0];

/// The long-term key for PASSWORD-ALGORITHM MD5 (and every RFC 5389 client):
/// MD5(username ":" realm ":" password).
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    joined_digest::<Md5>(username, realm, password).into()
}

/// The long-term key for PASSWORD-ALGORITHM SHA-256 (RFC 8489 §18.5.1.2).
pub fn long_term_key_sha256(username: &str, realm: &str, password: &str) -> [u8; 32] {
    joined_digest::<Sha256>(username, realm, password).into()
}

fn joined_digest<D: Digest>(username: &str, realm: &str, password: &str) -> digest::Output<D> {
    let mut h = D::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize()
}

/// USERHASH (RFC 8489 §14.4): SHA-256(username ":" realm).
pub fn userhash(username: &str, realm: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.finalize().into()
}

/// The password of an ephemeral username: base64(HMAC-SHA1(secret, username)), as coturn's
/// `use-auth-secret` expects.
pub fn ephemeral_password(secret: &str, username: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A username for ephemeral credentials: `<expiry unix time>[:<user id>]`.
pub fn ephemeral_username(expiry_unix: u64, user: Option<&str>) -> String {
    match user {
        Some(u) => format!("{expiry_unix}:{u}"),
        None => expiry_unix.to_string(),
    }
}

/// Why a request did not authenticate. Each maps to a response code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no message integrity")]
    Missing,
    #[error("integrity without username, realm or nonce")]
    Incomplete,
    #[error("unsupported or downgraded password algorithm")]
    BadAlgorithm,
    #[error("nonce expired or not ours")]
    StaleNonce,
    #[error("realm not served")]
    UnknownRealm,
    #[error("unknown user")]
    UnknownUser,
    #[error("ephemeral username expired")]
    Expired,
    #[error("message integrity check failed")]
    BadIntegrity,
    #[error("user revoked")]
    Revoked,
}

impl AuthError {
    pub fn code(self) -> u16 {
        match self {
            AuthError::Missing
            | AuthError::UnknownRealm
            | AuthError::UnknownUser
            | AuthError::Expired
            | AuthError::BadIntegrity => 401,
            AuthError::Incomplete | AuthError::BadAlgorithm => 400,
            AuthError::StaleNonce => 438,
            AuthError::Revoked => 403,
        }
    }

    /// Label value for `turnpike_auth_failures_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Incomplete => "incomplete",
            AuthError::BadAlgorithm => "bad_algorithm",
            AuthError::StaleNonce => "stale_nonce",
            AuthError::UnknownRealm => "unknown_realm",
            AuthError::UnknownUser => "unknown_user",
            AuthError::Expired => "expired",
            AuthError::BadIntegrity => "bad_password",
            AuthError::Revoked => "revoked",
        }
    }

    pub const ALL: [AuthError; 9] = [
        AuthError::Missing,
        AuthError::Incomplete,
        AuthError::BadAlgorithm,
        AuthError::StaleNonce,
        AuthError::UnknownRealm,
        AuthError::UnknownUser,
        AuthError::Expired,
        AuthError::BadIntegrity,
        AuthError::Revoked,
    ];
}

/// The long-term key a request authenticated with; responses are signed with it.
#[derive(Clone, PartialEq, Eq)]
pub enum Key {
    Md5([u8; 16]),
    Sha256([u8; 32]),
}

impl Key {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Key::Md5(k) => k,
            Key::Sha256(k) => k,
        }
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// A request that authenticated.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub username: String,
    /// What quotas count against: the user part of an ephemeral username, else the username.
    pub user_id: String,
    pub key: Key,
    /// The request used MESSAGE-INTEGRITY-SHA256; the response does too.
    pub sha256: bool,
    /// The tenant's id (see `tenant::Tenants`); 0 until a tenant claims the request.
    pub tenant: u32,
}

struct StaticUser {
    md5: [u8; 16],
    sha256: [u8; 32],
}

/// The users and secrets of one realm. Keys of static users are precomputed at load time.
pub struct Credentials {
    realm: String,
    users: HashMap<String, StaticUser>,
    userhashes: HashMap<[u8; 32], String>,
    secrets: Vec<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("realm", &self.realm)
            .field("users", &self.users.len())
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Credentials {
    pub fn new<'a>(
        realm: &str,
        users: impl IntoIterator<Item = (&'a str, &'a str)>,
        secrets: impl IntoIterator<Item = String>,
    ) -> Self {
        let mut c = Credentials {
            realm: realm.to_owned(),
            users: HashMap::new(),
            userhashes: HashMap::new(),
            secrets: secrets.into_iter().collect(),
        };
        for (name, password) in users {
            c.users.insert(
                name.to_owned(),
                StaticUser {
                    md5: long_term_key(name, realm, password),
                    sha256: long_term_key_sha256(name, realm, password),
                },
            );
            c.userhashes.insert(userhash(name, realm), name.to_owned());
        }
        c
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    pub fn has_static_users(&self) -> bool {
        !self.users.is_empty()
    }

    /// The shared secrets; the first one mints new credentials, the others are still accepted
    /// (rotation).
    pub fn secrets(&self) -> &[String] {
        &self.secrets
    }

    /// Authenticates a request in this realm (RFC 8489 §9.2.4). `unix_now` judges ephemeral
    /// expiry.
    pub fn authenticate(
        &self,
        msg: &Message<'_>,
        nonces: &Nonces,
        client: SocketAddr,
        unix_now: u64,
    ) -> Result<Authenticated, AuthError> {
        let signed = Signed::check(msg, nonces, client, unix_now)?;
        if signed.realm != self.realm.as_bytes() {
            return Err(AuthError::UnknownRealm);
        }
        self.verify(msg, &signed, &self.realm, true, unix_now)
    }

    /// Checks the integrity of a request that passed [`Signed::check`] against this realm's
    /// users (when `static_users`) and secrets. `realm` is the realm the client signed with,
    /// which differs from this one when an ephemeral credential finds its tenant by secret.
    pub fn verify(
        &self,
        msg: &Message<'_>,
        signed: &Signed<'_>,
        realm: &str,
        static_users: bool,
        unix_now: u64,
    ) -> Result<Authenticated, AuthError> {
        let username = match (signed.username, signed.userhash) {
            (Some(u), _) => u,
            (None, Some(h)) if static_users => self
                .userhashes
                .get(h)
                .map(String::as_str)
                .ok_or(AuthError::UnknownUser)?,
            (None, _) => return Err(AuthError::UnknownUser),
        };
        let sha256_algorithm = signed.sha256_algorithm;
        let check = |key: &Key| {
            if msg.has_integrity_sha256() {
                msg.check_integrity_sha256(key.bytes())
            } else {
                msg.check_integrity_sha1(key.bytes())
            }
        };
        let make_key = |password: &str| {
            if sha256_algorithm {
                Key::Sha256(long_term_key_sha256(username, realm, password))
            } else {
                Key::Md5(long_term_key(username, realm, password))
            }
        };
        let authenticated = |key: Key, user_id: &str| Authenticated {
            username: username.to_owned(),
            user_id: user_id.to_owned(),
            key,
            sha256: msg.has_integrity_sha256(),
            tenant: 0,
        };
        if let Some(user) = self.users.get(username).filter(|_| static_users) {
            let key = if sha256_algorithm {
                Key::Sha256(user.sha256)
            } else {
                Key::Md5(user.md5)
            };
            return if check(&key) {
                Ok(authenticated(key, username))
            } else {
                Err(AuthError::BadIntegrity)
            };
        }
        let Some((expiry, user_id)) = parse_ephemeral(username) else {
            return Err(AuthError::UnknownUser);
        };
        if self.secrets.is_empty() {
            return Err(AuthError::UnknownUser);
        }
        if expiry < unix_now {
            return Err(AuthError::Expired);
        }
        for secret in &self.secrets {
            let key = make_key(&ephemeral_password(secret, username));
            if check(&key) {
                return Ok(authenticated(key, user_id));
            }
        }
        Err(AuthError::BadIntegrity)
    }
}

/// What a signed request carries, checked once before any realm's users are looked at:
/// integrity, realm, nonce, a username or USERHASH, and the password algorithm.
#[derive(Debug)]
pub struct Signed<'m> {
    pub realm: &'m [u8],
    pub username: Option<&'m str>,
    pub userhash: Option<&'m [u8; 32]>,
    pub sha256_algorithm: bool,
}

impl<'m> Signed<'m> {
    pub fn check(
        msg: &Message<'m>,
        nonces: &Nonces,
        client: SocketAddr,
        unix_now: u64,
    ) -> Result<Self, AuthError> {
        if !msg.has_integrity() {
            return Err(AuthError::Missing);
        }
        let (Some(realm), Some(nonce)) = (msg.get(attr::REALM), msg.get(attr::NONCE)) else {
            return Err(AuthError::Incomplete);
        };
        let (username, userhash) = match (msg.get(attr::USERNAME), msg.get(attr::USERHASH)) {
            (Some(u), _) => (
                Some(std::str::from_utf8(u).map_err(|_| AuthError::UnknownUser)?),
                None,
            ),
            (None, Some(h)) => (
                None,
                Some(<&[u8; 32]>::try_from(h).map_err(|_| AuthError::UnknownUser)?),
            ),
            (None, None) => return Err(AuthError::Incomplete),
        };
        if !nonces.verify(nonce, client, unix_now) {
            return Err(AuthError::StaleNonce);
        }
        let sha256_algorithm = match msg.get(attr::PASSWORD_ALGORITHM) {
            // RFC 8489 §9.2.4: the two attributes come together or not at all.
            None if msg.has(attr::PASSWORD_ALGORITHMS) => return Err(AuthError::BadAlgorithm),
            None => false,
            Some(v) => {
                // A client choosing an algorithm must echo the list it was offered, so a
                // man in the middle cannot bid it down (RFC 8489 §9.2.4 step 4).
                if msg.get(attr::PASSWORD_ALGORITHMS) != Some(&PASSWORD_ALGORITHMS[..]) {
                    return Err(AuthError::BadAlgorithm);
                }
                match v.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) {
                    Some(ALGORITHM_MD5) => false,
                    Some(ALGORITHM_SHA256) => true,
                    _ => return Err(AuthError::BadAlgorithm),
                }
            }
        };
        Ok(Signed {
            realm,
            username,
            userhash,
            sha256_algorithm,
        })
    }
}

/// Splits `<expiry>[:<user>]`, or coturn's other accepted form `<user>:<expiry>`; the user id
/// is the whole username when there is no user part.
fn parse_ephemeral(username: &str) -> Option<(u64, &str)> {
    let Some((first, second)) = username.split_once(':') else {
        return Some((username.parse().ok()?, username));
    };
    match first.parse() {
        Ok(ts) => Some((ts, second)),
        Err(_) => Some((second.parse().ok()?, first)),
    }
}

/// Stateless nonces: a timestamp and a MAC over it and the client's IP, so the server keeps
/// nothing per client before a request authenticates.
pub struct Nonces {
    key: [u8; 32],
    lifetime_secs: u64,
    cookie: &'static str,
}

impl Nonces {
    /// `userhash`: advertise USERHASH support (only useful with static users).
    pub fn new(key: [u8; 32], lifetime_secs: u64, userhash: bool) -> Self {
        let cookie = if userhash {
            NONCE_COOKIE_USERHASH
        } else {
            NONCE_COOKIE
        };
        Nonces {
            key,
            lifetime_secs,
            cookie,
        }
    }

    fn mac(&self, ts: u32, client: SocketAddr) -> [u8; 8] {
        let mut out = [0u8; 8];
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return out;
        };
        mac.update(&ts.to_be_bytes());
        // Bound to the client's IP, not its port: an RFC 6062 client signs ConnectionBind on
        // a new data connection with the nonce its control connection got.
        match client.ip() {
            std::net::IpAddr::V4(ip) => mac.update(&ip.octets()),
            std::net::IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        out.copy_from_slice(&mac.finalize().into_bytes()[..8]);
        out
    }

    /// Writes a fresh nonce into `out` and returns it.
    pub fn issue<'o>(&self, client: SocketAddr, unix_now: u64, out: &'o mut [u8; 37]) -> &'o [u8] {
        let ts = unix_now as u32;
        out[..13].copy_from_slice(self.cookie.as_bytes());
        write_hex(&ts.to_be_bytes(), &mut out[13..21]);
        write_hex(&self.mac(ts, client), &mut out[21..37]);
        &out[..]
    }

    pub fn verify(&self, nonce: &[u8], client: SocketAddr, unix_now: u64) -> bool {
        if nonce.len() != 37 || &nonce[..13] != self.cookie.as_bytes() {
            return false;
        }
        let (Some(ts), Some(mac)) = (read_hex::<4>(&nonce[13..21]), read_hex::<8>(&nonce[21..37]))
        else {
            return false;
        };
        let ts = u32::from_be_bytes(ts);
        let age = (unix_now as u32).wrapping_sub(ts);
        // Constant-time comparison is not needed: the MAC is not a secret the client lacks.
        mac == self.mac(ts, client) && u64::from(age) <= self.lifetime_secs
    }
}

fn write_hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[(b >> 4) as usize];
        out[2 * i + 1] = DIGITS[(b & 15) as usize];
    }
}

fn read_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (s.get(2 * i).copied()? as char).to_digit(16)?;
        let lo = (s.get(2 * i + 1).copied()? as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coturn_rest_api_vector() {
        // Computed independently: python3 hmac.new(b"north", b"1700000000:alice", sha1), base64.
        assert_eq!(
            ephemeral_password("north", "1700000000:alice"),
            "Cd/49soE35ICqcJF/bCTn8Z4OyE="
        );
    }

    #[test]
    fn long_term_key_matches_rfc5769() {
        let key = long_term_key(
            "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}",
            "example.org",
            "TheMatrIX",
        );
        assert_eq!(
            key,
            [
                0xe8, 0xca, 0x7a, 0xd5, 0x9d, 0x5e, 0xb0, 0x51, 0x8e, 0x31, 0x29, 0x11, 0xd2, 0xda,
                0xb2, 0xa9
            ]
        );
    }

    #[test]
    fn nonces_expire_and_bind_to_the_client_ip() {
        let n = Nonces::new([7; 32], 600, true);
        let a: SocketAddr = "192.0.2.1:1000".parse().expect("addr");
        let b: SocketAddr = "192.0.2.2:1000".parse().expect("addr");
        let mut buf = [0u8; 37];
        let nonce = n.issue(a, 1_000_000, &mut buf).to_vec();
        assert!(n.verify(&nonce, a, 1_000_000));
        assert!(n.verify(&nonce, a, 1_000_600));
        assert!(!n.verify(&nonce, a, 1_000_601));
        assert!(!n.verify(&nonce, b, 1_000_000));
        assert!(!Nonces::new([8; 32], 600, true).verify(&nonce, a, 1_000_000));
        assert!(!n.verify(b"obMatJos2wAAAzz", a, 1_000_000));
    }

    #[test]
    fn ephemeral_usernames_parse() {
        assert_eq!(
            parse_ephemeral("1700000000:alice"),
            Some((1_700_000_000, "alice"))
        );
        assert_eq!(
            parse_ephemeral("1700000000"),
            Some((1_700_000_000, "1700000000"))
        );
        assert_eq!(
            parse_ephemeral("alice:1700000000"),
            Some((1_700_000_000, "alice"))
        );
        assert_eq!(parse_ephemeral("alice"), None);
        assert_eq!(parse_ephemeral("alice:bob"), None);
    }
}
