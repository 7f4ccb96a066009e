//! The configuration as the core takes it: tenants (credentials, quotas, peer policy with the
//! relay's own addresses) and limits. Built at start and on each reload.

use turnpike_proto::auth::Credentials;
use turnpike_proto::policy::PeerPolicy;
use turnpike_proto::tenant::{Tenant, Tenants};
use turnpike_proto::CoreConfig;

use crate::config::Settings;
use crate::io;

/// The core's settings: tenants (credentials, quotas, policy) and limits. Rebuilt on reload.
pub(super) fn core_config(
    settings: &Settings,
    plan: &io::RelayPlan,
    bound: &[std::net::SocketAddr],
) -> CoreConfig {
    let own_ips: Vec<_> = [plan.v4, plan.v6]
        .into_iter()
        .flatten()
        .flat_map(|(bind, advertised)| [bind, advertised])
        .chain(
            settings
                .external_ips
                .iter()
                .flat_map(|(public, private)| [Some(*public), *private])
                .flatten(),
        )
        .collect();
    let tenants = settings
        .tenants
        .iter()
        .map(|t| {
            let mut policy = PeerPolicy::new(
                [&settings.allow_peer[..], &t.allow_peer[..]].concat(),
                [&settings.deny_peer[..], &t.deny_peer[..]].concat(),
            );
            if t.relay_only {
                policy = policy.relay_only();
            }
            policy.set_own_addresses(bound.to_vec(), own_ips.clone(), plan.ports);
            let credentials = Credentials::new(
                &t.realm,
                t.users.iter().map(|(u, p)| (u.as_str(), p.0.as_str())),
                t.secrets.iter().map(|s| s.0.clone()),
            );
            let mut tenant = Tenant::new(&t.name, credentials, policy);
            tenant.origins = t.origins.clone();
            tenant.hostnames = t.hostnames.clone();
            tenant.quotas = t.quotas.clone();
            tenant.revoked = t.revoked.iter().cloned().collect();
            tenant.max_lifetime = t.max_lifetime;
            tenant
        })
        .collect();
    CoreConfig {
        tenants: Tenants::new(&settings.realm, tenants),
        default_lifetime: settings.default_lifetime,
        max_lifetime: settings.max_lifetime,
        nonce_lifetime: settings.nonce_lifetime_secs,
        max_permissions: settings.max_permissions,
        max_peer_endpoints: settings.max_peer_endpoints,
        max_tcp_connections: settings.max_tcp_connections,
        relay_v4: plan.addresses()[0],
        relay_v6: plan.addresses()[1],
        software: settings.software.clone(),
        software_unauthenticated: settings.software_unauthenticated,
        unauthenticated_replies_per_sec: settings.unauthenticated_replies_per_sec,
        relay_ports: plan.ports,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
    use crate::config::FileConfig;

    #[test]
    fn the_core_configuration_prints_no_secret() {
        let text = r#"
listen = ["udp://127.0.0.1:0"]
relay_ips = ["127.0.0.1"]
[auth]
secrets = ["fleet-secret-value"]
users = [{ name = "alice", password = "alice-password-value" }]
"#;
        let file = FileConfig::from_toml("test.toml", text).expect("parses");
        let settings =
            Settings::resolve(file, &Cli::default(), "test.toml".into()).expect("resolves");
        let plan = io::relay_plan(&settings);
        let printed = format!("{:?}", core_config(&settings, &plan, &[]));
        assert!(printed.contains("Credentials"), "{printed}");
        for secret in ["fleet-secret-value", "alice-password-value"] {
            assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        }
    }
}
