//! Tests of the batches over loopback.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use crate::*;

/// A registered socket; needs the runtime of a `#[tokio::test]`.
fn sock() -> Rc<UdpSock> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_nonblocking(true).expect("nonblocking");
    Rc::new(register(s).expect("register"))
}

/// Receives until `want` datagrams arrived (bounded).
fn receive(to: &std::net::UdpSocket, want: usize) -> Vec<(Vec<u8>, SocketAddr)> {
    to.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while got.len() < want {
        let Ok((n, from)) = to.recv_from(&mut buf) else {
            break;
        };
        got.push((buf[..n].to_vec(), from));
    }
    got
}

#[tokio::test(flavor = "current_thread")]
async fn gso_runs_and_single_datagrams_arrive_whole_and_in_order() {
    let a = sock();
    let b = sock();
    let x = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let y = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let (xa, ya) = (x.local_addr().expect("addr"), y.local_addr().expect("addr"));
    let mut q = TxQueue::new();
    // Interleaved: a run of equal sizes to x from a (one GSO send), a shorter one, and
    // datagrams to y from a and b.
    for i in 0..10u8 {
        q.push(&a, xa, &[i; 100]);
        q.push(&b, ya, &[100 + i; 7]);
    }
    q.push(&a, xa, &[42; 30]);
    q.push(&a, ya, &[43; 100]);
    q.flush();
    assert!(q.is_empty());
    let at_x = receive(&x, 11);
    let want_x: Vec<Vec<u8>> = (0..10u8)
        .map(|i| vec![i; 100])
        .chain([vec![42; 30]])
        .collect();
    assert_eq!(
        at_x.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
        want_x
    );
    let from_a = a.get_ref().local_addr().expect("addr");
    assert!(at_x.iter().all(|(_, from)| *from == from_a));
    let at_y = receive(&y, 11);
    assert_eq!(at_y.len(), 11);
    let from_b: Vec<Vec<u8>> = at_y
        .iter()
        .filter(|(_, f)| *f == b.get_ref().local_addr().expect("addr"))
        .map(|(d, _)| d.clone())
        .collect();
    assert_eq!(
        from_b,
        (0..10u8).map(|i| vec![100 + i; 7]).collect::<Vec<_>>()
    );
    assert!(a.gso() && q.gso_sends() > 0, "loopback takes GSO sends");
}

#[tokio::test(flavor = "current_thread")]
async fn a_route_that_cannot_segment_loses_gso_for_itself_alone() {
    let a = sock();
    let bad: SocketAddr = "127.0.0.2:9".parse().expect("addr");
    let good: SocketAddr = "127.0.0.3:9".parse().expect("addr");
    a.without_gso_to(bad);
    assert!(!a.gso_to(bad) && a.gso_to(good) && a.gso());
    // Many such destinations: the socket's own device cannot segment, then.
    for i in 0..NO_GSO_DESTINATIONS as u16 {
        a.without_gso_to(SocketAddr::from(([127, 0, 1, 1], 1000 + i)));
    }
    assert!(!a.gso() && !a.gso_to(good));
}

#[tokio::test(flavor = "current_thread")]
async fn a_destination_that_refuses_leaves_gso_and_the_other_datagrams_alone() {
    let a = sock();
    let x = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let to = x.local_addr().expect("addr");
    // Loopback's broadcast address refuses a socket without SO_BROADCAST (EACCES), and
    // port 0 is no destination (EINVAL): nothing leaves for either.
    let refused: [SocketAddr; 2] = [
        "127.255.255.255:9".parse().expect("addr"),
        "127.0.0.1:0".parse().expect("addr"),
    ];
    let mut q = TxQueue::new();
    for round in 0..2u8 {
        for bad in refused {
            for _ in 0..5 {
                q.push(&a, bad, &[0xEE; 100]);
            }
        }
        for i in 0..10u8 {
            q.push(&a, to, &[round * 10 + i; 100]);
        }
        q.flush();
    }
    let got: Vec<Vec<u8>> = receive(&x, 20).into_iter().map(|(d, _)| d).collect();
    assert_eq!(got, (0..20u8).map(|i| vec![i; 100]).collect::<Vec<_>>());
    assert!(
        a.gso(),
        "a refused destination turned GSO off for the socket"
    );
    assert!(q.gso_sends() >= 2, "the good runs did not go as GSO sends");
}

