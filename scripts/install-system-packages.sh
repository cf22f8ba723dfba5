#!/usr/bin/env bash
# Nginx, Prometheus, its Nginx exporter and Alertmanager come from Debian; so do wrk (benchmarks, the rollout
# test) and docker-compose (the static check of compose mode: there is no Docker engine here).
set -euo pipefail
need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v prometheus >/dev/null || need+=(prometheus)
command -v prometheus-nginx-exporter >/dev/null || need+=(prometheus-nginx-exporter)
command -v prometheus-alertmanager >/dev/null || need+=(prometheus-alertmanager)
command -v wrk >/dev/null || need+=(wrk)
command -v docker-compose >/dev/null || need+=(docker-compose)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages; install them with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi
echo "installing ${need[*]} from Debian"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts packaged daemons where it can; Flywheel runs its own under supervisord.
for svc in nginx prometheus prometheus-nginx-exporter prometheus-node-exporter prometheus-alertmanager; do
    service "$svc" stop >/dev/null 2>&1 || true
done
