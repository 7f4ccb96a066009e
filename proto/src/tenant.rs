//! Tenants: one relay serving many customers, each with its own realm, users, secrets, quotas
//! and peer policy, and nothing that authenticates in another's.
//!
//! A request finds its tenant by the REALM it signs with; an unsigned request (the first
//! Allocate) is challenged with the realm of the tenant its ORIGIN attribute or TLS SNI names,
//! else with the relay's default realm. In the default realm an ephemeral credential finds its
//! tenant by the shared secret that signed it, so clients that can send neither ORIGIN nor SNI
//! (browsers over UDP and TCP) still reach their tenant; static users of a tenant need its realm.
//! A single-tenant relay is one tenant named `default` in the default realm.

use std::collections::HashSet;
use std::net::SocketAddr;

use crate::auth::{AuthError, Authenticated, Credentials, Nonces, Signed};
use crate::policy::PeerPolicy;
use crate::quota::Quotas;
use crate::stun::{attr, Message};

/// The tenant of the relay's own realm, and of every single-tenant relay.
pub const DEFAULT_TENANT: &str = "default";
/// The metrics label of requests no tenant claims.
pub const NO_TENANT: &str = "none";
/// The tenant of the browser test page's credentials.
pub const TEST_PAGE_TENANT: &str = "test-page";

/// One customer of the relay.
#[derive(Debug)]
pub struct Tenant {
    /// Its name: the `tenant` metrics label, and the name revocation lists use.
    pub name: String,
    pub credentials: Credentials,
    /// ORIGIN attribute values (draft-johnston-tram-stun-origin) that select this tenant, as
    /// coturn's multi-tenant mode does.
    pub origins: Vec<String>,
    /// TLS SNI host names that select this tenant.
    pub hostnames: Vec<String>,
    pub quotas: Quotas,
    /// The relay's policy plus this tenant's additions.
    pub policy: PeerPolicy,
    /// User ids (the user part of an ephemeral username) and usernames refused from now on.
    pub revoked: HashSet<String>,
    /// Longest allocation lifetime for this tenant, below the relay's (the test page's
    /// allocations do not outlive its credentials).
    pub max_lifetime: Option<u32>,
    /// Stable id (never reused for another name while the relay runs), assigned by
    /// `Shared`: what allocations and counters refer to across reloads.
    pub id: u32,
}

impl Tenant {
    pub fn new(name: &str, credentials: Credentials, policy: PeerPolicy) -> Self {
        Tenant {
            name: name.to_owned(),
            credentials,
            origins: Vec::new(),
            hostnames: Vec::new(),
            quotas: Quotas::default(),
            policy,
            revoked: HashSet::new(),
            max_lifetime: None,
            id: 0,
        }
    }

    pub fn realm(&self) -> &str {
        self.credentials.realm()
    }

    /// Whether requests of this user are refused: by user id or by whole username.
    pub fn is_revoked(&self, user_id: &str, username: &str) -> bool {
        !self.revoked.is_empty()
            && (self.revoked.contains(user_id) || self.revoked.contains(username))
    }
}

/// Every tenant of the relay, and the default realm unsigned requests are challenged with.
#[derive(Debug)]
pub struct Tenants {
    realm: String,
    list: Vec<Tenant>,
}

impl Tenants {
    /// `realm` is the relay's default realm; a tenant with that realm is the default tenant.
    /// Realms, names, origins and host names are unique (the configuration checks that).
    pub fn new(realm: &str, list: Vec<Tenant>) -> Self {
        Tenants {
            realm: realm.to_owned(),
            list,
        }
    }

    /// A relay with one tenant, `default`, in its realm.
    pub fn single(credentials: Credentials, policy: PeerPolicy) -> Self {
        let realm = credentials.realm().to_owned();
        Tenants::new(
            &realm,
            vec![Tenant::new(DEFAULT_TENANT, credentials, policy)],
        )
    }

    pub fn default_realm(&self) -> &str {
        &self.realm
    }

    pub fn list(&self) -> &[Tenant] {
        &self.list
    }

    pub fn list_mut(&mut self) -> &mut [Tenant] {
        &mut self.list
    }

    /// The tenant with a stable id.
    pub fn get(&self, id: u32) -> Option<&Tenant> {
        self.list.iter().find(|t| t.id == id)
    }

    pub fn by_name(&self, name: &str) -> Option<&Tenant> {
        self.list.iter().find(|t| t.name == name)
    }

    pub fn has_static_users(&self) -> bool {
        self.list.iter().any(|t| t.credentials.has_static_users())
    }

