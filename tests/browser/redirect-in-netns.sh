#!/usr/bin/env bash
# Runs inside a network namespace the test made (unshare --net): Chromium follows a 300 Try
# Alternate. Relay A drains (one allocation, held by coturn's uclient, keeps it up) and names
# relay B; Chromium, given only A's URL, must get its relay candidates from B. Fixed ports are
# safe here: nothing else lives in this namespace.
# Usage: redirect-in-netns.sh TURNPIKE_BINARY
set -euo pipefail
bin=$1
here=$(cd "$(dirname "$0")" && pwd)
sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 || true
ip link set lo up
ip link add v0 type veth peer name v1
ip addr add 10.99.0.1/24 dev v0
ip addr add 10.99.0.2/24 dev v1
ip link set v0 up
ip link set v1 up
secret=redirect-test-secret-0123456789
logs=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$logs"' EXIT INT TERM
start() { # NAME PORT METRICS [CONFIG]
  "$bin" --listen "udp://10.99.0.1:$2" --relay-ip 10.99.0.1 --allow-peer 10.99.0.0/24 \
    --auth-secret "$secret" --metrics-listen "127.0.0.1:$3" --drain-grace 120 \
    ${4:+--config "$4"} >"$logs/$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    grep -q 'metrics on' "$logs/$1.log" && return
    sleep 0.1
  done
  cat "$logs/$1.log"; exit 1
}
start b 3479 9642
cat >"$logs/a.toml" <<TOML
[redirect]
siblings = [{ udp = ["10.99.0.1:3479"] }]
TOML
start a 3478 9641 "$logs/a.toml"
a=${pids[1]}
# One allocation keeps A up while it drains (uclient relays slowly to itself for a minute).
turnutils_uclient -W "$secret" -u holder -y -c -m 1 -n 600 -l 100 -z 100 -p 3478 10.99.0.1 \
  >"$logs/holder.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -s 127.0.0.1:9641/metrics | grep -q '^turnpike_allocations_active [1-9]' && break
  sleep 0.1
done
kill -TERM "$a"
for _ in $(seq 100); do
  curl -s 127.0.0.1:9641/metrics | grep -q '^turnpike_redirecting 1' && break
  sleep 0.1
done
count() { curl -s "127.0.0.1:$1/metrics" | grep '^turnpike_allocations_total{tenant="default"}' | awk '{print $2}'; }
# A's count once its counters show the holder's allocations and stay (they are exported four
# times a second).
before=0
for _ in $(seq 100); do
  now=$(count 9641)
  [ "${now:-0}" -ge 2 ] && [ "$now" = "$before" ] && break
  before=${now:-0}
  sleep 0.3
done
echo "a-before: $before"
expiry=$(( $(date +%s) + 3600 ))
user="$expiry:chromium"
pass=$(printf %s "$user" | openssl dgst -sha1 -hmac "$secret" -binary | base64)
node "$here/relay-datachannel.mjs" "$user" "$pass" "turn:10.99.0.1:3478?transport=udp"
echo "a-allocations: $(count 9641)"
echo "b-allocations: $(count 9642)"
