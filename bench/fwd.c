/*
 * A bare UDP forwarder with no TURN parsing: the floor the benchmark measures relays against.
 *
 *   fwd BASE_PORT FLOWS PEER_IP PEER_PORT
 *
 * Flow i listens on 127.0.0.1:BASE_PORT+i. A datagram arriving there is sent, unchanged, from
 * the flow's own back socket to PEER_IP:PEER_PORT; a datagram arriving on the back socket is
 * sent to the last client seen on the front socket. One recvfrom and one sendto per datagram,
 * as a relay without batching does. Single-threaded, level-triggered epoll. Runs until killed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FLOWS 4096
#define BUFFER (4 << 20)

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

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: fwd BASE_PORT FLOWS PEER_IP PEER_PORT\n");
        return 2;
    }
    int base = atoi(argv[1]), n = atoi(argv[2]);
    if (n < 1 || n > MAX_FLOWS || base < 1 || base + n > 65536) {
        fprintf(stderr, "fwd: FLOWS 1-%d, ports within 1-65535\n", MAX_FLOWS);
        return 2;
    }
    struct sockaddr_in peer = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[4])) };
    if (inet_pton(AF_INET, argv[3], &peer.sin_addr) != 1) {
        fprintf(stderr, "fwd: bad PEER_IP\n");
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
        /* Event data: flow index * 2, +1 for the back socket. */
        struct epoll_event ev = { .events = EPOLLIN, .data.u64 = (uint64_t)i * 2 };
        epoll_ctl(ep, EPOLL_CTL_ADD, flows[i].front, &ev);
        ev.data.u64 = (uint64_t)i * 2 + 1;
        epoll_ctl(ep, EPOLL_CTL_ADD, flows[i].back, &ev);
    }
    printf("fwd: %d flows on 127.0.0.1:%d-%d\n", n, base, base + n - 1);
    fflush(stdout);
    static char buf[65536];
    struct epoll_event events[256];
    for (;;) {
        int k = epoll_wait(ep, events, 256, -1);
        if (k < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int e = 0; e < k; e++) {
            struct flow *f = &flows[events[e].data.u64 / 2];
            int from_back = events[e].data.u64 & 1;
            /* A bounded number of datagrams per event, so no socket starves the others. */
            for (int budget = 0; budget < 64; budget++) {
                if (from_back) {
                    ssize_t len = recv(f->back, buf, sizeof buf, 0);
                    if (len < 0) break;
                    if (f->has_client)
                        sendto(f->front, buf, len, 0, (struct sockaddr *)&f->client, sizeof f->client);
                } else {
                    socklen_t alen = sizeof f->client;
                    ssize_t len = recvfrom(f->front, buf, sizeof buf, 0, (struct sockaddr *)&f->client, &alen);
                    if (len < 0) break;
                    f->has_client = 1;
                    send(f->back, buf, len, 0);
                }
            }
        }
    }
}