    /// The tenant an unsigned request is challenged for: by the first of its ORIGIN
    /// attributes that names one (a request may carry several), then by SNI host name, then
    /// the default tenant (None when the default realm has no tenant).
    pub fn named<'o>(
        &self,
        origins: impl IntoIterator<Item = &'o [u8]>,
        host: Option<&str>,
    ) -> Option<&Tenant> {
        for o in origins {
            if let Some(t) = self.list.iter().find(|t| {
                t.origins
                    .iter()
                    .any(|x| x.as_bytes().eq_ignore_ascii_case(o))
            }) {
                return Some(t);
            }
        }
        if let Some(h) = host {
            if let Some(t) = self
                .list
                .iter()
                .find(|t| t.hostnames.iter().any(|x| x.eq_ignore_ascii_case(h)))
            {
                return Some(t);
            }
        }
        self.list.iter().find(|t| t.realm() == self.realm)
    }

    /// The REALM a 401 carries.
    pub fn challenge_realm<'o>(
        &self,
        origins: impl IntoIterator<Item = &'o [u8]>,
        host: Option<&str>,
    ) -> &str {
        self.named(origins, host)
            .map(Tenant::realm)
            .unwrap_or(&self.realm)
    }

    /// Authenticates a request and finds its tenant (whose stable id the result carries). An
    /// error names the tenant it is counted against, where one is known. `may_search` is asked
    /// before credentials are tried against other tenants' secrets (an HMAC per secret), so
    /// the caller can bound that work per source.
    pub fn authenticate(
        &self,
        msg: &Message<'_>,
        nonces: &Nonces,
        client: SocketAddr,
        host: Option<&str>,
        unix_now: u64,
        may_search: &mut dyn FnMut() -> bool,
    ) -> Result<Authenticated, (Option<u32>, AuthError)> {
        let hint = || self.named(msg.get_all(attr::ORIGIN), host).map(|t| t.id);
        let signed = Signed::check(msg, nonces, client, unix_now).map_err(|e| (hint(), e))?;
        let claim = |t: &Tenant, mut a: Authenticated| {
            a.tenant = t.id;
            a
        };
        let named = self
            .list
            .iter()
            .find(|t| t.realm().as_bytes() == signed.realm);
        let default_realm = signed.realm == self.realm.as_bytes();
        let mut first = None;
        if let Some(t) = named {
            match t
                .credentials
                .verify(msg, &signed, t.realm(), true, unix_now)
            {
                Ok(a) => return Ok(claim(t, a)),
                Err(e) => first = Some((Some(t.id), e)),
            }
        } else if !default_realm {
            first = Some((hint(), AuthError::UnknownRealm));
        }
        // In the default realm, after its own tenant: an ephemeral credential is tried against
        // each other tenant's secrets, keyed with the realm the client signed with. In a
        // tenant's realm, only relay-only tenants' secrets are (the test page opened under a
        // tenant's host name): their allocations reach nothing but each other, and they are
        // counted as theirs, so no tenant's credentials ever work as another's.
        let realm = std::str::from_utf8(signed.realm).unwrap_or_default();
        let candidates: Vec<&Tenant> = self
            .list
            .iter()
            .filter(|t| named.is_none_or(|n| n.id != t.id))
            .filter(|t| default_realm || t.policy.is_relay_only())
            .filter(|t| !t.credentials.secrets().is_empty())
            .collect();
        if candidates.is_empty() || !may_search() {
            return Err(first.unwrap_or((None, AuthError::UnknownUser)));
        }
        let mut worst = AuthError::UnknownUser;
        for t in candidates {
            match t.credentials.verify(msg, &signed, realm, false, unix_now) {
                Ok(a) => return Ok(claim(t, a)),
                Err(e) => {
                    if rank(e) > rank(worst) {
                        worst = e;
                    }
                }
            }
        }
        Err(first.unwrap_or((None, worst)))
    }
}

