#!/usr/bin/env bash
# slurm_netns_nodes.sh up|down - two more SLURM nodes, node1 and node2, for the running cluster of
# launch/slurm_cluster_start.sh: one slurmd each in its own network namespace (mt-node1, mt-node2),
# joined by veth pairs to a bridge in the root namespace, in partition `multi`. A job there is a real
# 2-node job whose ranks talk over the bridge (gloo: GLOO_SOCKET_IFNAME=mt0, the veth in each namespace).
#
#   up     bridge mt-br0 10.77.0.1/24; mt-node1 10.77.0.11, mt-node2 10.77.0.12 (node1/node2 in
#          /etc/hosts); node + partition lines in $ETC/netns-nodes.conf, which the start script
#          appends to slurm.conf; slurmctld restarted (SLURM adds nodes only on a restart); the two
#          slurmd started with $ETC/slurm-netns.conf (controller at 10.77.0.1, per-node pid/spool/log).
#   down   stops those two slurmd by their pid files, removes exactly the namespaces, veths, bridge and
#          /etc/hosts lines that `up` recorded, takes the nodes out of slurm.conf, restarts slurmctld.
#
# Clients that a job on node1/node2 runs (srun) need a controller address reachable from there: submit
# with SLURM_CONF=$ETC/slurm-netns.conf (sbatch exports it to the job). Needs root and `ip netns`.
set -euo pipefail
STATE="${MEGATRAIN_SLURM_DIR:-/tmp/megatrain-slurm}"
RUN="$STATE/run" LOG="$STATE/log" ETC="$STATE/etc" NET="$STATE/netns"
BR=mt-br0 CTLD_IP=10.77.0.1 PREFIX=24
say() { echo "[megatrain-slurm-netns] $*"; }
running() { local pid; pid=$(cat "$2" 2>/dev/null) || return 1
            [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]; }
stop_pid() { # stop_pid NAME PIDFILE
  local pid; pid=$(cat "$2" 2>/dev/null) || return 0
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]; then
    kill -TERM "$pid"
    for _ in $(seq 150); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
    [ -d "/proc/$pid" ] && kill -KILL "$pid"
    say "stopped $1 (pid $pid)"
  fi
  rm -f "$2"; }
restart_ctld() {
  stop_pid slurmctld "$RUN/slurmctld.pid"
  slurmctld
  # reconfigure: running slurmd register again now (a restarted slurmctld sees them as UNKNOWN until then)
  for _ in $(seq 150); do scontrol ping >/dev/null 2>&1 && { scontrol reconfigure; return 0; }; sleep 0.2; done
  say "slurmctld did not come back (see $LOG/slurmctld.log)" >&2; return 1; }
# the node lines go into slurm.conf between these markers (the start script appends netns-nodes.conf)
strip_block() { sed -i '/^# >>> megatrain netns nodes/,/^# <<< megatrain netns nodes/d' "$1"; }
record() { echo "$*" >> "$NET/created"; }

[ "$(id -u)" = 0 ] || { say "needs root" >&2; exit 1; }
cmd=${1:-}

if [ "$cmd" = down ]; then
  for n in 1 2; do stop_pid slurmd "$RUN/slurmd-node$n.pid"; done
  if [ -s "$NET/created" ]; then
    tac "$NET/created" | while read -r kind name; do
      case $kind in
        netns) ip netns del "$name" 2>/dev/null && say "removed namespace $name" ;;
        link) ip link del "$name" 2>/dev/null && say "removed link $name" ;;
        hosts) sed -i "/ # megatrain-netns $name\$/d" /etc/hosts ;;
      esac || true
    done
  fi
  rm -rf "$NET" "$ETC/netns-nodes.conf" "$ETC/slurm-netns.conf"
  if [ -f "$ETC/slurm.conf" ] && grep -q '^# >>> megatrain netns nodes' "$ETC/slurm.conf"; then
    strip_block "$ETC/slurm.conf"
    if [ -z "${MEGATRAIN_NETNS_NO_RESTART:-}" ] && running slurmctld "$RUN/slurmctld.pid"; then restart_ctld; fi
  fi
  say "down"; exit 0
fi
[ "$cmd" = up ] || { echo "usage: $0 up|down" >&2; exit 2; }

running slurmctld "$RUN/slurmctld.pid" || { say "no cluster running; start launch/slurm_cluster_start.sh first" >&2; exit 1; }
if ! ip netns add mt-probe$$ 2>"$STATE/netns-probe.err"; then
  say "ip netns is not permitted here: $(head -1 "$STATE/netns-probe.err")" >&2; rm -f "$STATE/netns-probe.err"; exit 1
fi
ip netns del mt-probe$$; rm -f "$STATE/netns-probe.err"
mkdir -p "$NET"
t0=$(date +%s)

