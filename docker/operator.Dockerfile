# syntax=docker/dockerfile:1.7
# Image of the Sealed OTA operator (run, crdgen).
# Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t sealed-ota/sealed-ota-operator:dev .
#
# Stage 1 compiles one release binary with the locked dependency set; BuildKit cache mounts keep the
# registry and target directory between builds. Stage 2 is distroless (glibc, CA bundle, no shell,
# no package manager) and runs as the numeric non-root user 65532, so a restricted Pod Security
# Standard and runAsNonRoot admit it without a securityContext.runAsUser.
ARG RUST_VERSION=1.95
ARG DEBIAN_CODENAME=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-slim-${DEBIAN_CODENAME} AS build
WORKDIR /src
# Only what cargo needs to build the workspace (see operator.Dockerfile.dockerignore).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p sealed-ota-operator --bin sealed-ota-operator \
 && install -D -m 0755 target/release/sealed-ota-operator /out/sealed-ota-operator

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="sealed-ota-operator" \
      org.opencontainers.image.description="the Sealed OTA operator (run, crdgen)" \
      org.opencontainers.image.source="https://github.com/sealed-ota/sealed-ota" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/sealed-ota-operator /usr/local/bin/sealed-ota-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sealed-ota-operator"]
