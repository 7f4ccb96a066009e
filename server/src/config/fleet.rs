//! What a fleet of relays shares and how an operator runs it: `[store]` (the tenant store),
//! `[admin]` (the admin API's keys), `[sessions]` (session records) and `[redirect]` (300 Try
//! Alternate to a sibling while draining or beyond a load).

use std::net::SocketAddr;

use serde::Deserialize;

use super::tenant::ApiKeyHash;
use super::Secret;
use crate::Error;
use turnpike_proto::core::Alternate;

/// `[store]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite:PATH` or `postgres://...`; the environment's `TURNPIKE_STORE_URL` (a
    /// Kubernetes Secret) or `--store` override it.
    #[serde(default)]
    pub url: Option<Secret>,
    /// How this relay names itself in the store's `relays` table (default: the host name).
    #[serde(default)]
    pub relay_name: Option<String>,
    /// Where the relay keeps the store's last snapshot and the usage not yet written (default:
    /// the SQLite file's folder, or `/var/lib/turnpike` for PostgreSQL).
    #[serde(default)]
    pub state_dir: Option<std::path::PathBuf>,
}

/// One `[[admin.keys]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminKeyConfig {
    /// Who holds it: the name every change it makes is logged with.
    pub name: String,
    /// `sha256:<hex>` of the key (`printf %s KEY | sha256sum`).
    pub hash: String,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default)]
    pub keys: Vec<AdminKeyConfig>,
    /// Where the admin API answers: `"metrics"` (the metrics listener, the default) or an
    /// `IP:PORT` of its own.
    #[serde(default)]
    pub listen: Option<String>,
    /// Also over HTTPS on the relay's `tls://` listeners.
    #[serde(default)]
    pub https_listeners: bool,
    /// Where its siblings reach this relay's admin API (`http://IP:PORT` or `https://...`),
    /// published in the store so that any relay answers for the fleet's allocations.
    #[serde(default)]
    pub advertise: Option<String>,
}

/// Where the admin API answers besides the TLS listeners.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AdminListen {
    /// On the metrics listener.
    #[default]
    Metrics,
    /// On a listener of its own (plain HTTP).
    Own(SocketAddr),
}

/// `[sessions]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    /// A JSON line per ended allocation on stdout.
    #[serde(default = "yes")]
    pub log: bool,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig { log: true }
    }
}

fn yes() -> bool {
    true
}

/// A sibling's addresses, in `[redirect]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiblingConfig {
    #[serde(default)]
    pub udp: Vec<String>,
    #[serde(default)]
    pub tcp: Vec<String>,
    #[serde(default)]
    pub tls: Vec<String>,
    /// The host name its TLS certificate is for (ALTERNATE-DOMAIN).
    #[serde(default)]
    pub domain: Option<String>,
}

/// `[redirect]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// Beyond this many allocations, Allocate is redirected (0: never for load).
    #[serde(default)]
    pub max_allocations: u64,
    /// Siblings to send clients to, in order of preference, when the store publishes none.
    #[serde(default)]
    pub siblings: Vec<SiblingConfig>,
    /// This relay's own addresses, published in the store for its siblings' redirects.
    #[serde(default)]
    pub advertise: Option<SiblingConfig>,
}

/// The fleet settings, validated.
#[derive(Debug, Default, PartialEq)]
pub struct FleetSettings {
    pub store_url: Option<Secret>,
    /// The state folder, with a store: `[store] state_dir` or its default.
    pub state_dir: Option<std::path::PathBuf>,
    pub relay_name: String,
    pub admin_keys: Vec<(String, ApiKeyHash)>,
    pub admin_listen: AdminListen,
    /// The admin API also over HTTPS on the TLS listeners.
    pub admin_https_listeners: bool,
    /// Where siblings reach this relay's admin API.
    pub admin_advertise: Option<String>,
    pub session_log: bool,
    pub max_allocations: u64,
    pub siblings: Vec<Alternate>,
    pub advertise: Option<Alternate>,
}

