#!/usr/bin/env bash
# A single-node Slurm cluster on 127.0.0.1 for the tests and for trying the Slurm launcher on one machine.
#
#   scripts/slurm_local.sh up      install the Debian packages if missing, write the config, start the
#                                  daemons (munged, mariadbd, slurmdbd, slurmctld, slurmd), wait for an idle node
#   scripts/slurm_local.sh check   submit one job with sbatch and read it back with sacct
#   scripts/slurm_local.sh status  which daemons run, and sinfo
#   scripts/slurm_local.sh down    cancel every job, stop the daemons this script started (by their pid files)
#   scripts/slurm_local.sh purge   down, then delete the state folder and the config files this script wrote
#
# Debian 12 / Ubuntu (slurm-wlm 22.05+), as root. Every command is idempotent: `up` on a running cluster
# only checks it. The daemons run as root without cgroups (proctrack/linuxproc, task/none), so it works in
# containers. Accounting (slurmdbd on a private MariaDB bound to 127.0.0.1) is on by default because
# submitit asks `sacct` for job states; without it submitit only warns, and `sacct` errors.
#
# Environment:
#   VLM_SLURM_DIR=/tmp/vlm-slurm   state, logs, pid files and the MariaDB data folder
#   VLM_SLURM_ACCOUNTING=1         0: no slurmdbd/MariaDB (accounting_storage/none)
#   VLM_SLURM_DB_PORT=3317         TCP port of the private MariaDB
#   VLM_SLURM_CPUS                 CPUs the node offers (default: what slurmd -C detects)
set -euo pipefail

STATE=${VLM_SLURM_DIR:-/tmp/vlm-slurm}
ACCOUNTING=${VLM_SLURM_ACCOUNTING:-1}
DB_PORT=${VLM_SLURM_DB_PORT:-3317}
CONF_DIR=/etc/slurm
SLURM_CONF_FILE=$CONF_DIR/slurm.conf
DBD_CONF_FILE=$CONF_DIR/slurmdbd.conf
OWNER_TAG="# written by vlm-data-metabolism scripts/slurm_local.sh; safe to delete with 'purge'"
PIDS=$STATE/pids
LOGS=$STATE/logs
HOST=$(hostname -s)