# -- network: bridge in the root namespace, one veth pair per node namespace (named mt0 inside)
if ! ip link show "$BR" >/dev/null 2>&1; then
  ip link add "$BR" type bridge; record link "$BR"
  ip addr add "$CTLD_IP/$PREFIX" dev "$BR"; ip link set "$BR" up
fi
for n in 1 2; do
  ns=mt-node$n ip=10.77.0.1$n
  if ! ip netns list | grep -qw "$ns"; then
    ip netns add "$ns"; record netns "$ns"
    ip link add "mt-h$n" type veth peer name "mt-n$n"; record link "mt-h$n"
    ip link set "mt-n$n" netns "$ns"
    ip link set "mt-h$n" master "$BR"; ip link set "mt-h$n" up
    ip netns exec "$ns" ip link set "mt-n$n" name mt0
    ip netns exec "$ns" ip addr add "$ip/$PREFIX" dev mt0
    ip netns exec "$ns" ip link set mt0 up
    ip netns exec "$ns" ip link set lo up
  fi
  if ! grep -q " # megatrain-netns node$n\$" /etc/hosts; then
    echo "$ip node$n # megatrain-netns node$n" >> /etc/hosts; record hosts "node$n"
  fi
done

# -- config: nodes + partition for slurmctld; a copy for the namespaced slurmd / clients there
read -r CPUS SOCKETS CORES THREADS MEM < <(slurmd -C | head -1 | tr ' ' '\n' | awk -F= '
  /^CPUs=/{c=$2} /^SocketsPerBoard=/{s=$2} /^CoresPerSocket=/{k=$2} /^ThreadsPerCore=/{t=$2}
  /^RealMemory=/{m=$2} END{print c, s, k, t, m}')
MEM=$(( MEM * 40 / 100 ))  # the two nodes share this machine's memory
cat > "$ETC/netns-nodes.conf" <<EOF
# >>> megatrain netns nodes (launch/slurm_netns_nodes.sh)
NodeName=node1 NodeAddr=10.77.0.11 CPUs=$CPUS Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM State=UNKNOWN
NodeName=node2 NodeAddr=10.77.0.12 CPUs=$CPUS Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM State=UNKNOWN
PartitionName=multi Nodes=node1,node2 Default=NO MaxTime=INFINITE State=UP
# <<< megatrain netns nodes
EOF
strip_block "$ETC/slurm.conf"
cat "$ETC/netns-nodes.conf" >> "$ETC/slurm.conf"
sed -e "s/^SlurmctldHost=\([^(]*\)(.*)/SlurmctldHost=\1($CTLD_IP)/" \
    -e "s|^SlurmdPidFile=.*|SlurmdPidFile=$RUN/slurmd-%n.pid|" \
    -e "s|^SlurmdSpoolDir=.*|SlurmdSpoolDir=$STATE/spool-%n|" \
    -e "s|^SlurmdLogFile=.*|SlurmdLogFile=$LOG/slurmd-%n.log|" "$ETC/slurm.conf" > "$ETC/slurm-netns.conf"
echo "SlurmdParameters=config_overrides" >> "$ETC/slurm-netns.conf"
mkdir -p "$STATE/spool-node1" "$STATE/spool-node2"
restart_ctld

for n in 1 2; do
  if ! running slurmd "$RUN/slurmd-node$n.pid"; then
    # nsenter, not `ip netns exec`: that also remounts /sys in a new mount namespace, without the
    # cgroup filesystem slurmd looks for
    nsenter --net="/run/netns/mt-node$n" slurmd -N "node$n" -f "$ETC/slurm-netns.conf"
    for _ in $(seq 50); do running slurmd "$RUN/slurmd-node$n.pid" && break; sleep 0.2; done
    say "started slurmd node$n in mt-node$n (pid $(cat "$RUN/slurmd-node$n.pid" 2>/dev/null))"
  fi
done
state() { sinfo -h -N -n "node$1" -o %T 2>/dev/null | head -1; }
for _ in $(seq 150); do
  s1=$(state 1) s2=$(state 2)
  case "$s1 $s2" in idle\ idle) break ;; esac
  for n in 1 2; do case "$(state $n)" in down*|drain*|fail*) scontrol update nodename="node$n" state=resume 2>/dev/null || true ;; esac; done
  sleep 0.2
done
[ "$(state 1) $(state 2)" = "idle idle" ] || { say "nodes are '$(state 1)' '$(state 2)'; see $LOG/slurmd-node*.log" >&2; exit 1; }
say "ready in $(( $(date +%s) - t0 )) s: node1 (10.77.0.11) + node2 (10.77.0.12), partition multi; submit with SLURM_CONF=$ETC/slurm-netns.conf GLOO_SOCKET_IFNAME=mt0"
