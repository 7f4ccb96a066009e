//! TCP sockets with the options listeners and RFC 6062 allocations need.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// A bound, non-blocking TCP socket with SO_REUSEADDR and SO_REUSEPORT: listener shards
/// share an address this way, and so do an RFC 6062 allocation's listener and its outgoing
/// connections (RFC 6062 §5.2 has them leave from the relayed address, which Linux allows
/// beside a listening socket only with SO_REUSEPORT on both). An allocation's port is its own
/// by the relay's port registry, and [`pin_to_first`] keeps any other socket that joins the
/// port from receiving its peers' connections.
pub(super) fn tcp_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock)
}

/// Attaches a reuseport program that hands every new connection to the first listener of the
/// port's SO_REUSEPORT group: the allocation's own, even if another socket (another process of
/// the same user) binds the port too. Set before `listen`.
fn pin_to_first(sock: &Socket) -> std::io::Result<()> {
    // One classic BPF instruction: return 0, the index of the group's first socket.
    let mut code = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: fd is a valid socket owned by `sock`; `prog` points at `code`, both alive for
    // the call, and the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The listening socket of an RFC 6062 allocation on `addr`. Where the kernel takes no
/// reuseport program (before Linux 4.5, some sandboxes), the registry's ownership of the port
/// is the guarantee left, and the relay says so once.
pub(super) fn tcp_relay_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let sock = tcp_socket(addr)?;
    if let Err(e) = pin_to_first(&sock) {
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(error = %e, "TCP relay listeners run without a reuseport program");
        }
    }
    sock.listen(128)?;
    Ok(sock.into())
}

pub(super) fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = tcp_socket(addr)?;
    sock.listen(1024)?;
    Ok(sock.into())
}