say() { printf '[slurm_local %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() { say "error: $*"; exit 1; }

# retry SECONDS WHAT COMMAND...: run COMMAND every 0.25 s until it succeeds, or fail after SECONDS.
retry() {
  local seconds=$1 what=$2 tries
  shift 2
  tries=$((seconds * 4))
  while ((tries-- > 0)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  fail "gave up after ${seconds}s waiting for $what (logs: $LOGS)"
}

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --- packages -----------------------------------------------------------------------------------------

have_packages() {
  local tool
  for tool in slurmctld slurmd sbatch sacct munged; do command -v "$tool" >/dev/null || return 1; done
  if [[ $ACCOUNTING == 1 ]]; then
    for tool in slurmdbd mariadbd mariadb-install-db; do command -v "$tool" >/dev/null || return 1; done
  fi
}

install_packages() {
  have_packages && return 0
  command -v apt-get >/dev/null || fail "Slurm is not installed and apt-get is not available to install it"
  local packages=(slurmctld slurmd slurm-client munge)
  [[ $ACCOUNTING == 1 ]] && packages+=(slurmdbd mariadb-server)
  say "installing ${packages[*]} with apt-get"
  # On a host with an init system, packages start their services on install; this cluster starts its own
  # daemons with private paths, so forbid that for the duration of the install (policy-rc.d exit 101).
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
  fi
  local status=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
  } >"$STATE/apt.log" 2>&1 || status=$?
  ((added_policy)) && rm -f "$policy"
  ((status == 0)) || fail "apt-get failed (exit $status); see $STATE/apt.log"
  have_packages || fail "apt-get finished but the Slurm tools are still missing"
}

# --- configuration ------------------------------------------------------------------------------------

ours_or_absent() { [[ ! -s $1 ]] || grep -qxF "$OWNER_TAG" "$1"; }

# hardware FIELD: one field of `slurmd -C` (what slurmd will report; the node line must match it exactly,
# or slurmctld drains the node as "reconfigured").
hardware() { slurmd -C | head -1 | tr ' ' '\n' | sed -n "s/^$1=//p"; }

write_slurm_conf() {
  local cpus sockets cores threads memory
  cpus=${VLM_SLURM_CPUS:-$(hardware CPUs)}
  sockets=$(hardware SocketsPerBoard)
  cores=$(hardware CoresPerSocket)
  threads=$(hardware ThreadsPerCore)
  memory=$(($(hardware RealMemory) * 9 / 10)) # below the detected size: a node with less than it says drains
  local accounting
  if [[ $ACCOUNTING == 1 ]]; then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
  else
    accounting="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  cat >"$SLURM_CONF_FILE.new" <<EOF
$OWNER_TAG
ClusterName=vlmlocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only cred_expire + 1 s after it stopped (default 120 s).
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule every 2 s instead of every 60 s (backfill: 30 s), so a requeued job restarts promptly.
SchedulerParameters=sched_interval=2,bf_interval=2
$accounting
JobCompType=jobcomp/none
# A job asking for more than the node has is rejected by sbatch instead of pending forever.
EnforcePartLimits=ALL
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
MinJobAge=300
KillWait=5
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$SLURM_CONF_FILE.new" "$SLURM_CONF_FILE"
}

write_dbd_conf() {
  cat >"$DBD_CONF_FILE.new" <<EOF
$OWNER_TAG
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOGS/slurmdbd.log
PidFile=$PIDS/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=vlmlocal
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DBD_CONF_FILE.new" # slurmdbd refuses to start with a config others can read
  mv "$DBD_CONF_FILE.new" "$DBD_CONF_FILE"
}

configure() {
  local file
  for file in "$SLURM_CONF_FILE" "$DBD_CONF_FILE"; do
    ours_or_absent "$file" || fail "$file exists and was not written by this script; not touching it"
  done
  mkdir -p "$CONF_DIR" "$STATE"/{slurmctld,slurmd} "$PIDS" "$LOGS"
  write_slurm_conf
  if [[ $ACCOUNTING == 1 ]]; then write_dbd_conf; fi
}

# --- daemons ------------------------------------------------------------------------------------------

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then return 0; fi # a munged that answers (ours or the host's) is all slurm needs
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge "$PIDS/munge"
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged --pid-file="$PIDS/munge/munged.pid"
  ln -sfn munge/munged.pid "$PIDS/munged.pid"
  retry 15 "munged" munge_works
}

mariadb_socket() { echo "$PIDS/mariadb.sock"; }

start_mariadb() {
  local data=$STATE/mariadb socket
  socket=$(mariadb_socket)
  if ! running "$PIDS/mariadb.pid"; then
    if [[ ! -d $data/mysql ]]; then
      mkdir -p "$data"
      mariadb-install-db --no-defaults --user=root --datadir="$data" --auth-root-authentication-method=socket \
        >"$LOGS/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed; see $LOGS/mariadb-install.log"
    fi
    # setsid: a daemon of its own session, so it survives the shell (or CI step) that started it
    setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$data" --socket="$socket" \
      --pid-file="$PIDS/mariadb.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
      --log-error="$LOGS/mariadb.log" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 &
  fi
  retry 60 "mariadb" mariadb-admin --no-defaults --socket="$socket" -uroot ping
  mariadb --no-defaults --socket="$socket" -uroot -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'vlmlocal';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    FLUSH PRIVILEGES;"
}

# start DAEMON PIDFILE: start /usr/sbin/DAEMON unless its pid file names a live process.
start() {
  if running "$2"; then return 0; fi
  rm -f "$2"
  "/usr/sbin/$1" || fail "$1 did not start; see $LOGS/$1.log"
  retry 20 "$1 to write its pid file" running "$2"
}

node_state() { sinfo --noheader --nodes="$HOST" --format=%t 2>/dev/null | head -1; }

