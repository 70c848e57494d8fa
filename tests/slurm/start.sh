#!/usr/bin/env bash
# tests/slurm/start.sh - bring up a real single-node SLURM cluster for bench's SLURM tests, on Debian 12
# (bookworm) as root, without systemd or cgroups: munged, [mariadbd + slurmdbd], slurmctld, slurmd.
# Started by .ci/run before the test suite; tests/integration/test_slurm.py skips (with the reason) when `sinfo` fails.
# Adapted from the shared reference scripts (../shared/tools/local-slurm/); bench owns this copy.
# Idempotent: re-running reuses whatever already runs and only starts what is missing.
# PIDs of the daemons *this script* started are recorded in $SLURM_CI_STATE/<name>.pid,
# which is what tests/slurm/stop.sh uses (it stops only those).
#
# Accounting (slurmdbd + MariaDB) is on by default: submitit polls `sacct` to learn that a job died without
# writing its result (a killed rank, a time limit); without it bench could only rely on its own timeout_s.
#
# Knobs (environment):
#   SLURM_CI_ACCOUNTING=1   1: run mariadb + slurmdbd so `sacct` works (submitit polls sacct; without
#                           it, a job that dies without writing its result makes job.result() hang);
#                           0: AccountingStorageType=accounting_storage/none (fewer packages, faster)
#   SLURM_CI_STATE=/run/slurm-ci     where started PIDs are recorded
#   SLURM_CI_CLUSTER=ci  SLURM_CI_PARTITION=debug
#   SLURM_CI_SMOKE=1        run `srun -n<cpus> hostname` at the end
set -euo pipefail

ACCOUNTING=${SLURM_CI_ACCOUNTING:-1}
STATE=${SLURM_CI_STATE:-/run/slurm-ci}
CLUSTER=${SLURM_CI_CLUSTER:-ci}
PARTITION=${SLURM_CI_PARTITION:-debug}
SMOKE=${SLURM_CI_SMOKE:-1}
DBPASS=slurmci-dbpass            # local-only DB (bound to 127.0.0.1), throwaway CI machine
export DEBIAN_FRONTEND=noninteractive

