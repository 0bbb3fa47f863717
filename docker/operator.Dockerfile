# Image of the Sealed OTA operator (run, crdgen).
#
# With a registry, from the repository root:
#   docker build -f docker/operator.Dockerfile -t sealed-ota/sealed-ota-operator:dev .
# compiles one release binary (CARGO_PROFILE) in the official Rust image (locked dependency set; BuildKit cache
# mounts keep the registry and target directory between builds) and ends on distroless (glibc, CA
# bundle, no shell, no package manager).
#
# Without a registry, scripts/images.sh (make images) gives the same final stage other inputs:
#   BINARY=prebuilt         the binary cargo built on the host, from a build context holding only it
#   RUNTIME_IMAGE=sealed-ota/runtime-base:bookworm   a distroless equivalent from Debian's packages
# and its `dockerfile` mode runs this file unchanged with a local BUILDER_IMAGE (Debian and the
# host's Rust toolchain). Every way ends as the numeric non-root user 65532, so a restricted Pod
# Security Standard and runAsNonRoot admit it without a securityContext.runAsUser.
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG BINARY=compiled
# The compile stage's cargo profile: release, or dev for a quicker build of the same Dockerfile
# (`scripts/images.sh dockerfile --profile debug`, as `make test` checks it).
ARG CARGO_PROFILE=release

FROM ${BUILDER_IMAGE} AS compiled
ARG CARGO_PROFILE
# jemalloc, the operator's allocator, builds with make, which the slim Rust image lacks (the
# local builder image has it: no network needed there).
RUN command -v make >/dev/null || { apt-get update && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*; }
WORKDIR /src
# Only what cargo needs to build the workspace (see operator.Dockerfile.dockerignore).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --profile "$CARGO_PROFILE" --locked -p sealed-ota-operator --bin sealed-ota-operator \
 && dir=$(if [ "$CARGO_PROFILE" = dev ]; then echo debug; else echo "$CARGO_PROFILE"; fi) \
 && install -D -m 0755 "target/$dir/sealed-ota-operator" /out/sealed-ota-operator

FROM scratch AS prebuilt
COPY sealed-ota-operator /out/sealed-ota-operator

FROM ${BINARY} AS binary

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="sealed-ota-operator" \
      org.opencontainers.image.description="the Sealed OTA operator (run, crdgen)" \
      org.opencontainers.image.source="https://github.com/sealed-ota/sealed-ota" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=binary /out/sealed-ota-operator /usr/local/bin/sealed-ota-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sealed-ota-operator"]
