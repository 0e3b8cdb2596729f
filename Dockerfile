# syntax=docker/dockerfile:1
#
# kiln in a container: one image for `kiln up` (the default), `kiln serve` and `kiln gateway`.
#
#   docker build -t kiln .
#   docker run --rm -p 8080:8080 -v "$PWD/testdata/hf/llama:/models/model:ro" kiln
#
# deploy/compose.yaml and deploy/k8s run it as separate `serve` and `gateway` services. The
# runtime image has no shell tools beyond Debian's base and no curl: health checks use
# `kiln healthcheck` (exit 0 when a URL answers 2xx within 3 s).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---- build -------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder

# plotters (the training reports' charts) links fontconfig and freetype.
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libfontconfig1-dev libfreetype-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# .cargo/config.toml carries the target CPU (x86-64-v3): the image runs on any x86 CPU since
# Haswell, never only on the build machine's.
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY crates ./crates

# The registry and target directories are BuildKit caches: a source change rebuilds kiln's
# crates, not the dependencies. target/ is a cache mount, so the binary is copied out of it.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p kiln-cli \
 && install -D -m 0755 target/release/kiln /out/kiln

# ---- runtime -----------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

ARG KILN_VERSION=0.1.0
LABEL org.opencontainers.image.title="kiln" \
      org.opencontainers.image.description="Pre-train, fine-tune, align, quantize and serve language models: kiln serve, kiln gateway, kiln up" \
      org.opencontainers.image.version="${KILN_VERSION}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/kiln" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

RUN apt-get update \
 && apt-get install -y --no-install-recommends libfontconfig1 libfreetype6 fonts-dejavu-core ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 kiln \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/kiln --create-home \
      --shell /usr/sbin/nologin kiln \
 && mkdir -p /models /data \
 && chown 10001:10001 /data

COPY --from=builder /out/kiln /usr/local/bin/kiln

# /data is the working directory: `kiln up` and a gateway without `store.url` keep their
# SQLite record there. Fontconfig's cache goes to /tmp, writable under a read-only root.
ENV XDG_CACHE_HOME=/tmp/.cache \
    KILN_HEALTHCHECK_URL=http://127.0.0.1:8080/live
WORKDIR /data
VOLUME /models
# 8000: kiln serve; 8080: kiln gateway and kiln up.
EXPOSE 8000 8080

USER 10001:10001

# Liveness of `kiln up` (its gateway on 8080). Services on another port pass
# `kiln healthcheck --url http://127.0.0.1:PORT/ready` (deploy/compose.yaml does).
# The start period covers loading the model: the server binds only once it is loaded.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["kiln", "healthcheck"]

# SIGTERM drains: readiness turns 503, requests in flight finish (--shutdown-timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["kiln"]
CMD ["up", "--host", "0.0.0.0", "--model", "/models/model"]
