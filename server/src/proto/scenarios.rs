//! Core scenarios on virtual time: no sockets, no sleeps. A test client builds requests with
//! the codec, the test plays the IO layer (binding "sockets" by handing out addresses).

use super::*;
use crate::proto::auth::{
    ephemeral_password, ephemeral_username, long_term_key, userhash, Credentials,
};
use crate::proto::policy::PeerPolicy;
use crate::proto::quota::Quotas;

const REALM: &str = "example.org";
const SECRET: &str = "fleet-secret";
const EPOCH_UNIX: u64 = 1_800_000_000;

struct Harness {
    core: Core,
    now: Instant,
    /// The wall clock the IO layer would read, in Unix seconds.
    unix: u64,
    next_port: u16,
    relay_ip: IpAddr,
}

struct Client {
    id: ClientId,
    username: String,
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
    let mut policy = PeerPolicy::new(allow, vec![]);
    policy.set_own_addresses(
        vec!["127.0.0.1:3478".parse().expect("a")],
        vec![],
        (49152, 65535),
    );
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
        max_tcp_connections: 8,
        relay_v4: true,
        relay_v6: false,
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
            next_port: 50000,
            relay_ip: "127.0.0.1".parse().expect("ip"),
        }
    }

    fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.unix += secs;
        self.core.handle_timeout(self.now);
    }

    /// Sends a datagram; binds relay addresses when the core asks; returns the reply, if any.
    fn send(&mut self, packet: &[u8], from: ClientId) -> Option<Vec<u8>> {
        match self.core.handle_client(packet, from, self.now, self.unix) {
            ClientAction::None => None,
            ClientAction::Reply => Some(self.core.output().to_vec()),
            ClientAction::Relay { .. } => panic!("unexpected relay"),
            ClientAction::Connect { .. } | ClientAction::Bind { .. } => {
                panic!("unexpected TCP relay action")
            }
            ClientAction::Allocate(p) => {
                let port = self.next_port;
                self.next_port += 2;
                let relayed = RelayAddrs {
                    v4: p.want_v4.then(|| SocketAddr::new(self.relay_ip, port)),
                    v6: None,
                };
                let _ = self.core.complete_allocate(*p, relayed, self.now);
                Some(self.core.output().to_vec())
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
        key: long_term_key(username, REALM, password).to_vec(),
        nonce: Vec::new(),
        tid: 0,
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
            .attr(attr::REALM, REALM.as_bytes())
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
    AllocId(
        h.core
            .slots
            .iter()
            .position(Option::is_some)
            .expect("one allocation") as u32,
    )
}

#[test]
fn binding_answers_modern_and_classic_requests_without_credentials() {
    let mut h = Harness::new();
    let c = client(40000, "alice", "wonderland");
    let mut buf = Vec::new();
    let mut tid = [3u8; 16];
    tid[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
    Builder::new(
        &mut buf,
        Class::Request,
        method::BINDING,
        TransactionId(tid),
    )
    .fingerprint();
    let reply = h.send(&buf, c.id).expect("reply");
    let msg = Message::parse(&reply).expect("parses");
    assert_eq!(msg.class(), Class::Success);
    assert_eq!(
        msg.xor_address(msg.get(attr::XOR_MAPPED_ADDRESS).expect("xma")),
        Some(c.id.addr)
    );

    Builder::new(
        &mut buf,
        Class::Request,
        method::BINDING,
        TransactionId([5; 16]),
    )
    .u32(attr::CHANGE_REQUEST, 0);
    let reply = h.send(&buf, c.id).expect("classic reply");
    let msg = Message::parse(&reply).expect("parses");
    assert_eq!(msg.transaction_id(), TransactionId([5; 16]));
    let mapped = stun::decode_address(msg.get(attr::MAPPED_ADDRESS).expect("mapped"), None);
    assert_eq!(mapped, Some(c.id.addr));
}

#[test]
fn unknown_comprehension_required_attribute_gets_420() {
    let mut h = Harness::new();
    let c = client(40000, "alice", "wonderland");
    let mut buf = Vec::new();
    let mut tid = [3u8; 16];
    tid[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
    Builder::new(
        &mut buf,
        Class::Request,
        method::BINDING,
        TransactionId(tid),
    )
    .attr(0x0077, b"????")
    .attr(0x8077, b"fine");
    let reply = h.send(&buf, c.id).expect("reply");
    assert_eq!(code(&reply), Some(420));
    let msg = Message::parse(&reply).expect("parses");
    assert_eq!(msg.get(attr::UNKNOWN_ATTRIBUTES), Some(&[0x00, 0x77][..]));
}

#[test]
fn allocate_needs_credentials_and_answers_signed() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    let reply = c.allocate(&mut h);
    assert_eq!(code(&reply), None);
    let msg = Message::parse(&reply).expect("parses");
    assert!(msg.check_integrity_sha1(&c.key));
    assert_eq!(msg.get_u32(attr::LIFETIME), Some(600));
    assert_eq!(relayed_of(&reply), "127.0.0.1:50000".parse().expect("addr"));
    assert_eq!(h.core.allocation_count(), 1);
}

#[test]
fn wrong_password_and_unknown_user_get_401_and_leave_no_state() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "not-the-password");
    let reply = c.allocate(&mut h);
    assert_eq!(code(&reply), Some(401));
    let mut c = client(40001, "mallory", "x");
    assert_eq!(code(&c.allocate(&mut h)), Some(401));
    assert_eq!(h.core.allocation_count(), 0);
    assert_eq!(
        h.core.responses.len(),
        0,
        "no per-client state before authentication"
    );
    let stats = h.core.take_stats().total();
    assert_eq!(stats.auth_failures[7], 1, "bad password");
    assert_eq!(stats.auth_failures[5], 1, "unknown user");
}

#[test]
fn ephemeral_credentials_work_until_they_expire() {
    let mut h = Harness::new();
    let user = ephemeral_username(EPOCH_UNIX + 100, Some("carol"));
    let mut c = client(40000, &user, &ephemeral_password(SECRET, &user));
    assert_eq!(code(&c.allocate(&mut h)), None);

    let user = ephemeral_username(EPOCH_UNIX - 1, Some("carol"));
    let mut c = client(40001, &user, &ephemeral_password(SECRET, &user));
    assert_eq!(code(&c.allocate(&mut h)), Some(401));

    let user = ephemeral_username(EPOCH_UNIX + 100, None);
    let mut c = client(40002, &user, &ephemeral_password("other-secret", &user));
    assert_eq!(code(&c.allocate(&mut h)), Some(401));
}

#[test]
fn stale_nonce_gets_438_with_a_fresh_one() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    assert_eq!(code(&c.allocate(&mut h)), None);
    let req = c.request(method::REFRESH, |b| {
        b.u32(attr::LIFETIME, 3600);
    });
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), None);
    h.advance(601);
    let req = c.request(method::REFRESH, |_| {});
    let reply = h.send(&req, c.id).expect("reply");
    assert_eq!(code(&reply), Some(438));
    c.learn_nonce(&reply);
    let req = c.request(method::REFRESH, |_| {});
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), None);
}

