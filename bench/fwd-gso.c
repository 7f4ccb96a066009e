/*
 * A bare UDP forwarder with batched IO and no TURN parsing: the "GSO forwarder floor", the
 * lowest CPU per datagram the benchmark expects of a relay that batches.
 *
 *   fwd-gso BASE_PORT FLOWS PEER_IP PEER_PORT
 *
 * The same flows as fwd.c: flow i listens on 127.0.0.1:BASE_PORT+i, a datagram arriving there
 * goes out, unchanged, of the flow's back socket (connected to PEER_IP:PEER_PORT), and one
 * arriving on the back socket goes to the last client seen on the front socket. Here a
 * readable socket is drained with recvmmsg (up to 64 datagrams a call) and what it received
 * leaves with one sendmmsg: each run of consecutive datagrams of one size to one destination
 * becomes a single UDP GSO send (a UDP_SEGMENT control message), so a burst of N costs one
 * traversal of the stack instead of N. A datagram that arrives alone is sent alone, as in a
 * relay. Single-threaded, level-triggered epoll. Runs until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

#define MAX_FLOWS 4096
#define BUFFER (4 << 20)
#define BATCH 64
#define SLOT 2048
/* The kernel takes at most 64 segments (UDP_MAX_SEGMENTS) and 64 KiB in one GSO send. */
#define MAX_SEGMENTS 64
#define MAX_GSO_BYTES 65000

struct flow {
    int front, back;
    struct sockaddr_in client;
    int has_client;
};

static int udp_socket(const char *ip, int port) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (s < 0) { perror("socket"); exit(1); }
    int size = BUFFER;
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(s, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, ip, &a.sin_addr);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); exit(1); }
    return s;
}

static char bufs[BATCH][SLOT];
static struct iovec in_iov[BATCH];
static struct sockaddr_in in_addr[BATCH];
static struct mmsghdr in_msgs[BATCH];

/* One outgoing send: a run of datagrams, contiguous in bufs, of one size (the last may be
 * shorter) to one destination. */
static struct iovec out_iov[BATCH];
static struct mmsghdr out_msgs[BATCH];
static char out_cmsg[BATCH][CMSG_SPACE(sizeof(uint16_t))];

/* Sends datagrams 0..n-1 of bufs (lengths len[]) from fd, to `to` (NULL: the connected peer). */
static void send_batch(int fd, int n, const unsigned *len, struct sockaddr_in *to) {
    int m = 0;
    for (int i = 0; i < n;) {
        unsigned seg = len[i];
        int j = i + 1;
        /* Consecutive slots are SLOT apart, so a run is copied together into bufs[i]. */
        size_t total = seg;
        while (j < n && j - i < MAX_SEGMENTS && total + len[j] <= MAX_GSO_BYTES && len[j] <= seg &&
               len[j - 1] == seg) {
            memmove(bufs[i] + total, bufs[j], len[j]);
            total += len[j];
            j++;
        }
        struct msghdr *h = &out_msgs[m].msg_hdr;
        memset(h, 0, sizeof *h);
        out_iov[m].iov_base = bufs[i];
        out_iov[m].iov_len = total;
        h->msg_iov = &out_iov[m];
        h->msg_iovlen = 1;
        if (to) {
            h->msg_name = to;
            h->msg_namelen = sizeof *to;
        }
        if (j - i > 1) {
            h->msg_control = out_cmsg[m];
            h->msg_controllen = sizeof out_cmsg[m];
            struct cmsghdr *c = CMSG_FIRSTHDR(h);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t s = (uint16_t)seg;
            memcpy(CMSG_DATA(c), &s, sizeof s);
        }
        m++;
        i = j;
    }
    for (int sent = 0; sent < m;) {
        int k = sendmmsg(fd, out_msgs + sent, m - sent, 0);
        if (k <= 0) break; /* a full buffer drops the rest, as a relay would */
        sent += k;
    }
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: fwd-gso BASE_PORT FLOWS PEER_IP PEER_PORT\n");
        return 2;
    }
    int base = atoi(argv[1]), n = atoi(argv[2]);
    if (n < 1 || n > MAX_FLOWS || base < 1 || base + n > 65536) {
        fprintf(stderr, "fwd-gso: FLOWS 1-%d, ports within 1-65535\n", MAX_FLOWS);
        return 2;
    }
    struct sockaddr_in peer = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[4])) };
    if (inet_pton(AF_INET, argv[3], &peer.sin_addr) != 1) {
        fprintf(stderr, "fwd-gso: bad PEER_IP\n");
        return 2;
    }
    static struct flow flows[MAX_FLOWS];
    int ep = epoll_create1(0);
    for (int i = 0; i < n; i++) {
        flows[i].front = udp_socket("127.0.0.1", base + i);
        flows[i].back = udp_socket("127.0.0.1", 0);
        if (connect(flows[i].back, (struct sockaddr *)&peer, sizeof peer) < 0) {
            perror("connect");
            return 1;
        }
        struct epoll_event ev = { .events = EPOLLIN, .data.u64 = (uint64_t)i * 2 };
        epoll_ctl(ep, EPOLL_CTL_ADD, flows[i].front, &ev);
        ev.data.u64 = (uint64_t)i * 2 + 1;
        epoll_ctl(ep, EPOLL_CTL_ADD, flows[i].back, &ev);
    }
    /* Fails here, not silently later, on a kernel without UDP GSO. */
    int probe = 0;
    if (setsockopt(flows[0].back, SOL_UDP, UDP_SEGMENT, &probe, sizeof probe) < 0 && errno == ENOPROTOOPT) {
        fprintf(stderr, "fwd-gso: this kernel has no UDP GSO\n");
        return 1;
    }
    printf("fwd-gso: %d flows on 127.0.0.1:%d-%d\n", n, base, base + n - 1);
    fflush(stdout);
    for (int i = 0; i < BATCH; i++) {
        in_iov[i].iov_base = bufs[i];
        in_iov[i].iov_len = SLOT;
    }
    unsigned len[BATCH];
    struct epoll_event events[256];
    for (;;) {
        int k = epoll_wait(ep, events, 256, -1);
        if (k < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int e = 0; e < k; e++) {
            struct flow *f = &flows[events[e].data.u64 / 2];
            int from_back = events[e].data.u64 & 1;
            int fd = from_back ? f->back : f->front;
            /* A bounded number of batches per event, so no socket starves the others. */
            for (int round = 0; round < 4; round++) {
                for (int i = 0; i < BATCH; i++) {
                    memset(&in_msgs[i].msg_hdr, 0, sizeof in_msgs[i].msg_hdr);
                    in_msgs[i].msg_hdr.msg_iov = &in_iov[i];
                    in_msgs[i].msg_hdr.msg_iovlen = 1;
                    in_msgs[i].msg_hdr.msg_name = &in_addr[i];
                    in_msgs[i].msg_hdr.msg_namelen = sizeof in_addr[i];
                }
                int got = recvmmsg(fd, in_msgs, BATCH, MSG_DONTWAIT, NULL);
                if (got <= 0) break;
                for (int i = 0; i < got; i++) len[i] = in_msgs[i].msg_len;
                if (from_back) {
                    if (f->has_client) send_batch(f->front, got, len, &f->client);
                } else {
                    f->client = in_addr[got - 1];
                    f->has_client = 1;
                    send_batch(f->back, got, len, NULL);
                }
                if (got < BATCH) break;
            }
        }
    }
}
