#!/usr/bin/env bash
# A SLURM cluster on this machine, for tests and for rehearsing the sbatch scripts.
#
#   slurm/local-cluster.sh start              one node: this host, on localhost
#   slurm/local-cluster.sh start --nodes N    N nodes (2 to 8), each a network namespace with its own
#                                             address, hostname and slurmd; the controller runs here
#   slurm/local-cluster.sh stop               cancel jobs, stop the daemons this script started (by
#                                             pid), remove the namespaces, bridge and host files
#   slurm/local-cluster.sh status
#
# Both install the Debian packages (slurmctld, slurmd, slurm-client, munge) when missing.
# With --nodes N the nodes are tt-node1 .. tt-nodeN at $TINYTRAIN_SLURM_NET.11 .. (default
# 10.77.77), on a bridge tt-br0 where this host is $TINYTRAIN_SLURM_NET.1; each node resolves the
# others' names from /etc/netns/tt-nodeI/hosts. Traffic between the nodes (srun's, the rendezvous,
# the collectives) crosses those addresses as it would between machines; nothing leaves the machine.
# All nodes share this machine's cores and file system, as nodes on a shared file system would.
#
# State, logs and spool live under $TINYTRAIN_SLURM_DIR (default /tmp/tinytrain-slurm). The
# config goes to /etc/slurm/slurm.conf, where every SLURM client looks for it. Needs root.
set -Eeuo pipefail

STATE=${TINYTRAIN_SLURM_DIR:-/tmp/tinytrain-slurm}
CONF=/etc/slurm/slurm.conf
NET=${TINYTRAIN_SLURM_NET:-10.77.77}
BRIDGE=tt-br0

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

write_conf() {  # write_conf NODES (1: this host on localhost; more: tt-node1.. in namespaces)
    local nodes=$1 host node_line
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
    local ctld_host="localhost" node_lines partition_nodes
    local hardware="Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem CpuBind=cores"
    if [ "$nodes" = 1 ]; then
        node_lines="NodeName=$host NodeAddr=127.0.0.1 $hardware State=UNKNOWN"
        partition_nodes=$host
    else
        # Every node declares the whole machine: they share its cores, as oversubscribed nodes would.
        ctld_host="$host($NET.1)"
        node_lines=""
        for i in $(seq "$nodes"); do
            node_lines+="NodeName=tt-node$i NodeAddr=$NET.$((10 + i)) NodeHostname=tt-node$i $hardware State=UNKNOWN"$'\n'
        done
        partition_nodes="tt-node[1-$nodes]"
    fi
    cat >"$CONF" <<EOF
# Written by tinytrain's slurm/local-cluster.sh: a $nodes-node test cluster on this machine.
ClusterName=tinytrain-local
SlurmctldHost=$ctld_host
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
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
KillWait=10
${node_lines}
PartitionName=debug Nodes=$partition_nodes Default=YES MaxTime=INFINITE State=UP
EOF
}

make_network() {  # make_network NODES: a bridge here, a namespace per node with a veth on it
    local nodes=$1 i
    remove_network
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local hosts="127.0.0.1 localhost"$'\n'"$NET.1 $(hostname -s)"$'\n'
    for i in $(seq "$nodes"); do hosts+="$NET.$((10 + i)) tt-node$i"$'\n'; done
    for i in $(seq "$nodes"); do
        local ns=tt-node$i
        ip netns add "$ns"
        ip link add "tt-veth$i" type veth peer name eth0 netns "$ns"
        ip link set "tt-veth$i" master "$BRIDGE"
        ip link set "tt-veth$i" up
        ip -n "$ns" addr add "$NET.$((10 + i))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        mkdir -p "/etc/netns/$ns"   # `ip netns exec` mounts these files over /etc's
        printf '%s' "$hosts" >"/etc/netns/$ns/hosts"
        echo "$ns" >"/etc/netns/$ns/hostname"
    done
    echo "$nodes" >"$STATE/nodes"
}

remove_network() {  # what make_network made, also after a crash (found by its names)
    local ns link
    for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^tt-node[0-9]+$/ {print $1}'); do
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^tt-veth[0-9]+@/ {sub(/@.*/, "", $2); print $2}'); do
        ip link del "$link" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    rm -f "$STATE/nodes"
}