#[test]
fn retransmitted_allocate_gets_the_same_answer_and_a_new_one_gets_437() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    let tid = c.tid();
    let mut buf = Vec::new();
    Builder::new(&mut buf, Class::Request, method::ALLOCATE, tid).fingerprint();
    c.learn_nonce(&h.send(&buf, c.id).expect("401"));
    let req = c.request(method::ALLOCATE, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 17 << 24);
    });
    let first = h.send(&req, c.id).expect("reply");
    let again = h.send(&req, c.id).expect("reply");
    assert_eq!(first, again);
    assert_eq!(h.core.allocation_count(), 1);
    let other = c.request(method::ALLOCATE, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 17 << 24);
    });
    assert_eq!(code(&h.send(&other, c.id).expect("reply")), Some(437));
}

#[test]
fn allocate_checks_transport_and_families() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let mut d = client(40001, "alice", "wonderland");
    d.allocate(&mut h);
    let mut d = client(40002, "alice", "wonderland");
    type Extra<'f> = &'f dyn Fn(&mut Builder<'_>);
    let cases: [(Extra<'_>, u16); 8] = [
        (
            &|b| {
                b.u32(attr::REQUESTED_TRANSPORT, 6 << 24);
            },
            400,
        ),
        (
            &|b| {
                b.u32(attr::REQUESTED_TRANSPORT, 132 << 24);
            },
            442,
        ),
        (&|_| {}, 400),
        (
            &|b| {
                b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
                    .u32(attr::REQUESTED_ADDRESS_FAMILY, 0x02 << 24);
            },
            440,
        ),
        (
            &|b| {
                b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
                    .u32(attr::REQUESTED_ADDRESS_FAMILY, 0x01 << 24)
                    .u32(attr::ADDITIONAL_ADDRESS_FAMILY, 0x02 << 24);
            },
            400,
        ),
        (
            &|b| {
                b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
                    .u32(attr::EVEN_PORT, 0)
                    .attr(attr::RESERVATION_TOKEN, &[1; 8]);
            },
            400,
        ),
        (
            &|b| {
                b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
                    .attr(attr::RESERVATION_TOKEN, &[1; 8])
                    .u32(attr::ADDITIONAL_ADDRESS_FAMILY, 0x02 << 24);
            },
            400,
        ),
        (
            &|b| {
                b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
                    .u32(attr::EVEN_PORT, 0x8000_0000)
                    .u32(attr::ADDITIONAL_ADDRESS_FAMILY, 0x02 << 24);
            },
            400,
        ),
    ];
    for (extra, want) in cases {
        assert_eq!(code(&d.call(&mut h, method::ALLOCATE, extra)), Some(want));
    }
    // Dual-stack asked of an IPv4-only relay: IPv4 granted, IPv6 refused in ADDRESS-ERROR-CODE.
    let req = d.request(method::ALLOCATE, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            .u32(attr::ADDITIONAL_ADDRESS_FAMILY, 0x02 << 24);
    });
    let reply = h.send(&req, d.id).expect("reply");
    assert_eq!(code(&reply), None);
    let msg = Message::parse(&reply).expect("parses");
    assert_eq!(
        msg.get(attr::ADDRESS_ERROR_CODE)
            .map(|v| (v[0], v[2], v[3])),
        Some((2, 4, 40))
    );
}

