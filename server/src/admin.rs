//! The admin API, `/v1/admin/...`, authorised by `[admin] keys` (`Authorization: Bearer KEY`;
//! the configuration holds only their SHA-256). Served on the metrics listener and over HTTPS
//! on the TLS listeners, never in plain HTTP on a relay port. Every change is logged with the
//! name of the key that made it; secrets are taken, never returned.
//!
//! - `GET /v1/admin/tenants`; `PUT /v1/admin/tenants/NAME` (a `[[tenant]]` table as JSON);
//!   `DELETE /v1/admin/tenants/NAME`
//! - `PUT /v1/admin/tenants/NAME/users/USER` (`{"password": ...}`); `DELETE` the same
//! - `POST /v1/admin/tenants/NAME/revocations` (`{"user": ...}`, a user id or username);
//!   `DELETE /v1/admin/tenants/NAME/revocations/USER`
//! - `GET /v1/admin/allocations[?tenant=T&user=U]`; `DELETE /v1/admin/allocations/ID`
//! - `GET /v1/admin/usage[?tenant=T&hours=N]`: hourly totals from the session records

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use axum::routing::any;
use axum::Router;
use serde_json::json;

use crate::config::fleet::FleetSettings;
use crate::config::ApiKeyHash;
use crate::fleet::Fleet;
use crate::http::Secure;
use crate::service::{bearer, json};
use crate::store::{Snapshot, StoredTenant};

const MAX_BODY: usize = 64 << 10;

/// The admin API's state.
pub struct Admin {
    fleet: Arc<Fleet>,
    keys: arc_swap::ArcSwap<Vec<(String, ApiKeyHash)>>,
    /// Wrong keys per source.
    failures: std::sync::Mutex<turnpike_proto::limiter::Limiter>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    json(status, &json!({ "error": message.into() }))
}

/// The query string's value of `key`, percent-decoded (as [`encode`] encodes it).
fn query(req: &Request, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| decode(v))
    })
}

/// What the admin API and its CLI percent-encode in a path segment or a query value:
/// everything but letters, digits and `-._~` (RFC 3986's unreserved characters), so names
/// with spaces, `/`, `:`, `@`, `%` or `+` go through whole.
const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A name as one path segment or query value.
pub fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, NOT_UNRESERVED).to_string()
}

/// The inverse of [`encode`] (a `+` stays a `+`).
pub fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Wrong keys a source may send: two, then one a second; beyond, 429.
const FAILURE_RATE: turnpike_proto::limiter::Rates = turnpike_proto::limiter::Rates {
    packets_per_sec: 1.0,
    bytes_per_sec: 1.0,
};

impl Admin {
    pub fn new(fleet: Arc<Fleet>, settings: &FleetSettings) -> Arc<Self> {
        Arc::new(Admin {
            fleet,
            keys: arc_swap::ArcSwap::from_pointee(settings.admin_keys.clone()),
            failures: std::sync::Mutex::new(turnpike_proto::limiter::Limiter::new(
                FAILURE_RATE,
                turnpike_proto::limiter::MAX_SOURCES,
            )),
        })
    }

    pub fn reload(&self, settings: &FleetSettings) {
        self.keys.store(Arc::new(settings.admin_keys.clone()));
    }

    /// The routes; `plain_ok` on the metrics listener, where plain HTTP is allowed.
    pub fn routes(self: Arc<Self>, plain_ok: bool) -> Router {
        Router::new().route(
            "/v1/admin/{*rest}",
            any(move |req: Request| {
                let admin = Arc::clone(&self);
                async move { admin.handle(req, plain_ok).await }
            }),
        )
    }

    /// Which key signed the request, by name; every key is compared, in constant time.
    fn who(&self, req: &Request) -> Option<String> {
        let key = bearer(req.headers())?;
        let hash = ApiKeyHash::of(key);
        self.keys
            .load()
            .iter()
            .fold(None, |found, (n, h)| match (found, *h == hash) {
                (None, true) => Some(n.clone()),
                (found, _) => found,
            })
    }