log() { printf '[slurm/start %(%T)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
mkdir -p "$STATE"

# is PID $2 alive and running program $1 (guards against stale pid files / PID reuse)
alive_as() { [ -n "${2:-}" ] && [ -r "/proc/$2/comm" ] && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]; }
pidfile() { cat "$1" 2>/dev/null || true; }
record() { echo "$2" > "$STATE/$1.pid"; log "started $1 (pid $2)"; }
wait_for() {  # wait_for <what> <seconds> <cmd...>
  local what=$1 secs=$2 i; shift 2
  for ((i = 0; i < secs * 4; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  die "timed out after ${secs}s waiting for $what"
}

# ---------------------------------------------------------------- 1. packages
PKGS=(munge slurmctld slurmd slurm-client)
[ "$ACCOUNTING" = 1 ] && PKGS+=(slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  # keep apt/dpkg from starting services itself (we start them below, the same way everywhere)
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1
  fi
  inst() { apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/start-slurm-apt.log 2>&1; }
  inst || { apt-get update -q >>/tmp/start-slurm-apt.log 2>&1 && inst; } || {
    [ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get failed, see /tmp/start-slurm-apt.log"; }
  [ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# ---------------------------------------------------------------- 2. host name
HOST=$(hostname -s)
# slurmd finds its NodeName from `hostname -s`; submitit/torch use it as MASTER_ADDR -> must resolve
getent hosts "$HOST" >/dev/null || { log "adding '127.0.0.1 $HOST' to /etc/hosts"; echo "127.0.0.1 $HOST" >> /etc/hosts; }

# ---------------------------------------------------------------- 3. munge
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge          # tmpfs; systemd would create it
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged already running"
else
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged              # forks itself; checks key/dir ownership+modes
  wait_for munged 20 sh -c 'munge -n </dev/null | unmunge'
  record munged "$(pidfile /run/munge/munged.pid)"
fi

# ---------------------------------------------------------------- 4. config
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
# `slurmd -C` prints the real topology; keep 90% of RealMemory (config > actual makes the node unusable)
read -r -a NODE <<<"$(slurmd -C | head -1)"
NODELINE=""
for kv in "${NODE[@]}"; do
  case $kv in
    NodeName=*) NODELINE+="NodeName=$HOST NodeAddr=127.0.0.1 " ;;
    RealMemory=*) NODELINE+="RealMemory=$(( ${kv#RealMemory=} * 9 / 10 )) " ;;
    *) NODELINE+="$kv " ;;
  esac
done
NODELINE+="State=UNKNOWN"
if [ "$ACCOUNTING" = 1 ]; then
  ACCT=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819\nJobAcctGatherType=jobacct_gather/linux'
else
  ACCT=$'AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none'
fi
tmp=$(mktemp)
cat > "$tmp" <<EOF
# generated by bench tests/slurm/start.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroups: works in containers/VMs without a systemd-managed cgroup tree
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
$ACCT
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$NODELINE
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
conf_changed=0
if ! cmp -s "$tmp" /etc/slurm/slurm.conf; then install -m 0644 "$tmp" /etc/slurm/slurm.conf; conf_changed=1; fi
rm -f "$tmp"

# ---------------------------------------------------------------- 5. mariadb + slurmdbd
if [ "$ACCOUNTING" = 1 ]; then
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  if mariadb -e 'select 1' >/dev/null 2>&1; then
    log "mariadb already running"
  else
    rm -f /run/mysqld/mysqld.pid
    setsid -f /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql \
      --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
      --bind-address=127.0.0.1 --innodb-buffer-pool-size=64M \
      </dev/null >>/var/log/slurm/mariadb.log 2>&1
    wait_for "mariadb pid file" 30 test -s /run/mysqld/mysqld.pid
    record mariadb "$(pidfile /run/mysqld/mysqld.pid)"
    wait_for "mariadb (see /var/log/slurm/mariadb.log)" 60 mariadb -e 'select 1'
  fi
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
              ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  umask_old=$(umask); umask 077
  cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
  umask "$umask_old"; chmod 0600 /etc/slurm/slurmdbd.conf   # holds the DB password; Slurm docs ask for 0600
  if alive_as slurmdbd "$(pidfile /run/slurmdbd.pid)"; then
    log "slurmdbd already running"
  else
    rm -f /run/slurmdbd.pid; /usr/sbin/slurmdbd
    wait_for "slurmdbd pid file" 20 test -s /run/slurmdbd.pid
    record slurmdbd "$(pidfile /run/slurmdbd.pid)"
    wait_for "slurmdbd :6819 (see /var/log/slurm/slurmdbd.log)" 60 bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819'
  fi
fi

# ---------------------------------------------------------------- 6. slurmctld + slurmd
if alive_as slurmctld "$(pidfile /run/slurmctld.pid)"; then
  log "slurmctld already running"
  if [ $conf_changed = 1 ]; then log "slurm.conf changed -> scontrol reconfigure (plugin changes need stop+start)"; scontrol reconfigure; fi
else
  rm -f /run/slurmctld.pid; /usr/sbin/slurmctld
  wait_for "slurmctld pid file" 20 test -s /run/slurmctld.pid
  record slurmctld "$(pidfile /run/slurmctld.pid)"
  wait_for "slurmctld (see /var/log/slurm/slurmctld.log)" 60 sh -c 'scontrol ping | grep -q UP'
fi
if alive_as slurmd "$(pidfile /run/slurmd.pid)"; then
  log "slurmd already running"
else
  rm -f /run/slurmd.pid; /usr/sbin/slurmd
  wait_for "slurmd pid file" 20 test -s /run/slurmd.pid
  record slurmd "$(pidfile /run/slurmd.pid)"
fi

node_ok() { sinfo -h -n "$HOST" -o %T | grep -Eq '^(idle|mixed|allocated|completing)$'; }
for ((i = 0; i < 120; i++)); do
  node_ok && break
  # a node left DOWN/DRAINED from an earlier run: ReturnToService=2 usually fixes it; resume otherwise
  if (( i == 20 )); then scontrol update nodename="$HOST" state=resume 2>/dev/null || true; fi
  sleep 0.25
done
node_ok || { sinfo -R >&2; tail -20 /var/log/slurm/slurmd.log >&2; die "node $HOST not usable"; }
if [ "$ACCOUNTING" = 1 ]; then
  wait_for "cluster $CLUSTER in slurmdbd" 60 sh -c "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
fi
sinfo >&2
if [ "$SMOKE" = 1 ]; then
  out=$(timeout 60 srun -N1 -n"$(nproc)" hostname) || die "smoke test srun failed"
  log "smoke test ok: $(echo $out)"
fi
log "SLURM is up (state: $STATE)"