#[test]
fn denied_peers_get_403_and_are_counted() {
    let mut h = Harness::with(Quotas::default(), false);
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    for peer in [
        "127.0.0.1:9",
        "10.0.0.1:9",
        "169.254.169.254:80",
        "[::ffff:192.168.0.1]:9",
    ] {
        let req = c.request(
            method::CREATE_PERMISSION,
            peer_attr(peer.parse().expect("a")),
        );
        assert_eq!(
            code(&h.send(&req, c.id).expect("reply")),
            Some(403),
            "{peer}"
        );
    }
    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, "127.0.0.1:9".parse().expect("a"));
    });
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), Some(403));
    let req = c.request(
        method::CREATE_PERMISSION,
        peer_attr("[2606:4700::1]:9".parse().expect("a")),
    );
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), Some(443));
    let req = c.request(
        method::CREATE_PERMISSION,
        peer_attr("8.8.8.8:53".parse().expect("a")),
    );
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), None);
    assert_eq!(h.core.take_stats().total().peer_denied, 5);
}

#[test]
fn channels_relay_both_ways_and_data_indications_without_a_channel() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let alloc = relayed_alloc(&h);
    let peer: SocketAddr = "127.0.0.1:7000".parse().expect("a");

    // Peer traffic without a permission is dropped.
    let mut buf = [0u8; 64];
    buf[4..9].copy_from_slice(b"hello");
    assert_eq!(
        h.core.handle_peer(alloc, peer, &mut buf, 5, h.now),
        PeerAction::Drop
    );

    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4001 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), None);

    let data = [0x40, 0x01, 0, 3, b'a', b'b', b'c', 0];
    match h.core.handle_client(&data, c.id, h.now, h.unix) {
        ClientAction::Relay {
            alloc: a,
            peer: p,
            start,
            end,
        } => {
            assert_eq!((a, p, &data[start..end]), (alloc, peer, &b"abc"[..]));
        }
        other => panic!("expected relay, got {other:?}"),
    }
    assert_eq!(
        h.core.handle_peer(alloc, peer, &mut buf, 5, h.now),
        PeerAction::ChannelData {
            client: c.id,
            len: 5
        }
    );
    assert_eq!(&buf[..9], &[0x40, 0x01, 0, 5, b'h', b'e', b'l', b'l', b'o']);

    // Another port of the same peer IP has the permission but no channel: Data indication.
    let other: SocketAddr = "127.0.0.1:7001".parse().expect("a");
    assert_eq!(
        h.core.handle_peer(alloc, other, &mut buf, 5, h.now),
        PeerAction::DataIndication { client: c.id }
    );
    let ind = Message::parse(h.core.output()).expect("indication parses");
    assert_eq!(
        (ind.class(), ind.method()),
        (Class::Indication, method::DATA)
    );
    assert_eq!(ind.get(attr::DATA), Some(&b"hello"[..]));
    assert_eq!(
        ind.xor_address(ind.get(attr::XOR_PEER_ADDRESS).expect("peer")),
        Some(other)
    );

    // Rebinding the channel to another peer is refused.
    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4001 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, other);
    });
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), Some(400));
    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x3FFF << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, other);
    });
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), Some(400));
}

