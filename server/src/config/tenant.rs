//! `[[tenant]]` tables, the default tenant's credential-service keys (`[auth]`), and the
//! revocation file.

use std::path::Path;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use super::file::{TenantConfig, TestPageConfig, UserConfig};
use super::parse::{parse_all, parse_net};
use super::Secret;
use crate::Error;
use turnpike_proto::quota::Quotas;
use turnpike_proto::tenant::{DEFAULT_TENANT, NO_TENANT, TEST_PAGE_TENANT};

/// Longest TTL a credential service answer may carry unless configured (coturn's REST API
/// examples use a day).
pub const DEFAULT_MAX_TTL: u64 = 86_400;
pub const DEFAULT_TTL: u64 = 3_600;

/// The SHA-256 of a credential-service API key, as the configuration stores it. Compared in
/// constant time, so a caller timing the answers learns nothing of the hashes held.
#[derive(Clone, Eq)]
pub struct ApiKeyHash(pub [u8; 32]);

impl PartialEq for ApiKeyHash {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&other.0).into()
    }
}

impl ApiKeyHash {
    /// Whether `self` is among `keys`, looking at every one of them (no early return).
    pub fn is_in<'a>(&self, keys: impl IntoIterator<Item = &'a ApiKeyHash>) -> bool {
        keys.into_iter().fold(false, |found, k| found | (k == self))
    }
}

impl std::fmt::Debug for ApiKeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha256:<hash>")
    }
}

impl ApiKeyHash {
    pub fn of(key: &str) -> Self {
        ApiKeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// `sha256:` followed by 64 hex digits (`printf %s KEY | sha256sum`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            "expected \"sha256:<64 hex digits>\", the SHA-256 of the key (printf %s KEY | sha256sum); \
             the key itself never goes in the file"
                .to_owned()
        };
        let hex = s.strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(ApiKeyHash(out))
    }
}

/// A tenant, validated: the default tenant (from the top-level `realm`, `[auth]`, `[quota]`)
/// or a `[[tenant]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantSettings {
    pub name: String,
    pub realm: String,
    pub hostnames: Vec<String>,
    pub origins: Vec<String>,
    pub users: Vec<(String, Secret)>,
    pub secrets: Vec<Secret>,
    pub api_keys: Vec<ApiKeyHash>,
    pub revoked: Vec<String>,
    pub credential_ttl: u64,
    pub credential_max_ttl: u64,
    pub ice_urls: Vec<String>,
    pub quotas: Quotas,
    /// Added to the relay's `[peer]` lists.
    pub allow_peer: Vec<IpNet>,
    pub deny_peer: Vec<IpNet>,
    /// Allocations may reach only their own session's other allocations on this relay (the
    /// test page's tenant).
    pub relay_only: bool,
    /// Longest allocation lifetime, below the relay's.
    pub max_lifetime: Option<u32>,
}

type ErrAt<'a> = &'a dyn Fn(&str, String) -> Error;

pub(super) fn users(
    list: &[UserConfig],
    key: &str,
    err: ErrAt,
) -> Result<Vec<(String, Secret)>, Error> {
    let mut out = Vec::new();
    for (i, u) in list.iter().enumerate() {
        if u.name.is_empty() {
            return Err(err(&format!("{key}[{i}].name"), "empty user name".into()));
        }
        out.push((u.name.clone(), u.password.clone()));
    }
    Ok(out)
}

pub(super) fn secrets(list: &[Secret], key: &str, err: ErrAt) -> Result<Vec<Secret>, Error> {
    if list.iter().any(|s| s.0.is_empty()) {
        return Err(err(key, "empty secret".into()));
    }
    Ok(list.to_vec())
}

pub(super) fn api_keys(list: &[String], key: &str, err: ErrAt) -> Result<Vec<ApiKeyHash>, Error> {
    list.iter()
        .enumerate()
        .map(|(i, s)| ApiKeyHash::parse(s).map_err(|e| err(&format!("{key}[{i}]"), e)))
        .collect()
}

pub(super) fn ttls(
    ttl: Option<u64>,
    max: Option<u64>,
    prefix: &str,
    err: ErrAt,
) -> Result<(u64, u64), Error> {
    let max = max.unwrap_or(DEFAULT_MAX_TTL);
    let ttl = ttl.unwrap_or(DEFAULT_TTL.min(max));
    if max == 0 {
        return Err(err(
            &format!("{prefix}credential_max_ttl_secs"),
            "must be above 0".into(),
        ));
    }
    if ttl == 0 || ttl > max {
        return Err(err(
            &format!("{prefix}credential_ttl_secs"),
            format!("{ttl} is not between 1 and credential_max_ttl_secs {max}"),
        ));
    }
    Ok((ttl, max))
}

