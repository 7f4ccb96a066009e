//! Who holds a port, for `--check-config`: a port in use is a warning that names the process
//! (the relay the edited file is for, usually), read from `/proc/net` and `/proc/PID/fd`.

use std::net::SocketAddr;

use procfs::net::TcpState;
use procfs::process::FDTarget;

/// The process that has `addr` bound (UDP) or listening (TCP), as `NAME (pid N)`, when this
/// user may see its file descriptors.
pub fn holder(addr: SocketAddr, udp: bool) -> Option<String> {
    let covers = |local: SocketAddr| {
        local.port() == addr.port()
            && (local.ip() == addr.ip()
                || local.ip().is_unspecified()
                || addr.ip().is_unspecified())
    };
    let inodes: Vec<u64> = if udp {
        [procfs::net::udp(), procfs::net::udp6()]
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| covers(e.local_address))
            .map(|e| e.inode)
            .collect()
    } else {
        [procfs::net::tcp(), procfs::net::tcp6()]
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.state == TcpState::Listen && covers(e.local_address))
            .map(|e| e.inode)
            .collect()
    };
    if inodes.is_empty() {
        return None;
    }
    for p in procfs::process::all_processes().ok()?.flatten() {
        let Ok(fds) = p.fd() else { continue };
        let holds = fds
            .flatten()
            .any(|fd| matches!(fd.target, FDTarget::Socket(i) if inodes.contains(&i)));
        if holds {
            let name = p.stat().map(|s| s.comm).unwrap_or_else(|_| "?".into());
            return Some(format!("{name} (pid {})", p.pid()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_of_a_port_is_this_process() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let me = format!("(pid {})", std::process::id());
        let u = holder(udp.local_addr().expect("addr"), true).expect("found");
        let t = holder(tcp.local_addr().expect("addr"), false).expect("found");
        assert!(u.ends_with(&me) && t.ends_with(&me), "{u} / {t}");
        // A UDP socket is not a TCP listener.
        assert_eq!(holder(udp.local_addr().expect("addr"), false), None);
    }
}