wait_for_node() {
  local i state
  for ((i = 0; i < 120; i++)); do
    state=$(node_state)
    case $state in
      idle | mix | alloc) return 0 ;;
      down* | drain* | drng* | fail*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  sinfo --list-reasons >&2 || true
  fail "node $HOST is '$(node_state)', not idle"
}

cmd_up() {
  ((EUID == 0)) || fail "run as root (the daemons and apt-get need it)"
  mkdir -p "$STATE"
  install_packages
  configure
  start_munge
  if [[ $ACCOUNTING == 1 ]]; then
    start_mariadb
    start slurmdbd "$PIDS/slurmdbd.pid"
    retry 30 "slurmdbd" sacctmgr --noheader --parsable2 show cluster
  fi
  start slurmctld "$PIDS/slurmctld.pid"
  retry 30 "slurmctld" bash -c 'scontrol ping | grep -q UP'
  start slurmd "$PIDS/slurmd.pid"
  wait_for_node
  say "up: $(sinfo --noheader --format='partition %P, %D node(s) %N, %t, %c CPUs')"
}

cmd_check() {
  local folder job output
  folder=$(mktemp -d "$STATE/check.XXXXXX")
  job=$(sbatch --parsable --partition=debug --time=1 --output="$folder/%j.out" --wrap='echo "job $SLURM_JOB_ID on $(hostname)"')
  # polling squeue is faster than `sbatch --wait`, which backs off to several seconds between polls
  retry 60 "job $job to finish" bash -c "[[ -z \$(squeue --noheader --jobs=$job 2>/dev/null) ]]"
  output=$(cat "$folder/$job.out")
  [[ $output == "job $job on "* ]] || fail "job $job wrote '$output'"
  say "sbatch: $output"
  if [[ $ACCOUNTING == 1 ]]; then
    retry 15 "sacct to report job $job COMPLETED" \
      bash -c "[[ \$(sacct --noheader --allocations --parsable2 --jobs=$job --format=State) == COMPLETED ]]"
    say "sacct: job $job COMPLETED"
  fi
  rm -rf "$folder"
}

cmd_status() {
  local name
  for name in munged mariadb slurmdbd slurmctld slurmd; do
    if running "$PIDS/$name.pid"; then echo "$name running (pid $(cat "$PIDS/$name.pid"))"; else echo "$name stopped"; fi
  done
  sinfo 2>/dev/null || true
}

# stop NAME PIDFILE: SIGTERM the process the pid file names, SIGKILL after 15 s.
stop() {
  if ! running "$2"; then
    rm -f "$2"
    return 0
  fi
  local pid i
  pid=$(cat "$2")
  kill "$pid"
  for ((i = 0; i < 60; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "$1 (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -9 "$pid"
  fi
  rm -f "$2"
  say "stopped $1 (pid $pid)"
}

cmd_down() {
  if running "$PIDS/slurmctld.pid"; then
    scancel --full --quiet --user=root 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
      [[ -z $(squeue --noheader 2>/dev/null) ]] && break
      sleep 0.25
    done
  fi
  stop slurmd "$PIDS/slurmd.pid"
  stop slurmctld "$PIDS/slurmctld.pid"
  stop slurmdbd "$PIDS/slurmdbd.pid"
  stop mariadbd "$PIDS/mariadb.pid"
  stop munged "$PIDS/munged.pid" # only a munged this script started has its pid file here
}

cmd_purge() {
  cmd_down
  rm -rf "$STATE"
  local file
  for file in "$SLURM_CONF_FILE" "$DBD_CONF_FILE"; do
    if [[ -f $file ]] && grep -qxF "$OWNER_TAG" "$file"; then rm -f "$file"; fi
  done
  say "purged $STATE and this script's config files"
}

case ${1:-} in
  up) cmd_up ;;
  check) cmd_check ;;
  status) cmd_status ;;
  down) cmd_down ;;
  purge) cmd_purge ;;
  *)
    echo "usage: $0 up|check|status|down|purge" >&2
    exit 2
    ;;
esac
