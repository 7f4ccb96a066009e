//! Reloading on SIGHUP or when a watched file changes: credentials, tenants, peer policy,
//! limits and certificates change in place; listeners, relay addresses and relay ports only
//! on restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use turnpike_proto::tenant::DEFAULT_TENANT;
use turnpike_proto::Shared;

use super::core_config::core_config;
use super::tls_of;
use crate::config::{Cli, Settings};
use crate::io;
use crate::metrics::Metrics;
use crate::service::CredentialService;

/// Files whose change triggers a reload: the config file, the certificate and the key.
pub(super) fn watched(cli: &Cli, settings: &Settings) -> Vec<(PathBuf, Option<SystemTime>)> {
    [
        cli.config.clone(),
        settings.tls_cert.clone(),
        settings.tls_key.clone(),
        settings.revoked_file.clone(),
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        let t = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
        (p, t)
    })
    .collect()
}

/// Everything a reload touches.
pub(super) struct Reloader<'a> {
    pub(super) cli: &'a Cli,
    pub(super) current: Settings,
    pub(super) plan: io::RelayPlan,
    pub(super) bound: Vec<std::net::SocketAddr>,
    pub(super) shared: Arc<Shared>,
    pub(super) streams: Arc<io::stream::StreamContext>,
    pub(super) credentials: Arc<CredentialService>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) files: Vec<(PathBuf, Option<SystemTime>)>,
    pub(super) fleet: Arc<crate::fleet::Fleet>,
    pub(super) admin: Arc<crate::admin::Admin>,
    /// The tenant store's last copy, merged into every reload.
    pub(super) snapshot: Option<crate::store::Snapshot>,
}

impl Reloader<'_> {
    pub(super) fn changed(&self) -> bool {
        self.files
            .iter()
            .any(|(p, t)| std::fs::metadata(p).and_then(|m| m.modified()).ok() != *t)
    }

    /// Re-reads the configuration and certificates; on any error the running configuration
    /// stays. Existing allocations keep relaying either way.
    pub(super) fn reload(&mut self, why: &str) {
        // The files' times before reading them: an edit made while this reload reads them
        // triggers the next one.
        let before = watched(self.cli, &self.current);
        self.files = before.clone();
        let mut next = match Settings::load(self.cli) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the running configuration stays");
                return;
            }
        };
        if next.generated_secret {
            // Keep the secret generated at start, so the printed credential stays valid.
            next.secrets = self.current.secrets.clone();
            if let Some(t) = next.tenants.iter_mut().find(|t| t.name == DEFAULT_TENANT) {
                t.secrets = next.secrets.clone();
            }
        }
        // The test page's secret is made at start: keep it, so issued credentials stay valid.
        for t in next.tenants.iter_mut().filter(|t| t.relay_only) {
            if let Some(old) = self.current.tenants.iter().find(|o| o.name == t.name) {
                t.secrets = old.secrets.clone();
            }
        }
        let tls = match tls_of(&next) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the running configuration stays");
                return;
            }
        };
        for w in &next.warnings {
            tracing::warn!("{w}");
        }
        // The store's tenants beside the file's; what clashes is left out and said.
        let merge = crate::config::fleet::StoreMerge::of(&next);
        if let Some(snapshot) = &self.snapshot {
            let (tenants, refused) = merge.resolve(snapshot);
            for r in &refused {
                tracing::error!("store: {r}: left out");
            }
            next.tenants = tenants;
        }
        self.fleet.merge.store(Arc::new(merge));
        self.fleet.reload(&next.fleet);
        self.admin.reload(&next.fleet);
        if next.fleet.store_url != self.current.fleet.store_url {
            tracing::warn!("store.url changes only on restart");
        }
        if next.listen != self.current.listen
            || next.relay_ips != self.current.relay_ips
            || next.echo != self.current.echo
            || next.relay_ports != self.current.relay_ports
            || next.shared_relay_ports != self.current.shared_relay_ports
        {
            tracing::warn!(
                "listeners, relay addresses and ports, and echo services change only on restart"
            );
        }
        self.shared
            .reload(core_config(&next, &self.plan, &self.bound));
        self.metrics.add_tenants(&self.shared.tenant_names());
        self.credentials.reload(&next);
        if tls.is_some() {
            self.streams.tls.store(tls);
        }
        tracing::info!(
            trigger = why,
            tenants = next.tenants.len(),
            users = next.users.len(),
            secrets = next.secrets.len(),
            revoked = next.tenants.iter().map(|t| t.revoked.len()).sum::<usize>(),
            allow_peer = next.allow_peer.len(),
            deny_peer = next.deny_peer.len(),
            "configuration reloaded"
        );
        let paths =
            |f: &[(PathBuf, Option<SystemTime>)]| f.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        let after = watched(self.cli, &next);
        self.files = if paths(&after) == paths(&before) {
            before
        } else {
            after
        };
        self.current = next;
    }
}