fn sibling(
    s: &SiblingConfig,
    key: &str,
    err: &dyn Fn(&str, String) -> Error,
) -> Result<Alternate, Error> {
    let addrs = |list: &[String], k: &str| -> Result<Vec<SocketAddr>, Error> {
        list.iter()
            .enumerate()
            .map(|(i, a)| {
                a.parse().map_err(|_| {
                    err(
                        &format!("{key}.{k}[{i}]"),
                        format!("{a:?}: expected IP:PORT"),
                    )
                })
            })
            .collect()
    };
    let alt = Alternate {
        udp: addrs(&s.udp, "udp")?,
        tcp: addrs(&s.tcp, "tcp")?,
        tls: addrs(&s.tls, "tls")?,
        domain: s.domain.clone(),
    };
    if alt.udp.is_empty() && alt.tcp.is_empty() && alt.tls.is_empty() {
        return Err(err(
            key,
            "a sibling needs at least one address (udp, tcp or tls)".into(),
        ));
    }
    if !alt.tls.is_empty() && alt.domain.is_none() {
        return Err(err(
            &format!("{key}.domain"),
            "TLS addresses need the host name of the sibling's certificate".into(),
        ));
    }
    Ok(alt)
}

pub(super) fn resolve(
    store: &StoreConfig,
    admin: &AdminConfig,
    sessions: &SessionsConfig,
    redirect: &RedirectConfig,
    store_flag: Option<&str>,
    err: &dyn Fn(&str, String) -> Error,
) -> Result<FleetSettings, Error> {
    let store_url = match store_flag {
        Some(u) => Some(Secret(u.to_owned())),
        None => store.url.clone(),
    }
    .filter(|u| !u.0.is_empty());
    let mut admin_keys = Vec::new();
    for (i, k) in admin.keys.iter().enumerate() {
        if k.name.is_empty() {
            return Err(err(&format!("admin.keys[{i}].name"), "empty name".into()));
        }
        let hash =
            ApiKeyHash::parse(&k.hash).map_err(|e| err(&format!("admin.keys[{i}].hash"), e))?;
        admin_keys.push((k.name.clone(), hash));
    }
    let admin_listen = match admin.listen.as_deref() {
        None | Some("metrics") => AdminListen::Metrics,
        Some(a) => AdminListen::Own(
            a.parse()
                .map_err(|_| err("admin.listen", format!("{a:?}: \"metrics\" or IP:PORT")))?,
        ),
    };
    let admin_advertise = match admin.advertise.as_deref() {
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => Some(u.to_owned()),
        Some(u) => {
            return Err(err(
                "admin.advertise",
                format!("{u:?}: http://IP:PORT or https://NAME:PORT"),
            ))
        }
        None => None,
    };
    let siblings = redirect
        .siblings
        .iter()
        .enumerate()
        .map(|(i, s)| sibling(s, &format!("redirect.siblings[{i}]"), err))
        .collect::<Result<Vec<_>, _>>()?;
    let advertise = redirect
        .advertise
        .as_ref()
        .map(|a| sibling(a, "redirect.advertise", err))
        .transpose()?;
    let relay_name = store.relay_name.clone().unwrap_or_else(host_name);
    let state_dir = store_url.as_ref().map(|url| match &store.state_dir {
        Some(d) => d.clone(),
        None => default_state_dir(&url.0),
    });
    Ok(FleetSettings {
        store_url,
        state_dir,
        relay_name,
        admin_keys,
        admin_listen,
        admin_https_listeners: admin.https_listeners,
        admin_advertise,
        session_log: sessions.log,
        max_allocations: redirect.max_allocations,
        siblings,
        advertise,
    })
}

/// Where a store's local state goes by default: beside a SQLite file, else the relay's state
/// folder (systemd's `StateDirectory`, the container's volume).
fn default_state_dir(url: &str) -> std::path::PathBuf {
    let sqlite = !(url.starts_with("postgres://")
        || url.starts_with("postgresql://")
        || url.contains("host="));
    let path = url.strip_prefix("sqlite:").unwrap_or(url);
    let path = std::path::Path::new(path.strip_prefix("//").unwrap_or(path));
    match path.parent() {
        Some(dir) if sqlite && !dir.as_os_str().is_empty() => dir.to_path_buf(),
        Some(_) if sqlite => std::path::PathBuf::from("."),
        _ => std::path::PathBuf::from("/var/lib/turnpike"),
    }
}

