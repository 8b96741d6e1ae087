#!/usr/bin/env bash
# A SLURM cluster on this machine's loopback, for trying the sbatch files and for the tests.
#
#   slurm/local-cluster.sh start [--install]   # munged + slurmctld + slurmd(s); idempotent
#   slurm/local-cluster.sh status              # daemons, sinfo, squeue
#   slurm/local-cluster.sh stop                # cancels jobs, stops the daemons this script started
#   slurm/local-cluster.sh env                 # prints `export SLURM_CONF=...` (eval it)
#
# Uses Debian/Ubuntu's `slurm-wlm` and `munge` packages. They are installed with apt-get only when
# asked (`start --install` or SLURM_LOCAL_INSTALL=1). Runs as root without systemd: the daemons are
# started directly. By default the machine's CPUs become one node (`slurmd -C`).
# Config, state, logs and a munge key of its own live under ${SLURM_LOCAL_DIR:-/tmp/vaebm-slurm};
# nothing under /etc is written. Client commands (sbatch, squeue, scontrol) find the cluster through
# SLURM_CONF:
#
#   eval "$(slurm/local-cluster.sh env)"; sbatch slurm/train_nvae.sbatch --config digits
#
# Knobs (environment): SLURM_LOCAL_DIR; SLURM_LOCAL_PORT (slurmctld's port; the slurmd ports follow it,
# default 6817); SLURM_LOCAL_CPUS=N to declare N CPUs per node instead of the machine's;
# SLURM_LOCAL_NODES=N to run N slurmd on this machine (nodes <host>-1..N, all on 127.0.0.1), so
# multi-node jobs (`sbatch --nodes=2`) run for real. Changing a knob and running `start` again restarts
# the daemons with the new configuration.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/vaebm-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
NNODES="${SLURM_LOCAL_NODES:-1}"
MUNGE_SOCKET="$DIR/munge/munge.socket"
PORT_CTLD="${SLURM_LOCAL_PORT:-6817}"

say() { echo "local-cluster: $*" >&2; }
die() { say "$*"; exit 1; }

[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_NODES must be a positive integer, got '$NNODES'"
if (( NNODES == 1 )); then NODES=("$HOST"); else NODES=(); for i in $(seq 1 "$NNODES"); do NODES+=("$HOST-$i"); done; fi

have_packages() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
                  && command -v sbatch >/dev/null; }

install_packages() {
    command -v apt-get >/dev/null \
        || die "cannot install slurm-wlm and munge: apt-get not found (install them with your package manager)"
    [[ $(id -u) -eq 0 ]] || die "cannot install slurm-wlm and munge: apt-get needs root (sudo apt-get install -y slurm-wlm munge)"
    local log="${TMPDIR:-/tmp}/local-cluster-apt.log"
    say "installing slurm-wlm munge with apt-get ..."
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } >"$log" 2>&1; then
        tail -n 5 "$log" >&2 || true
        die "cannot install slurm-wlm and munge with apt-get (log: $log)"
    fi
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

running_daemons() {  # pid files of live daemons of this cluster
    local f
    for f in "$DIR"/munged.pid "$DIR"/slurmctld.pid "$DIR"/slurmd-*.pid; do
        pid_alive "$f" && echo "$f"
    done
    return 0
}

