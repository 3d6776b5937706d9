#!/usr/bin/env bash
# slurm_cluster_stop.sh - stop what launch/slurm_cluster_start.sh started, by its pid files only
# (never by process name: other SLURM or MariaDB processes on the machine are not ours).
#
#   --purge   cancel the cluster's jobs first (else their slurmstepd processes outlive slurmd and
#             reattach when it starts again), then delete $MEGATRAIN_SLURM_DIR and restore
#             /etc/slurm as it was.
set -uo pipefail
STATE="${MEGATRAIN_SLURM_DIR:-/tmp/megatrain-slurm}"
RUN="$STATE/run"
PURGE=0; [ "${1:-}" = "--purge" ] && PURGE=1
say() { echo "[megatrain-slurm] $*"; }

if [ "$PURGE" = 1 ] && [ -s "$RUN/slurmctld.pid" ] && scontrol ping >/dev/null 2>&1; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    say "cancelling jobs $(echo $jobs)"
    # shellcheck disable=SC2086
    scancel $jobs
    for _ in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

# the namespaced nodes of launch/slurm_netns_nodes.sh, if up: their slurmd, namespaces, bridge
if [ -d "$STATE/netns" ]; then
  MEGATRAIN_NETNS_NO_RESTART=1 bash "$(dirname "$0")/slurm_netns_nodes.sh" down
fi

# stop NAME: SIGTERM the pid in $RUN/NAME.pid if that is a live NAME process; SIGKILL after 30 s
stop() {
  local name=$1 file="$RUN/$1.pid" pid
  pid=$(cat "$file" 2>/dev/null) || { say "$name: not started here"; return 0; }
  if [ -z "$pid" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]; then
    say "$name: not running"; rm -f "$file"; return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 150); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
  if [ -d "/proc/$pid" ]; then say "$name ($pid) ignored SIGTERM; SIGKILL"; kill -KILL "$pid"; fi
  rm -f "$file"; say "stopped $name (pid $pid)"
}
stop slurmd
stop slurmctld
stop slurmdbd
stop mariadbd
stop munged

if [ "$PURGE" = 1 ]; then
  for f in slurm.conf slurmdbd.conf; do
    if [ -L "/etc/slurm/$f" ] && [ "$(readlink "/etc/slurm/$f")" = "$STATE/etc/$f" ]; then
      rm -f "/etc/slurm/$f"
      [ -e "/etc/slurm/$f.before-megatrain" ] && mv "/etc/slurm/$f.before-megatrain" "/etc/slurm/$f"
    fi
  done
  rm -rf "$STATE"; say "removed $STATE"
fi
