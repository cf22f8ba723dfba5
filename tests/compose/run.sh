#!/usr/bin/env bash
# `make test-compose`: compose mode for real. Builds every image from the repo's Dockerfiles, brings
# docker-compose.yml up, and runs tests/compose/test_stack.py against it (upload -> served through
# Nginx, Prometheus labels, Airflow's asset chain, a blue/green redeploy, the promises under load,
# API keys and alerts, steps in containers (FLYWHEEL_RUNNER=docker), a Celery worker's run).
#
# The Docker engine is the one DOCKER_HOST (or the default socket) names. Where none answers, a
# private one is started in .cache/docker (tests/compose/engine.sh) and stopped afterwards, the host
# put back as it was. Where none can be started, this fails: a compose test never passes by skipping.
# Compose v2 is needed (`up --wait`, build secrets); without the plugin, the pinned release is
# built from the Go module proxy into .cache/compose, as `make install` builds MinIO.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
ENGINE_DIR=$REPO/.cache/docker
CACHE=$REPO/.cache/compose
COMPOSE_VERSION=v2.29.7
PYTHON=$REPO/.venv/platform/bin/python
started=$(date +%s)

say() { echo "[test-compose] $*"; }
since() { echo "$(($(date +%s) - $1))s"; }
fail() {
    echo "[test-compose] FAILED: $*" >&2
    exit 1
}

# --- the engine -----------------------------------------------------------------------------------
if docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    say "using the Docker engine at ${DOCKER_HOST:-the default socket}"
else
    if [ "$(id -u)" -ne 0 ]; then
        fail "no Docker engine answers at ${DOCKER_HOST:-the default socket}, and starting one needs root.
Start Docker (or point DOCKER_HOST at an engine) and run again."
    fi
    say "no Docker engine answers: starting a private one in ${ENGINE_DIR#"$REPO"/}"
    DOCKER_HOST=$(tests/compose/engine.sh start "$ENGINE_DIR") ||
        fail "could not start a Docker engine (log: $ENGINE_DIR/dockerd.log)"
    export DOCKER_HOST
    own_engine=1
fi
cleanup() {
    rm -f "$CACHE/test.env"
    if [ -n "${own_engine:-}" ]; then tests/compose/engine.sh stop "$ENGINE_DIR"; fi
}
trap cleanup EXIT
say "engine ready after $(since "$started")"
docker version --format 'engine {{.Server.Version}}, API {{.Server.APIVersion}}' | sed 's/^/[test-compose] /'

# --- Compose v2 -----------------------------------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
    COMPOSE="docker compose"
elif [ -x "$CACHE/docker-compose-$COMPOSE_VERSION" ]; then
    COMPOSE=$CACHE/docker-compose-$COMPOSE_VERSION
else
    command -v go >/dev/null ||
        fail "Compose v2 is needed (the \`docker compose\` plugin), and Go to build it is missing"
    say "building Compose $COMPOSE_VERSION from the Go module proxy (once; cached in ${CACHE#"$REPO"/})"
    mkdir -p "$CACHE"
    compose_started=$(date +%s)
    GOBIN=$CACHE/gobin CGO_ENABLED=0 go install \
        -ldflags "-X github.com/docker/compose/v2/internal.Version=$COMPOSE_VERSION" \
        "github.com/docker/compose/v2/cmd@$COMPOSE_VERSION" >"$CACHE/compose-build.log" 2>&1 || {
        tail -30 "$CACHE/compose-build.log"
        fail "could not build Compose $COMPOSE_VERSION (log: ${CACHE#"$REPO"/}/compose-build.log)"
    }
    say "Compose built in $(since "$compose_started")"
    mv "$CACHE/gobin/cmd" "$CACHE/docker-compose-$COMPOSE_VERSION"
    rmdir "$CACHE/gobin"
    COMPOSE=$CACHE/docker-compose-$COMPOSE_VERSION
