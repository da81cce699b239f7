#!/usr/bin/env bash
# Keep one command running: restart it whenever it exits, like systemd's Restart=always.
# The no-systemd, no-Docker way to keep a SuperLink or a SuperNode up (docs/deployment.md,
# "Keeping a federation up across restarts"):
#
#   scripts/supervise.sh [--restart-sec S] [--pidfile FILE] -- COMMAND [ARG...]
#
#   scripts/supervise.sh --pidfile superlink.pid -- \
#       flower-superlink --insecure --database /var/lib/flwr/superlink.db
#   scripts/supervise.sh -- flower-supernode --insecure --superlink server:9093 \
#       --node-config "partition-id=0 num-partitions=3 state-dir='/srv/pfedmma/state'"
#
# --restart-sec S   wait S seconds (default 5) before each restart, as RestartSec= does
#                   (--delay S is the same).
# --pidfile FILE    the running command's pid is written here (updated on every restart),
#                   so that the command itself can be signalled: `kill -9 $(cat FILE)`
#                   simulates a crash and the supervisor starts it again.
#
# Every exit is logged on stderr with its status. SIGTERM or SIGINT to the supervisor stops
# the command (SIGTERM, then SIGKILL after 20 s) and ends the supervisor. Use nohup, tmux or
# your init system to keep the supervisor itself alive across logouts; on a machine with
# systemd prefer the units in docker/systemd/.
set -uo pipefail

restart_sec=5
pidfile=""
while (($#)); do
    case "$1" in
        --restart-sec|--delay) restart_sec="$2"; shift 2 ;;
        --pidfile) pidfile="$2"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        *) echo "supervise.sh: unknown argument '$1' (the command goes after --; see --help)" >&2; exit 2 ;;
    esac
done
(($#)) || { echo "supervise.sh: no command given (supervise.sh [options] -- COMMAND...)" >&2; exit 2; }
[[ "$restart_sec" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "supervise.sh: --restart-sec must be a number of seconds, got '$restart_sec'" >&2; exit 2; }

say() { echo "[supervise $(date -u +%FT%TZ)] $*" >&2; }

child=""
sleeper=""
stopping=0
stop() {
    stopping=1
    [[ -n "$sleeper" ]] && kill "$sleeper" 2>/dev/null
    if [[ -n "$child" ]] && kill -0 "$child" 2>/dev/null; then
        say "stopping pid $child"
        kill -TERM "$child" 2>/dev/null
        for _ in $(seq 1 200); do kill -0 "$child" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$child" 2>/dev/null && { say "pid $child still running after 20 s: SIGKILL"; kill -KILL "$child" 2>/dev/null; }
        wait "$child" 2>/dev/null
    fi
    [[ -n "$pidfile" ]] && rm -f "$pidfile"
    exit 0
}
trap stop TERM INT

starts=0
while :; do
    starts=$((starts + 1))
    "$@" &
    child=$!
    [[ -n "$pidfile" ]] && echo "$child" > "$pidfile"
    say "started (#$starts) pid $child: $*"
    # `wait` returns early when a trapped signal arrives; the trap then stops the child.
    wait "$child"
    status=$?
    ((stopping)) && break
    say "pid $child exited with status $status; starting it again in ${restart_sec}s"
    sleep "$restart_sec" &
    sleeper=$!
    wait "$sleeper"
    sleeper=""
done
