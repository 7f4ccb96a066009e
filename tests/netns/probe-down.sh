#!/usr/bin/env bash
# Runs inside a network namespace the test made (unshare --net --fork), "the laptop": a relay
# in a second namespace of its own on 10.99.0.1 (UDP and TCP on 3478, TLS on 443) behind a
# firewall that rejects UDP and TCP to 3478 (ICMP port unreachable, TCP reset) and lets TLS
# on 443 through; 10.99.0.7 on the same link, where nobody answers (a relay host that is off);
# and no route at all to 203.0.113.9. One probe run writes the rows as JSON (table.json), one
# the HTML report (report.html).
# Fixed addresses and ports are safe here: nothing else lives in these namespaces, and nothing
# leaves them.
# Usage: probe-down.sh TURNPIKE PROBE CERT KEY OUTDIR
set -euo pipefail
. "$(dirname "$0")/lib.sh"
relay_bin=$1 probe_bin=$2 cert=$3 key=$4 out=$5
sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 || true
ip link set lo up
relay_namespace 'iptables -A INPUT -i v0 -p tcp --dport 3478 -j REJECT --reject-with tcp-reset
  iptables -A INPUT -i v0 -p udp --dport 3478 -j REJECT' "$out/relay.log" \
  "$relay_bin" --listen udp://10.99.0.1:3478 --listen tcp://10.99.0.1:3478 \
  --listen tls://10.99.0.1:443 --cert "$cert" --key "$key" --relay-ip 10.99.0.1 \
  --allow-peer 10.99.0.0/24 --user alice:wonderland --drain-grace 0
trap 'kill $(pgrep -P $relay) 2>/dev/null; wait $relay 2>/dev/null' EXIT INT TERM
link_relay_namespace
# An address nobody has is given up on after one ARP request of 200 ms, not three seconds.
sysctl -qw net.ipv4.neigh.v1.mcast_solicit=1 net.ipv4.neigh.v1.retrans_time_ms=200
for _ in $(seq 300); do
  (echo >/dev/tcp/10.99.0.1/443) 2>/dev/null && break
  kill -0 $relay 2>/dev/null || { cat "$out/relay.log"; exit 1; }
  sleep 0.1
done
cat >"$out/regions.toml" <<TOML
[[region]]
name = "rejecting"
host = "10.99.0.1"
udp_port = 3478
tcp_port = 3478
tls_port = 443
tls_name = "10.99.0.1"
ca_file = "$cert"
username = "alice"
password = "wonderland"

[[region]]
name = "off"
host = "10.99.0.7"
udp_port = 3478
tcp_port = 3478
tls_port = 443
tls_name = "10.99.0.1"
ca_file = "$cert"
username = "alice"
password = "wonderland"

[[region]]
name = "unrouted"
host = "203.0.113.9"
tcp_port = 3478
username = "alice"
password = "wonderland"
TOML
"$probe_bin" measure --regions "$out/regions.toml" --samples 2 --timeout-ms 700 \
  --firewall --json >"$out/table.json" 2>"$out/probe.err" || true
"$probe_bin" measure --regions "$out/regions.toml" --samples 2 --timeout-ms 700 \
  --report "$out/report.html" >/dev/null 2>>"$out/probe.err" || true
echo "probe ran"
