# syntax=docker/dockerfile:1
# Builds a small, static, non-root image for either binary:
#   docker build --build-arg BIN=appset-operator -t appset-operator .
#   docker build --build-arg BIN=appset-webhook  -t appset-webhook .
# (No Docker engine runs on the project's development machines; this file is kept correct by
# review, not by CI.)

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
ARG BIN=appset-operator
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl -p "${BIN}" \
    && install -D -m 0755 "target/x86_64-unknown-linux-musl/release/${BIN}" /out/app

# distroless/static: no shell, no package manager, CA certificates and a nonroot user (65532).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/app /usr/local/bin/app
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/app"]
