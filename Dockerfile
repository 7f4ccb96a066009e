# Turnpike container image: the relay (default target `relay`) and the probe (target `probe`).
#
#   podman build --format docker -t turnpike .                      # see deploy/container/README.md
#   podman build --format docker --target probe -t turnpike-probe .
#
# Any Debian bookworm image with the bookworm-security suite in its apt sources works as BASE:
# docker.io/library/debian:bookworm-slim where registries can be reached, or the image the tests
# make offline with debootstrap (deploy/container/test.sh). `--format docker` keeps HEALTHCHECK,
# which the OCI image format has no field for.
ARG BASE=localhost/turnpike-base:bookworm

# ---------------------------------------------------------------------------------------------
# Build stage.
#
# Toolchain: Debian's own `rustc-web`/`cargo-web` from bookworm-security, not rustup and not an
# official rust image. Bookworm's plain `rustc` (1.63) is too old for this workspace
# (rust-version 1.85, lockfile v4); `rustc-web` is the current stable toolchain Debian ships
# to build its browsers and keeps updated in bookworm-security. It comes from the same apt
# sources as the base image, so the build needs no image pull, no rustup download and nothing
# from the host's own toolchain, and it builds against the very glibc the runtime stage runs on.
#
# Crates are downloaded from crates.io (`--locked`: exactly Cargo.lock). Where TLS is
# intercepted, mount the host's CA certificates into the build: `-v /etc/ssl/certs:/etc/ssl/certs:ro`;
# Debian's ca-certificates are installed only when no CA bundle is mounted.
# ---------------------------------------------------------------------------------------------
FROM ${BASE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# Versions unpinned on purpose (DL3008): bookworm-security replaces them, and a pinned version
# disappears from the mirror. Even bookworm's first rustc-web (1.85) meets rust-version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends rustc-web cargo-web libcap2-bin \
    && { [ -s /etc/ssl/certs/ca-certificates.crt ] \
         || apt-get install -y --no-install-recommends ca-certificates; } \
    && rm -rf /var/lib/apt/lists/* \
    && rustc --version && cargo --version

ENV CARGO_HOME=/usr/local/cargo \
    CARGO_TERM_COLOR=never
WORKDIR /src
# .dockerignore keeps the context to the manifests, the crates and the configs.
COPY Cargo.toml Cargo.lock ./
COPY config ./config
COPY proto ./proto
COPY udp ./udp
COPY server ./server
COPY client-probe ./client-probe
# The registry and target folders are build caches: a rebuild after a source change compiles
# only the workspace crates. The binaries are copied out of the cache within the same step.
# They carry symbols (for panic messages) but no debug info, which would double their size.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN --mount=type=cache,id=turnpike-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=turnpike-target,target=/src/target \
    cargo build --release --locked -p turnpike -p turnpike-probe \
    && install -d /out \
    && install -m 0755 target/release/turnpike target/release/turnpike-probe /out/ \
    && setcap cap_net_bind_service=+ep /out/turnpike

# ---------------------------------------------------------------------------------------------
# Runtime: the bare base (no compiler, no package added), both binaries, a non-root user.
# ---------------------------------------------------------------------------------------------
FROM ${BASE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The user has no home, no shell and no password.
RUN groupadd --system --gid 10001 turnpike \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin turnpike \
    && install -d -m 0755 /etc/turnpike \
    && install -d -m 0700 -o 10001 -g 10001 /var/lib/turnpike
# The binaries. The relay carries CAP_NET_BIND_SERVICE as a file capability (set in the build
# stage; COPY keeps it), so that its non-root user can bind 443 (and 3478, 5349) and nothing
# else: run the container with `--cap-drop ALL --cap-add NET_BIND_SERVICE`. COPY, not a RUN
# with a bind mount of the build stage: only COPY's cache key follows the binaries' content.
COPY --from=build /out/turnpike /out/turnpike-probe /usr/local/bin/

# The image's own configuration is the embedded default (UDP 3478 on every interface, metrics
# and health on 127.0.0.1:9641, peer policy on; with no secret given, a random one per start):
# it starts without any file mounted. Mount yours over /etc/turnpike/turnpike.toml (or
# elsewhere, and set TURNPIKE_CONFIG to it). The annotated example, which names TLS files and sample
# credentials and so is no default to run, is beside it for reference.
COPY config/default.toml /etc/turnpike/turnpike.toml
COPY config/turnpike.example.toml /etc/turnpike/turnpike.example.toml
# With a tenant store, /var/lib/turnpike ([store] state_dir) holds the store's last snapshot and
# the usage not yet written to it: mount a volume there (`-v turnpike-state:/var/lib/turnpike`)
# so that they outlive the container. A SQLite store lives there too.

LABEL org.opencontainers.image.title="turnpike" \
      org.opencontainers.image.description="Self-hostable TURN/STUN relay, and its probe" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/turnpike-relay/turnpike"

USER 10001:10001

# Health checks speak HTTP/1.0 to /healthz through bash's /dev/tcp (the image has no curl).
# TURNPIKE_HEALTHCHECK_ADDR is read by the check only: set it to the metrics address when the
# configuration moves metrics_listen (an IPv6 address in brackets, "[::1]:9641").

# ---------------------------------------------------------------------------------------------
# Probe target: `turnpike-probe watch` as a Prometheus exporter on 9642. Mount a regions file
# at /etc/turnpike/regions.toml.
# ---------------------------------------------------------------------------------------------
FROM runtime AS probe
ENV TURNPIKE_HEALTHCHECK_ADDR=127.0.0.1:9642
EXPOSE 9642/tcp
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/bin/bash", "-c", "a=$TURNPIKE_HEALTHCHECK_ADDR; h=${a%:*}; h=${h#[}; h=${h%]}; exec 3<>/dev/tcp/$h/${a##*:} && printf 'GET /healthz HTTP/1.0\\r\\nHost: %s\\r\\n\\r\\n' \"$a\" >&3 && read -r -t 4 _ code _ <&3 && [ \"$code\" = 200 ]"]
ENTRYPOINT ["/usr/local/bin/turnpike-probe"]
CMD ["watch", "--regions", "/etc/turnpike/regions.toml", "--listen", "0.0.0.0:9642"]

# ---------------------------------------------------------------------------------------------
# Relay target (the default, being last).
#
# Ports: 3478/udp and 3478/tcp (STUN, TURN), 5349/tcp and 443/tcp (TURN over TLS, HTTPS), the
# relay range 49152-65535/udp (and tcp for RFC 6062), 9641/tcp metrics. Run with
# `--network host` (publishing 16k relay ports through a NAT is neither practical nor what TURN
# wants), or publish the listeners and a narrowed `relay_ports` range and set `external_ips`.
# SIGTERM drains: give `--stop-timeout` a little more than drain_grace_secs (30).
# ---------------------------------------------------------------------------------------------
FROM runtime AS relay
ENV TURNPIKE_HEALTHCHECK_ADDR=127.0.0.1:9641
EXPOSE 3478/udp 3478/tcp 5349/tcp 443/tcp
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/bin/bash", "-c", "a=$TURNPIKE_HEALTHCHECK_ADDR; h=${a%:*}; h=${h#[}; h=${h%]}; exec 3<>/dev/tcp/$h/${a##*:} && printf 'GET /healthz HTTP/1.0\\r\\nHost: %s\\r\\n\\r\\n' \"$a\" >&3 && read -r -t 4 _ code _ <&3 && [ \"$code\" = 200 ]"]
# The configuration file comes from TURNPIKE_CONFIG rather than a `--config` in CMD, so that
# flags given to `podman run IMAGE --flag ...` add to the mounted file instead of replacing it.
ENV TURNPIKE_CONFIG=/etc/turnpike/turnpike.toml
ENTRYPOINT ["/usr/local/bin/turnpike"]
CMD []
