# Warren as a container image: `docker compose up` builds it three times over
# (docker-compose.yml), or on its own:
#
#   docker build -t warren .
#   docker run -p 8080:8080 warren                      # one node, embedded bus
#   docker run -p 8080:8080 -e AMQP_URL=amqp://... warren
#
# The builder stage runs the same command CI runs outside Docker:
#   cargo build --release -p warren --locked

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src

# Dependencies first, against stub sources, so editing src/ does not rebuild
# every crate. The bench crate is a workspace member, so cargo reads its
# manifest; its sources are never built here and stay a stub.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && cargo build --release -p warren --locked \
 && rm -rf src

COPY src src
# The JavaScript client library is built into the binary (served at /warren-client.js).
COPY clients/js/warren-client.js clients/js/warren-client.js
# COPY keeps the files' own timestamps, which can be older than the stub build:
# touch them so cargo rebuilds warren itself.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release -p warren --locked


FROM debian:bookworm-slim AS runtime
# ca-certificates: amqps:// brokers are verified against the system roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin warren

COPY --from=builder /src/target/release/warren /usr/local/bin/warren
COPY static /app/static
WORKDIR /app

ENV WARREN_LISTEN=0.0.0.0:8080 \
    WARREN_STATIC_DIR=/app/static
EXPOSE 8080
USER 10001:10001

# SIGTERM drains (not ready at once, sockets closed with 1012 after
# WARREN_DRAIN_SECS + up to WARREN_DRAIN_JITTER_SECS): give the container at
# least that long to stop (docker-compose.yml: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/warren"]
