#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for tests and for trying the sbatch scripts.
#
#   slurm/local-cluster.sh start    install (Debian packages, as root) if needed, configure, start
#   slurm/local-cluster.sh stop     cancel jobs, stop the daemons this script started (by pid)
#   slurm/local-cluster.sh status
#
# State, logs and spool live under $TINYTRAIN_SLURM_DIR (default /tmp/tinytrain-slurm). The
# config goes to /etc/slurm/slurm.conf, where every SLURM client looks for it. Needs root.
set -euo pipefail

STATE=${TINYTRAIN_SLURM_DIR:-/tmp/tinytrain-slurm}
CONF=/etc/slurm/slurm.conf

log() { echo "[local-cluster] $*" >&2; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    for _ in $(seq $((limit * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    log "timed out after ${limit}s waiting for $what"
    return 1
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        log "SLURM is not installed and installing it needs root"; exit 3
    fi
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
        || { log "apt-get install failed"; exit 3; }
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munge already running"; return 0
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    [ -f /etc/munge/munge.key ] || { log "/etc/munge/munge.key missing"; exit 3; }
    runuser -u munge -- munged --force
    wait_for 10 munged sh -c 'munge -n | unmunge'
    cp /run/munge/munged.pid "$STATE/munged.pid"   # ours to stop
}

write_conf() {
    local host node_line
    host=$(hostname -s)
    # Sockets, cores, threads and memory as slurmd sees them; RealMemory at 90% so the node is not drained.
    node_line=$(slurmd -C | head -1)
    local key value boards=1 sockets_per_board=1 cores=1 threads=1 mem=1024
    for pair in $node_line; do
        key=${pair%%=*}; value=${pair#*=}
        case $key in
            Boards) boards=$value ;;
            SocketsPerBoard) sockets_per_board=$value ;;
            CoresPerSocket) cores=$value ;;
            ThreadsPerCore) threads=$value ;;
            RealMemory) mem=$value ;;
        esac
    done
    local sockets=$((boards * sockets_per_board))
    mem=$((mem * 9 / 10))
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
    cat >"$CONF" <<EOF
# Written by tinytrain's slurm/local-cluster.sh: a one-node test cluster on localhost.
ClusterName=tinytrain-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem CpuBind=cores State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    install
    mkdir -p "$STATE"
    if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
        log "already running (state in $STATE)"; return 0
    fi
    start_munge
    write_conf
    slurmctld -i
    wait_for 30 "slurmctld" sh -c 'scontrol ping | grep -q UP'
    slurmd
    wait_for 60 "the node to be idle" sh -c 'sinfo -h -N -o %t | grep -qx idle'
    log "up: $(sinfo -h -N -o '%N %t %c CPUs')"
}

stop() {
    if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
        scancel --quiet --full "$(squeue -h -o %i | tr '\n' ' ')" 2>/dev/null || true
        scontrol shutdown >/dev/null 2>&1 || true
        wait_for 20 "slurmctld to stop" sh -c "! kill -0 $(cat "$STATE/slurmctld.pid") 2>/dev/null" || true
    fi
    for daemon in slurmd slurmctld munged; do
        local pidfile="$STATE/$daemon.pid"
        if [ -f "$pidfile" ]; then
            local pid; pid=$(cat "$pidfile")
            if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
            wait_for 10 "$daemon to exit" sh -c "! kill -0 $pid 2>/dev/null" || kill -KILL "$pid" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
    log "stopped"
}

status() {
    scontrol ping && sinfo && squeue
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
