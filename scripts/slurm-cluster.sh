#!/usr/bin/env bash
# A real, throw-away Slurm cluster on this machine, for the `slurm` tests (CI calls `up` from `make test`).
#
#   scripts/slurm-cluster.sh up       install Slurm + munge from Debian if missing, (re)start the daemons
#   scripts/slurm-cluster.sh down     stop the daemons (the state directory is kept for its logs)
#   scripts/slurm-cluster.sh status   say whether the cluster answers, and show its nodes
#
# One slurmctld and COMMUNS_SLURM_NODES slurmd (default 2) on this host: several `slurmd -N name`, one
# port each, emulate a multi-node cluster so that the srun + torchrun rendezvous is tested for real.
# State, spool, logs and the generated slurm.conf live in COMMUNS_SLURM_DIR (default /tmp/communs-slurm);
# /etc/slurm/slurm.conf is a symlink to that slurm.conf so that sbatch/sinfo find it with no environment.
# Needs root (daemons, apt); where it cannot work it prints one line and exits non-zero at once.
# Facts this relies on (Slurm 22.05, no systemd, no cgroups): ../shared/notes/slurm-on-this-machine.md.
set -euo pipefail

STATE=${COMMUNS_SLURM_DIR:-/tmp/communs-slurm}
NODES=${COMMUNS_SLURM_NODES:-2}
# CPUs each emulated node claims (config_overrides): more than this machine has, so that 2+ tasks per
# node and a chain's next job never pend forever on a 2-core machine.
NODE_CPUS=${COMMUNS_SLURM_CPUS:-8}
PARTITION=debug
MARKER="# communs CI cluster (scripts/slurm-cluster.sh)"
SYSTEM_CONF=/etc/slurm/slurm.conf

die() {
  echo "slurm-cluster: $*" >&2
  exit 1
}

node_name() { echo "cn$1"; }

# Daemon pids from their pidfiles; an empty answer when the file is missing or the process is gone.
pid_of() {
  local f=$1 p
  [ -f "$f" ] || return 0
  p=$(cat "$f" 2>/dev/null || true)
  if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then echo "$p"; fi
}

stop_pid() {
  local p=$1 i
  [ -n "$p" ] || return 0
  kill "$p" 2>/dev/null || true
  for i in $(seq 50); do
    kill -0 "$p" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$p" 2>/dev/null || true
}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
  echo "slurm-cluster: installing slurmctld slurmd slurm-client munge (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$STATE/apt.log" 2>&1 || die "apt-get update failed (see $STATE/apt.log)"
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >>"$STATE/apt.log" 2>&1 \
    || die "apt-get install of Slurm failed (see $STATE/apt.log)"
}

write_config() {
  local host mem_kb mem_mb i
  host=$(hostname -s)
  mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  # Split ~85% of the machine's memory among the emulated nodes (slurmd refuses a node that claims more).
  mem_mb=$((mem_kb * 85 / 100 / 1024 / NODES))
  mkdir -p "$STATE"/{spool/ctld,log,run}
  for i in $(seq "$NODES"); do mkdir -p "$STATE/spool/$(node_name "$i")"; done
  {
    echo "$MARKER"
    cat <<EOF
ClusterName=communs
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Credentials expire after 10 s: a requeued job is rerun after ~12 s instead of ~2 minutes.
AuthInfo=cred_expire=5
SlurmctldPort=6817
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Start a submitted job within ~1 s (the defaults batch jobs and wait up to a minute).
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=5,bf_interval=5
# A job whose dependency can never be satisfied (afterok on a failed job) is cancelled, not left pending.
DependencyParameters=kill_invalid_depend
# Use the CPUs of the node lines below, not what the hardware reports (emulated nodes share 2 cores).
SlurmdParameters=config_overrides
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
EOF
    for i in $(seq "$NODES"); do
      echo "NodeName=$(node_name "$i") NodeHostname=$host NodeAddr=127.0.0.1 Port=$((6830 + i)) CPUs=$NODE_CPUS RealMemory=$mem_mb State=UNKNOWN"
    done
    echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } >"$STATE/slurm.conf.new"
  mv "$STATE/slurm.conf.new" "$STATE/slurm.conf"


  mkdir -p "$(dirname "$SYSTEM_CONF")"
  ln -sfn "$STATE/slurm.conf" "$SYSTEM_CONF"
}

