#!/usr/bin/env bash
# A real one-machine Slurm for tests/test_slurm.py: munge, slurmctld and slurmd from
# Debian's packages (slurm-wlm 22.05 on Debian 12), configured for this machine, without
# systemd. Test machinery, not a way to run a cluster. Adapted from ../shared/slurm/.
#
#   export SLURM_TEST_DIR=$(mktemp -d)   # state, logs and config; `up` and `down` share it
#   tests/slurm/local-slurm.sh up        # install (first time, ~20 s), start, wait for idle
#   export SLURM_CONF=$SLURM_TEST_DIR/etc/slurm.conf DPBP_TEST_SLURM=1
#   python -m pytest tests/test_slurm.py
#   tests/slurm/local-slurm.sh down      # cancel jobs; stop the daemons by their pid files
#
# Needs root (slurmd runs jobs as their user; SlurmUser=root keeps it simple), free ports
# $SLURM_TEST_PORT and the next one (default 6817, 6818), and every folder above
# SLURM_TEST_DIR open to all (munged refuses its socket otherwise). `up` exits 3, having
# started nothing, where the packages are missing and cannot be installed (not root, no
# apt-get): the Slurm tests then skip.
set -euo pipefail
S=${SLURM_TEST_DIR:?set SLURM_TEST_DIR to a scratch folder that up and down share}
export SLURM_CONF=$S/etc/slurm.conf
PORT=${SLURM_TEST_PORT:-6817}

down() {
    local f p
    # cancel leftover jobs first: slurmstepd and the jobs' processes outlive slurmd
    if [[ -s $S/run/slurmctld.pid ]] && squeue -h >/dev/null 2>&1; then
        squeue -h -o %i | xargs -r scancel
        for _ in $(seq 50); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.2; done
    fi
    for f in "$S/run/slurmd.pid" "$S/run/slurmctld.pid" "$S/munge/munged.pid"; do
        [[ -s $f ]] || continue
        p=$(cat "$f")
        kill "$p" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$p" 2>/dev/null; then kill -KILL "$p"; fi
        rm -f "$f"
    done
}

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    if (( EUID != 0 )) || ! command -v apt-get >/dev/null; then
        echo "local-slurm.sh: slurm-wlm and munge are not installed, and cannot be here" \
             "(needs root and apt-get)" >&2
        exit 3
    fi
    # about 15-25 s from the Debian mirror (~86 packages). srun --mpi=pmix would also need
    # libpmix-dev, and the PyPI mpich wheel refuses PMIx anyway: it speaks pmi2.
    apt-get update -q || { echo "local-slurm.sh: apt-get update failed" >&2; exit 3; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge psmisc </dev/null \
        || { echo "local-slurm.sh: apt-get install slurm-wlm munge failed" >&2; exit 3; }
}

start_munge() {
    chmod 755 "$S" "$S/munge"   # munged wants every folder above its socket open to all
    if [[ ! -s $S/munge/munge.key ]]; then
        dd if=/dev/urandom of="$S/munge/munge.key" bs=1 count=1024 status=none
        chmod 400 "$S/munge/munge.key"
    fi
    munged --socket="$S/munge/munge.socket" --key-file="$S/munge/munge.key" \
           --pid-file="$S/munge/munged.pid" --log-file="$S/munge/munged.log" \
           --seed-file="$S/munge/munged.seed"
    munge -S "$S/munge/munge.socket" -n | unmunge -S "$S/munge/munge.socket" >/dev/null
}

write_config() {
    local host=$1 mem ncpu
    # RealMemory a little under what slurmd measures, else the node drains
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem - 512))
    ncpu=$(nproc)
    cat > "$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$S/munge/munge.socket,cred_expire=10
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# plain "srun -n N python ..." then gives one N-rank world with the PyPI mpich wheel
MpiDefault=pmi2
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
    install
    mkdir -p "$S"/{etc,state,spool,log,run,munge}
    local host
    host=$(hostname -s)
    mkdir -p "$S/spool/$host"          # SlurmdSpoolDir=.../%n is not created by slurmd
    start_munge
    write_config "$host"
    # both fork into the background; -i: ignore the saved state of an earlier run
    slurmctld -i
    slurmd
    for _ in $(seq 60); do
        [[ $(sinfo -h -o %T 2>/dev/null) == idle ]] && break
        sleep 0.5
    done
    if [[ $(sinfo -h -o %T 2>/dev/null) != idle ]]; then
        echo "local-slurm.sh: the node did not become idle in 30 s; logs:" >&2
        tail -n 5 "$S/log/slurmctld.log" "$S/log/slurmd.log" >&2 || true
        exit 1
    fi
    sinfo
}

case ${1:-up} in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
