# Shared by the probe's namespace scripts (sourced): a relay in a network namespace of its
# own on 10.99.0.1, linked to the calling one (10.99.0.2) by a veth pair.

# relay_namespace RULES LOG COMMAND...: runs COMMAND (the relay) in a new namespace once its
# end of the link is there, behind RULES (shell commands, iptables, run in that namespace);
# its stderr goes to LOG. Sets $relay to its pid.
relay_namespace() {
  local rules=$1 log=$2
  shift 2
  RULES=$rules unshare --net --fork --kill-child bash -c '
    for _ in $(seq 200); do ip link show v0 >/dev/null 2>&1 && break; sleep 0.05; done
    ip link set lo up
    ip addr add 10.99.0.1/24 dev v0
    ip link set v0 up
    eval "$RULES"
    exec "$@"' relay "$@" 2>"$log" &
  relay=$!
}

# link_relay_namespace: gives the relay's namespace its end of the link once unshare has made
# it (until then the process is still in this one, and the link would stay here).
link_relay_namespace() {
  for _ in $(seq 200); do
    [ "$(readlink /proc/$relay/ns/net)" != "$(readlink /proc/self/ns/net)" ] && break
    sleep 0.05
  done
  ip link add v0 type veth peer name v1
  ip link set v0 netns "$relay"
  ip addr add 10.99.0.2/24 dev v1
  ip link set v1 up
}
