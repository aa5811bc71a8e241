# syntax=docker/dockerfile:1
# batchd's container image: a release build with the locked dependencies, copied onto
# distroless (glibc, CA certificates, no shell, no package manager), run as a non-root
# numeric user. Build: docker build -t batchd:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache dependencies and the target directory between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin batchd \
    && cp target/release/batchd /usr/local/bin/batchd

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/batchd /usr/local/bin/batchd
# Listen on every interface inside the container; 65532 is distroless's "nonroot".
ENV BATCHD_GRPC_ADDR=0.0.0.0:50051 \
    BATCHD_HTTP_ADDR=0.0.0.0:8080
USER 65532:65532
EXPOSE 50051 8080
ENTRYPOINT ["batchd"]
CMD ["serve"]
