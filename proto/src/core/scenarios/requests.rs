//! Requests: Binding, authentication (long-term, ephemeral, SHA-256, USERHASH), nonces, the wall clock, retransmissions, unknown attributes.

use super::*;

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
    let relayed = relayed_of(&reply);
    assert_eq!(relayed.ip(), "127.0.0.1".parse::<IpAddr>().expect("ip"));
    assert!((49152..=65535).contains(&relayed.port()), "{relayed}");
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
    let key = crate::auth::long_term_key_sha256("alice", REALM, "wonderland");
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
