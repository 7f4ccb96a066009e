//! Signed answers to authenticated requests, and the cache that answers a retransmitted
//! request as the first copy was answered (RFC 8489 §6.3.1: a request is idempotent for the
//! client only if its answer is).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::auth::Authenticated;
use crate::stun::{attr, Builder, Class, Message, TransactionId};

use super::{ClientAction, ClientId, Core, Shared};

/// How long a retransmitted request is answered from the cache (RFC 8489: 39.5 s of retries).
const TTL: Duration = Duration::from_secs(40);
/// Most answers cached; the oldest go first.
const MAX: usize = 8192;

/// Answers by (client, transaction), oldest first.
#[derive(Debug, Default)]
pub(super) struct Cache {
    answers: HashMap<(ClientId, TransactionId), (Instant, Vec<u8>)>,
    order: VecDeque<(ClientId, TransactionId)>,
}

impl Cache {
    /// Copies the cached answer to this request into `out`, if there is one.
    pub(super) fn answer(&self, client: ClientId, tid: TransactionId, out: &mut Vec<u8>) -> bool {
        let Some((_, cached)) = self.answers.get(&(client, tid)) else {
            return false;
        };
        out.clear();
        out.extend_from_slice(cached);
        true
    }

    pub(super) fn store(
        &mut self,
        client: ClientId,
        tid: TransactionId,
        answer: &[u8],
        now: Instant,
    ) {
        while self.order.len() >= MAX {
            if let Some(k) = self.order.pop_front() {
                self.answers.remove(&k);
            }
        }
        self.answers.insert((client, tid), (now, answer.to_vec()));
        self.order.push_back((client, tid));
    }

    /// When the oldest answer is due to go.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        let k = self.order.front()?;
        self.answers.get(k).map(|(t, _)| *t + TTL)
    }

    /// Forgets the answers older than the retransmission window.
    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(k) = self.order.front() {
            match self.answers.get(k) {
                Some((t, _)) if now.saturating_duration_since(*t) < TTL => break,
                _ => {
                    if let Some(k) = self.order.pop_front() {
                        self.answers.remove(&k);
                    }
                }
            }
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.answers.len()
    }
}

impl Core {
    /// Writes a signed response into `out` (success with an optional LIFETIME, or an error
    /// code), caches it for retransmissions and counts it.
    pub(super) fn finish(
        &mut self,
        msg: &Message<'_>,
        client: ClientId,
        auth: &Authenticated,
        result: Result<Option<u32>, u16>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> ClientAction {
        let code = result.err().unwrap_or(0);
        self.count(auth.tenant, msg.method(), code);
        let class = if code == 0 {
            Class::Success
        } else {
            Class::Error
        };
        let mut b = Builder::new(out, class, msg.method(), msg.transaction_id());
        match result {
            Err(420) => {
                let (unknown, n) = unknown_required(msg);
                b.error(420, reason(420)).unknown_attributes(&unknown[..n]);
            }
            Err(300) => {
                // RFC 8489 §10: the sibling's address of the client's family, then one of the
                // other family where it has one; ALTERNATE-DOMAIN (the name on the sibling's
                // certificate) over TLS, only to a client that signed with
                // MESSAGE-INTEGRITY-SHA256 and so implements it.
                b.error(300, reason(300));
                let full = !self.shared.is_draining();
                let r = self.shared.redirect();
                let to = if full { &r.full } else { &r.draining };
                let (stream, tls) = (client.is_stream(), self.tls.contains(&client));
                let v6 = client.addr.is_ipv6();
                if let Some(a) = to {
                    if let Some((addr, domain)) = a.for_client(stream, tls, v6) {
                        b.address(attr::ALTERNATE_SERVER, addr);
                        if let Some((other, _)) = a.for_client(stream, tls, !v6) {
                            b.address(attr::ALTERNATE_SERVER, other);
                        }
                        if let (Some(d), true) = (domain, auth.sha256) {
                            b.attr(attr::ALTERNATE_DOMAIN, d.as_bytes());
                        }
                    }
                }
            }
            Err(code) => {
                b.error(code, reason(code));
            }
            Ok(Some(lifetime)) => {
                b.u32(attr::LIFETIME, lifetime);
            }
            Ok(None) => {}
        }
        sign(&mut b, &self.shared, auth);
        self.responses.store(client, msg.transaction_id(), out, now);
        ClientAction::Reply
    }
}

/// Adds SOFTWARE, the integrity the request used, and FINGERPRINT.
pub(super) fn sign(b: &mut Builder<'_>, shared: &Shared, auth: &Authenticated) {
    if let Some(s) = &shared.config().software {
        b.attr(attr::SOFTWARE, s.as_bytes());
    }
    if auth.sha256 {
        b.integrity_sha256(auth.key.bytes());
    } else {
        b.integrity_sha1(auth.key.bytes());
    }
    b.fingerprint();
}

pub(super) fn reason(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        446 => "Connection Already Exists",
        447 => "Connection Timeout or Failure",
        486 => "Allocation Quota Reached",
        508 => "Insufficient Capacity",
        _ => "Server Error",
    }
}

/// Comprehension-required attributes this server does not know (RFC 8489 §7.3.1), at most 8.
/// CHANGE-REQUEST with no flags set asks for nothing, so classic clients' requests pass.
pub(super) fn unknown_required(msg: &Message<'_>) -> ([u16; 8], usize) {
    let mut unknown = [0u16; 8];
    let mut n = 0;
    for t in msg.attribute_types() {
        let known = attr::is_known_required(t)
            || (t == attr::CHANGE_REQUEST && msg.get(t).is_some_and(|v| v.iter().all(|b| *b == 0)));
        if t < 0x8000 && !known && n < unknown.len() {
            unknown[n] = t;
            n += 1;
        }
    }
    (unknown, n)
}
