//! Core scenarios on virtual time: no sockets, no sleeps. A test client builds requests with
//! the codec, the test plays the IO layer (reporting how binding the relay sockets went). The
//! harness is here; the scenarios are grouped by what they exercise.

mod allocations;
mod relaying;
mod requests;
mod sharing;
mod strangers;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use rand::RngCore;

use crate::auth::PASSWORD_ALGORITHMS;
use crate::auth::{ephemeral_password, ephemeral_username, long_term_key, userhash, Credentials};
use crate::policy::PeerPolicy;
use crate::quota::QuotaState;
use crate::quota::Quotas;
use crate::stun::{self, attr, method, Builder, Class, Message, TransactionId};
use crate::tenant::Tenants;

const REALM: &str = "example.org";
const SECRET: &str = "fleet-secret";
const EPOCH_UNIX: u64 = 1_800_000_000;

struct Harness {
    core: Core,
    now: Instant,
    /// The wall clock the IO layer would read, in Unix seconds.
    unix: u64,
    /// The buffer the IO layer lends the core for its answers.
    out: Vec<u8>,
}

struct Client {
    id: ClientId,
    username: String,
    realm: String,
    key: Vec<u8>,
    nonce: Vec<u8>,
    tid: u8,
}

fn config(
    quotas: Quotas,
    allow_loopback: bool,
    epoch: Instant,
    tweak: impl FnOnce(&mut CoreConfig),
) -> Arc<Shared> {
    let allow = if allow_loopback {
        vec!["127.0.0.0/8".parse().expect("net")]
    } else {
        vec![]
    };
    let policy = test_policy(allow);
    let mut cfg = CoreConfig {
        tenants: {
            let mut t = Tenants::single(
                Credentials::new(
                    REALM,
                    [("alice", "wonderland"), ("bob", "builder")],
                    [SECRET.to_owned()],
                ),
                policy,
            );
            t.list_mut()[0].quotas = Quotas {
                total_allocations: None,
                ..quotas.clone()
            };
            t
        },
        default_lifetime: 600,
        max_lifetime: 3600,
        nonce_lifetime: 600,
        max_permissions: 4,
        max_peer_endpoints: 256,
        max_tcp_connections: 8,
        relay_v4: Some(RelayAddress {
            bind: "127.0.0.1".parse().expect("ip"),
            advertised: "127.0.0.1".parse().expect("ip"),
        }),
        relay_v6: None,
        software: Some("turnpike-test".into()),
        software_unauthenticated: false,
        unauthenticated_replies_per_sec: 1000.0,
        relay_ports: (49152, 65535),
    };
    tweak(&mut cfg);
    Arc::new(Shared::new(
        cfg,
        QuotaState::new(quotas.total_allocations),
        [9; 32],
        epoch,
    ))
}

/// The peer policy of the test relay, allowing `allow` beside the defaults.
fn test_policy(allow: Vec<ipnet::IpNet>) -> PeerPolicy {
    let mut policy = PeerPolicy::new(allow, vec![]);
    policy.set_own_addresses(
        vec!["127.0.0.1:3478".parse().expect("a")],
        vec![],
        (49152, 65535),
    );
    policy
}

impl Harness {
    fn new() -> Self {
        Self::with(Quotas::default(), true)
    }

    fn with(quotas: Quotas, allow_loopback: bool) -> Self {
        Self::configured(quotas, allow_loopback, |_| {})
    }

    /// A harness whose core configuration `tweak` changes first.
    fn configured(
        quotas: Quotas,
        allow_loopback: bool,
        tweak: impl FnOnce(&mut CoreConfig),
    ) -> Self {
        let now = Instant::now();
        Harness {
            core: Core::new(config(quotas, allow_loopback, now, tweak), [1; 32]),
            now,
            unix: EPOCH_UNIX,
            out: Vec::new(),
        }
    }

    fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.unix += secs;
        self.core.handle_timeout(self.now);
    }

    /// Sends a datagram; binds the relay sockets the core asks for (always with success);
    /// returns the reply, if any.
    fn send(&mut self, packet: &[u8], from: ClientId) -> Option<Vec<u8>> {
        match self
            .core
            .handle_client(packet, from, self.now, self.unix, &mut self.out)
        {
            ClientAction::None => None,
            ClientAction::Reply => Some(self.out.clone()),
            ClientAction::Relay { .. } => panic!("unexpected relay"),
            ClientAction::Connect { .. } | ClientAction::DataConnection { .. } => {
                panic!("unexpected TCP relay action")
            }
            ClientAction::Allocate(bind) => {
                let outcome = self
                    .core
                    .relay_bound(bind.alloc, Ok(()), self.now, &mut self.out);
                assert_eq!(outcome, BindOutcome::Answer);
                Some(self.out.clone())
            }
        }
    }
}