pub(super) fn ice_urls(list: &[String], key: &str, err: ErrAt) -> Result<Vec<String>, Error> {
    for (i, u) in list.iter().enumerate() {
        if !(u.starts_with("turn:") || u.starts_with("turns:") || u.starts_with("stun:")) {
            return Err(err(
                &format!("{key}[{i}]"),
                format!("{u:?}: expected a turn:, turns: or stun: URL"),
            ));
        }
    }
    Ok(list.to_vec())
}

/// Validates the `[[tenant]]` list; `default_quotas` are `[quota]`, whose per-user and
/// per-allocation values tenants inherit.
pub(super) fn resolve(
    list: &[TenantConfig],
    realm: &str,
    default_quotas: &Quotas,
    err: ErrAt,
) -> Result<Vec<TenantSettings>, Error> {
    let mut out: Vec<TenantSettings> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let at = |k: &str| format!("tenant[{i}].{k}");
        // Errors name the tenant too, not only its index.
        let e = |k: &str, r: String| {
            let who = if t.name.is_empty() {
                String::new()
            } else {
                format!("tenant {:?}: ", t.name)
            };
            err(&at(k), format!("{who}{r}"))
        };
        let name_ok = !t.name.is_empty()
            && t.name.len() <= 64
            && t.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err(e(
                "name",
                format!("{:?}: 1-64 letters, digits, '-', '_' or '.'", t.name),
            ));
        }
        if [DEFAULT_TENANT, NO_TENANT, TEST_PAGE_TENANT].contains(&t.name.as_str()) {
            return Err(e(
                "name",
                format!(
                    "{:?} is reserved (the top-level realm is tenant \"default\")",
                    t.name
                ),
            ));
        }
        if out.iter().any(|o| o.name == t.name) {
            return Err(e("name", format!("{:?} names two tenants", t.name)));
        }
        if t.realm.is_empty() || t.realm == realm || out.iter().any(|o| o.realm == t.realm) {
            return Err(e(
                "realm",
                format!(
                    "{:?}: each tenant needs a realm of its own, not empty and not the top-level realm",
                    t.realm
                ),
            ));
        }
        let clash = |v: &String, of: fn(&TenantSettings) -> &[String]| {
            v.is_empty()
                || out
                    .iter()
                    .any(|o| of(o).iter().any(|x| x.eq_ignore_ascii_case(v)))
        };
        if let Some(v) = t.hostnames.iter().find(|v| clash(v, |o| &o.hostnames)) {
            return Err(e(
                "hostnames",
                format!("{v:?} is empty or selects two tenants"),
            ));
        }
        if let Some(v) = t.origins.iter().find(|v| clash(v, |o| &o.origins)) {
            return Err(e(
                "origins",
                format!("{v:?} is empty or selects two tenants"),
            ));
        }
        let users = users(&t.users, &at("users"), err)?;
        let secrets = secrets(&t.secrets, &at("secrets"), err)?;
        if users.is_empty() && secrets.is_empty() {
            return Err(e("secrets", "a tenant needs users or secrets".into()));
        }
        let api_keys = api_keys(&t.api_keys, &at("api_keys"), err)?;
        if !api_keys.is_empty() && secrets.is_empty() {
            return Err(e(
                "api_keys",
                "the credential service mints with the tenant's first secret: add secrets".into(),
            ));
        }
        let (credential_ttl, credential_max_ttl) = ttls(
            t.credential_ttl_secs,
            t.credential_max_ttl_secs,
            &format!("tenant[{i}]."),
            err,
        )?;
        let nonzero = |v: u64| (v != 0).then_some(v);
        let quotas = Quotas {
            total_allocations: (t.quota.allocations != 0).then_some(t.quota.allocations),
            user_allocations: match t.quota.user_allocations {
                Some(0) => None,
                Some(n) => Some(n),
                None => default_quotas.user_allocations,
            },
            allocation_bandwidth: t
                .quota
                .allocation_bytes_per_sec
                .map_or(default_quotas.allocation_bandwidth, nonzero),
            user_bandwidth: t
                .quota
                .user_bytes_per_sec
                .map_or(default_quotas.user_bandwidth, nonzero),
            tenant_bandwidth: nonzero(t.quota.bytes_per_sec),
        };
        out.push(TenantSettings {
            name: t.name.clone(),
            realm: t.realm.clone(),
            hostnames: t.hostnames.clone(),
            origins: t.origins.clone(),
            users,
            secrets,
            api_keys,
            revoked: t.revoked.clone(),
            credential_ttl,
            credential_max_ttl,
            ice_urls: ice_urls(&t.ice_urls, &at("ice_urls"), err)?,
            quotas,
            allow_peer: parse_all(&t.peer.allow, parse_net).map_err(|r| e("peer.allow", r))?,
            deny_peer: parse_all(&t.peer.deny, parse_net).map_err(|r| e("peer.deny", r))?,
            relay_only: false,
            max_lifetime: None,
        });
    }
    Ok(out)
}