node_shape() {
    # `slurmd -C` prints this machine's shape: CPUs, sockets, cores, threads, memory.
    local shape
    shape=$(slurmd -C 2>/dev/null | head -n1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *$//')
    [[ -n "$shape" ]] || shape="CPUs=$(nproc)"
    if [[ -n "${SLURM_LOCAL_CPUS:-}" ]]; then  # declare more (or fewer) CPUs than the machine has
        shape="CPUs=$SLURM_LOCAL_CPUS $(grep -o 'RealMemory=[0-9]*' <<<"$shape" || true)"
    fi
    echo "$shape"
}

write_config() {  # writes $CONF.new
    mkdir -p "$DIR"/{state,spool,log,munge}
    chmod 700 "$DIR/munge"
    if [[ ! -s "$DIR/munge/munge.key" ]]; then
        (umask 077; head -c 1024 /dev/urandom >"$DIR/munge/munge.key")
    fi
    local shape i
    shape=$(node_shape)
    {
        cat <<EOF
# Written by slurm/local-cluster.sh: ${NNODES} node(s) on loopback.
ClusterName=vaebm-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT_CTLD
SlurmdPort=$((PORT_CTLD + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups, no systemd: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Trust the node lines below even where they differ from the hardware (SLURM_LOCAL_CPUS).
SlurmdParameters=config_overrides
JobRequeue=1
# Finished jobs stay visible to scontrol/squeue for a while (there is no accounting database here).
MinJobAge=900
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
SlurmctldParameters=preempt_send_user_signal
EOF
        if (( NNODES == 1 )); then
            echo "NodeName=$HOST NodeAddr=127.0.0.1 $shape State=UNKNOWN"
        else
            for i in "${!NODES[@]}"; do
                echo "NodeName=${NODES[$i]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT_CTLD + 1 + i)) $shape State=UNKNOWN"
            done
        fi
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
    } >"$CONF.new"
}

start() {
    local install="${SLURM_LOCAL_INSTALL:-0}"
    [[ "${1:-}" == "--install" ]] && install=1
    if ! have_packages; then
        if [[ "$install" == 1 ]]; then
            install_packages
            have_packages || die "slurm-wlm/munge installed but slurmctld, slurmd, sbatch or munged is still missing"
        else
            die "slurm-wlm and munge are not installed (run: $0 start --install, or apt-get install -y slurm-wlm munge)"
        fi
    fi
    [[ $(id -u) -eq 0 ]] || die "must run as root (the daemons run as root with SlurmUser=root)"
    write_config
    if [[ -f "$CONF" ]] && ! cmp -s "$CONF" "$CONF.new" && [[ -n "$(running_daemons)" ]]; then
        say "configuration changed; restarting the daemons"
        stop
    fi
    mv "$CONF.new" "$CONF"
    export SLURM_CONF="$CONF"

    if ! pid_alive "$DIR/munged.pid"; then
        munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
               --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed" \
            || die "munged failed to start (log: $DIR/log/munged.log)"
    fi
    if ! pid_alive "$DIR/slurmctld.pid"; then
        slurmctld -f "$CONF" || die "slurmctld failed to start (log: $DIR/log/slurmctld.log)"
    fi
    local node
    for node in "${NODES[@]}"; do
        if ! pid_alive "$DIR/slurmd-$node.pid"; then
            slurmd -f "$CONF" -N "$node" || die "slurmd for $node failed to start (log: $DIR/log/slurmd-$node.log)"
        fi
    done

    # Wait (bounded) for every node to register and be usable.
    local states="" ready
    for _ in $(seq 1 60); do
        states=$(sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        ready=1
        for node in "${NODES[@]}"; do
            case " $states" in
                *" $node=idle "*|*" $node=mix "*|*" $node=alloc "*|*" $node=comp "*) ;;
                *" $node=down"*|*" $node=drain"*|*" $node=fail"*)
                    ready=0; scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
                *) ready=0 ;;
            esac
        done
        (( ready )) && break
        sleep 0.5
    done
    if (( ! ready )); then
        say "nodes not ready after 30 s: ${states:-no answer from slurmctld}; see $DIR/log/"
        exit 1
    fi
    say "up: ${NODES[*]} ($(sinfo -h -o '%C' | awk -F/ '{print $4}') CPUs), config $CONF"
    echo "export SLURM_CONF=$CONF"
}

stop() {
    local pidfile pid name
    export SLURM_CONF="$CONF"
    if [[ -f "$CONF" ]] && pid_alive "$DIR/slurmctld.pid"; then
        # Cancel whatever is queued or running, and give the job steps a moment to end.
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ -n "${jobs// /}" ]]; then
            # shellcheck disable=SC2086
            scancel --quiet $jobs >/dev/null 2>&1 || true
            for _ in $(seq 1 40); do [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break; sleep 0.25; done
        fi
    fi
    for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
        [[ -f "$pidfile" ]] || continue
        if pid_alive "$pidfile"; then
            pid=$(cat "$pidfile")
            name=$(basename "$pidfile" .pid)
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
            say "stopped $name ($pid)"
        fi
        rm -f "$pidfile"
    done
    # Job step daemons of this cluster that outlived slurmd carry our SLURM_CONF: end them by pid.
    for pid in $(pgrep -x slurmstepd || true); do
        if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

status() {
    local f name
    for f in "$DIR/munged.pid" "$DIR/slurmctld.pid" "$DIR"/slurmd-*.pid; do
        [[ -e "$f" ]] || continue
        name=$(basename "$f" .pid)
        if pid_alive "$f"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: not running"; fi
    done
    if [[ -f "$CONF" ]] && pid_alive "$DIR/slurmctld.pid"; then
        export SLURM_CONF="$CONF"
        sinfo
        squeue
    else
        echo "slurmctld: not running (start with: $0 start)"
        return 1
    fi
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start [--install] | stop | status | env" >&2; exit 2 ;;
esac
