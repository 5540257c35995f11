# syntax=docker/dockerfile:1
#
# policyd as a small static image: built with the Go toolchain, run from a
# distroless base (no shell, no package manager) as an unprivileged user.
#
#   docker build --build-arg VERSION=$(git describe --always) -t policyd .
#   docker run -d --name policyd \
#     -v policyd-config:/etc/policyd -v policyd-state:/var/lib/policyd \
#     -p 127.0.0.1:10040:10040 -p 127.0.0.1:10041:10041 -p 127.0.0.1:10042:10042 \
#     policyd
#   docker kill -s HUP policyd      # reload /etc/policyd
#
# Settings are the flags' environment twins (POLICYD_STORE, POLICYD_LOG_FORMAT,
# ...; see `policyd serve -h`). deploy/compose.yaml wires it to Postfix and Redis.

ARG GO_VERSION=1.26

FROM golang:${GO_VERSION} AS build
WORKDIR /src
# Modules first, so a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w -X main.version=${VERSION}" -o /out/policyd ./cmd/policyd
# The built-in chain, as files an operator can edit: a volume mounted on
# /etc/policyd starts from them (or replaces them, for a bind mount).
RUN mkdir -p /out/etc/policyd /out/var/lib/policyd && cp examples/default/* /out/etc/policyd/

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/policyd /usr/local/bin/policyd
COPY --from=build --chown=65532:65532 /out/etc/policyd /etc/policyd
COPY --from=build --chown=65532:65532 /out/var/lib/policyd /var/lib/policyd
# distroless's "nonroot" user.
USER 65532:65532
WORKDIR /var/lib/policyd
# Inside a container the listeners must accept connections from other
# containers: 0.0.0.0 here, and publish the ports on loopback or a private
# network only (the protocols have no authentication).
ENV POLICYD_CONFIG=/etc/policyd \
    POLICYD_STATE_DIR=/var/lib/policyd \
    POLICYD_POLICY_LISTEN=0.0.0.0:10040 \
    POLICYD_MILTER_LISTEN=0.0.0.0:10041 \
    POLICYD_HTTP_LISTEN=0.0.0.0:10042
VOLUME ["/etc/policyd", "/var/lib/policyd"]
# policy delegation, milter, HTTP (/metrics, /healthz, /readyz)
EXPOSE 10040 10041 10042
# SIGTERM drains open sessions for up to --drain-timeout (30s): stop the
# container with a longer timeout (docker stop -t 40, compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/policyd"]
CMD ["serve"]
