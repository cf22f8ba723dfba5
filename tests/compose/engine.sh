#!/usr/bin/env bash
# Test scaffolding: a private Docker engine for `make test-compose`, and the host put back after it.
#
#   engine.sh start DIR   start Debian's dockerd with everything of its own inside DIR (data-root,
#                         exec-root, pid file, socket); print the DOCKER_HOST that reaches it
#   engine.sh stop DIR    stop it and undo what it changed on the host
#
# The engine changes the host in ways it does not undo itself (seen on this machine by diffing the
# host before a start and after a stop): it creates the docker0 bridge, adds iptables chains and
# rules to the filter and nat tables (and sets FORWARD's policy to DROP), turns on ip_forward, and
# leaves folders in /run. `start` records the host as it was in DIR/host; `stop` removes exactly
# what was added since, so whatever else the host runs (another engine, someone's own rules) is left
# alone. Images and build caches stay in DIR/data, so the next run starts warm.
set -euo pipefail

# Container networks stay inside one private /16 that nothing else here uses.
BRIDGE_IP=172.31.0.1/24
POOL=172.31.0.0/16
# dockerd writes /etc/docker/key.json whatever its configuration says.
RUN_DIRS=(/run/docker /run/containerd /run/runc /etc/docker /etc/docker/key.json)
TABLES=(filter nat)

die() {
    echo "engine.sh: $*" >&2
    exit 1
}

socket_of() { echo "unix://$1/docker.sock"; }

answers() { DOCKER_HOST=$(socket_of "$1") docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

dockerd_pid() {
    # The pid file's process, if it is still our dockerd (not a reused pid number).
    local pid
    pid=$(cat "$1/docker.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "dockerd --config-file $1/daemon.json" &&
        echo "$pid"
}

install_engine() {
    command -v dockerd >/dev/null && command -v iptables >/dev/null && return 0
    [ "$(id -u)" -eq 0 ] || die "no Docker engine answers, and starting one needs root (dockerd, iptables)"
    command -v apt-get >/dev/null || die "no Docker engine answers, and Debian's docker.io cannot be installed here (no apt-get)"
    echo "installing Debian's docker.io (dockerd, containerd, runc, iptables)" >&2
    # Debian starts a packaged daemon on install unless policy-rc.d forbids it: we start our own.
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e $policy ]; then
        printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null; } ||
        { [ -n "$made_policy" ] && rm -f $policy; die "apt-get could not install docker.io"; }
    [ -n "$made_policy" ] && rm -f $policy
    return 0
}

record_host() {
    local host=$1/host table run_dir
    mkdir -p "$host"
    cat /proc/sys/net/ipv4/ip_forward >"$host/ip_forward"
    ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 >"$host/links"
    for table in "${TABLES[@]}"; do
        iptables-save -t "$table" 2>/dev/null | grep -E '^(:|-A)' | sed -E 's/ \[[0-9]+:[0-9]+\]$//' >"$host/iptables.$table"
    done
    : >"$host/run_dirs"
    for run_dir in "${RUN_DIRS[@]}"; do
        [ -e "$run_dir" ] && echo "$run_dir" >>"$host/run_dirs"
    done
    return 0
}

start() {
    local dir=$1
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if answers "$dir"; then
        socket_of "$dir"
        return 0
    fi
    install_engine
    [ "$(id -u)" -eq 0 ] || die "starting dockerd needs root"
    [ -d "$dir/host" ] || record_host "$dir"
    cat >"$dir/daemon.json" <<EOF
{
  "data-root": "$dir/data",
  "exec-root": "$dir/run",
  "pidfile": "$dir/docker.pid",
  "hosts": ["$(socket_of "$dir")"],
  "storage-driver": "overlay2",
  "exec-opts": ["native.cgroupdriver=cgroupfs"],
  "iptables": true,
  "ip-forward": true,
  "bip": "$BRIDGE_IP",
  "default-address-pools": [{"base": "$POOL", "size": 24}],
  "features": {"buildkit": true}
}
EOF
    # Its own session: the engine outlives this script and is stopped by `stop`, by its pid file.
    setsid dockerd --config-file "$dir/daemon.json" >>"$dir/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 120); do
        if answers "$dir"; then
            socket_of "$dir"
            return 0
        fi
        sleep 0.5
    done
    tail -20 "$dir/dockerd.log" >&2
    die "dockerd did not answer within 60 s (log: $dir/dockerd.log)"
}

chains() { grep -E '^:' | cut -c2- | cut -d' ' -f1 | sort; }

restore_iptables() {
    local host=$1/host table line chain policy now added
    for table in "${TABLES[@]}"; do
        [ -f "$host/iptables.$table" ] || continue
        now=$(iptables-save -t "$table" 2>/dev/null | grep -E '^(:|-A)' | sed -E 's/ \[[0-9]+:[0-9]+\]$//')
        # Rules the engine added, newest first; then the chains it created; then the policies it changed.
        while IFS= read -r line; do
            [ -n "$line" ] && eval "iptables -t $table -D ${line#-A }" 2>/dev/null || true
        done < <(grep -E '^-A' <<<"$now" | grep -vxF -f "$host/iptables.$table" | tac)
        added=$(comm -13 <(chains <"$host/iptables.$table") <(chains <<<"$now"))
        for chain in $added; do iptables -t "$table" -F "$chain" 2>/dev/null || true; done
        for chain in $added; do iptables -t "$table" -X "$chain" 2>/dev/null || true; done
        grep -E '^:' "$host/iptables.$table" | while read -r chain policy; do
            [ "$policy" = "-" ] || iptables -t "$table" -P "${chain#:}" "$policy"
        done
    done
}

stop() {
    local dir=$1 pid proc mount link run_dir
    [ -d "$dir" ] || return 0
    dir=$(cd "$dir" && pwd)
    if pid=$(dockerd_pid "$dir"); then
        # dockerd stops its containers (15 s each at most) and its containerd before it exits.
        kill -TERM "$pid"
        for _ in $(seq 120); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "engine.sh: dockerd $pid still running after 60 s: killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    # containerd shims of containers dockerd could not stop: ours, found by their socket folder.
    for proc in /proc/[0-9]*; do
        if tr '\0' ' ' 2>/dev/null <"$proc/cmdline" | grep -qF -- "$dir/run/"; then
            kill -KILL "${proc#/proc/}" 2>/dev/null || true
        fi
    done
    for mount in $(grep -F " $dir/" /proc/mounts | cut -d' ' -f2 | sort -r || true); do
        umount -l "$mount" 2>/dev/null || true
    done
    local host=$dir/host
    [ -d "$host" ] || return 0
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1); do
        if ! grep -qxF "$link" "$host/links" && [[ $link == docker0 || $link == br-* || $link == veth* ]]; then
            ip link delete "$link" 2>/dev/null || true
        fi
    done
    restore_iptables "$dir"
    cat "$host/ip_forward" >/proc/sys/net/ipv4/ip_forward
    for run_dir in "${RUN_DIRS[@]}"; do
        grep -qxF "$run_dir" "$host/run_dirs" || rm -rf "$run_dir"
    done
    rm -rf "$host" "$dir/run"
    echo "engine.sh: dockerd stopped; docker0, iptables, ip_forward and /run put back as they were" >&2
}

case "${1:-}" in
start) start "${2:?engine.sh start DIR}" ;;
stop) stop "${2:?engine.sh stop DIR}" ;;
*) die "usage: engine.sh start|stop DIR" ;;
esac