#[tokio::test(flavor = "current_thread")]
async fn equal_datagrams_from_two_sockets_keep_their_source() {
    let (a, b) = (sock(), sock());
    let x = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let to = x.local_addr().expect("addr");
    let mut q = TxQueue::new();
    for i in 0..8u8 {
        q.push(&a, to, &[i; 50]);
        q.push(&b, to, &[i; 50]);
    }
    q.flush();
    let got = receive(&x, 16);
    for s in [&a, &b] {
        let from = s.get_ref().local_addr().expect("addr");
        let data: Vec<Vec<u8>> = got
            .iter()
            .filter(|(_, f)| *f == from)
            .map(|(d, _)| d.clone())
            .collect();
        assert_eq!(data, (0..8u8).map(|i| vec![i; 50]).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_is_read_with_headroom_and_sources() {
    let rx = sock();
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let to = rx.get_ref().local_addr().expect("addr");
    for i in 0..5u8 {
        tx.send_to(&[i; 9], to).expect("send");
    }
    let mut batch = RecvBatch::new(2048);
    let mut got = Vec::new();
    for _ in 0..200 {
        match batch.recv(rx.get_ref().as_raw_fd()) {
            Ok(n) => (0..n).for_each(|i| {
                assert_eq!(batch.source(i), tx.local_addr().ok());
                let payload = batch.payload(i).to_vec();
                let (slot, len) = batch.slot_mut(i);
                assert_eq!(slot[HEADROOM..HEADROOM + len], payload[..]);
                got.push(payload);
            }),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got.len() < 5 => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(_) => break,
        }
        if got.len() == 5 {
            break;
        }
    }
    assert_eq!(got, (0..5u8).map(|i| vec![i; 9]).collect::<Vec<_>>());
}

#[test]
fn a_batch_crosses_loopback_with_its_sources() {
    let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    b.set_nonblocking(true).expect("nonblocking");
    let to = b.local_addr().expect("addr");
    let mut out = SendBatch::new();
    for i in 0..10u8 {
        out.push_with(Some(to), |buf| buf.extend_from_slice(&[i; 5]));
    }
    assert_eq!(out.flush(a.as_raw_fd()).expect("send"), 10);
    assert!(out.is_empty());
    let mut got = Vec::new();
    let mut batch = RecvBatch::new(64);
    for _ in 0..100 {
        match batch.recv(b.as_raw_fd()) {
            Ok(n) => {
                for i in 0..n {
                    assert_eq!(batch.source(i), a.local_addr().ok());
                    got.push(batch.payload(i).to_vec());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got.len() == 10 => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(e) => panic!("{e}"),
        }
    }
    let want: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 5]).collect();
    assert_eq!(got, want);
}

/// The poller reports every socket that became readable, by its token, and none it stopped
/// watching; a socket not drained is not reported again until more arrives (edge-triggered).
#[tokio::test(flavor = "current_thread")]
async fn poller_reports_each_ready_socket_once_by_token() {
    let (mut poller, registry) = Poller::new().expect("poller");
    let socks: Vec<UdpSock> = (0..8)
        .map(|_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.set_nonblocking(true).expect("nonblocking");
            UdpSock::unregistered(s)
        })
        .collect();
    for (i, s) in socks.iter().enumerate() {
        registry.add(s, 100 + i).expect("add");
    }
    registry.remove(&socks[5]);
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    for i in [1, 3, 5, 6] {
        let to = socks[i].get_ref().local_addr().expect("addr");
        tx.send_to(b"x", to).expect("send");
        tx.send_to(b"y", to).expect("send");
    }
    let mut ready = Vec::new();
    let wait = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        // Datagrams on loopback are queued by the time send_to returns.
        poller.wait(&mut ready).await.expect("wait");
    });
    wait.await.expect("a socket became readable");
    ready.sort_unstable();
    assert_eq!(ready, vec![101, 103, 106]);
    // Nothing was read, but nothing new arrived: no new event.
    ready.clear();
    assert_eq!(poller.take(&mut ready).expect("take"), 0);
    tx.send_to(b"z", socks[3].get_ref().local_addr().expect("addr"))
        .expect("send");
    let wait = tokio::time::timeout(std::time::Duration::from_secs(5), poller.wait(&mut ready));
    wait.await.expect("readable again").expect("wait");
    assert_eq!(ready, vec![103]);
}