/// `[test_page]`: its settings, and the tenant its credentials belong to: a secret made at
/// start, small quotas, a short lifetime, and peers limited to this relay's own allocations,
/// so that a published page gives no one a relay.
pub(super) fn test_page(
    c: &TestPageConfig,
    realm: &str,
    err: ErrAt,
) -> Result<(super::TestPageSettings, TenantSettings), Error> {
    if c.ttl_secs == 0 || c.ttl_secs > 3600 {
        return Err(err(
            "test_page.ttl_secs",
            "must be between 1 and 3600".into(),
        ));
    }
    if c.allocations == 0 {
        return Err(err("test_page.allocations", "must be above 0".into()));
    }
    if c.min_mbps.is_nan() || c.min_mbps < 0.0 {
        return Err(err("test_page.min_mbps", "must be 0 or more".into()));
    }
    for (i, r) in c.regions.iter().enumerate() {
        let ok = !r.name.is_empty()
            && r.url.starts_with("https://")
            && !r.url[8..].is_empty()
            && !r.url[8..].contains(['/', '"', '\'', ' ']);
        if !ok {
            return Err(err(
                &format!("test_page.regions[{i}]"),
                format!(
                    "{:?}: needs a name and a url https://HOST[:PORT] (no path)",
                    r.url
                ),
            ));
        }
    }
    let mut secret = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
    let tenant = TenantSettings {
        name: TEST_PAGE_TENANT.to_owned(),
        realm: format!("{TEST_PAGE_TENANT}.{realm}"),
        hostnames: Vec::new(),
        origins: Vec::new(),
        users: Vec::new(),
        secrets: vec![Secret(secret.iter().map(|b| format!("{b:02x}")).collect())],
        api_keys: Vec::new(),
        revoked: Vec::new(),
        credential_ttl: c.ttl_secs,
        credential_max_ttl: c.ttl_secs,
        ice_urls: ice_urls(&c.ice_urls, "test_page.ice_urls", err)?,
        quotas: Quotas {
            total_allocations: Some(c.allocations),
            // A test holds two allocations per path; its user id is the visitor's address, so
            // one source holds at most this many.
            user_allocations: Some(8),
            allocation_bandwidth: (c.bytes_per_sec != 0).then_some(c.bytes_per_sec),
            user_bandwidth: None,
            // A few tests at full speed at once, not `allocations` of them.
            tenant_bandwidth: (c.bytes_per_sec != 0).then_some(c.bytes_per_sec.saturating_mul(4)),
        },
        allow_peer: Vec::new(),
        deny_peer: Vec::new(),
        relay_only: true,
        // Allocations do not outlive the credentials.
        max_lifetime: Some(c.ttl_secs as u32),
    };
    let page = super::TestPageSettings {
        ttl_secs: c.ttl_secs,
        min_mbps: c.min_mbps,
        max_mbps: (c.bytes_per_sec != 0).then(|| c.bytes_per_sec as f64 * 8.0 / 1e6),
        ice_urls: tenant.ice_urls.clone(),
        regions: c.regions.clone(),
    };
    Ok((page, tenant))
}