#[test]
fn send_indications_need_a_permission_and_permissions_expire() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let alloc = relayed_alloc(&h);
    let peer: SocketAddr = "127.0.0.1:7000".parse().expect("a");
    let send = |tid: u8| {
        let mut buf = Vec::new();
        let mut t = [tid; 16];
        t[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        Builder::new(&mut buf, Class::Indication, method::SEND, TransactionId(t))
            .xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, b"payload");
        buf
    };
    let ind = send(1);
    assert!(matches!(
        h.core.handle_client(&ind, c.id, h.now, h.unix),
        ClientAction::None
    ));
    let req = c.request(method::CREATE_PERMISSION, peer_attr(peer));
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), None);
    match h.core.handle_client(&ind, c.id, h.now, h.unix) {
        ClientAction::Relay {
            peer: p,
            start,
            end,
            ..
        } => {
            assert_eq!((p, &ind[start..end]), (peer, &b"payload"[..]));
        }
        other => panic!("expected relay, got {other:?}"),
    }
    h.advance(299);
    assert!(matches!(
        h.core.handle_client(&ind, c.id, h.now, h.unix),
        ClientAction::Relay { .. }
    ));
    h.advance(2);
    assert!(matches!(
        h.core.handle_client(&ind, c.id, h.now, h.unix),
        ClientAction::None
    ));
    let mut buf = [0u8; 16];
    assert_eq!(
        h.core.handle_peer(alloc, peer, &mut buf, 4, h.now),
        PeerAction::Drop
    );
}

#[test]
fn allocations_expire_and_refresh_zero_frees_consistently() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let alloc = relayed_alloc(&h);
    h.advance(599);
    assert_eq!(h.core.allocation_count(), 1);
    let reply = c.call(&mut h, method::REFRESH, |b| {
        b.u32(attr::LIFETIME, 100_000);
    });
    assert_eq!(
        Message::parse(&reply).expect("p").get_u32(attr::LIFETIME),
        Some(3600)
    );
    h.advance(3599);
    assert_eq!(h.core.allocation_count(), 1);
    let (bye, first) = c.exchange(&mut h, method::REFRESH, |b| {
        b.u32(attr::LIFETIME, 0);
    });
    assert_eq!(code(&first), None);
    assert_eq!(h.core.poll_event(), Some(Event::Freed(alloc)));
    assert_eq!(h.send(&bye, c.id).expect("retransmission"), first);
    let again = c.request(method::REFRESH, |_| {});
    assert_eq!(code(&h.send(&again, c.id).expect("reply")), Some(437));

    let mut d = client(40001, "bob", "builder");
    d.allocate(&mut h);
    h.advance(601);
    assert_eq!(h.core.allocation_count(), 0);
    assert!(matches!(h.core.poll_event(), Some(Event::Freed(_))));
}

