#!/usr/bin/env bash
# slurm_cluster_start.sh - a real single-node SLURM cluster for megatrain's tests and for trying
# `megatrain submit` on one machine: munged, MariaDB + slurmdbd (accounting), slurmctld, slurmd.
#
# Installs Debian's packages when they are missing, writes every config and all state under
# $MEGATRAIN_SLURM_DIR, and starts the daemons by hand (there is no systemd here). Daemons that are
# already running (by our pid files) are left alone, so a second call is cheap. Needs root.
# launch/slurm_cluster_stop.sh ends what this started, by pid.
#
#   MEGATRAIN_SLURM_DIR=/tmp/megatrain-slurm   configs, spool, logs, pid files, database
#   MEGATRAIN_SLURM_PARTITION=debug            the one (default) partition
#   MEGATRAIN_SLURM_DB_PORT=3307               MariaDB on 127.0.0.1 (not 3306: leave a system one alone)
set -euo pipefail

STATE="${MEGATRAIN_SLURM_DIR:-/tmp/megatrain-slurm}"
PART="${MEGATRAIN_SLURM_PARTITION:-debug}"
DB_PORT="${MEGATRAIN_SLURM_DB_PORT:-3307}"
CLUSTER=megatrain
RUN="$STATE/run" LOG="$STATE/log" ETC="$STATE/etc"
say() { echo "[megatrain-slurm] $*"; }
[ "$(id -u)" = 0 ] || { say "needs root (it installs packages and runs the SLURM daemons)" >&2; exit 1; }
t0=$(date +%s)

# -- packages. slurmdbd + MariaDB are not optional: submitit reads job states through sacct, and
#    without accounting a job's state stays UNKNOWN and anything waiting on it hangs.
missing=()
for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client slurmdbd:slurmdbd \
            mariadbd:mariadb-server; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  # Stop the packages' maintainer scripts from starting services (there is no init to start them).
  policy_created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; policy_created=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$policy_created" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# running NAME PIDFILE: the pid file names a live process called NAME (a recycled pid does not count)
running() { local pid; pid=$(cat "$2" 2>/dev/null) || return 1
            [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]; }
wait_until() { # wait_until SECONDS WHAT CMD...
  local tries=$(( $1 * 5 )) what=$2; shift 2
  for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  say "gave up waiting for $what (logs: $LOG)" >&2; return 1; }

mkdir -p "$STATE"/{ctld,spool,mysql} "$RUN" "$LOG" "$ETC"
NODE=$(hostname -s)
# torch.distributed resolves the node name (MASTER_ADDR comes from the nodelist)
getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >> /etc/hosts

# -- munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged already running"
else
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge; chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  wait_until 10 munged sh -c 'munge -n | unmunge'
  cp /run/munge/munged.pid "$RUN/munged.pid"
  say "started munged (pid $(cat "$RUN/munged.pid"))"
fi