fi
export FLYWHEEL_COMPOSE=$COMPOSE
$COMPOSE version | sed 's/^/[test-compose] /'

# --- base images, then ours -----------------------------------------------------------------------
standins_started=$(date +%s)
"$PYTHON" tests/compose/standins.py --profile celery
say "base images ready in $(since "$standins_started")"

# The builds trust what this host trusts: on the machines CI runs on, a local CA re-signs HTTPS, and
# pip, uv and Go in the builds refused every download until they were given its certificate.
# docker-compose.yml and the test's own additions (tests/compose/test.yml: the webhook receiver).
files=(-f docker-compose.yml -f tests/compose/test.yml)
if [ -z "${FLYWHEEL_CA_CERTIFICATES:-}" ] && [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    export FLYWHEEL_CA_CERTIFICATES=/etc/ssl/certs/ca-certificates.crt
fi
if [ -n "${FLYWHEEL_CA_CERTIFICATES:-}" ]; then
    files+=(-f compose.ca-certificates.yml)
    say "builds trust the CA certificates in $FLYWHEEL_CA_CERTIFICATES"
fi
# The credentials of this run only: the stack and its volumes are deleted at the end.
mkdir -p "$CACHE"
rm -f "$CACHE/test.env"
"$PYTHON" -c 'import sys; from pathlib import Path; from flywheel.core.settings import ensure_env_file; ensure_env_file(Path(sys.argv[1]))' "$CACHE/test.env"
# Combined with the features embedded mode tests alone: API keys on /predict, alerts to a webhook
# (the test's receiver container).
{
    echo "FLYWHEEL_API_KEYS=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))')"
    echo "FLYWHEEL_ALERT_WEBHOOK=http://webhook:8080/hook"
} >>"$CACHE/test.env"
export FLYWHEEL_COMPOSE_ENV_FILE=$CACHE/test.env
export FLYWHEEL_COMPOSE_FILES="${files[*]}"
# FLYWHEEL_RUNNER=docker (tests/compose/docker-runner.yml): the scheduler reaches this engine.
socket=$(docker context inspect --format '{{.Endpoints.docker.Host}}' 2>/dev/null || true)
socket=${DOCKER_HOST:-${socket:-unix:///var/run/docker.sock}}
export FLYWHEEL_DOCKER_SOCKET=${socket#unix://}
FLYWHEEL_DOCKER_GID=$(stat -c %g "$FLYWHEEL_DOCKER_SOCKET")
export FLYWHEEL_DOCKER_GID

# One service per image: Compose builds (and exports, ~50 s for a 3 GB image) an image once for each
# service that names it, even when all of them hit the same cache.
builders=$("$PYTHON" -c 'import yaml; services = yaml.safe_load(open("docker-compose.yml"))["services"]
print(" ".join({s["image"]: n for n, s in reversed(services.items()) if "build" in s}.values()))')
say "building every image (services: $builders)"
build_started=$(date +%s)
# shellcheck disable=SC2086  # one word per service
$COMPOSE --env-file "$CACHE/test.env" "${files[@]}" --profile celery build --progress plain $builders \
    >"$CACHE/build.log" 2>&1 || {
    tail -60 "$CACHE/build.log"
    fail "image build failed (full log: ${CACHE#"$REPO"/}/build.log)"
}
build_seconds=$(($(date +%s) - build_started))
say "images built in ${build_seconds}s"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^flywheel/' | sort | sed 's/^/[test-compose]   /'
export FLYWHEEL_COMPOSE_BUILD_SECONDS=$build_seconds

# --- the stack ------------------------------------------------------------------------------------
say "Grafana is not started: its image cannot be pulled here and has no stand-in, so it is in the" \
    "\`grafana\` profile, which this test leaves out (docker compose --profile grafana up starts it)"
"$PYTHON" -m pytest tests/compose -p no:cacheprovider "$@"

say "test-compose finished in $(($(date +%s) - started))s"