#[test]
fn another_username_on_the_same_five_tuple_gets_441() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let mut b = client(40000, "bob", "builder");
    b.nonce = c.nonce.clone();
    let req = b.request(method::REFRESH, |_| {});
    assert_eq!(code(&h.send(&req, b.id).expect("reply")), Some(441));
}

#[test]
fn quotas_refuse_with_486_and_508() {
    let mut h = Harness::with(
        Quotas {
            total_allocations: Some(2),
            user_allocations: Some(1),
            ..Default::default()
        },
        true,
    );
    assert_eq!(
        code(&client(40000, "alice", "wonderland").allocate(&mut h)),
        None
    );
    assert_eq!(
        code(&client(40001, "alice", "wonderland").allocate(&mut h)),
        Some(486)
    );
    assert_eq!(
        code(&client(40002, "bob", "builder").allocate(&mut h)),
        None
    );
    let u = ephemeral_username(EPOCH_UNIX + 60, Some("carol"));
    assert_eq!(
        code(&client(40003, &u, &ephemeral_password(SECRET, &u)).allocate(&mut h)),
        Some(508)
    );
}

#[test]
fn bandwidth_quota_drops_excess_packets() {
    let mut h = Harness::with(
        Quotas {
            allocation_bandwidth: Some(1000),
            ..Default::default()
        },
        true,
    );
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let peer: SocketAddr = "127.0.0.1:7000".parse().expect("a");
    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    h.send(&req, c.id);
    let mut data = vec![0x40, 0x00, 0x01, 0xf4];
    data.resize(4 + 500, 7);
    let relayed = (0..5)
        .filter(|_| {
            matches!(
                h.core.handle_client(&data, c.id, h.now, h.unix),
                ClientAction::Relay { .. }
            )
        })
        .count();
    assert_eq!(relayed, 2);
    h.now += Duration::from_millis(500);
    assert!(matches!(
        h.core.handle_client(&data, c.id, h.now, h.unix),
        ClientAction::Relay { .. }
    ));
}

#[test]
fn sha256_integrity_with_userhash_and_password_algorithm() {
    let mut h = Harness::new();
    let c = client(40000, "alice", "wonderland");
    let mut buf = Vec::new();
    let mut t = [8u8; 16];
    t[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
    Builder::new(&mut buf, Class::Request, method::ALLOCATE, TransactionId(t)).fingerprint();
    let challenge = h.send(&buf, c.id).expect("401");
    let msg = Message::parse(&challenge).expect("p");
    assert_eq!(
        msg.get(attr::PASSWORD_ALGORITHMS),
        Some(&PASSWORD_ALGORITHMS[..])
    );
    let nonce = msg.get(attr::NONCE).expect("nonce").to_vec();
    assert!(nonce.starts_with(b"obMatJos2"));
    let key = crate::proto::auth::long_term_key_sha256("alice", REALM, "wonderland");
    let request = |algos: &[u8], t: u8| {
        let mut buf = Vec::new();
        let mut tid = [t; 16];
        tid[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        Builder::new(
            &mut buf,
            Class::Request,
            method::ALLOCATE,
            TransactionId(tid),
        )
        .u32(attr::REQUESTED_TRANSPORT, 17 << 24)
        .attr(attr::USERHASH, &userhash("alice", REALM))
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, &nonce)
        .attr(attr::PASSWORD_ALGORITHMS, algos)
        .u32(attr::PASSWORD_ALGORITHM, 0x0002_0000)
        .integrity_sha256(&key)
        .fingerprint();
        buf
    };
    // A bid-down (the offered list altered) is refused.
    assert_eq!(
        code(&h.send(&request(&[0, 2, 0, 0], 9), c.id).expect("reply")),
        Some(400)
    );
    let reply = h
        .send(&request(&PASSWORD_ALGORITHMS, 10), c.id)
        .expect("reply");
    assert_eq!(code(&reply), None);
    assert!(Message::parse(&reply)
        .expect("p")
        .check_integrity_sha256(&key));
}

#[test]
fn malformed_datagrams_never_disturb_an_allocation() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let peer: SocketAddr = "127.0.0.1:7000".parse().expect("a");
    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    let good = h.send(&req, c.id).expect("reply");
    let mut rng = StdRng::from_seed([4; 32]);
    for i in 0..20_000usize {
        let mut junk = good.clone();
        let n = (rng.next_u32() as usize) % (junk.len() + 1);
        junk.truncate(n);
        if !junk.is_empty() {
            let at = (rng.next_u32() as usize) % junk.len();
            junk[at] = rng.next_u32() as u8;
        }
        if i % 3 == 0 && junk.len() > 1 {
            junk[0] = 0x40 | (junk[0] & 0x0f);
        }
        let _ = h.core.handle_client(&junk, c.id, h.now, h.unix);
        let _ = h.core.handle_client(
            &junk,
            ClientId {
                listener: 0,
                addr: "127.0.0.1:1".parse().expect("a"),
            },
            h.now,
            h.unix,
        );
    }
    let data = [0x40, 0x00, 0, 1, b'x'];
    assert!(matches!(
        h.core.handle_client(&data, c.id, h.now, h.unix),
        ClientAction::Relay { .. }
    ));
}

