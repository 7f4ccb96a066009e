//! Client input from parsing to the answer: ChannelData and Send indications go to `data`,
//! requests are authenticated here and dispatched to `allocation` and `tcp`; Binding, the
//! answers to unauthenticated requests (401, 438, 400, 420) and their per-source limit live
//! here too.

use std::time::Instant;

use crate::auth::{AuthError, PASSWORD_ALGORITHMS};
use crate::stun::{self, attr, method, Builder, Class, Message};

use super::responses::{reason, unknown_required};
use super::stats::{method_index, result_index};
use super::{ClientAction, ClientId, Core, CoreConfig};

impl Core {
    /// Handles a datagram (or stream frame) from a client; an answer is written into `out`.
    /// For ChannelData this is one hash lookup and a scan of the allocation's few channels,
    /// with no allocation and no copy.
    ///
    /// `now` drives timers and rates; `unix` is the wall clock in Unix seconds, which judges
    /// ephemeral credentials and nonces. Pass both as read at the call, not one derived from
    /// the other: the wall clock may step (NTP) while the relay runs.
    pub fn handle_client(
        &mut self,
        packet: &[u8],
        client: ClientId,
        now: Instant,
        unix: u64,
        out: &mut Vec<u8>,
    ) -> ClientAction {
        self.last_now = Some(now);
        if stun::is_channel_data(packet) {
            return self.client_channel_data(packet, client, now);
        }
        let Ok(msg) = Message::parse(packet) else {
            self.stats.malformed += 1;
            return ClientAction::None;
        };
        match msg.class() {
            Class::Request => self.request(&msg, client, now, unix, out),
            Class::Indication if msg.method() == method::SEND => {
                self.send_indication(&msg, client, now)
            }
            Class::Indication | Class::Success | Class::Error => {
                self.stats.dropped_packets += 1;
                ClientAction::None
            }
        }
    }

    /// The tenant an unsigned request is counted against: the one its ORIGIN or SNI names,
    /// else the default tenant, else none (0).
    fn unclaimed(&self, msg: &Message<'_>, client: ClientId) -> u32 {
        let host = self.hosts.get(&client).map(|h| &**h);
        self.shared
            .config()
            .tenants
            .named(msg.get_all(attr::ORIGIN), host)
            .map_or(0, |t| t.id)
    }

    fn request(
        &mut self,
        msg: &Message<'_>,
        client: ClientId,
        now: Instant,
        unix: u64,
        out: &mut Vec<u8>,
    ) -> ClientAction {
        let m = msg.method();
        if m == method::BINDING {
            let tenant = self.unclaimed(msg, client);
            if unknown_required(msg).1 > 0 {
                self.count(tenant, m, 420);
                if !self.may_reply(client, now) {
                    return ClientAction::None;
                }
                return self.unknown_attributes(msg, out);
            }
            self.count(tenant, m, 0);
            return self.binding(msg, client, out);
        }
        if !matches!(
            m,
            method::ALLOCATE
                | method::REFRESH
                | method::CREATE_PERMISSION
                | method::CHANNEL_BIND
                | method::CONNECT
                | method::CONNECTION_BIND
        ) {
            let tenant = self.unclaimed(msg, client);
            self.count(tenant, m, 400);
            if !self.may_reply(client, now) {
                return ClientAction::None;
            }
            self.error_unsigned(msg, 400, out);
            return ClientAction::Reply;
        }
        if self.responses.answer(client, msg.transaction_id(), out) {
            return ClientAction::Reply;
        }
        let config = self.shared.config();
        let host = self.hosts.get(&client).map(|h| &**h);
        let searches = &mut self.searches;
        let mut may_search = || searches.allow(client.addr.ip(), 0, now);
        let auth = match config.tenants.authenticate(
            msg,
            &self.shared.nonces,
            client.addr,
            host,
            unix,
            &mut may_search,
        ) {
            Ok(a) => a,
            Err((tenant, e)) => {
                drop(config);
                return self.auth_failure(msg, client, tenant.unwrap_or(0), e, now, unix, out);
            }
        };
        let revoked = config
            .tenants
            .get(auth.tenant)
            .is_some_and(|t| t.is_revoked(&auth.user_id, &auth.username));
        drop(config);
        if revoked {
            // Authenticated, so the refusal is signed and final: 403 (RFC 8656 §7.2 lists
            // it for administrative refusals).
            self.count_auth_failure(auth.tenant, AuthError::Revoked);
            return self.finish(msg, client, &auth, Err(403), now, out);
        }
        // Checked after authentication, so the 420 is signed and the client accepts it
        // (RFC 8489 §9.2.5).
        if unknown_required(msg).1 > 0 {
            return self.finish(msg, client, &auth, Err(420), now, out);
        }
        let existing = self.by_client.get(&client).copied();
        if let Some(id) = existing {
            if self
                .slot(id)
                .is_some_and(|a| a.username != auth.username || a.tenant != auth.tenant)
            {
                return self.finish(msg, client, &auth, Err(441), now, out);
            }
        }
        let result = match m {
            method::ALLOCATE => match self.allocate(msg, client, &auth, existing, now, unix) {
                Ok(bind) => return ClientAction::Allocate(bind),
                Err(code) => Err(code),
            },
            method::CONNECT => match self.connect(msg, client, &auth, existing, now) {
                Ok(action) => return action,
                Err(code) => Err(code),
            },
            method::CONNECTION_BIND => match self.connection_bind(msg, &auth, existing) {
                Ok((connection, quota)) => {
                    let _ = self.finish(msg, client, &auth, Ok(None), now, out);
                    return ClientAction::DataConnection { connection, quota };
                }
                Err(code) => Err(code),
            },
            method::REFRESH => self.refresh(msg, existing, now).map(Some),
            method::CREATE_PERMISSION => self.create_permission(msg, existing, now).map(|()| None),
            _ => self.channel_bind(msg, existing, now).map(|()| None),
        };
        self.finish(msg, client, &auth, result, now, out)
    }

