//! What strangers can do to a running relay over UDP: a flood of unauthenticated requests
//! leaves memory flat, and a spoofed source gets little back however much it sends.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{RawClient, Relay};
use turnpike_proto::stun::{attr, method};

#[test]
fn unauthenticated_allocate_flood_leaves_memory_flat() {
    let relay = Relay::start(&["--user", "alice:wonderland"]);
    // Warm up, then measure.
    let senders: Vec<UdpSocket> = (0..64)
        .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let flood = |rounds: u32| {
        let mut buf = Vec::new();
        for r in 0..rounds {
            for (i, s) in senders.iter().enumerate() {
                let mut t = [0u8; 16];
                t[..4].copy_from_slice(&turnpike_proto::stun::MAGIC_COOKIE.to_be_bytes());
                t[4..8].copy_from_slice(&r.to_be_bytes());
                t[8..12].copy_from_slice(&(i as u32).to_be_bytes());
                turnpike_proto::stun::Builder::new(
                    &mut buf,
                    turnpike_proto::stun::Class::Request,
                    method::ALLOCATE,
                    turnpike_proto::stun::TransactionId(t),
                )
                .u32(attr::REQUESTED_TRANSPORT, 17 << 24)
                .fingerprint();
                let _ = s.send_to(&buf, relay.udp);
            }
            // Read the 401s back so the senders' buffers do not fill; pacing keeps loopback lossless.
            for s in &senders {
                s.set_nonblocking(true).expect("nonblocking");
                let mut b = [0u8; 512];
                while s.recv_from(&mut b).is_ok() {}
            }
        }
    };
    flood(50);
    let before_401 = relay.wait_metric(
        "turnpike_requests_total{method=\"allocate\",result=\"401\"}",
        1.0,
    );
    let before = relay.rss_kib();
    flood(1000);
    let after_401 = relay.wait_metric(
        "turnpike_requests_total{method=\"allocate\",result=\"401\"}",
        before_401 + 30_000.0,
    );
    let after = relay.rss_kib();
    assert!(
        after_401 - before_401 >= 30_000.0,
        "flood did not reach the relay: {after_401}"
    );
    assert!(
        after < before + 2048,
        "RSS grew from {before} KiB to {after} KiB under an unauthenticated flood"
    );
    assert_eq!(relay.metric("turnpike_allocations_active"), 0.0);
}

/// What a spoofed source can make the relay send: unsigned requests from one address get
/// their small errors at a bounded rate (50 a second, in bursts of 100, by default), and the
/// rest no answer at all.
#[test]
fn a_stranger_gets_little_back_however_much_it_sends() {
    let relay = Relay::start(&["--user", "alice:wonderland"]);
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_nonblocking(true).expect("nonblocking");
    let (mut sent, mut got, mut answers) = (0usize, 0usize, 0usize);
    let mut buf = Vec::new();
    let mut reply = [0u8; 2048];
    let mut drain = |got: &mut usize, answers: &mut usize| {
        while let Ok(n) = sock.recv(&mut reply) {
            *got += n;
            *answers += 1;
        }
    };
    let start = std::time::Instant::now();
    for n in 0..2000u32 {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&turnpike_proto::stun::MAGIC_COOKIE.to_be_bytes());
        t[4..8].copy_from_slice(&n.to_be_bytes());
        // A bare 20-byte Allocate, the smallest request a 401 answers.
        turnpike_proto::stun::Builder::new(
            &mut buf,
            turnpike_proto::stun::Class::Request,
            method::ALLOCATE,
            turnpike_proto::stun::TransactionId(t),
        );
        sent += sock.send_to(&buf, relay.udp).expect("send");
        if n % 100 == 99 {
            drain(&mut got, &mut answers);
        }
    }
    // The relay counts every request it judged, answered or not; a loaded machine may drop
    // some of the flood before the relay reads it, so take its count once it stops moving.
    let series = "turnpike_requests_total{method=\"allocate\",result=\"401\"}";
    let mut judged = relay.wait_metric(series, 2000.0);
    loop {
        std::thread::sleep(Duration::from_millis(600));
        let now = relay.metric(series);
        if now == judged {
            break;
        }
        judged = now;
    }
    let elapsed = start.elapsed().as_secs_f64();
    drain(&mut got, &mut answers);
    let limited = relay.metric("turnpike_dropped_packets_total{reason=\"reply_rate\"}");
    let factor = got as f64 / sent as f64;
    eprintln!(
        "2000 bare Allocates ({sent} bytes) from one source in {elapsed:.2} s: {judged} judged, {answers} answered ({got} bytes), {limited} unanswered: {factor:.2} bytes out per byte in"
    );
    assert!(judged > 1000.0, "the flood did not reach the relay");
    assert_eq!(
        answers as f64 + limited,
        judged,
        "every request is answered or counted"
    );
    // The burst, then the rate over the time the flood took.
    let allowed = 100.0 + 50.0 * elapsed;
    assert!(
        answers as f64 <= allowed + 1.0,
        "{answers} answers in {elapsed:.2} s, more than the limit allows ({allowed:.0})"
    );
    // Another source is answered at once, and can authenticate.
    let mut other = RawClient::from_ip("127.0.0.2", relay.udp, "alice", "wonderland");
    other.sock.send_to(&buf, relay.udp).expect("send");
    let n = other
        .sock
        .recv(&mut reply)
        .expect("another source gets its 401");
    assert!(n > 20 && reply[..2] == [0x01, 0x13], "not a 401");
    assert_eq!(other.allocate().code(), None);
}