#[test]
fn own_relayed_address_is_refused_but_another_allocation_is_reachable() {
    let mut h = Harness::new();
    let mut a = client(40000, "alice", "wonderland");
    let a_relayed = relayed_of(&a.allocate(&mut h));
    let mut b = client(40001, "bob", "builder");
    let b_relayed = relayed_of(&b.allocate(&mut h));
    assert_eq!(
        code(&a.call(&mut h, method::CREATE_PERMISSION, peer_attr(a_relayed))),
        Some(403)
    );
    assert_eq!(
        code(&a.call(&mut h, method::CREATE_PERMISSION, peer_attr(b_relayed))),
        None
    );
}

#[test]
fn send_indications_to_the_relays_own_ports_are_dropped() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    // A permission for the relay's IP (another allocation there is a fine peer)…
    let other: SocketAddr = "127.0.0.1:50002".parse().expect("a");
    assert_eq!(
        code(&c.call(&mut h, method::CREATE_PERMISSION, peer_attr(other))),
        None
    );
    // …does not open its listening port to Send indications.
    for (target, relayed) in [("127.0.0.1:3478", false), ("127.0.0.1:50002", true)] {
        let mut buf = Vec::new();
        let tid = c.tid();
        Builder::new(&mut buf, Class::Indication, method::SEND, tid)
            .xor_address(attr::XOR_PEER_ADDRESS, target.parse().expect("a"))
            .attr(attr::DATA, b"x");
        let action = h.core.handle_client(&buf, c.id, h.now, h.unix);
        assert_eq!(
            matches!(action, ClientAction::Relay { .. }),
            relayed,
            "{target}"
        );
    }
}

#[test]
fn unknown_attributes_in_authenticated_requests_get_a_signed_420() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let reply = c.call(&mut h, method::REFRESH, |b| {
        b.attr(0x0041, b"huh?");
    });
    assert_eq!(code(&reply), Some(420));
    let msg = Message::parse(&reply).expect("p");
    assert!(msg.check_integrity_sha1(&c.key));
    assert_eq!(msg.get(attr::UNKNOWN_ATTRIBUTES), Some(&[0x00, 0x41][..]));
}

#[test]
fn password_algorithms_without_a_choice_is_a_bad_request() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let reply = c.call(&mut h, method::REFRESH, |b| {
        b.attr(attr::PASSWORD_ALGORITHMS, &PASSWORD_ALGORITHMS);
    });
    assert_eq!(code(&reply), Some(400));
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

