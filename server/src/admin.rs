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
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    json(status, &json!({ "error": message.into() }))
}

/// The query string's `key=value` pairs (values percent-decoded only for `%40` and `+`,
/// which user ids carry).
fn query(req: &Request, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%40", "@").replace('+', " "))
    })
}

impl Admin {
    pub fn new(fleet: Arc<Fleet>, settings: &FleetSettings) -> Arc<Self> {
        Arc::new(Admin {
            fleet,
            keys: arc_swap::ArcSwap::from_pointee(settings.admin_keys.clone()),
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

    /// Which key signed the request, by name.
    fn who(&self, req: &Request) -> Option<String> {
        let key = bearer(req.headers())?;
        let hash = ApiKeyHash::of(key);
        self.keys
            .load()
            .iter()
            .find(|(_, h)| *h == hash)
            .map(|(n, _)| n.clone())
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
        let Some(who) = self.who(&req) else {
            let mut r = error(StatusCode::UNAUTHORIZED, "an admin key is needed");
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
            .map(|s| s.replace("%40", "@"))
            .collect();
        let tenant_filter = query(&req, "tenant");
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
                json(StatusCode::OK, &json!({ "allocations": list }))
            }
            (&Method::DELETE, ["allocations", id]) => {
                if self.fleet.board.end(id) {
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
