# shellcheck shell=bash
# What the foreground run scripts share (scripts/run-demo.sh, scripts/run-edge.sh,
# envoy/fleet/run.sh). Sourced, not run; needs bash >= 5.1. Set RUN_TAG (the log prefix)
# and ROOT (the repository root, the working directory) before sourcing it.
#
#   log MSG / die MSG                    progress / an error on stderr as "[RUN_TAG] MSG"
#                                        (die exits 1)
#   require_file PATH HINT               die "missing PATH (run: HINT)" unless PATH exists
#   require_ports_free HOST HINT PORT..  die naming every PORT already taken on HOST
#   run_traps                            from here on, on exit, Ctrl-C (130) or SIGTERM (143):
#                                        stop everything below, by PID / container name
#   start_bg NAME CMD [ARG..]            CMD in the background; its PID in LAST_PID, stopped
#                                        on exit (SIGTERM; SIGKILL after RUN_STOP_GRACE s, 10:
#                                        an etcd leader tries to hand over leadership first)
#   docker_engine_up                     scripts/docker-engine.sh up; the engine is stopped
#                                        again on exit only if this call started it
#   start_container NAME DOCKER-RUN-ARG..  docker run -d --name NAME ...; removed on exit
#   follow_container NAME GREP-ARG..     docker logs -f NAME | grep --line-buffered GREP-ARG..
#                                        in the background, in a session of its own (Ctrl-C
#                                        is the script's to handle); stopped on exit
#   on_exit CMD [ARG..]                  also run CMD on exit, after the processes stopped
#   wait_http_ready WHAT URL [BODY] [PID]  poll URL for 30 s until it answers (with BODY, if
#                                        given; any HTTP status if not); false with a message
#                                        if it does not, or if process PID exits meanwhile
#   show_container_log NAME [LINES]      the last LINES (40) lines of a container's log
#   wait_first_exit                      block until one started process exits; log which

: "${RUN_TAG:?set RUN_TAG before sourcing scripts/lib.sh}"
: "${ROOT:?set ROOT before sourcing scripts/lib.sh}"
PYTHON="${PYTHON:-python3}"
RUN_READY_SECONDS=30
RUN_STOP_GRACE=10

RUN_PIDS=()
declare -A RUN_PID_NAMES=()
RUN_CONTAINERS=()
RUN_EXIT_HOOKS=()
RUN_ENGINE_STARTED_HERE=0
RUN_CLEANED=0
LAST_PID=""

log() { printf '[%s] %s\n' "$RUN_TAG" "$*" >&2; }
die() {
  log "$*"
  exit 1
}

require_file() {
  [[ -e "$1" ]] || die "missing $1 (run: $2)"
}

require_ports_free() {
  local host="$1" hint="$2" taken
  shift 2
  taken="$("$PYTHON" - "$host" "$@" <<'PY'
import socket, sys
host, taken = sys.argv[1], []
for port in sys.argv[2:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, int(port)))
    except OSError:
        taken.append(port)
    finally:
        s.close()
print(" ".join(taken))
PY
)"
  [[ -z "$taken" ]] && return 0
  if [[ "$taken" == *" "* ]]; then
    die "ports $taken are already in use ($hint); stop that first"
  fi
  die "port $taken is already in use ($hint); stop that first"
}

# True while PID is a live process (a zombie, exited but not yet reaped, is not).
pid_alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ -n "$stat" && "${stat:0:1}" != Z ]]
}

start_bg() {
  local name="$1"
  shift
  "$@" &
  LAST_PID=$!
  RUN_PIDS+=("$LAST_PID")
  RUN_PID_NAMES[$LAST_PID]="$name"
}

docker_engine_up() {
  scripts/docker-engine.sh status >/dev/null 2>&1 || RUN_ENGINE_STARTED_HERE=1
  scripts/docker-engine.sh up
}

start_container() {
  local name="$1"
  shift
  docker rm -f "$name" >/dev/null 2>&1 || true
  RUN_CONTAINERS+=("$name")
  docker run -d --name "$name" "$@" >/dev/null
}

follow_container() {
  local name="$1"
  shift
  # $! is `docker logs` itself (setsid execs it: a background job leads no process group);
  # grep ends at its EOF.
  setsid docker logs -f "$name" > >(grep --line-buffered "$@") 2>&1 &
  LAST_PID=$!
  RUN_PIDS+=("$LAST_PID")
  RUN_PID_NAMES[$LAST_PID]="the log of $name"
}

on_exit() {
  RUN_EXIT_HOOKS+=("$(printf '%q ' "$@")")
}

run_cleanup() {
  [[ $RUN_CLEANED == 1 ]] && return 0
  RUN_CLEANED=1
  trap - INT TERM
  log "stopping"
  local i pid hook
  for ((i = ${#RUN_PIDS[@]} - 1; i >= 0; i--)); do
    kill "${RUN_PIDS[i]}" 2>/dev/null || true
  done
  for i in "${RUN_CONTAINERS[@]}"; do docker rm -f "$i" >/dev/null 2>&1 || true; done
  for pid in "${RUN_PIDS[@]}"; do
    for ((i = 0; i < RUN_STOP_GRACE * 10; i++)); do pid_alive "$pid" || break; sleep 0.1; done
    if pid_alive "$pid"; then
      log "${RUN_PID_NAMES[$pid]} (pid $pid) still runs ${RUN_STOP_GRACE} s after SIGTERM; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  for hook in "${RUN_EXIT_HOOKS[@]}"; do eval "$hook" || true; done
  if [[ $RUN_ENGINE_STARTED_HERE == 1 ]]; then scripts/docker-engine.sh down || true; fi
}

run_traps() {
  trap run_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

wait_http_ready() {
  local what="$1" url="$2" body="${3:-}" pid="${4:-}" rc=0
  "$PYTHON" - "$url" "$body" "$pid" "$RUN_READY_SECONDS" <<'PY' || rc=$?
import os, sys, time, urllib.error, urllib.request
url, body, pid, seconds = sys.argv[1], sys.argv[2].encode(), sys.argv[3], float(sys.argv[4])

def exited():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(") ")[2][:1] == "Z"
    except OSError:
        return True

deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    if pid and exited():
        sys.exit(2)
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if not body or r.read().strip() == body:
                sys.exit(0)
    except urllib.error.HTTPError:
        if not body:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(1)
PY
  case $rc in
    0) return 0 ;;
    2) log "$what exited before it answered on $url" ;;
    *) log "$what did not become ready within ${RUN_READY_SECONDS} s ($url)" ;;
  esac
  return 1
}

show_container_log() {
  local lines="${2:-40}"
  log "the last $lines lines of $1's log:"
  docker logs "$1" 2>&1 | tail -n "$lines" >&2
}

wait_first_exit() {
  local pid=""
  wait -n -p pid "${RUN_PIDS[@]}" || true
  if [[ -n "$pid" ]]; then log "${RUN_PID_NAMES[$pid]:-pid $pid} (pid $pid) exited"; else log "a process exited"; fi
}