    pub(super) fn count(&mut self, tenant: u32, m: u16, code: u16) {
        self.stats.tenant(tenant).requests[method_index(m)][result_index(code)] += 1;
    }

    fn count_auth_failure(&mut self, tenant: u32, e: AuthError) {
        if let Some(i) = AuthError::ALL.iter().position(|x| *x == e) {
            self.stats.tenant(tenant).auth_failures[i] += 1;
        }
    }

    /// Whether an unauthenticated request from `client` may be answered with an error now: at
    /// most `unauthenticated_replies_per_sec` per UDP source, across the shards. Stream
    /// clients cannot spoof their address, so only UDP is limited.
    fn may_reply(&mut self, client: ClientId, now: Instant) -> bool {
        if client.is_stream() || self.shared.replies().allow(client.addr.ip(), 0, now) {
            return true;
        }
        self.stats.replies_limited += 1;
        false
    }

    /// 420 for comprehension-required attributes this server does not know (RFC 8489 §7.3.1),
    /// to an unauthenticated request.
    fn unknown_attributes(&mut self, msg: &Message<'_>, out: &mut Vec<u8>) -> ClientAction {
        let (unknown, n) = unknown_required(msg);
        let config = self.shared.config();
        let mut b = Builder::new(out, Class::Error, msg.method(), msg.transaction_id());
        b.error(420, reason(420)).unknown_attributes(&unknown[..n]);
        if let Some(s) = software_unauthenticated(&config) {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        if !msg.transaction_id().is_classic() {
            b.fingerprint();
        }
        ClientAction::Reply
    }

    fn binding(&mut self, msg: &Message<'_>, client: ClientId, out: &mut Vec<u8>) -> ClientAction {
        let tid = msg.transaction_id();
        let config = self.shared.config();
        let mut b = Builder::new(out, Class::Success, method::BINDING, tid);
        if tid.is_classic() {
            // RFC 3489 §11.2.1: MAPPED-ADDRESS. SOURCE-ADDRESS and CHANGED-ADDRESS are left
            // out: this relay has no alternate address to offer, and a listener on 0.0.0.0
            // does not know which of its addresses answered.
            b.address(attr::MAPPED_ADDRESS, client.addr);
        } else {
            b.xor_address(attr::XOR_MAPPED_ADDRESS, client.addr);
            if let Some(s) = software_unauthenticated(&config) {
                b.attr(attr::SOFTWARE, s.as_bytes());
            }
            b.fingerprint();
        }
        ClientAction::Reply
    }

    #[allow(clippy::too_many_arguments)]
    fn auth_failure(
        &mut self,
        msg: &Message<'_>,
        client: ClientId,
        tenant: u32,
        e: AuthError,
        now: Instant,
        unix: u64,
        out: &mut Vec<u8>,
    ) -> ClientAction {
        let code = e.code();
        self.count(tenant, msg.method(), code);
        self.count_auth_failure(tenant, e);
        if !self.may_reply(client, now) {
            return ClientAction::None;
        }
        let mut nonce = [0u8; 37];
        let nonce = self.shared.nonces.issue(client.addr, unix, &mut nonce);
        let config = self.shared.config();
        let mut b = Builder::new(out, Class::Error, msg.method(), msg.transaction_id());
        b.error(code, reason(code));
        if code != 400 {
            let host = self.hosts.get(&client).map(|h| &**h);
            let realm = config
                .tenants
                .challenge_realm(msg.get_all(attr::ORIGIN), host);
            b.attr(attr::REALM, realm.as_bytes())
                .attr(attr::NONCE, nonce)
                .attr(attr::PASSWORD_ALGORITHMS, &PASSWORD_ALGORITHMS);
        }
        if let Some(s) = software_unauthenticated(&config) {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        b.fingerprint();
        ClientAction::Reply
    }

    fn error_unsigned(&mut self, msg: &Message<'_>, code: u16, out: &mut Vec<u8>) {
        let config = self.shared.config();
        let mut b = Builder::new(out, Class::Error, msg.method(), msg.transaction_id());
        b.error(code, reason(code));
        if let Some(s) = software_unauthenticated(&config) {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        if !msg.transaction_id().is_classic() {
            b.fingerprint();
        }
    }
}

/// The SOFTWARE of an answer to an unauthenticated request: only where the operator asks for
/// it, so that what a stranger gets back stays small. Borrowed from the configuration: no copy
/// per request.
fn software_unauthenticated(config: &CoreConfig) -> Option<&str> {
    config
        .software
        .as_deref()
        .filter(|_| config.software_unauthenticated)
}
