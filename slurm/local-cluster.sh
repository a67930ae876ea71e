#!/usr/bin/env bash
# A real 4-node Slurm cluster on this one machine, for tests and for trying `exatrain launch`.
#
#   slurm/local-cluster.sh install   Debian packages (slurm-wlm, slurmdbd, munge, mariadb-server)
#   slurm/local-cluster.sh up        write configs, start munged, mariadbd, slurmdbd, slurmctld, 4 slurmd
#   slurm/local-cluster.sh down      cancel jobs, stop the daemons (by PID, reverse order)
#   slurm/local-cluster.sh status    which daemons run, and sinfo
#
# Nodes node1..node4 run as multiple slurmd on 127.0.0.1 (one port each), with CPUs=4 declared per
# node whatever the machine has, so 4 nodes x 2 tasks schedule on a 2-core box. slurmdbd on MariaDB
# backs `sacct`, which submitit needs to see cancelled or failed jobs. No systemd: every daemon is
# started directly and stopped by the PID in its pid file. All steps are idempotent, and up/down
# hold a lock so concurrent callers (two test sessions) do not race; daemons are started with the
# lock's descriptor closed so they do not keep holding it. Runs as root.
#
# Exposure: MariaDB and every slurmd listen on 127.0.0.1 only (CommunicationParameters=NoInAddrAny);
# slurmctld and slurmdbd cannot be bound to an address in Slurm 22.05 and listen on all interfaces,
# but accept only messages signed with this machine's munge key (random, mode 0400). The database
# password is random, made at the first `up` and kept in $STATE/db-password (mode 0600).
set -euo pipefail
shopt -s lastpipe  # `... | write_managed` records what changed in this shell, not in a subshell

STATE=${EXATRAIN_SLURM_STATE:-/var/lib/exatrain-slurm}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
CLUSTER=exatrain
NODES=(node1 node2 node3 node4)
CPUS_PER_NODE=${EXATRAIN_SLURM_CPUS:-4}
SLURMD_BASE_PORT=17000
MARK="# managed by exatrain slurm/local-cluster.sh"
DB_PASS_FILE=$STATE/db-password
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