# -- slurm.conf, from what slurmd sees on this machine
read -r CPUS SOCKETS CORES THREADS MEM < <(slurmd -C | head -1 | tr ' ' '\n' | awk -F= '
  /^CPUs=/{c=$2} /^SocketsPerBoard=/{s=$2} /^CoresPerSocket=/{k=$2} /^ThreadsPerCore=/{t=$2}
  /^RealMemory=/{m=$2} END{print c, s, k, t, m}')
MEM=$(( MEM * 95 / 100 ))  # a little under what slurmd measures, or it drains the node as "low memory"
cat > "$ETC/slurm.conf.tmp" <<EOF
# written by megatrain launch/slurm_cluster_start.sh
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
MpiDefault=none
# No cgroups in this container: track processes by /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Jobs that ask for no memory get 2 GB per CPU, so two small jobs share the node.
DefMemPerCPU=2048
SchedulerType=sched/backfill
# Start jobs ~1 s after sbatch instead of at the next default scheduling pass.
SchedulerParameters=batch_sched_delay=0,sched_interval=5
ReturnToService=2
KillWait=10
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM State=UNKNOWN
PartitionName=$PART Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
# the two namespaced nodes of launch/slurm_netns_nodes.sh, while that is up
[ -s "$ETC/netns-nodes.conf" ] && cat "$ETC/netns-nodes.conf" >> "$ETC/slurm.conf.tmp"
mv "$ETC/slurm.conf.tmp" "$ETC/slurm.conf"

# Clients (sbatch, srun, sacct, submitit) read /etc/slurm/slurm.conf. A config that was there before
# is kept aside and put back by the stop script.
mkdir -p /etc/slurm
for f in slurm.conf slurmdbd.conf; do
  if [ -e "/etc/slurm/$f" ] && [ ! -L "/etc/slurm/$f" ] && [ ! -e "/etc/slurm/$f.before-megatrain" ]; then
    mv "/etc/slurm/$f" "/etc/slurm/$f.before-megatrain"
  fi
done
ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf

# -- accounting: MariaDB with a private datadir on 127.0.0.1, then slurmdbd
[ -s "$ETC/dbpass" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$ETC/dbpass")
DBPASS=$(cat "$ETC/dbpass")
SOCK="$RUN/mysqld.sock"
if running mariadbd "$RUN/mariadbd.pid"; then
  say "mariadbd already running"
else
  [ -d "$STATE/mysql/mysql" ] || mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root \
      --auth-root-authentication-method=socket --skip-test-db > "$LOG/mariadb-install.log" 2>&1
  setsid mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$SOCK" \
    --pid-file="$RUN/mariadbd.pid" --bind-address=127.0.0.1 --port="$DB_PORT" --log-error="$LOG/mariadbd.log" \
    --skip-name-resolve --innodb-buffer-pool-size=256M --innodb-flush-log-at-trx-commit=2 \
    </dev/null >/dev/null 2>&1 &
  wait_until 60 mariadbd mariadb --no-defaults -S "$SOCK" -e 'select 1'
  say "started mariadbd (pid $(cat "$RUN/mariadbd.pid"))"
fi
mariadb --no-defaults -S "$SOCK" -e "
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
  FLUSH PRIVILEGES;"
(umask 077; cat > "$ETC/slurmdbd.conf" <<EOF
# written by megatrain launch/slurm_cluster_start.sh
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
)
ln -sfn "$ETC/slurmdbd.conf" /etc/slurm/slurmdbd.conf
if running slurmdbd "$RUN/slurmdbd.pid"; then
  say "slurmdbd already running"
else
  slurmdbd
  wait_until 60 slurmdbd sacctmgr -n list cluster
  say "started slurmdbd (pid $(cat "$RUN/slurmdbd.pid"))"
fi
sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null

# -- controller and node daemon
if running slurmctld "$RUN/slurmctld.pid"; then
  say "slurmctld already running; re-reading its config"; scontrol reconfigure || true
else
  slurmctld
  wait_until 30 slurmctld scontrol ping
  say "started slurmctld (pid $(cat "$RUN/slurmctld.pid"))"
fi
if running slurmd "$RUN/slurmd.pid"; then
  say "slurmd already running"
else
  slurmd
  wait_until 10 slurmd test -s "$RUN/slurmd.pid"
  say "started slurmd (pid $(cat "$RUN/slurmd.pid"))"
fi

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1; }
for _ in $(seq 150); do
  case "$(node_state)" in
    idle|mixed|allocated) break ;;
    down*|drain*|fail*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.2
done
case "$(node_state)" in
  idle|mixed|allocated) ;;
  *) say "node $NODE is '$(node_state)'; see $LOG/slurmd.log and $LOG/slurmctld.log" >&2; exit 1 ;;
esac
say "ready in $(( $(date +%s) - t0 )) s: node $NODE ($CPUS CPUs, $MEM MB), partition $PART; state in $STATE"
