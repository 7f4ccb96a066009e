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
        q.push(&a, xa, 1, &[i; 100]);
        q.push(&b, ya, 2, &[100 + i; 7]);
    }
    q.push(&a, xa, 1, &[42; 30]);
    q.push(&a, ya, 3, &[43; 100]);
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

/// A UDP-Lite socket: the kernel refuses its GSO sends with EIO, as it does where a route's
/// device cannot segment, and takes its single datagrams.
fn udplite(ip: &str) -> std::net::UdpSocket {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::from(libc::IPPROTO_UDPLITE)),
    )
    .expect("UDP-Lite socket");
    s.bind(&SocketAddr::new(ip.parse().expect("ip"), 0).into())
        .expect("bind");
    s.into()
}

#[test]
fn a_destination_that_refuses_gso_gets_single_datagrams_and_only_it() {
    let a = Rc::new(UdpSock::unregistered(udplite("127.0.0.1")));
    a.get_ref().set_nonblocking(true).expect("nonblocking");
    let (x, y) = (udplite("127.0.0.1"), udplite("127.0.0.1"));
    let (xa, ya) = (x.local_addr().expect("addr"), y.local_addr().expect("addr"));
    let mut q = TxQueue::new();
    for round in 0..2u8 {
        for i in 0..10u8 {
            q.push(&a, xa, 1, &[round * 10 + i; 100]);
        }
        q.flush();
    }
    // The first GSO send was refused with a real EIO: everything went again as single
    // datagrams, in order, and the destination is remembered, so the second round did not
    // try GSO again.
    let got: Vec<Vec<u8>> = receive(&x, 20).into_iter().map(|(d, _)| d).collect();
    assert_eq!(got, (0..20u8).map(|i| vec![i; 100]).collect::<Vec<_>>());
    assert_eq!((q.gso_refused(), a.without_gso()), (1, 1));
    // Another destination is tried on its own; the socket keeps GSO for whatever takes it,
    // however many destinations refuse.
    for i in 0..10u8 {
        q.push(&a, ya, 1, &[i; 100]);
    }
    q.flush();
    assert_eq!(receive(&y, 10).len(), 10);
    assert_eq!((q.gso_refused(), a.without_gso()), (2, 2));
    for k in 0..(NO_GSO_DESTINATIONS as u16 + 10) {
        a.without_gso_to(SocketAddr::from(([127, 0, 9, 9], 1000 + k)));
    }
    assert!(a.gso(), "GSO is off for the whole socket");
    assert_eq!(a.without_gso(), NO_GSO_DESTINATIONS, "bounded");
    // The memory expires: a destination is tried again after NO_GSO_FOR.
    a.age_without_gso(NO_GSO_FOR);
    assert_eq!(a.without_gso(), 0);
    for i in 0..10u8 {
        q.push(&a, xa, 1, &[i; 100]);
    }
    q.flush();
    assert_eq!(receive(&x, 10).len(), 10);
    assert_eq!(q.gso_refused(), 3, "tried again once expired");
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
                q.push(&a, bad, 1, &[0xEE; 100]);
            }
        }
        for i in 0..10u8 {
            q.push(&a, to, 2, &[round * 10 + i; 100]);
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
        q.push(&a, to, 1, &[i; 50]);
        q.push(&b, to, 1, &[i; 50]);
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

/// Network namespaces made for one test (it runs as root, as CI does), removed when dropped;
/// traffic stays inside them.
mod netns {
    use std::process::Command;

    pub struct Netns(pub String);

    impl Netns {
        pub fn new(tag: &str) -> Netns {
            let name = format!("tp-udp-{tag}-{}", std::process::id());
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(std::process::Stdio::null())
                .status();
            run(&["ip", "netns", "add", &name]);
            let ns = Netns(name);
            ns.ip(&["link", "set", "lo", "up"]);
            ns
        }

        /// `ip -n NAME ARGS`.
        pub fn ip(&self, args: &[&str]) {
            let mut all = vec!["ip", "-n", &self.0];
            all.extend_from_slice(args);
            run(&all);
        }

        /// A program run inside the namespace.
        pub fn exec(&self, args: &[&str]) {
            let mut all = vec!["ip", "netns", "exec", &self.0];
            all.extend_from_slice(args);
            run(&all);
        }

        /// Moves the calling thread into the namespace: the sockets it makes live there.
        pub fn enter(&self) {
            let f = std::fs::File::open(format!("/run/netns/{}", self.0)).expect("netns file");
            // SAFETY: setns on a namespace descriptor we hold open; it changes only the
            // calling thread's network namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    fn run(args: &[&str]) {
        let status = Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(status.success(), "{args:?} failed");
    }
}

#[test]
fn a_segment_above_the_path_mtu_goes_as_single_datagrams() {
    let ns = netns::Netns::new("mtu");
    ns.ip(&["link", "set", "lo", "mtu", "1300"]);
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            let a = Rc::new(UdpSock::unregistered(
                std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"),
            ));
            a.get_ref().set_nonblocking(true).expect("nonblocking");
            let x = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            let to = x.local_addr().expect("addr");
            let mut q = TxQueue::new();
            // 1400-byte segments on a 1300-byte path: the kernel refuses the GSO send
            // (EMSGSIZE here, EINVAL on older kernels); as single datagrams it fragments
            // them, and all arrive.
            for i in 0..8u8 {
                q.push(&a, to, 1, &[i; 1400]);
            }
            q.flush();
            let got: Vec<(usize, u8)> = receive(&x, 8)
                .into_iter()
                .map(|(d, _)| (d.len(), d[0]))
                .collect();
            assert_eq!(got, (0..8u8).map(|i| (1400, i)).collect::<Vec<_>>());
            assert_eq!((q.gso_refused(), a.without_gso()), (1, 1));
        });
    });
}