#[test]
fn channel_bind_whose_permission_cannot_be_installed_binds_no_channel() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let alloc = relayed_alloc(&h);
    // max_permissions is 4: fill them with other IPs.
    for i in 2..6u8 {
        let peer = SocketAddr::from(([127, 0, 0, i], 7000));
        let reply = c.call(&mut h, method::CREATE_PERMISSION, peer_attr(peer));
        assert_eq!(code(&reply), None);
    }
    let peer: SocketAddr = "127.0.0.9:7000".parse().expect("a");
    let reply = c.call(&mut h, method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    assert_eq!(code(&reply), Some(508));
    // Neither the channel nor the permission exists.
    let data = [0x40, 0x00, 0, 1, b'x', 0, 0, 0];
    assert!(matches!(
        h.core.handle_client(&data, c.id, h.now, h.unix),
        ClientAction::None
    ));
    let mut buf = [0u8; 16];
    assert_eq!(
        h.core.handle_peer(alloc, peer, &mut buf, 1, h.now),
        PeerAction::Drop
    );
    // Once a permission expires, the same ChannelBind works.
    h.advance(301);
    let reply = c.call(&mut h, method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    assert_eq!(code(&reply), None);
}

#[test]
fn peer_datagrams_too_large_for_the_client_are_dropped_and_counted() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let alloc = relayed_alloc(&h);
    let peer: SocketAddr = "127.0.0.1:7000".parse().expect("a");
    let reply = c.call(&mut h, method::CREATE_PERMISSION, peer_attr(peer));
    assert_eq!(code(&reply), None);
    let _ = h.core.take_stats();
    let mut buf = vec![0u8; 4 + 65_520];
    // 20 + 12 + 4 + 65520 bytes: above a UDP datagram, and its length field would wrap.
    assert_eq!(
        h.core.handle_peer(alloc, peer, &mut buf, 65_520, h.now),
        PeerAction::Drop
    );
    // The largest that fits one datagram to an IPv4 client (padded to four bytes) still goes.
    let fits = (65_507 - 20 - 12 - 4) & !3;
    assert_eq!(
        h.core.handle_peer(alloc, peer, &mut buf, fits, h.now),
        PeerAction::DataIndication { client: c.id }
    );
    let ind = Message::parse(h.core.output()).expect("parses");
    assert_eq!(ind.get(attr::DATA).map(<[u8]>::len), Some(fits));
    let stats = h.core.take_stats();
    assert_eq!(stats.oversized, 1);
    assert_eq!(stats.total().relayed_packets[1], 1);
}

#[test]
fn dont_fragment_the_relay_cannot_set_is_refused_with_a_signed_420() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    let challenge = h
        .send(&bare(method::ALLOCATE, 1), c.id)
        .expect("401 challenge");
    c.learn_nonce(&challenge);
    let req = c.request(method::ALLOCATE, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            .attr(attr::DONT_FRAGMENT, &[]);
    });
    let ClientAction::Allocate(p) = h.core.handle_client(&req, c.id, h.now, h.unix) else {
        panic!("expected an allocation to bind");
    };
    assert!(p.dont_fragment);
    // The IO layer could not set DF on the relay socket.
    h.core.fail_allocate(*p, 420, h.now);
    let reply = h.core.output().to_vec();
    assert_eq!(code(&reply), Some(420));
    let msg = Message::parse(&reply).expect("parses");
    assert_eq!(msg.get(attr::UNKNOWN_ATTRIBUTES), Some(&[0x00, 0x1A][..]));
    assert!(msg.check_integrity_sha1(&c.key), "a signed refusal");
    assert_eq!(h.core.allocation_count(), 0);
}

#[test]
fn replies_to_unauthenticated_requests_are_limited_per_source_and_small() {
    let mut h = Harness::configured(Quotas::default(), true, |c| {
        c.unauthenticated_replies_per_sec = 10.0;
    });
    let stranger = client(40000, "x", "y");
    let (mut sent, mut replied, mut answers) = (0usize, 0usize, 0usize);
    for n in 0..1000u32 {
        // Unsigned Allocates (401) and unknown methods (400), as a spoofing flood sends.
        let m = if n % 2 == 0 { method::ALLOCATE } else { 0x0FF };
        let req = bare(m, n);
        sent += req.len();
        if let Some(r) = h.send(&req, stranger.id) {
            replied += r.len();
            answers += 1;
        }
    }
    // A burst of two seconds' worth, then nothing until time passes.
    assert_eq!(answers, 20);
    let stats = h.core.take_stats();
    assert_eq!(stats.replies_limited, 980);
    let factor = replied as f64 / sent as f64;
    eprintln!(
        "1000 unauthenticated requests ({sent} bytes) from one source: {answers} replies, {replied} bytes, amplification {factor:.3}"
    );
    assert!(factor < 0.1, "amplification {factor}");
    // Another source is not held back, and the first gets its rate again as time passes.
    let mut other = client(40001, "x", "y");
    other.id.addr = "127.0.0.2:40001".parse().expect("addr");
    assert_eq!(
        code(
            &h.send(&bare(method::ALLOCATE, 5000), other.id)
                .expect("401")
        ),
        Some(401)
    );
    h.advance(1);
    let again = (0..100u32)
        .filter(|n| {
            h.send(&bare(method::ALLOCATE, 6000 + n), stranger.id)
                .is_some()
        })
        .count();
    assert_eq!(again, 10);
    // An authenticated client is never limited: its answers are signed.
    let mut alice = client(40000, "alice", "wonderland");
    alice.nonce = {
        let mut out = [0u8; 37];
        h.core
            .shared()
            .nonces
            .issue(alice.id.addr, h.unix, &mut out)
            .to_vec()
    };
    let req = alice.request(method::ALLOCATE, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 17 << 24);
    });
    assert_eq!(code(&h.send(&req, alice.id).expect("allocated")), None);
}

