//! The allocation lifecycle: Allocate checks and quotas, binding the relay sockets (drawing again, DONT-FRAGMENT), expiry on poll_timeout, slot reuse.

use super::*;

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
    // Then its session record: released by the client, after its refreshes.
    match h.core.poll_event() {
        Some(Event::Ended(s)) => {
            assert_eq!(s.reason, crate::core::EndReason::Released);
            assert!(s.duration.as_secs() > 3599, "{s:?}");
        }
        other => panic!("no session record: {other:?}"),
    }
    assert_eq!(h.send(&bye, c.id).expect("retransmission"), first);
    let again = c.request(method::REFRESH, |_| {});
    assert_eq!(code(&h.send(&again, c.id).expect("reply")), Some(437));

    let mut d = client(40001, "bob", "builder");
    d.allocate(&mut h);
    h.advance(601);
    assert_eq!(h.core.allocation_count(), 0);
    assert!(matches!(h.core.poll_event(), Some(Event::Freed(_))));
    assert!(matches!(
        h.core.poll_event(),
        Some(Event::Ended(s)) if s.reason == crate::core::EndReason::Expired
    ));
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
    let ClientAction::Allocate(bind) = h.core.handle_client(&req, c.id, h.now, h.unix, &mut h.out)
    else {
        panic!("expected an allocation to bind");
    };
    assert!(bind.dont_fragment);
    // The IO layer could not set DF on the relay socket.
    let outcome = h.core.relay_bound(
        bind.alloc,
        Err(BindFailure::DontFragment),
        h.now,
        &mut h.out,
    );
    assert_eq!(outcome, BindOutcome::Answer);
    let reply = h.out.clone();
    assert_eq!(code(&reply), Some(420));
    let msg = Message::parse(&reply).expect("parses");
    assert_eq!(msg.get(attr::UNKNOWN_ATTRIBUTES), Some(&[0x00, 0x1A][..]));
    assert!(msg.check_integrity_sha1(&c.key), "a signed refusal");
    assert_eq!(h.core.allocation_count(), 0);
}

#[test]
fn a_port_in_use_is_drawn_again_and_the_answer_waits_for_the_bind() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    let challenge = h
        .send(&bare(method::ALLOCATE, 1), c.id)
        .expect("401 challenge");
    c.learn_nonce(&challenge);
    let req = c.request(method::ALLOCATE, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 17 << 24);
    });
    let ClientAction::Allocate(first) = h.core.handle_client(&req, c.id, h.now, h.unix, &mut h.out)
    else {
        panic!("expected sockets to bind");
    };
    let taken = first.v4.expect("an IPv4 relay socket");
    assert!(
        !h.core.has_allocation(c.id),
        "not live before its sockets are bound"
    );
    // Another process holds that port: the core draws another.
    let BindOutcome::Retry(second) =
        h.core
            .relay_bound(first.alloc, Err(BindFailure::InUse), h.now, &mut h.out)
    else {
        panic!("expected another port to bind");
    };
    let again = second.v4.expect("an IPv4 relay socket");
    assert_ne!(again.port(), taken.port());
    assert_eq!(second.alloc, first.alloc);
    let outcome = h.core.relay_bound(second.alloc, Ok(()), h.now, &mut h.out);
    assert_eq!(outcome, BindOutcome::Answer);
    assert_eq!(code(&h.out), None);
    assert_eq!(
        relayed_of(&h.out),
        again,
        "the port actually bound is advertised"
    );
    assert!(h.core.has_allocation(c.id));
    // The refused port is free again once the allocation is bound.
    let ip = taken.ip();
    assert!(h
        .core
        .shared()
        .ports
        .take_port(crate::ports::RelayTransport::Udp, ip, taken.port())
        .is_some());
    // A retransmission gets the same answer.
    let answer = h.out.clone();
    assert_eq!(h.send(&req, c.id), Some(answer));
}

#[test]
fn an_ended_allocation_never_reaches_the_next_one_in_its_slot() {
    let mut h = Harness::new();
    let mut a = client(40000, "alice", "wonderland");
    a.allocate(&mut h);
    let old = relayed_alloc(&h);
    let reply = a.call(&mut h, method::REFRESH, |b| {
        b.u32(attr::LIFETIME, 0);
    });
    assert_eq!(code(&reply), None);
    let Some(Event::Freed(freed)) = h.core.poll_event() else {
        panic!("expected the allocation to be freed");
    };
    assert_eq!(freed, old);
    // The next allocation takes the same slot, under another generation.
    let mut b = client(40001, "bob", "builder");
    b.allocate(&mut h);
    let new = relayed_alloc(&h);
    assert_eq!(new.index(), old.index());
    assert_ne!(new, old);
    // Whatever still carries the old id (a late event, a packet read from its socket) touches
    // nothing of the new allocation.
    let peer: SocketAddr = "127.0.0.1:7000".parse().expect("a");
    let reply = b.call(&mut h, method::CREATE_PERMISSION, peer_attr(peer));
    assert_eq!(code(&reply), None);
    let mut buf = [0u8; 16];
    assert_eq!(
        h.core
            .handle_peer(old, peer, &mut buf, 1, h.now, &mut h.out),
        PeerAction::Drop
    );
    assert!(h.core.relayed(old).is_none() && h.core.relayed(new).is_some());
    assert!(matches!(
        h.core
            .handle_peer(new, peer, &mut buf, 1, h.now, &mut h.out),
        PeerAction::DataIndication { .. }
    ));
}

#[test]
fn timers_come_from_poll_timeout_and_end_the_allocation_on_time() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let start = h.now;
    // Follow poll_timeout alone: no periodic scan.
    let mut steps = 0;
    while h.core.allocation_count() > 0 {
        let next = h
            .core
            .poll_timeout()
            .expect("a deadline while an allocation lives");
        assert!(next > h.now, "poll_timeout in the past");
        h.now = next;
        h.core.handle_timeout(h.now);
        steps += 1;
        assert!(steps < 20, "too many wake-ups for one allocation");
    }
    assert_eq!(
        h.now - start,
        Duration::from_secs(600),
        "freed at its lifetime, not before"
    );
    assert!(matches!(h.core.poll_event(), Some(Event::Freed(_))));
}