    async fn handle(&self, req: Request, plain_ok: bool) -> Response {
        if self.keys.load().is_empty() {
            return error(
                StatusCode::NOT_FOUND,
                "the admin API is off: no [admin] keys",
            );
        }
        let secure = req.extensions().get::<Secure>().is_some_and(|s| s.0);
        if !secure && !plain_ok {
            return error(
                StatusCode::FORBIDDEN,
                "the admin API answers over HTTPS only",
            );
        }
        let source = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        let now = std::time::Instant::now();
        if let Some(ip) = source {
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            if failures.exhausted(ip, now) {
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many wrong admin keys from this address; wait and retry",
                );
                r.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("1"),
                );
                return r;
            }
        }
        let Some(who) = self.who(&req) else {
            if let Some(ip) = source {
                let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
                failures.allow(ip, 0, now);
            }
            tracing::info!(source = ?source, "admin: a request with a missing or wrong key");
            let why = if bearer(req.headers()).is_some() {
                "wrong admin key"
            } else {
                "an admin key is needed (Authorization: Bearer KEY; turnpike admin --key)"
            };
            let mut r = error(StatusCode::UNAUTHORIZED, why);
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            return r;
        };
        let method = req.method().clone();
        let path: Vec<String> = req
            .uri()
            .path()
            .trim_start_matches("/v1/admin/")
            .split('/')
            .map(decode)
            .collect();
        let tenant_filter = query(&req, "tenant");
        let fleet_wide = query(&req, "fleet").is_some_and(|v| v == "1" || v == "true");
        let key = bearer(req.headers()).unwrap_or_default().to_owned();
        let user_filter = query(&req, "user");
        let hours = query(&req, "hours").and_then(|h| h.parse::<i64>().ok());
        let body = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
            Ok(b) => b,
            Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
        };
        let body: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
            serde_json::Value::Null
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
            }
        };
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        match (&method, p.as_slice()) {
            (&Method::GET, ["allocations"]) => {
                let list: Vec<_> = self
                    .fleet
                    .board
                    .list()
                    .await
                    .into_iter()
                    .filter(|a| tenant_filter.as_ref().is_none_or(|t| a.tenant == *t))
                    .filter(|a| {
                        user_filter
                            .as_ref()
                            .is_none_or(|u| a.user_id == *u || a.username == *u)
                    })
                    .collect();
                if fleet_wide {
                    return self
                        .fleet_allocations(&key, list, &tenant_filter, &user_filter)
                        .await;
                }
                json(StatusCode::OK, &json!({ "allocations": list }))
            }
            (&Method::DELETE, ["allocations", id]) => {
                if self.fleet.board.end(id).await {
                    tracing::info!(admin = %who, allocation = %id, "admin: allocation ended");
                    json(StatusCode::ACCEPTED, &json!({ "ending": id }))
                } else {
                    error(StatusCode::NOT_FOUND, format!("no allocation {id}"))
                }
            }
            (&Method::GET, ["tenants"]) => self.list_tenants().await,
            (&Method::GET, ["usage"]) => {
                let Some(store) = &self.fleet.store else {
                    return error(
                        StatusCode::CONFLICT,
                        "no [store]: usage is kept in the store",
                    );
                };
                let since =
                    crate::store::unix_now() as i64 - hours.unwrap_or(24).clamp(1, 24 * 400) * 3600;
                match store
                    .usage(tenant_filter.as_deref(), since - since % 3600)
                    .await
                {
                    Ok(rows) => json(StatusCode::OK, &json!({ "usage": rows })),
                    Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                }
            }
            _ => self.change(&who, &method, &p, body).await,
        }
    }

    /// Every relay's live allocations: this one's (`mine`) and those of each sibling that
    /// publishes its admin address in the store, asked with the same key at once (three
    /// seconds each). Each allocation names its relay; the relays that did not answer are
    /// named with why.
    async fn fleet_allocations(
        &self,
        key: &str,
        mine: Vec<crate::fleet::LiveAllocation>,
        tenant: &Option<String>,
        user: &Option<String>,
    ) -> Response {
        let siblings = match self.fleet.admin_siblings().await {
            Ok(s) => s,
            Err(e) => return error(StatusCode::CONFLICT, e),
        };
        let mut q = vec![];
        if let Some(t) = tenant {
            q.push(format!("tenant={}", encode(t)));
        }
        if let Some(u) = user {
            q.push(format!("user={}", encode(u)));
        }
        let path = if q.is_empty() {
            "allocations".to_owned()
        } else {
            format!("allocations?{}", q.join("&"))
        };
        let asks = siblings.iter().map(|(name, url)| {
            let path = path.clone();
            async move {
                let call = crate::admin_cli::call(url, key, None, "GET", &path, None);
                let answer =
                    match tokio::time::timeout(std::time::Duration::from_secs(3), call).await {
                        Err(_) => Err("no answer within 3 s".to_owned()),
                        Ok(Err(e)) => Err(e),
                        Ok(Ok((200, body))) => serde_json::from_str::<serde_json::Value>(&body)
                            .map_err(|e| format!("answer: {e}")),
                        Ok(Ok((status, body))) => Err(format!("{status}: {body}")),
                    };
                (name.clone(), answer)
            }
        });
        let answers = futures_util::future::join_all(asks).await;
        let me = self.fleet.relay_name();
        let mut all: Vec<serde_json::Value> = mine
            .iter()
            .map(|a| {
                let mut v = json!(a);
                v["relay"] = json!(me);
                v
            })
            .collect();
        let mut relays = vec![json!({ "name": me, "allocations": mine.len() })];
        let mut unanswered = Vec::new();
        for (name, answer) in answers {
            match answer {
                Ok(v) => {
                    let list = v["allocations"].as_array().cloned().unwrap_or_default();
                    relays.push(json!({ "name": name, "allocations": list.len() }));
                    all.extend(list.into_iter().map(|mut a| {
                        a["relay"] = json!(name);
                        a
                    }));
                }
                Err(e) => unanswered.push(json!({ "name": name, "error": e })),
            }
        }
        json(
            StatusCode::OK,
            &json!({ "allocations": all, "relays": relays, "unanswered": unanswered }),
        )
    }

    async fn list_tenants(&self) -> Response {
        let merge = self.fleet.merge.load();
        let stored = match &self.fleet.store {
            Some(s) => match s.snapshot().await {
                Ok(s) => Some(s),
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            },
            None => None,
        };
        let (all, errors) = match &stored {
            Some(s) => merge.resolve(s),
            None => (merge.base.clone(), Vec::new()),
        };
        let list: Vec<_> = all
            .iter()
            .map(|t| {
                let source = if merge.base.iter().any(|b| b.name == t.name) {
                    "configuration"
                } else {
                    "store"
                };
                json!({
                    "name": t.name,
                    "source": source,
                    "realm": t.realm,
                    "hostnames": t.hostnames,
                    "origins": t.origins,
                    "users": t.users.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                    "secrets": t.secrets.len(),
                    "api_keys": t.api_keys.len(),
                    "revoked": t.revoked,
                })
            })
            .collect();
        json(
            StatusCode::OK,
            &json!({ "tenants": list, "refused": errors }),
        )
    }

    /// A change to the store: checked against the configuration and the other tenants
    /// first, then written; every relay reading the store picks it up.
    async fn change(
        &self,
        who: &str,
        method: &Method,
        p: &[&str],
        body: serde_json::Value,
    ) -> Response {
        let Some(store) = &self.fleet.store else {
            return error(
                StatusCode::CONFLICT,
                "no [store]: tenants live in the configuration file",
            );
        };
        let current = match store.snapshot().await {
            Ok(s) => s,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        };
        let merge = self.fleet.merge.load();
        let in_file = |name: &str| merge.base.iter().any(|t| t.name == name);
        let in_store = |name: &str| current.tenants.iter().any(|t| t.name == name);
        let str_field = |k: &str| body.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let result = match (method, p) {
            (&Method::PUT, ["tenants", name]) => {
                if in_file(name) {
                    return error(
                        StatusCode::CONFLICT,
                        format!("tenant {name:?} is in the configuration file"),
                    );
                }
                if !body.is_object() {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "body: a [[tenant]] table as a JSON object",
                    );
                }
                let mut doc = body.clone();
                if let Some(o) = doc.as_object_mut() {
                    o.remove("users");
                }
                let mut next = current.clone();
                let users = next
                    .tenants
                    .iter()
                    .find(|t| t.name == *name)
                    .map(|t| t.users.clone())
                    .unwrap_or_default();
                next.tenants.retain(|t| t.name != *name);
                let candidate = StoredTenant {
                    name: (*name).to_owned(),
                    doc: doc.clone(),
                    users,
                };
                if let Err(e) = check(&merge, &next, &candidate) {
                    return error(StatusCode::BAD_REQUEST, e);
                }
                let created = !in_store(name);
                store.put_tenant(name, &doc).await.map(|()| {
                    tracing::info!(admin = %who, tenant = %name, created, "admin: tenant written");
                    (
                        if created {
                            StatusCode::CREATED
                        } else {
                            StatusCode::OK
                        },
                        json!({ "tenant": name }),
                    )
                })
            }
            (&Method::DELETE, ["tenants", name]) => match store.delete_tenant(name).await {
                Ok(true) => {
                    tracing::info!(admin = %who, tenant = %name, "admin: tenant deleted");
                    Ok((StatusCode::OK, json!({ "deleted": name })))
                }
                Ok(false) => {
                    return error(
                        StatusCode::NOT_FOUND,
                        format!("no tenant {name:?} in the store"),
                    )
                }
                Err(e) => Err(e),
            },
            (&Method::PUT, ["tenants", name, "users", user]) => {
                let Some(password) = str_field("password").filter(|p| !p.is_empty()) else {
                    return error(StatusCode::BAD_REQUEST, "body: {\"password\": \"...\"}");
                };
                let Some(t) = current.tenants.iter().find(|t| t.name == *name) else {
                    return error(
                        StatusCode::NOT_FOUND,
                        format!("no tenant {name:?} in the store"),
                    );
                };
                let mut candidate = t.clone();
                candidate.users.retain(|(u, _)| u != user);
                candidate.users.push(((*user).to_owned(), password.clone()));
                let mut others = current.clone();
                others.tenants.retain(|o| o.name != *name);
                if let Err(e) = check(&merge, &others, &candidate) {
                    return error(StatusCode::BAD_REQUEST, e);
                }
                store.put_user(name, user, &password).await.map(|()| {
                    tracing::info!(admin = %who, tenant = %name, user = %user, "admin: user written");
                    (StatusCode::OK, json!({ "tenant": name, "user": user }))
                })
            }
            (&Method::DELETE, ["tenants", name, "users", user]) => {
                match store.delete_user(name, user).await {
                    Ok(true) => {
                        tracing::info!(admin = %who, tenant = %name, user = %user, "admin: user deleted");
                        Ok((StatusCode::OK, json!({ "deleted": user })))
                    }
                    Ok(false) => {
                        return error(
                            StatusCode::NOT_FOUND,
                            format!("no user {user:?} in tenant {name:?}"),
                        )
                    }
                    Err(e) => Err(e),
                }
            }
            (&Method::POST, ["tenants", name, "revocations"]) => {
                let Some(user) = str_field("user").filter(|u| !u.is_empty()) else {
                    return error(StatusCode::BAD_REQUEST, "body: {\"user\": \"...\"}");
                };
                if !in_file(name) && !in_store(name) {
                    return error(StatusCode::NOT_FOUND, format!("no tenant {name:?}"));
                }
                store.revoke(name, &user).await.map(|()| {
                    tracing::info!(admin = %who, tenant = %name, user = %user, "admin: user revoked");
                    (StatusCode::OK, json!({ "tenant": name, "revoked": user }))
                })
            }
            (&Method::DELETE, ["tenants", name, "revocations", user]) => {
                match store.unrevoke(name, user).await {
                    Ok(true) => {
                        tracing::info!(admin = %who, tenant = %name, user = %user, "admin: revocation lifted");
                        Ok((StatusCode::OK, json!({ "tenant": name, "unrevoked": user })))
                    }
                    Ok(false) => {
                        return error(
                            StatusCode::NOT_FOUND,
                            format!("{user:?} is not revoked in {name:?}"),
                        )
                    }
                    Err(e) => Err(e),
                }
            }
            _ => return error(StatusCode::NOT_FOUND, "no such admin call"),
        };
        match result {
            Ok((status, body)) => json(status, &body),
            // The database refused a clash another relay wrote meanwhile: nothing written.
            Err(e @ crate::store::StoreError::Conflict(_)) => {
                error(StatusCode::CONFLICT, e.to_string())
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
}

/// Whether `candidate` joins the store's other tenants and the configuration's cleanly.
fn check(
    merge: &crate::config::fleet::StoreMerge,
    others: &Snapshot,
    candidate: &StoredTenant,
) -> Result<(), String> {
    let (accepted, _) = merge.resolve(others);
    merge.one(candidate, &accepted).map(|_| ())
}
