# syntax=docker/dockerfile:1
#
# lockstep gateway image.
#
#   docker build -t lockstep:0.1.0 .
#   docker run --rm -p 8080:8080 --read-only -v lockstep-data:/var/lib/lockstep \
#     -e LOCKSTEP_JWT_SECRET=... lockstep:0.1.0
#
# Two stages: a Rust 1.95 builder (Debian 12, the same glibc as the runtime) and a slim
# runtime that holds only the binary. The runtime runs as uid 10001 and writes nothing outside
# $LOCKSTEP_DATA_DIR, so it works with a read-only root filesystem once that directory is a
# volume. Any glibc 2.36+ image with libgcc works as a runtime (e.g. a distroless "cc" image:
# pass --build-arg RUNTIME_IMAGE=...); the binary needs only libc, libm and libgcc_s, plus the
# CA bundle copied in below.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src

# 1. Dependencies only, cached as long as Cargo.toml and Cargo.lock do not change: build the
#    real dependency graph against stub sources.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && echo '' > src/lib.rs \
 && cargo build --release --locked --bin lockstep \
 && rm -rf src

# 2. The crate itself. Migrations and the demo page are compiled into the binary.
COPY src ./src
COPY migrations ./migrations
# Debug line tables (~80 MB, Cargo.toml keeps them for local profiling) are stripped from the
# image; symbols stay, so panics still name their functions.
# COPY keeps the files' own mtimes, which may be older than the stub build: touch them so
# cargo rebuilds the crate instead of shipping the stub.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin lockstep \
 && objcopy --strip-debug target/release/lockstep /lockstep \
 && /lockstep --version

FROM ${RUNTIME_IMAGE} AS runtime
# The data directory exists and belongs to the runtime user, so `docker run` without a volume
# works too (with --read-only it must be a volume).
RUN mkdir -p /var/lib/lockstep && chown 10001:10001 /var/lib/lockstep
# The system CA roots that `rediss://` without LOCKSTEP_REDIS_TLS_CA, and Postgres with
# `sslrootcert=system`, verify managed services against (the slim image has none). Copied from
# the builder, so a runtime image without a package manager gets them too.
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /lockstep /lockstep
USER 10001:10001
ENV LOCKSTEP_LISTEN=0.0.0.0:8080 \
    LOCKSTEP_DATA_DIR=/var/lib/lockstep \
    LOCKSTEP_LOG_FORMAT=json
VOLUME ["/var/lib/lockstep"]
# 8080: HTTP + WebSocket; 9090: /metrics when LOCKSTEP_METRICS_LISTEN=0.0.0.0:9090.
EXPOSE 8080 9090
# SIGTERM starts the drain (readiness 503, `reconnect` + close 1012 to every client).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/lockstep"]
CMD ["serve"]