/// The machine's host name (a pod's name on Kubernetes).
fn host_name() -> String {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    if unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0 {
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        String::from_utf8_lossy(&name[..end]).into_owned()
    } else {
        "turnpike".into()
    }
}

/// What a store's tenants are checked against: the configuration file's realm, default
/// quotas and tenants. The reload keeps the current one for the admin API, which checks a
/// change before it writes it.
#[derive(Debug, Clone, Default)]
pub struct StoreMerge {
    pub realm: String,
    pub quotas: turnpike_proto::quota::Quotas,
    /// The configuration file's tenants (and the test page's).
    pub base: Vec<super::TenantSettings>,
}

impl StoreMerge {
    pub fn of(settings: &super::Settings) -> Self {
        StoreMerge {
            realm: settings.realm.clone(),
            quotas: settings.quotas.clone(),
            base: settings.tenants.clone(),
        }
    }

    /// The file's tenants with the store's added (and its revocations applied to both); what
    /// could not be added, each with why. A store tenant that clashes with another (name,
    /// realm, host name, origin or secret) is left out, never half-applied.
    pub fn resolve(
        &self,
        snapshot: &crate::store::Snapshot,
    ) -> (Vec<super::TenantSettings>, Vec<String>) {
        let mut out = self.base.clone();
        let mut errors = Vec::new();
        for t in &snapshot.tenants {
            match self.one(t, &out) {
                Ok(s) => out.push(s),
                Err(e) => errors.push(e),
            }
        }
        for (tenant, user) in &snapshot.revocations {
            if let Some(t) = out.iter_mut().find(|t| t.name == *tenant) {
                if !t.revoked.contains(user) {
                    t.revoked.push(user.clone());
                }
            }
        }
        (out, errors)
    }

    /// One stored tenant, validated as a `[[tenant]]` table and against `others`.
    pub fn one(
        &self,
        t: &crate::store::StoredTenant,
        others: &[super::TenantSettings],
    ) -> Result<super::TenantSettings, String> {
        let mut doc = t.doc.clone();
        if let Some(o) = doc.as_object_mut() {
            o.insert("name".into(), t.name.clone().into());
        }
        let mut cfg: super::TenantConfig = serde_path_to_error::deserialize(doc)
            .map_err(|e| format!("tenant {:?}: {}: {}", t.name, e.path(), e.inner()))?;
        for (name, password) in &t.users {
            cfg.users.push(super::file::UserConfig {
                name: name.clone(),
                password: Secret(password.clone()),
            });
        }
        let err = |key: &str, reason: String| Error::Config {
            file: "store".into(),
            key: key.replacen("tenant[0].", "", 1),
            reason,
        };
        let mut list =
            super::tenant::resolve(std::slice::from_ref(&cfg), &self.realm, &self.quotas, &err)
                .map_err(|e| e.to_string())?;
        let s = list.pop().ok_or("no tenant")?;
        let clash = |a: &[String], b: &[String]| {
            a.iter()
                .any(|x| b.iter().any(|y| x.eq_ignore_ascii_case(y)))
        };
        for o in others {
            let why = if o.name == s.name {
                Some("its name is another tenant's")
            } else if o.realm == s.realm {
                Some("its realm is another tenant's")
            } else if clash(&o.hostnames, &s.hostnames) {
                Some("a host name selects another tenant")
            } else if clash(&o.origins, &s.origins) {
                Some("an origin selects another tenant")
            } else if o.secrets.iter().any(|x| s.secrets.contains(x)) {
                Some("a secret is another tenant's")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(format!("tenant {:?}: {why} ({:?})", s.name, o.name));
            }
        }
        Ok(s)
    }
}
