//! What strangers get: malformed input dropped, replies to unauthenticated requests limited and small.

use super::*;

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
        let _ = h.core.handle_client(&junk, c.id, h.now, h.unix, &mut h.out);
        let _ = h.core.handle_client(
            &junk,
            ClientId {
                listener: 0,
                addr: "127.0.0.1:1".parse().expect("a"),
            },
            h.now,
            h.unix,
            &mut h.out,
        );
    }
    let data = [0x40, 0x00, 0, 1, b'x'];
    assert!(matches!(
        h.core.handle_client(&data, c.id, h.now, h.unix, &mut h.out),
        ClientAction::Relay { .. }
    ));
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