/// Reads a revocation file: one entry a line, `USER` (revoked in every tenant) or
/// `TENANT USER`; `#` starts a comment. USER is a user id (the user part of an ephemeral
/// username) or a whole username. A bad line never keeps the others from applying: it is
/// skipped and named in the warnings, as is a missing file (read as empty until it appears).
pub fn read_revocations(
    path: &Path,
    tenants: &[TenantSettings],
) -> (Vec<(Option<String>, String)>, Vec<String>) {
    let file = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return (
                Vec::new(),
                vec![format!("{file}: cannot read the revocation file ({e}); nothing revoked from it until it can be read")],
            )
        }
    };
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some(u), None, _) => out.push((None, u.to_owned())),
            (Some(t), Some(u), None) if tenants.iter().any(|x| x.name == t) => {
                out.push((Some(t.to_owned()), u.to_owned()))
            }
            (Some(t), Some(_), None) => warnings.push(format!(
                "{file}: line {}: no tenant {t:?} is configured; line skipped",
                n + 1
            )),
            _ => warnings.push(format!(
                "{file}: line {}: expected USER or TENANT USER; line skipped",
                n + 1
            )),
        }
    }
    (out, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_hashes_parse_and_match() {
        let h = ApiKeyHash::of("k3y");
        let hex: String = h.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(ApiKeyHash::parse(&format!("sha256:{hex}")), Ok(h.clone()));
        assert!(ApiKeyHash::parse("k3y").is_err());
        assert!(ApiKeyHash::parse(&format!("sha256:{}", &hex[1..])).is_err());
        assert_eq!(format!("{h:?}"), "sha256:<hash>");
    }

    fn load(text: &str) -> Result<super::super::Settings, Error> {
        let f = super::super::FileConfig::from_toml("t.toml", text)?;
        super::super::Settings::resolve(f, &super::super::Cli::default(), "t.toml".into())
    }

    const TWO: &str = r#"
listen = ["udp://127.0.0.1:0"]
[auth]
[quota]
user_allocations = 4
allocation_bytes_per_sec = 1000
[[tenant]]
name = "acme"
realm = "acme.example"
secrets = ["a"]
[tenant.quota]
allocations = 10
bytes_per_sec = 5000
user_allocations = 0
[tenant.peer]
allow = ["10.1.0.0/16"]
[[tenant]]
name = "globex"
realm = "globex.example"
users = [{ name = "bob", password = "b" }]
"#;

    #[test]
    fn tenants_inherit_per_user_quotas_and_there_is_no_default_tenant() {
        let s = load(TWO).expect("two tenants");
        assert!(!s.generated_secret, "tenants bring their own credentials");
        let names: Vec<_> = s.tenants.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["acme", "globex"]);
        let (acme, globex) = (&s.tenants[0], &s.tenants[1]);
        assert_eq!(acme.quotas.total_allocations, Some(10));
        assert_eq!(acme.quotas.tenant_bandwidth, Some(5000));
        assert_eq!(
            acme.quotas.user_allocations, None,
            "0 lifts the inherited limit"
        );
        assert_eq!(acme.quotas.allocation_bandwidth, Some(1000));
        assert_eq!(globex.quotas.user_allocations, Some(4));
        assert_eq!(acme.allow_peer.len(), 1);
        assert_eq!(
            (acme.credential_ttl, acme.credential_max_ttl),
            (3600, 86400)
        );
    }

    #[test]
    fn tenant_errors_name_the_key() {
        let cases = [
            (
                TWO.replace(r#""globex.example""#, r#""acme.example""#),
                "tenant[1].realm",
            ),
            (
                TWO.replace(r#"name = "globex""#, r#"name = "acme""#),
                "tenant[1].name",
            ),
            (
                TWO.replace(r#"name = "globex""#, r#"name = "default""#),
                "tenant[1].name",
            ),
            (
                TWO.replace(
                    r#"secrets = ["a"]"#,
                    "secrets = [\"a\"]\napi_keys = [\"plain\"]",
                ),
                "tenant[0].api_keys[0]",
            ),
            (
                TWO.replace(r#"users = [{ name = "bob", password = "b" }]"#, ""),
                "tenant[1].secrets",
            ),
            (
                TWO.replace(
                    r#"secrets = ["a"]"#,
                    "secrets = [\"a\"]\ncredential_ttl_secs = 90000",
                ),
                "tenant[0].credential_ttl_secs",
            ),
            (
                TWO.replace("allocations = 10", "allocatons = 10"),
                "tenant[0].quota",
            ),
            (
                TWO.replace(
                    r#"users = [{ name = "bob", password = "b" }]"#,
                    r#"secrets = ["a"]"#,
                ),
                "tenant[1].secrets",
            ),
        ];
        for (text, key) in cases {
            let e = load(&text).expect_err(key).to_string();
            assert!(e.contains("t.toml") && e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn revocation_files_name_tenants_and_users() {
        let dir = std::env::temp_dir().join(format!("turnpike-revoked-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("revoked");
        std::fs::write(
            &file,
            "# revoked\nacme carol\nglobex 1800000000:bob # by username\n",
        )
        .expect("write");
        let text = TWO.replace(
            "[auth]",
            &format!("[auth]\nrevoked_file = {:?}", file.display().to_string()),
        );
        let s = load(&text).expect("loads");
        assert_eq!(s.tenants[0].revoked, ["carol"]);
        assert_eq!(s.tenants[1].revoked, ["1800000000:bob"]);
        // A bad line is skipped and reported; the others still apply, a bare user everywhere.
        std::fs::write(&file, "nobody alice\nacme carol extra\ndave\n").expect("write");
        let s = load(&text).expect("loads despite bad lines");
        assert_eq!(s.tenants[0].revoked, ["dave"]);
        assert_eq!(s.tenants[1].revoked, ["dave"]);
        let of_file = |s: &crate::config::Settings| -> Vec<String> {
            let path = file.display().to_string();
            s.warnings
                .iter()
                .filter(|w| w.starts_with(&path))
                .cloned()
                .collect()
        };
        let warnings = of_file(&s);
        assert_eq!(warnings.len(), 2, "{:?}", s.warnings);
        assert!(warnings[0].contains("line 1") && warnings[0].contains("nobody"));
        std::fs::remove_file(&file).expect("remove");
        let s = load(&text).expect("a missing file reads as empty");
        assert!(of_file(&s)[0].contains("cannot read"), "{:?}", s.warnings);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