start_munge() {
  [ -f /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  if [ -z "$(pid_of /run/munge/munged.pid)" ]; then
    runuser -u munge -- munged || die "munged did not start"
  fi
}

# Daemons of a cluster this script started from another state directory (COMMUNS_SLURM_DIR changed
# between runs): found through the pidfiles named in the slurm.conf that /etc/slurm/slurm.conf points to.
stop_previous_state() {
  local conf f
  conf=$(readlink -f "$SYSTEM_CONF" 2>/dev/null) || return 0
  [ -f "$conf" ] && [ "$conf" != "$STATE/slurm.conf" ] || return 0
  head -1 "$conf" | grep -qF "$MARKER" || return 0
  for f in $(sed -n 's/^Slurm\(ctld\|d\)PidFile=//p' "$conf"); do
    for f in ${f//%n/*}; do stop_pid "$(pid_of "$f")"; done
  done
}

stop_daemons() {
  local f
  # slurmctld first (so it does not mark nodes down while they stop), then each slurmd, then munged.
  stop_pid "$(pid_of "$STATE/run/slurmctld.pid")"
  for f in "$STATE"/run/slurmd-*.pid; do
    [ -e "$f" ] && stop_pid "$(pid_of "$f")"
  done
  stop_pid "$(pid_of /run/munge/munged.pid)"
  rm -f "$STATE"/run/*.pid
}

wait_idle() {
  local i idle
  for i in $(seq 150); do
    idle=$(timeout 5 sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l || true)
    if [ "$idle" -ge "$NODES" ]; then return 0; fi
    sleep 0.2
  done
  sinfo -N >&2 || true
  die "the nodes did not become idle within 30 s (logs: $STATE/log/)"
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "needs root (starts munge/slurm daemons, may apt-get install Slurm)"
  # Never touch a real cluster's configuration (or its daemons): only a missing file or one of ours.
  if [ -e "$SYSTEM_CONF" ] && ! head -1 "$SYSTEM_CONF" 2>/dev/null | grep -qF "$MARKER"; then
    die "$SYSTEM_CONF exists and was not written by this script; refusing to replace it"
  fi
  mkdir -p "$STATE"
  install_if_missing
  # A previous run (this script, or a CI job on a reused machine) may have left daemons: restart cleanly.
  stop_previous_state
  stop_daemons
  # A fresh controller state: no stale jobs or node states from a previous run.
  rm -rf "$STATE/spool"
  write_config
  start_munge
  slurmctld -f "$STATE/slurm.conf" || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
  local i
  for i in $(seq "$NODES"); do
    slurmd -f "$STATE/slurm.conf" -N "$(node_name "$i")" \
      || die "slurmd $(node_name "$i") did not start (see $STATE/log/slurmd-$(node_name "$i").log)"
  done
  wait_idle
  echo "slurm-cluster: up: $NODES node(s) x $NODE_CPUS CPUs, partition $PARTITION (state: $STATE)"
}

cmd_down() {
  [ "$(id -u)" = 0 ] || die "needs root"
  if [ -d "$STATE" ]; then
    # Let slurmctld save its state and tell the slurmd to stop; then make sure every pid is gone.
    scontrol shutdown >/dev/null 2>&1 || true
    stop_daemons
  fi
  echo "slurm-cluster: down"
}

cmd_status() {
  if sinfo -h >/dev/null 2>&1; then
    sinfo -N -o '%N %T %c %m %P'
    squeue
  else
    echo "slurm-cluster: no cluster answers (run: scripts/slurm-cluster.sh up)"
    return 1
  fi
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