/// A sender whose device queue drains slowly (a token bucket on its veth), so its socket
/// buffer fills for real: one flow queues far more than the buffer holds, four others one
/// datagram each, after it. The drops fall on the big flow's tail; each small flow's
/// datagram leaves.
#[test]
fn a_full_socket_buffer_drops_the_biggest_flows_tail_not_its_neighbours() {
    let (a, b) = (netns::Netns::new("full-a"), netns::Netns::new("full-b"));
    let link = format!("tpf{}", std::process::id() % 100_000);
    let peer = format!("{link}p");
    a.ip(&[
        "link", "add", &link, "type", "veth", "peer", "name", &peer, "netns", &b.0,
    ]);
    a.ip(&["addr", "add", "10.79.0.1/24", "dev", &link]);
    b.ip(&["addr", "add", "10.79.0.2/24", "dev", &peer]);
    a.ip(&["link", "set", &link, "up"]);
    b.ip(&["link", "set", &peer, "up"]);
    a.exec(&[
        "tc", "qdisc", "add", "dev", &link, "root", "tbf", "rate", "1mbit", "burst", "16kb",
        "limit", "4mb",
    ]);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            b.enter();
            // The big flow's destination sorts first (the lowest port), where a queue in
            // destination order would send it first.
            let mut socks: Vec<std::net::UdpSocket> = (0..5)
                .map(|_| std::net::UdpSocket::bind("10.79.0.2:0").expect("bind"))
                .collect();
            socks.sort_by_key(|x| x.local_addr().expect("addr").port());
            ready_tx
                .send(
                    socks
                        .iter()
                        .map(|x| x.local_addr().expect("addr"))
                        .collect::<Vec<_>>(),
                )
                .expect("send");
            // Each small flow's one datagram; the big flow's, as many as came through.
            let small: Vec<usize> = socks[1..].iter().map(|x| receive(x, 1).len()).collect();
            (small, receive(&socks[0], 500).len())
        });
        let to: Vec<SocketAddr> = ready_rx.recv().expect("addresses");
        a.enter();
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
            .expect("socket");
        sock.set_send_buffer_size(32 * 1024).expect("sndbuf");
        sock.bind(&"10.79.0.1:0".parse::<SocketAddr>().expect("a").into())
            .expect("bind");
        let sender = Rc::new(UdpSock::unregistered(sock.into()));
        sender.get_ref().set_nonblocking(true).expect("nonblocking");
        let mut q = TxQueue::new();
        for i in 0..500u16 {
            q.push(&sender, to[0], 1, &[(i % 250) as u8; 1000]);
        }
        for (flow, dest) in to[1..].iter().enumerate() {
            q.push(&sender, *dest, 2 + flow as u64, &[0xAA; 1000]);
        }
        q.flush();
        let dropped = q.take_dropped();
        let (small, big) = receiver.join().expect("receiver");
        assert!(dropped > 0, "the buffer never filled");
        assert_eq!(small, [1, 1, 1, 1], "a small flow's datagram was dropped");
        assert!(big > 0 && big < 500, "{big} of the big flow's 500 left");
        assert_eq!(big as u64 + dropped, 500, "every drop counted");
    });
}
