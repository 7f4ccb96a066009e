#!/usr/bin/env bash
# Runs inside a network namespace the test made (unshare --net), like run-in-netns.sh: a veth
# pair gives Chromium an address. Starts the relay with the network test page twice and lets
# Chromium run the page against it: first with UDP, TCP and TLS on 443 (and a second TLS port
# named as another region), then without the UDP listener while the page still offers UDP,
# as a firewall dropping UDP would look, and with a throughput threshold no path meets; then
# with the relay's certificate accepted for the page only (a visitor who clicked through the
# warning); last behind a reverse proxy that inspects TLS (mitmproxy). Fixed ports are safe here: nothing else lives in
# this namespace.
# Usage: test-page-in-netns.sh TURNPIKE_BINARY CERT KEY OUTDIR
set -euo pipefail
bin=$1 cert=$2 key=$3 out=$4
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

relay=
stop() { [ -n "$relay" ] && kill "$relay" 2>/dev/null && wait "$relay" 2>/dev/null; relay=; }
trap stop EXIT INT TERM

start() { # CONFIG LOG
  "$bin" --config "$1" --drain-grace 0 2>"$2" &
  relay=$!
  for _ in $(seq 100); do
    grep -q 'relaying IPv' "$2" && return 0
    kill -0 $relay 2>/dev/null || { cat "$2"; exit 1; }
    sleep 0.1
  done
  cat "$2"; exit 1
}

common="relay_ips = [\"10.99.0.1\"]
realm = \"netns.test\"
[tls]
cert = \"$cert\"
key = \"$key\"
[echo]
websocket = true
long_poll_max_secs = 5"

cat >"$out/full.toml" <<TOML
listen = ["udp://10.99.0.1:3478", "tcp://10.99.0.1:3478", "tls://0.0.0.0:443", "tls://0.0.0.0:5349"]
$common
[test_page]
enabled = true
min_mbps = 1
ice_urls = ["turn:10.99.0.1:3478?transport=udp", "turn:10.99.0.1:3478?transport=tcp", "turns:10.99.0.1:443?transport=tcp"]
regions = [{ name = "here", url = "https://10.99.0.1" }, { name = "second", url = "https://10.99.0.1:5349" }]
TOML
start "$out/full.toml" "$out/full.log"
node "$here/network-test-page.mjs" "https://10.99.0.1/test?media=1" "$out/full"
stop

cat >"$out/noudp.toml" <<TOML
listen = ["tcp://10.99.0.1:3478", "tls://0.0.0.0:443"]
$common
[test_page]
enabled = true
min_mbps = 1000
ice_urls = ["turn:10.99.0.1:3478?transport=udp", "turn:10.99.0.1:3478?transport=tcp", "turns:10.99.0.1:443?transport=tcp"]
TOML
start "$out/noudp.toml" "$out/noudp.log"
node "$here/network-test-page.mjs" "https://10.99.0.1/test" "$out/noudp"
stop

# The relay's self-signed certificate accepted for the page only, as a visitor who clicked
# through the browser's warning: TURN over TLS refuses it, UDP and TCP work, at the test's own
# rate limit.
cat >"$out/clicked.toml" <<TOML
listen = ["udp://10.99.0.1:3478", "tcp://10.99.0.1:3478", "tls://0.0.0.0:443"]
$common
[test_page]
enabled = true
min_mbps = 1
# 2 Mbit/s per test allocation: every working path reaches the test's own limit.
bytes_per_sec = 250000
ice_urls = ["turn:10.99.0.1:3478?transport=udp", "turn:10.99.0.1:3478?transport=tcp", "turns:10.99.0.1:443?transport=tcp"]
TOML
start "$out/clicked.toml" "$out/clicked.log"
node "$here/network-test-page.mjs" "https://10.99.0.1/test" "$out/clicked" clicked-through
stop

# Behind a proxy that opens TLS and passes only web traffic: mitmproxy as a reverse proxy on
# 10.99.0.1:443 in front of the relay's TLS port on 10.99.0.2, re-signing with its own CA
# (which the browser accepts, as a company laptop trusts its proxy's). The page loads through
# it; TURN over TLS does not pass.
cat >"$out/inspect.toml" <<TOML
listen = ["tls://10.99.0.2:443"]
relay_ips = ["10.99.0.2"]
realm = "netns.test"
[tls]
cert = "$cert"
key = "$key"
[echo]
websocket = true
[test_page]
enabled = true
min_mbps = 1
ice_urls = ["turns:10.99.0.1:443?transport=tcp"]
TOML
mitmdump --mode reverse:https://10.99.0.2:443 --listen-host 10.99.0.1 -p 443 \
  --set "confdir=$out/mitmproxy" --set keep_host_header=true --ssl-insecure -q >"$out/mitmproxy.log" 2>&1 &
proxy=$!
trap 'stop; kill $proxy 2>/dev/null; wait $proxy 2>/dev/null' EXIT INT TERM
start "$out/inspect.toml" "$out/inspect.log"
for _ in $(seq 100); do
  (exec 3<>/dev/tcp/10.99.0.1/443) 2>/dev/null && break
  kill -0 $proxy 2>/dev/null || { cat "$out/mitmproxy.log"; exit 1; }
  sleep 0.1
done
node "$here/network-test-page.mjs" "https://10.99.0.1/test" "$out/inspect"
stop
kill $proxy; wait $proxy 2>/dev/null || true