log() { echo "[local-cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- helpers ---------------------------------------------------------------------------------

pid_alive() {  # pid_alive PIDFILE COMM: the pid file names a live process with that command name
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2
  shift 2
  for _ in $(seq $((secs * 4))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  die "timed out after ${secs}s waiting for $what (logs: $STATE/log)"
}

stop_pid() {  # stop_pid PIDFILE COMM: SIGTERM, then SIGKILL after 20 s
  local pid
  pid_alive "$1" "$2" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  log "stopping $2 (pid $pid)"
  kill "$pid"
  for _ in $(seq 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then log "$2 ignored SIGTERM; killing"; kill -9 "$pid"; fi
  rm -f "$1"
}

missing_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"
  done
}

# --- install ---------------------------------------------------------------------------------

cmd_install() {
  local missing created_policy=0
  missing=$(missing_packages)
  if [ -z "$missing" ]; then log "packages already installed"; return 0; fi
  [ "$(id -u)" = 0 ] || die "installing packages needs root"
  # Packages must not start their daemons through init scripts: this script owns them.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  log "installing: $(echo $missing)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $missing >/dev/null; }
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ -z "$(missing_packages)" ] || die "packages still missing: $(missing_packages | tr '\n' ' ')"
}

# --- configuration ---------------------------------------------------------------------------

write_managed() {  # write_managed PATH MODE: stdin -> PATH, refusing to overwrite a file we did not write
  local tmp
  tmp=$(mktemp)
  cat > "$tmp"
  if [ -e "$1" ] && ! grep -qF "$MARK" "$1"; then
    rm -f "$tmp"
    die "$1 exists and was not written by this script; move it away to use the local test cluster"
  fi
  if ! cmp -s "$tmp" "$1" 2>/dev/null; then
    install -m "$2" "$tmp" "$1"
    CHANGED+=("$1")
  fi
  rm -f "$tmp"
}

db_password() {  # the database password: random, made once, readable by root only
  if [ ! -s "$DB_PASS_FILE" ]; then
    (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=\n' > "$DB_PASS_FILE")
  fi
  chmod 600 "$DB_PASS_FILE"
  cat "$DB_PASS_FILE"
}

write_configs() {
  local host i db_pass
  host=$(hostname -s)
  db_pass=$(db_password)
  mkdir -p /etc/slurm "$STATE"/{log,run,ctld} "$STATE"/spool
  for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n"; done
  # Node names must resolve (the rank bootstrap uses the first node as the master address).
  for n in "${NODES[@]}"; do
    getent hosts "$n" >/dev/null || echo "127.0.0.1 $n  $MARK" >> /etc/hosts
  done
  {
    echo "$MARK"
    cat <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
AuthType=auth/munge
# Requeued jobs wait for the job credential to expire before they may start again.
AuthInfo=cred_expire=10
# Daemons other than slurmctld bind to their node's address (127.0.0.1), not to every interface.
CommunicationParameters=NoInAddrAny
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
NodeName=node[1-${#NODES[@]}] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((SLURMD_BASE_PORT + 1))-$((SLURMD_BASE_PORT + ${#NODES[@]}))] CPUs=$CPUS_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  } | write_managed "$CONF" 644
  {
    echo "$MARK"
    cat <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
EOF
  } | write_managed "$DBD_CONF" 600
}

# --- daemons ---------------------------------------------------------------------------------

start_munge() {
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  pid_alive /run/munge/munged.pid munged && return 0
  log "starting munged"
  rm -f /run/munge/munge.socket.2
  runuser -u munge -- /usr/sbin/munged 9>&-
  wait_for 20 munged bash -c 'munge -n | unmunge'
}

start_mariadb() {
  mkdir -p /run/mysqld
  chown mysql:mysql /run/mysqld
  if [ ! -d /var/lib/mysql/mysql ]; then
    log "initialising the MariaDB data directory"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE/log/mariadb-install.log" 2>&1
  fi
  if ! pid_alive /run/mysqld/mysqld.pid mariadbd; then
    log "starting mariadbd"
    setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --bind-address=127.0.0.1 \
      --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
      --innodb-lock-wait-timeout=900 --log-error="$STATE/log/mariadb.log" </dev/null >/dev/null 2>&1 9>&- &
    wait_for 60 mariadbd mariadb-admin --socket=/run/mysqld/mysqld.sock ping
  fi
  # ALTER as well: a cluster set up before the password was random gets its fixed one replaced.
  mariadb --socket=/run/mysqld/mysqld.sock -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$(db_password)';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$(db_password)';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    FLUSH PRIVILEGES;"
}

restart_if_reconfigured() {  # restart_if_reconfigured CONF PIDFILE COMM: a daemon reads its config at start only
  local f
  for f in "${CHANGED[@]}"; do
    if [ "$f" = "$1" ]; then stop_pid "$2" "$3"; fi
  done
}

start_slurmdbd() {
  restart_if_reconfigured "$DBD_CONF" "$STATE/run/slurmdbd.pid" slurmdbd
  if ! pid_alive "$STATE/run/slurmdbd.pid" slurmdbd; then
    if [ ! -e "$STATE/ctld/job_state" ]; then
      # A fresh controller numbers jobs from 1 again; old accounting records would share those ids
      # and make sacct (and submitit) report a new job as long finished.
      mariadb --socket=/run/mysqld/mysqld.sock -e "DROP DATABASE IF EXISTS slurm_acct_db;"
    fi
    log "starting slurmdbd"
    slurmdbd 9>&-
  fi
  wait_for 60 slurmdbd sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

start_slurmctld() {
  restart_if_reconfigured "$CONF" "$STATE/run/slurmctld.pid" slurmctld
  if ! pid_alive "$STATE/run/slurmctld.pid" slurmctld; then
    log "starting slurmctld"
    slurmctld 9>&-
  fi
  wait_for 30 slurmctld bash -c 'scontrol ping | grep -q "is UP"'
}

start_slurmds() {
  local n
  for n in "${NODES[@]}"; do
    restart_if_reconfigured "$CONF" "$STATE/run/slurmd-$n.pid" slurmd
    if ! pid_alive "$STATE/run/slurmd-$n.pid" slurmd; then
      log "starting slurmd $n"
      slurmd -N "$n" 9>&-
    fi
  done
  # Nodes left down or drained by an unclean stop come back once their slurmd is up again.
  local bad
  bad=$(sinfo -h -N -o '%N %t' | awk '$2 ~ /down|drain|fail/ {print $1}' | paste -sd, -)
  if [ -n "$bad" ]; then scontrol update nodename="$bad" state=resume 2>/dev/null || true; fi
  wait_for 60 "${#NODES[@]} idle nodes" bash -c \
    "[ \$(sinfo -h -N -o '%t' | grep -cE '^(idle|mix|alloc)') -eq ${#NODES[@]} ]"
}

cluster_ready() {
  pid_alive "$STATE/run/slurmctld.pid" slurmctld && pid_alive "$STATE/run/slurmdbd.pid" slurmdbd \
    && [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -cE '^(idle|mix|alloc)')" -eq ${#NODES[@]} ]
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "starting the daemons needs root"
  [ -z "$(missing_packages)" ] || die "packages missing: $(missing_packages | tr '\n' ' ') (run: $0 install)"
  mkdir -p "$STATE"
  exec 9>"$STATE/lock"
  flock 9
  local t0=$SECONDS
  CHANGED=()
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmds
  log "cluster up in $((SECONDS - t0)) s: $(sinfo -h -o '%P %D nodes %t' | paste -sd' ' -)"
}

cmd_down() {
  mkdir -p "$STATE"
  exec 9>"$STATE/lock"
  flock 9
  if pid_alive "$STATE/run/slurmctld.pid" slurmctld && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    log "cancelling the jobs still in the queue"
    scancel --full $(squeue -h -o %i | sort -u) 2>/dev/null || true
    wait_for 30 "jobs to end" bash -c '[ -z "$(squeue -h -t R,CG -o %i)" ]'
  fi
  local n
  for n in "${NODES[@]}"; do stop_pid "$STATE/run/slurmd-$n.pid" slurmd; done
  stop_pid "$STATE/run/slurmctld.pid" slurmctld
  stop_pid "$STATE/run/slurmdbd.pid" slurmdbd
  stop_pid /run/mysqld/mysqld.pid mariadbd
  stop_pid /run/munge/munged.pid munged
  log "cluster down"
}

cmd_status() {
  local n
  for d in "slurmctld $STATE/run/slurmctld.pid" "slurmdbd $STATE/run/slurmdbd.pid" \
           "mariadbd /run/mysqld/mysqld.pid" "munged /run/munge/munged.pid"; do
    set -- $d
    if pid_alive "$2" "$1"; then echo "$1: running (pid $(cat "$2"))"; else echo "$1: stopped"; fi
  done
  for n in "${NODES[@]}"; do
    if pid_alive "$STATE/run/slurmd-$n.pid" slurmd; then echo "slurmd $n: running"; else echo "slurmd $n: stopped"; fi
  done
  if cluster_ready; then sinfo; echo "ready"; else echo "not ready"; return 1; fi
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
