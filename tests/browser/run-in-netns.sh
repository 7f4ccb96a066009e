#!/usr/bin/env bash
# Runs inside a network namespace the test made (unshare --net): Chromium gathers no ICE
# candidates where only loopback exists, so a veth pair gives it an address. Starts the
# relay on that address with UDP and TCP on 3478 and TLS on 5349 and 443 (fixed ports are
# safe here: nothing else lives in this namespace), checks HTTPS on 443, then runs Chromium.
# Usage: run-in-netns.sh TURNPIKE_BINARY CERT KEY
set -euo pipefail
bin=$1 cert=$2 key=$3
here=$(cd "$(dirname "$0")" && pwd)
# No IPv6 here: its addresses would appear a moment after the links come up, and Chromium
# aborts a page load when the network changes under it (ERR_NETWORK_CHANGED).
sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 || true
ip link set lo up
ip link add v0 type veth peer name v1
ip addr add 10.99.0.1/24 dev v0
ip addr add 10.99.0.2/24 dev v1
ip link set v0 up
ip link set v1 up
log=$(mktemp)
"$bin" --listen udp://10.99.0.1:3478 --listen tcp://10.99.0.1:3478 \
  --listen tls://0.0.0.0:5349 --listen tls://0.0.0.0:443 --cert "$cert" --key "$key" \
  --relay-ip 10.99.0.1 --allow-peer 10.99.0.0/24 --user alice:wonderland --realm turnpike.test \
  --metrics-listen 127.0.0.1:9641 2>"$log" &
relay=$!
trap 'kill $relay 2>/dev/null; wait $relay 2>/dev/null; rm -f "$log"' EXIT INT TERM
for _ in $(seq 100); do
  grep -q 'metrics on' "$log" && break
  kill -0 $relay 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
echo "healthz: $(curl -sk --max-time 5 https://127.0.0.1:443/healthz)"
node "$here/relay-datachannel.mjs" alice wonderland \
  "turn:10.99.0.1:3478?transport=udp" \
  "turn:10.99.0.1:3478?transport=tcp" \
  "turns:10.99.0.1:5349?transport=tcp" \
  "turns:10.99.0.1:443?transport=tcp"
# Wrong credentials: Chromium reports 401 and gathers no relay candidate.
node "$here/relay-datachannel.mjs" alice not-the-password "turn:10.99.0.1:3478?transport=udp"
