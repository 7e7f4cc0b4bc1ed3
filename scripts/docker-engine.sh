#!/usr/bin/env bash
# Make sure a Docker engine answers, or stop the one we started.
#
#   scripts/docker-engine.sh up       engine answers? do nothing. Otherwise install
#                                     docker.io via apt if dockerd is missing, start
#                                     dockerd in the background, wait for `docker info`
#                                     and record its PID in $IDEMGATE_CACHE/dockerd.pid
#   scripts/docker-engine.sh down     stop the dockerd recorded in the PID file (and only
#                                     that one, by PID); an engine we did not start is
#                                     left alone
#   scripts/docker-engine.sh status   exit 0 if an engine answers; prints who owns it
#   scripts/docker-engine.sh started  exit 0 if the PID file names a live dockerd
#
# Env: IDEMGATE_CACHE (default ~/.cache/idemgate), DOCKER_HOST (honoured: dockerd is
# started listening there if it is a unix:// socket), IDEMGATE_DOCKERD_ARGS (extra
# dockerd flags, e.g. a separate --data-root), IDEMGATE_DOCKER_WAIT (seconds, default 60).
set -euo pipefail

CACHE="${IDEMGATE_CACHE:-$HOME/.cache/idemgate}"
PIDFILE="$CACHE/dockerd.pid"
LOGFILE="$CACHE/dockerd.log"
WAIT="${IDEMGATE_DOCKER_WAIT:-60}"

log() { printf '[docker] %s\n' "$*" >&2; }
engine_ok() { timeout 20 docker info >/dev/null 2>&1; }

# PID from the PID file if that process is still a dockerd, else empty.
our_pid() {
  [[ -f "$PIDFILE" ]] || return 0
  local pid
  pid="$(tr -dc '0-9' <"$PIDFILE")"
  if [[ -n "$pid" && -r "/proc/$pid/comm" && "$(cat "/proc/$pid/comm")" == dockerd ]]; then
    echo "$pid"
  fi
}

as_root() { if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo "$@"; fi; }

install_docker() {
  log "dockerd not found; installing docker.io with apt-get (one-time)"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends docker.io iptables ca-certificates >/dev/null
}

up() {
  if engine_ok; then
    if [[ -n "$(our_pid)" ]]; then log "engine up (dockerd pid $(our_pid), started by idemgate)";
    else log "engine already running (not started by idemgate; will be left alone)"; fi
    return 0
  fi
  local pid
  pid="$(our_pid)"
  if [[ -z "$pid" ]]; then
    rm -f "$PIDFILE"
    command -v dockerd >/dev/null 2>&1 || [[ -x /usr/sbin/dockerd ]] || install_docker
    command -v docker >/dev/null 2>&1 || install_docker
    local dockerd_bin
    dockerd_bin="$(command -v dockerd || echo /usr/sbin/dockerd)"
    local -a args=()
    if [[ "${DOCKER_HOST:-}" == unix://* ]]; then args+=(-H "$DOCKER_HOST"); fi
    # shellcheck disable=SC2206
    [[ -n "${IDEMGATE_DOCKERD_ARGS:-}" ]] && args+=(${IDEMGATE_DOCKERD_ARGS})
    mkdir -p "$CACHE"
    log "starting dockerd in the background (log: $LOGFILE)"
    # setsid: own session, so Ctrl-C in the calling terminal does not hit it.
    setsid "$dockerd_bin" "${args[@]}" </dev/null >>"$LOGFILE" 2>&1 &
    pid=$!
    echo "$pid" >"$PIDFILE"
  else
    log "dockerd pid $pid (ours) is starting"
  fi
  local i
  for ((i = 0; i < WAIT * 2; i++)); do
    if engine_ok; then log "engine up (dockerd pid $pid) after ~$((i / 2))s"; return 0; fi
    if [[ ! -d "/proc/$pid" ]]; then
      rm -f "$PIDFILE"
      log "dockerd exited during startup; last log lines:"
      tail -n 30 "$LOGFILE" >&2 || true
      return 1
    fi
    sleep 0.5
  done
  log "dockerd (pid $pid) did not answer within ${WAIT}s; last log lines:"
  tail -n 30 "$LOGFILE" >&2 || true
  return 1
}

down() {
  local pid
  pid="$(our_pid)"
  if [[ -z "$pid" ]]; then
    rm -f "$PIDFILE"
    log "no dockerd started by idemgate; nothing to stop"
    return 0
  fi
  log "stopping dockerd pid $pid (started by idemgate)"
  kill -TERM "$pid" 2>/dev/null || true
  local i
  for ((i = 0; i < 60; i++)); do
    [[ -d "/proc/$pid" && "$(cat "/proc/$pid/stat" 2>/dev/null | awk '{print $3}')" != Z ]] || break
    sleep 0.5
  done
  if [[ -d "/proc/$pid" && "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]; then
    log "dockerd pid $pid still alive after 30s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  log "dockerd stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status)
    if engine_ok; then
      if [[ -n "$(our_pid)" ]]; then echo "running (dockerd pid $(our_pid), started by idemgate)";
      else echo "running (not started by idemgate)"; fi
    else echo "not running"; exit 1; fi ;;
  started) [[ -n "$(our_pid)" ]] ;;
  *) echo "usage: $0 up|down|status|started" >&2; exit 2 ;;
esac