#[test]
fn replies_to_strangers_carry_software_only_where_the_operator_asks() {
    let software = |reply: &[u8]| {
        Message::parse(reply)
            .expect("parses")
            .get(attr::SOFTWARE)
            .map(<[u8]>::to_vec)
    };
    let mut h = Harness::new();
    let c = client(40000, "alice", "wonderland");
    let binding = h.send(&bare(method::BINDING, 1), c.id).expect("binding");
    let challenge = h.send(&bare(method::ALLOCATE, 2), c.id).expect("401");
    let bad = h.send(&bare(0x0FF, 3), c.id).expect("400");
    assert_eq!(
        (software(&binding), software(&challenge), software(&bad)),
        (None, None, None)
    );
    // 28-byte requests get 40 (Binding) and 120 (401, with this test's 11-byte realm) back.
    assert_eq!((binding.len(), challenge.len()), (40, 120));
    let mut alice = client(40001, "alice", "wonderland");
    let signed = alice.allocate(&mut h);
    assert_eq!(software(&signed), Some(b"turnpike-test".to_vec()));

    let mut h = Harness::configured(Quotas::default(), true, |c| {
        c.software_unauthenticated = true;
    });
    let binding = h.send(&bare(method::BINDING, 1), c.id).expect("binding");
    let challenge = h.send(&bare(method::ALLOCATE, 2), c.id).expect("401");
    assert_eq!(software(&binding), Some(b"turnpike-test".to_vec()));
    assert_eq!(software(&challenge), Some(b"turnpike-test".to_vec()));
}

#[test]
fn credentials_and_nonces_follow_the_wall_clock_when_it_steps() {
    let mut h = Harness::new();
    let user = ephemeral_username(EPOCH_UNIX + 100, Some("carol"));
    let password = ephemeral_password(SECRET, &user);
    let mut c = client(40000, &user, &password);
    assert_eq!(code(&c.allocate(&mut h)), None);
    // NTP steps the wall clock 200 s forward; no monotonic time passes.
    h.unix += 200;
    let mut late = client(40001, &user, &password);
    assert_eq!(
        code(&late.allocate(&mut h)),
        Some(401),
        "an expired credential was accepted"
    );
    // The live allocation's nonce is now older than its lifetime only if the step says so:
    // a step beyond the nonce lifetime makes it stale (438), and the client gets a new one.
    h.unix += 600;
    let reply = c.call(&mut h, method::REFRESH, |b| {
        b.u32(attr::LIFETIME, 600);
    });
    assert_eq!(code(&reply), Some(401), "the credential itself has expired");
    let mut alice = client(40002, "alice", "wonderland");
    assert_eq!(code(&alice.allocate(&mut h)), None);
    let stale = alice.request(method::REFRESH, |b| {
        b.u32(attr::LIFETIME, 600);
    });
    h.unix += 601;
    let reply = h.send(&stale, alice.id).expect("reply");
    assert_eq!(
        code(&reply),
        Some(438),
        "a nonce older than its lifetime by the wall clock"
    );
}
