# ward's container image: `ward` as the entrypoint, run as the non-root user 1337, with the
# tools `ward redirect` needs (iptables, nftables) and nothing else added.
#
# With a registry (the release binary is built in the image):
#   docker build -t ward .                 # or: podman build -t ward .
# From a binary built on the host (`cargo build --release`; no Rust image needed):
#   docker build --target runtime-prebuilt -t ward .
#
# uid 1337: the proxy's own connections are told apart by this uid (`ward redirect
# --proxy-uid 1337`), so no app container in the pod may run as it. Istio's sidecar uses the
# same uid, and ward's redirect ports are Istio's too (15001, 15006), so clusters already
# tuned for Istio (policies, exclusions) need no change.

# Build stage: the release binary, from the locked dependencies.
FROM docker.io/library/rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin ward \
    && install -D -m 0755 target/release/ward /out/ward

# The runtime without the binary: Debian (same glibc as the build stage), the redirect tools,
# the user.
FROM docker.io/library/debian:bookworm-slim AS runtime-base
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && useradd --system --uid 1337 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ward
# Listens of the example configs (examples/): inbound mTLS and the admin API.
EXPOSE 21000 19000
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/ward"]
CMD ["--help"]

# The runtime with a binary built on the host: `--target runtime-prebuilt`, and
# `--build-arg WARD_BINARY=path/in/the/context` for another build than target/release/ward.
FROM runtime-base AS runtime-prebuilt
ARG WARD_BINARY=target/release/ward
COPY ${WARD_BINARY} /usr/local/bin/ward

# The default target (last stage): the runtime with the binary of the build stage.
FROM runtime-base AS runtime
COPY --from=build /out/ward /usr/local/bin/ward
