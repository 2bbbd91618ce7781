"""The scaling model's check against measurement on this machine (docs/scaling.md).

    python launch/scaling_check.py [--repeats 3] [--keep DIR] [bench options, e.g. --steps 60]

Runs `mpirun -n W python -m dpbp.bench --scaling-model --json` at W = 1 (with one BLAS
thread: one core), 2 and 4, in turn and REPEATS times over (so that a busy moment hits
every row alike), and prints a Markdown table of the medians. Two predictions of each
step:
- from the same run: the compute and update timed alone, plus the gradient sum among the
  W ranks costed with the Allreduce fitted in that run (what --scaling-model prints);
- from one core: the compute of the 1-rank run shared by the min(W, cores) cores that
  the W ranks use, its update done by every rank (W updates on the cores), plus that
  same fitted sum.
The second is what the model does for N nodes: compute measured elsewhere, communication
from a fit. With --keep DIR, each run's whole output is also kept, as
DIR/bench-W-ranks-K.txt (K = 1 to REPEATS). Uses the mpirun beside this Python, else the
one on PATH.
"""

import json
import os
import statistics
import subprocess
import sys

import mpi_launcher   # launch/mpi_launcher.py, beside this script

WORLD_SIZES = (1, 2, 4)


def mpirun(n):
    return mpi_launcher.mpirun(n, "scaling_check")


def run(n, args, env):
    cmd = mpirun(n) + [sys.executable, "-m", "dpbp.bench", "--scaling-model", "--json", *args]
    env = dict(env, OMP_NUM_THREADS="1") if n == 1 else env
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        sys.exit(f"scaling_check: {' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


def from_one_core(one, f):
    """The step at f's world size predicted from the 1-rank, 1-thread run `one`."""
    n, cores, first = f["world_size"], f["cores"], one["scaling_inputs"]
    compute = first["seconds_per_sample"] * f["batch_size"] / min(n, cores)
    update = first["update_seconds"] * max(1.0, n / cores)
    return compute + update + f["scaling_inputs"]["host_sum_seconds"]


def main():
    args = sys.argv[1:]
    repeats, keep, args = mpi_launcher.script_options(args, 3)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    runs, load_before = {n: [] for n in WORLD_SIZES}, os.getloadavg()[0]
    for k in range(repeats):
        for n in WORLD_SIZES:
            out = run(n, args, env)
            mpi_launcher.kept(keep, f"bench-{n}-ranks-{k + 1}.txt", out)
            runs[n].append(json.loads(out.strip().splitlines()[-1]))
            print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(table(runs, repeats, (load_before, os.getloadavg()[0])))


def table(runs, repeats, loads):
    med = statistics.median
    first = runs[1][0]
    lines = [f"Medians of {repeats} runs; network {first['network']}; "
             f"{first['dtype']}, global batch {first['batch_size']}, sums in "
             f"{first['comm_dtype']}; {first['mpi']}; load average {loads[0]:.1f} before, "
             f"{loads[1]:.1f} after. One rank runs with one BLAS thread (one core).", "",
             "| ranks | measured step | Allreduce fit (latency, bandwidth) | predicted, same run "
             "| error | predicted from 1 core | error |", "|---|---|---|---|---|---|---|"]
    for n, fs in runs.items():   # the 1-rank row: one BLAS thread
        measured = [f["step_seconds"] for f in fs]
        same = [f["scaling_check"]["predicted_step_ms"] / 1e3 for f in fs]
        cross = [from_one_core(one, f) for one, f in zip(runs[1], fs)]
        fit = "-" if n == 1 else (f"{med(f['allreduce_latency_us'] for f in fs):.1f} us, "
                                  f"{med(f['allreduce_gbps'] for f in fs):.1f} Gb/s")
        error = lambda pred: f"{100 * med((p - m) / m for p, m in zip(pred, measured)):+.1f} %"
        lines.append(f"| {n} | {1e3 * med(measured):.2f} ms | {fit} | {1e3 * med(same):.2f} ms "
                     f"| {error(same)} | {1e3 * med(cross):.2f} ms | {error(cross)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
