#!/usr/bin/env bash
# Runs inside a network namespace the test made (unshare --net --fork), "the laptop": a relay
# in a second namespace of its own on 10.99.0.1 (UDP and TCP on 3478, TLS on 443) behind a
# firewall that silently drops every UDP datagram to it, a veth pair between the two, and in
# the laptop's namespace a real proxy that inspects TLS (mitmproxy on 127.0.0.1:8080,
# re-signing with its own CA). One probe run writes the report and the capture IT gets.
# With MODE relay-ports instead, the firewall drops only UDP to the relay ports (49152-65535),
# there is no proxy, and the probe prints its firewall rows as JSON (table.json).
# Fixed addresses and ports are safe here: nothing else lives in these namespaces.
# (unshare --fork does not pass SIGTERM on: the trap stops the relay itself.)
# Usage: probe-behind-proxy.sh TURNPIKE PROBE CERT KEY OUTDIR [MODE]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
relay_bin=$1 probe_bin=$2 cert=$3 key=$4 out=$5 mode=${6:-proxy}
if [ "$mode" = relay-ports ]; then export DROP="--dport 49152:65535"; else export DROP=; fi
sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 || true
ip link set lo up
# The relay's namespace: it waits for its end of the link, sets up its firewall, and runs.
relay_namespace 'iptables -A INPUT -i v0 -p udp $DROP -j DROP' "$out/relay.log" \
  "$relay_bin" --listen udp://10.99.0.1:3478 --listen tcp://10.99.0.1:3478 \
  --listen tls://10.99.0.1:443 --cert "$cert" --key "$key" --relay-ip 10.99.0.1 \
  --allow-peer 10.99.0.0/24 --user alice:wonderland --drain-grace 0
proxy=
if [ "$mode" = proxy ]; then
  mitmdump --listen-host 127.0.0.1 -p 8080 --set "confdir=$out/mitmproxy" --ssl-insecure -q \
    >/dev/null 2>&1 &
  proxy=$!
fi
trap 'kill $(pgrep -P $relay) $proxy 2>/dev/null; wait $relay $proxy 2>/dev/null' EXIT INT TERM
link_relay_namespace
for _ in $(seq 300); do
  (echo >/dev/tcp/10.99.0.1/3478) 2>/dev/null &&
    { [ -z "$proxy" ] || (echo >/dev/tcp/127.0.0.1/8080) 2>/dev/null; } && break
  kill -0 $relay 2>/dev/null || { cat "$out/relay.log"; exit 1; }
  sleep 0.1
done
cat >"$out/regions.toml" <<TOML
[[region]]
name = "eu-office"
host = "10.99.0.1"
udp_port = 3478
tcp_port = 3478
tls_port = 443
tls_name = "10.99.0.1"
ca_file = "$cert"
username = "alice"
password = "wonderland"
TOML
if [ "$mode" = proxy ]; then
  "$probe_bin" measure --regions "$out/regions.toml" --samples 3 --timeout-ms 700 \
    --proxy http://127.0.0.1:8080 --bandwidth 1M --bandwidth-secs 1 \
    --report "$out/report.html" --capture "$out/probe.pcapng" --firewall \
    >"$out/table.txt" 2>"$out/probe.err" || true
else
  "$probe_bin" measure --regions "$out/regions.toml" --samples 3 --timeout-ms 700 \
    --firewall --json >"$out/table.json" 2>"$out/probe.err" || true
fi
echo "probe ran"
