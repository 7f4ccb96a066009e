#!/usr/bin/env python3
"""An independent TURN client (aioice) for Turnpike's end-to-end tests.

Allocates over UDP, TCP or TLS, relays COUNT datagrams to a UDP echo peer on loopback and back,
and prints one JSON line: {"relayed": "ip:port", "sent": N, "received": M}.
Usage: aioice_client.py HOST PORT udp|tcp|tls USER PASSWORD [CAFILE] [COUNT]
"""
import asyncio
import json
import ssl
import sys

from aioice import turn


class Collect(asyncio.DatagramProtocol):
    def __init__(self):
        self.received = []
        self.event = asyncio.Event()

    def datagram_received(self, data, addr):
        self.received.append(data)
        self.event.set()


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


async def main():
    host, port, transport, user, password = sys.argv[1:6]
    cafile = sys.argv[6] if len(sys.argv) > 6 and sys.argv[6] else None
    count = int(sys.argv[7]) if len(sys.argv) > 7 else 50
    context = None
    if transport == "tls":
        context = ssl.create_default_context(cafile=cafile)
        context.check_hostname = False
    loop = asyncio.get_running_loop()
    echo_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer = echo_transport.get_extra_info("sockname")
    relay, collect = await asyncio.wait_for(
        turn.create_turn_endpoint(
            Collect,
            server_addr=(host, int(port)),
            username=user,
            password=password,
            ssl=context,
            transport="udp" if transport == "udp" else "tcp",
        ),
        timeout=10,
    )
    relayed = relay.get_extra_info("sockname")
    for i in range(count):
        relay.sendto(b"packet %d" % i, peer)
        # Paced, and each echo awaited (bounded), so loss means loss.
        try:
            await asyncio.wait_for(collect.event.wait(), timeout=2)
        except asyncio.TimeoutError:
            pass
        collect.event.clear()
    relay.close()
    echo_transport.close()
    print(json.dumps({"relayed": "%s:%d" % relayed[:2], "sent": count, "received": len(collect.received)}))


asyncio.run(main())
