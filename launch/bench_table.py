"""The performance tables of docs/performance.md and docs/reproducibility.md: python -m dpbp.bench at 1, 2 and 4 ranks, repeated.

    python launch/bench_table.py [--repeats 5] [--keep DIR] [--deterministic] [bench options, e.g. --steps 60]

Runs, in turn and REPEATS times over (so that a busy moment hits every row alike):
1 rank with 1 BLAS thread, 1 rank with all cores, 2 ranks with --compare-torch (where
PyTorch is installed), and 4 ranks; then prints a Markdown table
of the medians. With --deterministic instead: at 1 (one thread), 2 and 4 ranks, plain
training next to train.deterministic with one grain per rank and with 4 grains (the
default), and the cost of each as the median ratio to the plain run of its repeat. With
--keep DIR, each run's whole output is also kept, as DIR/row-R-K.txt (the table's row R,
its repeat K, from 1). Uses the mpirun beside this Python, else the one on PATH.
"""

import json
import os
import statistics
import subprocess
import sys

import mpi_launcher   # launch/mpi_launcher.py, beside this script


def mpirun(n):
    return mpi_launcher.mpirun(n, "bench_table")


def rows(has_torch):
    """(label, ranks, extra bench options, extra environment)"""
    return [("`OMP_NUM_THREADS=1 mpirun -n 1`", 1, [], {"OMP_NUM_THREADS": "1"}),
            ("`mpirun -n 1`", 1, [], {}),
            ("`mpirun -n 2" + (" --compare-torch`" if has_torch else "`"), 2,
             ["--compare-torch"] if has_torch else [], {}),
            ("`mpirun -n 4` (4 ranks on the cores)", 4, [], {})]


def deterministic_rows():
    """(label, ranks, extra bench options, extra environment): each plain row, then the
    deterministic rows that are compared with it."""
    out = []
    for n, env in ((1, {"OMP_NUM_THREADS": "1"}), (2, {}), (4, {})):
        prefix = ("OMP_NUM_THREADS=1 " if env else "") + f"mpirun -n {n}"
        out.append((f"`{prefix}`", n, [], env))
        for grains in sorted({n, 4}):
            out.append((f"`{prefix} --deterministic --grains {grains}`", n,
                        ["--deterministic", "--grains", str(grains)], env))
    return out


def main():
    repeats, keep, args = mpi_launcher.script_options(sys.argv[1:], 5)
    deterministic = "--deterministic" in args
    if deterministic:
        args.remove("--deterministic")
    has_torch = not deterministic and subprocess.run(
        [sys.executable, "-c", "import torch"], capture_output=True, timeout=300).returncode == 0
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    results, load_before = {}, os.getloadavg()[0]
    for k in range(repeats):
        for row, (label, n, extra, more_env) in enumerate(deterministic_rows() if deterministic
                                                          else rows(has_torch)):
            cmd = mpirun(n) + [sys.executable, "-m", "dpbp.bench", "--json", *extra, *args]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, **more_env),
                               timeout=900)
            if r.returncode != 0:
                sys.exit(f"bench_table: {' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
            mpi_launcher.kept(keep, f"row-{row + 1}-{k + 1}.txt", r.stdout)
            results.setdefault(label, []).append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    loads = (load_before, os.getloadavg()[0])
    print((cost_table if deterministic else table)(results, repeats, loads))


def heading(results, repeats, loads):
    first = next(iter(results.values()))[0]
    return (f"Medians of {repeats} runs; network {first['network']}; "
            f"{first['dtype']}, global batch {first['batch_size']}, {first['steps']} timed "
            f"steps after {first['warmup']} warm-up; {first['mpi']}; load average "
            f"{loads[0]:.1f} before, {loads[1]:.1f} after.")


def cost_table(results, repeats, loads):
    """Plain and deterministic runs side by side; 'cost' is the median over repeats of
    (plain samples/s / deterministic samples/s - 1), the two made one after the other."""
    med = lambda runs, key: statistics.median(r[key] for r in runs)
    lines = [heading(results, repeats, loads), "",
             "| command | grains per rank | samples/s | step | MFU | peak memory | "
             "cost against plain |", "|---|---|---|---|---|---|---|"]
    plain = None
    for label, runs in results.items():
        f = runs[0]
        if not f["deterministic"]:
            plain, per_rank, cost = runs, "-", "-"
        else:
            n, grains = f["world_size"], f["grains"]   # rank r: grains [r G / n, (r+1) G / n)
            per_rank = "-".join(map(str, sorted({(r + 1) * grains // n - r * grains // n
                                                 for r in range(n)})))
            cost = statistics.median(p["samples_per_second"] / d["samples_per_second"] - 1
                                     for p, d in zip(plain, runs))
            cost = f"{100 * cost:+.0f} %"
        lines.append(f"| {label} | {per_rank} | {med(runs, 'samples_per_second'):,.0f} | "
                     f"{1e3 * med(runs, 'step_seconds'):.1f} ms | {med(runs, 'mfu'):.2f} | "
                     f"{med(runs, 'peak_rss_mb'):.0f} MB | {cost} |")
    return "\n".join(lines)


def table(results, repeats, loads):
    med = lambda runs, key: statistics.median(r[key] for r in runs)
    lines = [heading(results, repeats, loads), "",
             "| command | threads/rank | samples/s | step | communication | MFU | "
             "CPU µs/sample | peak memory / budget | PyTorch DDP samples/s (MFU, CPU µs/sample) "
             "| dpbp / PyTorch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, runs in results.items():
        torch = "-", "-"
        if "torch_samples_per_second" in runs[0]:
            torch = (f"{med(runs, 'torch_samples_per_second'):,.0f} "
                     f"({med(runs, 'torch_mfu'):.2f}, "
                     f"{1e6 * med(runs, 'torch_cpu_seconds_per_sample'):.0f})",
                     f"{med(runs, 'speedup_vs_torch'):.2f} x")
        lines.append(
            f"| {label} | {runs[0]['threads_per_rank']} | "
            f"{med(runs, 'samples_per_second'):,.0f} | {1e3 * med(runs, 'step_seconds'):.1f} ms | "
            f"{100 * med(runs, 'comm_fraction'):.1f} % | {med(runs, 'mfu'):.2f} | "
            f"{1e6 * med(runs, 'cpu_seconds_per_sample'):.0f} | "
            f"{med(runs, 'peak_rss_mb'):.0f} / {med(runs, 'memory_budget_mb'):.0f} MB | "
            f"{torch[0]} | {torch[1]} |")
    # Ratios of runs made one after the other, in the same repeat, then their median.
    ratio = lambda a, b: statistics.median(x["samples_per_second"] / y["samples_per_second"]
                                           for x, y in zip(a, b))
    labels = list(results)
    one, two, four = results[labels[0]], results[labels[2]], results[labels[3]]
    lines += ["", f"Strong scaling, 2 ranks / 1 rank (1 thread each): {ratio(two, one):.2f} x; "
              f"4 ranks / 2 ranks: {ratio(four, two):.2f} x"]
    lines.append(f"import of the training modules: {med(sum(results.values(), []), 'import_seconds'):.2f} s "
                 "(median over runs of the slowest rank)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