/// Which of several tenants' refusals to report: the one that says most.
fn rank(e: AuthError) -> u8 {
    match e {
        AuthError::BadIntegrity => 2,
        AuthError::Expired => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ephemeral_password, long_term_key};
    use crate::stun::{method, Builder, Class, TransactionId};

    const NOW: u64 = 1_800_000_000;

    fn tenants() -> Tenants {
        let mut acme = Tenant::new(
            "acme",
            Credentials::new(
                "acme.example",
                [("alice", "a-pass")],
                ["acme-secret".into()],
            ),
            PeerPolicy::default(),
        );
        acme.origins.push("https://app.acme.example".into());
        acme.hostnames.push("turn.acme.example".into());
        acme.id = 1;
        let mut globex = Tenant::new(
            "globex",
            Credentials::new(
                "globex.example",
                [("bob", "b-pass")],
                ["globex-secret".into()],
            ),
            PeerPolicy::default(),
        );
        globex.id = 2;
        globex.revoked.insert("mallory".into());
        Tenants::new("relay.example", vec![acme, globex])
    }

    fn client() -> SocketAddr {
        "192.0.2.7:5000".parse().expect("addr")
    }

    /// A signed Allocate as a client would build it after a 401 with `realm`.
    fn signed(nonces: &Nonces, user: &str, realm: &str, password: &str) -> Vec<u8> {
        let mut nonce = [0u8; 37];
        let nonce = nonces.issue(client(), NOW, &mut nonce).to_vec();
        let mut out = Vec::new();
        let mut b = Builder::new(
            &mut out,
            Class::Request,
            method::ALLOCATE,
            TransactionId({
                let mut t = [3u8; 16];
                t[..4].copy_from_slice(&crate::stun::MAGIC_COOKIE.to_be_bytes());
                t
            }),
        );
        b.attr(attr::USERNAME, user.as_bytes())
            .attr(attr::REALM, realm.as_bytes())
            .attr(attr::NONCE, &nonce)
            .integrity_sha1(&long_term_key(user, realm, password));
        out
    }

    fn auth(t: &Tenants, packet: &[u8]) -> Result<Authenticated, (Option<u32>, AuthError)> {
        let nonces = Nonces::new([1; 32], 600, true);
        let msg = Message::parse(packet).expect("parse");
        t.authenticate(&msg, &nonces, client(), None, NOW, &mut || true)
    }

    #[test]
    fn a_tenants_users_and_secrets_work_only_in_its_realm() {
        let t = tenants();
        let n = Nonces::new([1; 32], 600, true);
        let ok = auth(&t, &signed(&n, "alice", "acme.example", "a-pass")).expect("alice");
        assert_eq!((ok.tenant, ok.user_id.as_str()), (1, "alice"));
        // Alice's password in globex's realm: unknown there.
        assert_eq!(
            auth(&t, &signed(&n, "alice", "globex.example", "a-pass")).err(),
            Some((Some(2), AuthError::UnknownUser))
        );
        let eph = format!("{}:carol", NOW + 60);
        let acme_pass = ephemeral_password("acme-secret", &eph);
        let ok = auth(&t, &signed(&n, &eph, "acme.example", &acme_pass)).expect("ephemeral");
        assert_eq!((ok.tenant, ok.user_id.as_str()), (1, "carol"));
        assert_eq!(
            auth(&t, &signed(&n, &eph, "globex.example", &acme_pass)).err(),
            Some((Some(2), AuthError::BadIntegrity))
        );
        assert_eq!(
            auth(&t, &signed(&n, &eph, "nowhere.example", &acme_pass)).err(),
            Some((None, AuthError::UnknownRealm))
        );
    }

    #[test]
    fn in_the_default_realm_an_ephemeral_credential_finds_its_tenant_by_secret() {
        let t = tenants();
        let n = Nonces::new([1; 32], 600, true);
        let eph = format!("{}:dave", NOW + 60);
        let pass = ephemeral_password("globex-secret", &eph);
        let ok = auth(&t, &signed(&n, &eph, "relay.example", &pass)).expect("by secret");
        assert_eq!(ok.tenant, 2);
        // Static users are not found that way: they need their tenant's realm.
        assert_eq!(
            auth(&t, &signed(&n, "bob", "relay.example", "b-pass")).err(),
            Some((None, AuthError::UnknownUser))
        );
        let late = format!("{}:dave", NOW - 1);
        let pass = ephemeral_password("globex-secret", &late);
        assert_eq!(
            auth(&t, &signed(&n, &late, "relay.example", &pass)).err(),
            Some((None, AuthError::Expired))
        );
    }

    #[test]
    fn beside_a_default_tenant_other_tenants_secrets_still_work_in_the_default_realm() {
        let mut t = tenants();
        let mut default = Tenant::new(
            DEFAULT_TENANT,
            Credentials::new("relay.example", [], ["default-secret".into()]),
            PeerPolicy::default(),
        );
        default.id = 3;
        t.list.push(default);
        let n = Nonces::new([1; 32], 600, true);
        let eph = format!("{}:erin", NOW + 60);
        let ok = auth(
            &t,
            &signed(
                &n,
                &eph,
                "relay.example",
                &ephemeral_password("acme-secret", &eph),
            ),
        )
        .expect("acme by secret");
        assert_eq!(ok.tenant, 1);
        let ok = auth(
            &t,
            &signed(
                &n,
                &eph,
                "relay.example",
                &ephemeral_password("default-secret", &eph),
            ),
        )
        .expect("default");
        assert_eq!(ok.tenant, 3);
        assert_eq!(
            auth(&t, &signed(&n, &eph, "relay.example", "wrong")).err(),
            Some((Some(3), AuthError::BadIntegrity)),
            "counted against the default tenant"
        );
    }

    #[test]
    fn challenges_name_the_tenant_of_origin_or_host() {
        let t = tenants();
        assert_eq!(
            t.challenge_realm([&b"https://x"[..], b"https://APP.acme.example"], None),
            "acme.example"
        );
        assert_eq!(
            t.challenge_realm([], Some("turn.acme.example")),
            "acme.example"
        );
        assert_eq!(
            t.challenge_realm([&b"https://other"[..]], None),
            "relay.example"
        );
        assert!(t.named([], None).is_none());
        let single = Tenants::single(
            Credentials::new("r", [("u", "p")], []),
            PeerPolicy::default(),
        );
        assert_eq!(
            single.named([], None).map(|t| t.name.as_str()),
            Some("default")
        );
    }

    #[test]
    fn revocation_matches_user_id_or_username() {
        let t = tenants();
        let g = t.by_name("globex").expect("globex");
        assert!(g.is_revoked("mallory", "1800000000:mallory"));
        assert!(!g.is_revoked("bob", "bob"));
    }
}
