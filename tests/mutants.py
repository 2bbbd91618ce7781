"""Bugs put into dpbp on purpose, each with the tests that must catch it.

    python -m tests.mutants                 # every mutant: killed, survived or stale
    python -m tests.mutants grains-own      # those named
    python -m tests.mutants --list          # name, file, tests

Each mutant replaces one piece of text in one file of dpbp (it must occur exactly once)
with a plausible bug, in a copy of this checkout, and runs the tests that guard the
claim it breaks; the mutant is killed when they fail. Run it before you trust a test,
and after code changes that a mutant's text no longer matches ("stale": update it).
docs/testing.md's table of guarantees names these mutants. Not part of the suite (each
mutant costs a test run); the tests run with PYTHONPATH set to the copy, so the tests
that start `python -m dpbp...` in a subprocess see the mutant too.

Test code only: dpbp never imports it.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str        # relative to the checkout
    old: str         # text that occurs exactly once in the file
    new: str         # what it becomes
    tests: tuple     # pytest node ids that must fail


MUTANTS = [
    # The six bugs that once passed the whole suite.
    Mutant("identity-no-labels", "dpbp/service/data.py",
           'arrays = {"x": data.x, "y": data.y, "x_val": data.x_val, "y_val": data.y_val}',
           'arrays = {"x": data.x, "x_val": data.x_val}',
           ("tests/test_data.py::test_the_identity_covers_every_array",
            "tests/test_resume.py::test_a_resume_whose_data_changed_stops_unless_asked_for")),
    Mutant("grains-own-shard", "dpbp/parallel/deterministic.py",
           "        return [(slice(grain_rows[j].start - offset, grain_rows[j].stop - offset), grads)\n"
           "                for j, grads in zip(self.mine, self.buffers)]",
           "        own = sharding.grain_rows(self.rows(N).stop - offset, len(self.mine))\n"
           "        return [(own[i], grads) for i, grads in enumerate(self.buffers[:len(self.mine)])]",
           ("tests/test_deterministic.py",)),
    Mutant("half-sent-as-float32", "dpbp/parallel/step.py",
           'if self.comm_dtype == "float32":', "if True:",
           ("tests/test_step.py::test_16_bit_sums_send_16_bit_values",)),
    Mutant("watchdog-after-config", "dpbp/train.py",
           "watchdog = Watchdog(RunConfig.watchdog_seconds, comm.rank, end_hung_job)",
           "watchdog = Watchdog(0, comm.rank, end_hung_job)",
           ("tests/test_failures.py::test_the_watchdog_watches_before_the_config_is_read",)),
    Mutant("eval-blocks-by-world", "dpbp/parallel/evaluation.py",
           "    mine = sharding.blocks(len(x), block, comm.rank, comm.size)\n"
           "    counts = sharding.block_sizes(len(x), block, comm.size)\n"
           "    done = blockwise(",
           "    block = -(-len(x) // comm.size) or 1\n"
           "    mine = sharding.blocks(len(x), block, comm.rank, comm.size)\n"
           "    counts = sharding.block_sizes(len(x), block, comm.size)\n"
           "    done = blockwise(",
           ("tests/test_evaluation.py::test_evaluation_has_the_bits_of_one_process_at_any_world_size",
            "tests/test_reproducibility.py::test_evaluate_gives_the_logged_metrics_in_every_world")),
    Mutant("no-fsync-before-rename", "dpbp/service/files.py",
           "            f.flush()\n            os.fsync(f.fileno())\n",
           "            f.flush()\n",
           ("tests/test_run_dir.py::test_every_file_is_written_durably",)),
]


def copy_checkout(target):
    """The files git knows of (tracked, and untracked but not ignored) into `target`."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def run_tests(copy, tests, timeout):
    """(outcome, seconds, the tests that failed, tail of the output) of pytest on `tests`
    in the copy."""
    env = dict(os.environ, PYTHONPATH=str(copy))
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
                            *tests], cwd=copy, env=env, capture_output=True, text=True,
                           timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.perf_counter() - t0, [], ""
    failed = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("FAILED ")]
    outcome = {0: "SURVIVED", 1: "killed"}.get(r.returncode, f"error (pytest {r.returncode})")
    return outcome, time.perf_counter() - t0, failed, r.stdout[-2000:]


def main(argv):
    if "--list" in argv:
        for m in MUTANTS:
            print(f"{m.name:28} {m.file:34} {' '.join(m.tests)}")
        return 0
    chosen = [m for m in MUTANTS if not argv or m.name in argv]
    unknown = set(argv) - {m.name for m in MUTANTS}
    if unknown:
        print(f"no such mutant: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    survived = 0
    with tempfile.TemporaryDirectory(prefix="dpbp-mutants-") as tmp:
        copy = Path(tmp)
        copy_checkout(copy)
        for m in chosen:
            path = copy / m.file
            original = path.read_text()
            if original.count(m.old) != 1:
                print(f"{m.name:28} stale: its text occurs {original.count(m.old)} times in "
                      f"{m.file}", flush=True)
                continue
            path.write_text(original.replace(m.old, m.new))
            try:
                outcome, seconds, failed, tail = run_tests(copy, m.tests, timeout=900)
            finally:
                path.write_text(original)
            survived += outcome == "SURVIVED"
            print(f"{m.name:28} {outcome:18} {seconds:6.1f} s", flush=True)
            for test in failed:
                print(f"    failed: {test}")
            if outcome.startswith(("SURVIVED", "error")):
                print(tail)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