fn client(port: u16, username: &str, password: &str) -> Client {
    Client {
        id: ClientId {
            listener: 0,
            addr: SocketAddr::new("127.0.0.1".parse().expect("ip"), port),
        },
        username: username.to_owned(),
        realm: REALM.to_owned(),
        key: long_term_key(username, REALM, password).to_vec(),
        nonce: Vec::new(),
        tid: 0,
    }
}

/// A client of another tenant's realm.
fn client_in(port: u16, username: &str, password: &str, realm: &str) -> Client {
    Client {
        realm: realm.to_owned(),
        key: long_term_key(username, realm, password).to_vec(),
        ..client(port, username, password)
    }
}

impl Client {
    fn tid(&mut self) -> TransactionId {
        self.tid += 1;
        let mut t = [self.tid; 16];
        t[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        t[4] = (self.id.addr.port() & 0xff) as u8;
        TransactionId(t)
    }

    /// Builds a signed request; `extra` adds attributes before the integrity.
    fn request(&mut self, m: u16, extra: impl FnOnce(&mut Builder<'_>)) -> Vec<u8> {
        let tid = self.tid();
        let mut buf = Vec::new();
        let mut b = Builder::new(&mut buf, Class::Request, m, tid);
        extra(&mut b);
        b.attr(attr::USERNAME, self.username.as_bytes())
            .attr(attr::REALM, self.realm.as_bytes())
            .attr(attr::NONCE, &self.nonce)
            .integrity_sha1(&self.key)
            .fingerprint();
        buf
    }

    /// Sends a signed request, retrying once with a fresh nonce after 438; returns the reply.
    fn call(&mut self, h: &mut Harness, m: u16, extra: impl Fn(&mut Builder<'_>)) -> Vec<u8> {
        self.exchange(h, m, extra).1
    }

    /// Like `call`, returning the request that got the reply too.
    fn exchange(
        &mut self,
        h: &mut Harness,
        m: u16,
        extra: impl Fn(&mut Builder<'_>),
    ) -> (Vec<u8>, Vec<u8>) {
        let req = self.request(m, &extra);
        let reply = h.send(&req, self.id).expect("reply");
        if code(&reply) != Some(438) {
            return (req, reply);
        }
        self.learn_nonce(&reply);
        let req = self.request(m, &extra);
        let reply = h.send(&req, self.id).expect("reply");
        (req, reply)
    }

    /// Takes the nonce from a 401/438 response.
    fn learn_nonce(&mut self, reply: &[u8]) {
        let msg = Message::parse(reply).expect("reply parses");
        self.nonce = msg.get(attr::NONCE).expect("nonce").to_vec();
    }

    fn allocate(&mut self, h: &mut Harness) -> Vec<u8> {
        let tid = self.tid();
        let mut buf = Vec::new();
        Builder::new(&mut buf, Class::Request, method::ALLOCATE, tid)
            .u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            .fingerprint();
        let challenge = h.send(&buf, self.id).expect("401");
        assert_eq!(code(&challenge), Some(401));
        self.learn_nonce(&challenge);
        let req = self.request(method::ALLOCATE, |b| {
            b.u32(attr::REQUESTED_TRANSPORT, 17 << 24);
        });
        h.send(&req, self.id).expect("allocate reply")
    }
}

/// A Send indication of "payload" to `peer`, transaction id from `tid`.
fn send_indication(peer: SocketAddr, tid: u8) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut t = [tid; 16];
    t[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
    Builder::new(&mut buf, Class::Indication, method::SEND, TransactionId(t))
        .xor_address(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, b"payload");
    buf
}

fn code(reply: &[u8]) -> Option<u16> {
    let msg = Message::parse(reply).expect("parses");
    if msg.class() == Class::Success {
        return None;
    }
    let v = msg.get(attr::ERROR_CODE).expect("error code");
    Some(u16::from(v[2]) * 100 + u16::from(v[3]))
}

fn relayed_of(reply: &[u8]) -> SocketAddr {
    let msg = Message::parse(reply).expect("parses");
    msg.xor_address(msg.get(attr::XOR_RELAYED_ADDRESS).expect("relayed"))
        .expect("address")
}

fn peer_attr(addr: SocketAddr) -> impl Fn(&mut Builder<'_>) {
    move |b| {
        b.xor_address(attr::XOR_PEER_ADDRESS, addr);
    }
}

fn relayed_alloc(h: &Harness) -> AllocId {
    let (index, slot) = h
        .core
        .slots
        .iter()
        .enumerate()
        .find(|(_, s)| s.allocation.is_some())
        .expect("one allocation");
    AllocId {
        index: index as u32,
        generation: slot.generation,
    }
}

/// A bare request of method `m` with no attribute but FINGERPRINT (the smallest a stranger
/// sends, 28 bytes), transaction id from `n`.
fn bare(m: u16, n: u32) -> Vec<u8> {
    let mut t = [0u8; 16];
    t[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
    t[4..8].copy_from_slice(&n.to_be_bytes());
    let mut buf = Vec::new();
    Builder::new(&mut buf, Class::Request, m, TransactionId(t)).fingerprint();
    buf
}