start_nodes() {  # start_nodes NODES: one slurmd per namespace, under the node's hostname
    # Not `ip netns exec`: it mounts a fresh /sys without the cgroup mounts slurmd needs. Own mount
    # and UTS namespaces give the node its hostname and hosts file; jobs inherit all three.
    local nodes=$1 i
    for i in $(seq "$nodes"); do
        mkdir -p "$STATE/d/tt-node$i"
        nsenter --net="/run/netns/tt-node$i" unshare --mount --uts --propagation private sh -c \
            "hostname tt-node$i && mount --bind /etc/netns/tt-node$i/hosts /etc/hosts && exec slurmd"
    done
}

check_namespaces() {  # exit 3 (the tests skip) where this machine cannot make them
    if [ "$(id -u)" != 0 ]; then log "--nodes needs root (network namespaces)"; exit 3; fi
    if ! command -v ip >/dev/null || ! command -v unshare >/dev/null || ! command -v nsenter >/dev/null; then
        log "--nodes needs ip (iproute2), nsenter and unshare (util-linux)"; exit 3
    fi
    if ! ip netns add tt-probe 2>/dev/null; then log "cannot create network namespaces here"; exit 3; fi
    ip netns del tt-probe
    if ! unshare --uts --mount true 2>/dev/null; then log "cannot create UTS and mount namespaces here"; exit 3; fi
}

start() {  # start NODES
    local nodes=$1
    install
    mkdir -p "$STATE"
    if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
        log "already running (state in $STATE)"; return 0
    fi
    if [ "$nodes" != 1 ]; then check_namespaces; fi
    if pgrep -x slurmctld >/dev/null; then
        log "a slurmctld is already running (pid $(pgrep -x slurmctld | paste -sd' ' -)), not this script's with state in $STATE: stop it first"
        exit 1
    fi
    trap 'trap - ERR; log "start failed: undoing it"; stop' ERR
    start_munge
    write_conf "$nodes"
    if [ "$nodes" != 1 ]; then make_network "$nodes"; fi
    slurmctld -i
    wait_for 30 "slurmctld" sh -c 'scontrol ping | grep -q UP'
    if [ "$nodes" = 1 ]; then mkdir -p "$STATE/d/$(hostname -s)"; slurmd; else start_nodes "$nodes"; fi
    wait_for 60 "the nodes to be idle" sh -c "[ \$(sinfo -h -N -o %t | grep -cx idle) = $nodes ]"
    trap - ERR
    log "up: $(sinfo -h -N -o '%N (%o) %t %c CPUs' | paste -sd, - | sed 's/,/, /g')"
}

stop() {
    if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
        scancel --quiet --full "$(squeue -h -o %i | tr '\n' ' ')" 2>/dev/null || true
        scontrol shutdown >/dev/null 2>&1 || true
        wait_for 20 "slurmctld to stop" sh -c "! kill -0 $(cat "$STATE/slurmctld.pid") 2>/dev/null" || true
    fi
    local pidfile pid daemon
    for pidfile in "$STATE"/slurmd*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
        if [ -f "$pidfile" ]; then
            pid=$(cat "$pidfile"); daemon=$(basename "$pidfile" .pid)
            if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
            wait_for 10 "$daemon to exit" sh -c "! kill -0 $pid 2>/dev/null" || kill -KILL "$pid" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
    remove_network   # namespaces, veths, bridge, /etc/netns files (found by their names)
    log "stopped"
}

status() {
    scontrol ping && sinfo && squeue
}

case "${1:-}" in
    start)
        nodes=1
        if [ $# -ge 2 ]; then
            if [ "$2" != --nodes ] || [ $# != 3 ]; then echo "usage: $0 start [--nodes N]" >&2; exit 2; fi
            nodes=$3
        fi
        if ! [[ $nodes =~ ^[1-8]$ ]]; then echo "$0 start: --nodes takes 1 to 8, not '$nodes'" >&2; exit 2; fi
        start "$nodes" ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start [--nodes N] | stop | status" >&2; exit 2 ;;
esac
