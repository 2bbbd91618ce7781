"""Bugs put into dpbp on purpose, each with the tests that must catch it.

    python -m tests.mutants                 # every mutant: killed, survived or stale
    python -m tests.mutants grains-own-shard  # those named
    python -m tests.mutants --baseline ...  # first, their tests must pass without a mutant
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
           'return arrays_identity({"x": data.x, "y": data.y, "x_val": data.x_val, "y_val": data.y_val},',
           'return arrays_identity({"x": data.x, "x_val": data.x_val},',
           ("tests/test_data.py::test_the_identity_covers_every_array",
            "tests/test_resume.py::test_a_resume_whose_data_changed_stops_unless_asked_for")),
    Mutant("grains-own-shard", "dpbp/parallel/deterministic.py",
           "        segments = [slice(grain_rows[j].start - shard.start, grain_rows[j].stop - shard.start)\n"
           "                    for j in self.mine]",
           "        segments = sharding.grain_rows(shard.stop - shard.start, len(self.mine))",
           ("tests/test_deterministic.py",)),
    Mutant("half-sent-as-float32", "dpbp/parallel/step.py",
           'if self.comm_dtype == "float32":', "if True:",
           ("tests/test_step.py::test_16_bit_sums_send_16_bit_values",
            "tests/test_training_features.py::test_16_bit_gradient_sums_still_converge")),
    Mutant("watchdog-after-config", "dpbp/train.py",
           "watchdog = Watchdog(RunConfig.watchdog_seconds, comm.rank, end_hung_job)",
           "watchdog = Watchdog(0, comm.rank, end_hung_job)",
           ("tests/test_failures.py::test_the_watchdog_watches_before_the_config_is_read",)),
    Mutant("eval-blocks-by-world", "dpbp/parallel/evaluation.py",
           "    mine = sharding.blocks(len(x), block, comm.rank, comm.size)\n"
           "    counts = sharding.block_sizes(len(x), block, comm.size)\n"
           "    with mpi.agreement(comm):   # DP: a rank that cannot read its rows stops them all\n"
           "        done = blockwise(",
           "    block = -(-len(x) // comm.size) or 1\n"
           "    mine = sharding.blocks(len(x), block, comm.rank, comm.size)\n"
           "    counts = sharding.block_sizes(len(x), block, comm.size)\n"
           "    with mpi.agreement(comm):   # DP: a rank that cannot read its rows stops them all\n"
           "        done = blockwise(",
           ("tests/test_evaluation.py::test_evaluation_has_the_bits_of_one_process_at_any_world_size",
            "tests/test_reproducibility.py::test_evaluate_gives_the_logged_metrics_in_every_world")),
    Mutant("no-fsync-before-rename", "dpbp/service/files.py",
           "            f.flush()\n            os.fsync(f.fileno())\n",
           "            f.flush()\n",
           ("tests/test_run_dir.py::test_every_file_is_written_durably",)),

    # The README's guarantees.
    Mutant("loss-by-shard-rows", "dpbp/parallel/step.py",
           "loss_fn(outputs, y[rows], N)", "loss_fn(outputs, y[rows], max(len(outputs), 1))",
           ("tests/test_equivalence.py",)),
    Mutant("replicas-never-compared", "dpbp/parallel/comm.py",
           "        return self.allreduce_min(crc) == -self.allreduce_min(-crc)",
           "        return True",
           ("tests/test_failures.py::test_replicas_that_drift_apart_are_caught",)),
    Mutant("resume-loses-partial-loss", "dpbp/service/guard.py",
           "mine = np.array([self.summed.saved_loss(loss_sum)])", "mine = np.array([0.0])",
           ("tests/test_resume.py::test_resume_from_a_step_checkpoint_after_a_kill_is_bitwise",
            "tests/test_reproducibility.py::test_plain_resume_at_the_same_world_and_threads_is_bitwise")),
    Mutant("resume-without-momentum", "dpbp/service/checkpoint.py",
           "    problem = optimizer.load_state(found, f\"checkpoint {path}\")",
           "    problem = optimizer.load_state({}, f\"checkpoint {path}\")",
           ("tests/test_resume.py::test_a_signal_checkpoints_and_resume_is_bitwise",)),
    Mutant("resume-other-world-loss", "dpbp/parallel/step.py",
           "        return math.fsum(sums) if self.comm.rank == 0 else 0.0   # rank 0 carries it all",
           "        return float(sums[self.comm.rank]) if self.comm.rank < len(sums) else 0.0",
           ("tests/test_resume.py::test_resume_at_another_world_size_matches_to_rounding",
            "tests/test_resume.py::"
            "test_adamw_and_dropout_resume_at_another_world_size_matches_to_rounding")),
    Mutant("predict-blocks-by-world", "dpbp/parallel/evaluation.py",
           "    n, C = len(x), math.prod(model.output_shape)\n",
           "    n, C = len(x), math.prod(model.output_shape)\n    block = -(-n // comm.size) or 1\n",
           ("tests/test_evaluation.py::test_evaluation_has_the_bits_of_one_process_at_any_world_size",
            "tests/test_reproducibility.py::test_predict_gives_the_same_bits_in_every_world")),
    Mutant("blocks-on-many-threads", "dpbp/parallel/threads.py",
           "    with _blas().limit(limits=1):\n        if threads <= 1",
           "    with _blas().limit(limits=threads):\n        if threads <= 1",
           ("tests/test_threads.py", "tests/test_evaluation.py",
            "tests/test_reproducibility.py::test_evaluate_gives_the_logged_metrics_in_every_world")),
    Mutant("deterministic-many-threads", "dpbp/parallel/threads.py",
           "    if single:\n        _blas().limit(limits=1)\n        return 1, \"train.deterministic\"",
           "    if single and False:\n        _blas().limit(limits=1)\n        return 1, \"train.deterministic\"",
           ("tests/test_reproducibility.py::test_deterministic_training_gives_the_same_bits_in_every_world",)),
    Mutant("grid-without-room-for-grains", "dpbp/parallel/exact.py",
           "    h = (grains - 1).bit_length()", "    h = 0",
           ("tests/test_exact.py",)),
    Mutant("dropout-keys-by-shard", "dpbp/train.py",
           "keys = noise.row_keys(cfg.run.seed, at.step, rows) if model.draws else None",
           "keys = noise.row_keys(cfg.run.seed, at.step, np.arange(len(rows))) if model.draws "
           "else None",
           ("tests/test_reproducibility.py::test_adamw_with_dropout_gives_the_same_bits_at_1_to_4_ranks",)),
    Mutant("adamw-no-bias-correction", "dpbp/nn/optim.py",
           "        step_size = self.lr / (1 - self.beta1 ** t)", "        step_size = self.lr",
           ("tests/test_optim.py",)),
    Mutant("best-epoch-later-on-ties", "dpbp/service/history.py",
           "return score < best - min_delta if mode", "return score <= best - min_delta if mode",
           ("tests/test_history.py",)),
    Mutant("early-stop-one-late", "dpbp/service/history.py",
           "cfg.run.best_metric]) >= patience", "cfg.run.best_metric]) > patience",
           ("tests/test_history.py",
            "tests/test_training_features.py::test_early_stopping_ends_the_run_and_keeps_the_best_checkpoint")),

    # Failures: never hang, never lose or damage a file.
    Mutant("failing-rank-exits-alone", "dpbp/parallel/comm.py",
           "        print(f\"dpbp: rank {_rank()} failed: {what}; ending the job\", file=sys.stderr,\n"
           "              flush=True)\n        abort(code)",
           "        print(f\"dpbp: rank {_rank()} failed: {what}; ending the job\", file=sys.stderr,\n"
           "              flush=True)\n        sys.exit(code)",
           ("tests/test_failures.py::test_one_failing_rank_ends_the_whole_job",)),
    Mutant("nan-not-passed-on", "dpbp/parallel/step.py",
           "            doutputs[...] = np.nan   # NaN reaches every gradient, then every rank's sum",
           "            pass",
           ("tests/test_step.py::test_a_non_finite_loss_in_one_part_leaves_the_parameters",)),
    Mutant("divergence-exit-2", "dpbp/service/guard.py",
           "    with mpi.agreement(comm, code=EXIT_DIVERGED):\n        if policy == \"stop\":",
           "    with mpi.agreement(comm):\n        if policy == \"stop\":",
           ("tests/test_failures.py::test_divergence_stops_every_rank_and_saves_nothing_of_it",)),
    Mutant("watchdog-never-fires", "dpbp/service/supervise.py",
           "if self.seconds > 0 and time.monotonic() > self._deadline:",
           "if self.seconds > 0 and time.monotonic() > self._deadline + self.seconds * 1e6:",
           ("tests/test_supervise.py::test_an_unfed_watchdog_calls_back_with_a_stack",
            "tests/test_failures.py::test_watchdog_ends_a_hung_job_with_every_rank_stack")),
    Mutant("stop-signal-exit-1", "dpbp/service/guard.py",
           "    return 128 + signum", "    return 1",
           ("tests/test_resume.py::test_a_signal_checkpoints_and_resume_is_bitwise",)),
    Mutant("no-folder-fsync", "dpbp/service/files.py",
           "        os.fsync(dir_fd)   # make the rename itself durable", "        pass",
           ("tests/test_run_dir.py::test_every_file_is_written_durably",)),
    Mutant("metrics-line-not-synced", "dpbp/service/run_dir.py",
           "                os.fsync(f.fileno())   # durable before the checkpoint that follows it",
           "                pass",
           ("tests/test_run_dir.py::test_metrics_lines_are_durable_before_their_checkpoint",
            "tests/test_run_dir.py::test_every_file_is_written_durably")),
    Mutant("write-in-place", "dpbp/service/files.py",
           "    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)",
           "    fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), path",
           ("tests/test_failures.py::test_a_save_killed_half_way_damages_nothing",
            "tests/test_checkpoint.py::test_failed_write_leaves_nothing_behind")),

    # Refusals: one line, exit 2, nothing written.
    Mutant("second-run-clobbers", "dpbp/service/resume.py",
           "        if args.resume is None and not restart:\n            newest",
           "        if False:\n            newest",
           ("tests/test_train.py::test_second_run_never_clobbers_the_first",)),
    Mutant("lock-shared", "dpbp/service/run_dir.py",
           "fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)",
           "fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)",
           ("tests/test_run_dir.py::test_lock_names_its_holder_and_refuses_a_second_taker",
            "tests/test_train.py::test_two_runs_into_one_directory_at_once")),
    Mutant("link-into-another-run", "dpbp/service/run_dir.py",
           "        if is_run_dir(owner):", "        if False:",
           ("tests/test_run_dir.py::test_a_checkpoints_folder_linked_into_another_run_is_refused",)),
    Mutant("resume-changes-the-network", "dpbp/service/resume.py",
           'FIXED_ON_RESUME = ("model.hidden", "model.activation",',
           'FIXED_ON_RESUME = ("model.activation",',
           ("tests/test_resume.py::test_resume_refuses_another_network",)),
    Mutant("other-data-asked-by-any-key", "dpbp/service/run_dir.py",
           "    if named & set(SPLIT_KEYS):", "    if named:",
           ("tests/test_run_dir.py::test_data_that_differ_from_the_checkpoints_are_named_and_refused",)),
    Mutant("digest-not-checked", "dpbp/service/checkpoint.py",
           "    if stored is not None and (stored.shape != () or str(stored) != digest(state)):",
           "    if stored is not None and stored.shape != ():",
           ("tests/test_checkpoint.py::test_digest_catches_any_change_of_content",
            "tests/test_resume.py::test_stale_temporaries_are_cleaned_and_damaged_checkpoints_set_aside")),
    Mutant("lost-momentum-accepted", "dpbp/service/checkpoint.py",
           "        if lost:\n", "        if lost and False:\n",
           ("tests/test_checkpoint.py::test_a_checkpoint_without_its_momentum_buffer_is_refused",)),
    Mutant("best-without-validation", "dpbp/service/startup.py",
           "        if on and data.x_val is None:", "        if False:",
           ("tests/test_bad_input.py", "-k", "without-validation")),
    Mutant("momentum-ignored-under-adamw", "dpbp/service/config.py",
           '_unused(t, ("momentum", "nesterov") if t.optimizer == "adamw"',
           '_unused(t, ("nesterov",) if t.optimizer == "adamw"',
           ("tests/test_bad_input.py", "-k", "momentum-with-adamw")),
    Mutant("ranks-inputs-not-compared", "dpbp/service/startup.py",
           "    same = comm.replicas_identical(np.array(crcs, dtype=np.int64))",
           "    same = True",
           ("tests/test_startup.py",
            "tests/test_failures.py::test_ranks_that_loaded_different_data_are_stopped")),
    Mutant("arithmetic-not-compared", "dpbp/service/startup.py",
           "        if mine != first:", "        if False:",
           ("tests/test_startup.py",
            "tests/test_reproducibility.py::test_ranks_with_another_blas_are_refused")),
    Mutant("torchrun-trains-alone", "dpbp/parallel/comm.py",
           "if others.isdigit() and int(others) > 1 and not launched():",
           "if others.isdigit() and int(others) > 2 and not launched():",
           ("tests/test_train.py::test_a_torchrun_style_launch_without_mpi_is_refused",)),
    Mutant("launcher-without-mpi-trains-alone", "dpbp/parallel/comm.py",
           "        if size > 1:\n            raise UserError(",
           "        if size > 4:\n            raise UserError(",
           ("tests/test_train.py::test_without_mpi_trains_as_one_process",
            "tests/test_train.py::test_missing_mpi_under_a_launcher_is_reported_once")),
    Mutant("member-larger-than-memory", "dpbp/service/files.py",
           "    if room is not None and declared > room:", "    if False:",
           ("tests/test_data.py::test_a_member_larger_than_memory_is_refused_before_it_is_inflated",)),
    Mutant("predict-non-finite-rows", "dpbp/parallel/evaluation.py",
           "    if len(bad):\n        raise UserError(f\"{where}: row {first + bad[0]} holds NaN",
           "    if False:\n        raise UserError(f\"{where}: row {first + bad[0]} holds NaN",
           ("tests/test_evaluation.py::test_outputs_stop_at_a_row_that_is_not_finite",
            "tests/test_predict.py")),
    Mutant("predict-overflowing-outputs", "dpbp/parallel/evaluation.py",
           "        if len(bad):\n", "        if False:\n",
           ("tests/test_evaluation.py::test_outputs_stop_where_the_networks_outputs_overflow",)),
    Mutant("deterministic-float16-accepted", "dpbp/service/config.py",
           '    _check(not t.deterministic or t.comm_dtype == "float32", "train.comm_dtype",',
           '    _check(True, "train.comm_dtype",',
           ("tests/test_bad_input.py", "-k", "deterministic-float16")),
    Mutant("malformed-metrics-accepted", "dpbp/service/run_dir.py",
           "        return [(int(json.loads(line)[\"epoch\"]), line) for line in lines]",
           "        return [(int(json.loads(line).get(\"epoch\", 0)), line) for line in lines]",
           ("tests/test_run_dir.py::test_metrics_lines_that_are_not_an_epochs_record_are_refused",
            "tests/test_resume.py::test_resume_with_malformed_metrics_is_refused")),
    Mutant("negative-watchdog-accepted", "dpbp/service/config.py",
           "    _check(math.isfinite(r.watchdog_seconds) and r.watchdog_seconds >= 0,",
           "    _check(math.isfinite(r.watchdog_seconds),",
           ("tests/test_config.py::test_bad_overrides_name_the_key",
            "tests/test_properties.py")),
    # Convolutions, pooling and networks of model.layers.
    Mutant("conv-grads-kept-without-rows", "dpbp/nn/conv.py",
           "            np.copyto(dW_db[0], dWk",
           "            if B: np.copyto(dW_db[0], dWk",
           ("tests/test_cnn.py::test_n_ranks_match_one_process",)),
    Mutant("maxpool-grad-to-every-tie", "dpbp/nn/conv.py",
           "                np.greater(hit, taken, out=hit)   # not where an earlier one was largest\n",
           "",
           ("tests/test_conv.py::test_pooling_matches_the_reference",)),
    Mutant("maxpool-ties-kept-from-last-call", "dpbp/nn/conv.py",
           "                np.copyto(taken, hit)",
           "                taken |= hit",
           ("tests/test_cnn.py::test_deterministic_bits_at_1_to_4_ranks_across_a_resume_and_in_evaluation",)),
    Mutant("conv-blocks-from-the-end", "dpbp/nn/conv.py",
           "    return [(start, min(start + BLOCK, s.stop))\n"
           "            for s in segments for start in range(s.start, s.stop, BLOCK)]",
           "    return [(max(s.start, stop - BLOCK), stop)\n"
           "            for s in segments for stop in range(s.stop, s.start, -BLOCK)]",
           ("tests/test_conv.py::test_blocks_are_counted_from_the_first_row_a_layer_is_given",)),
    Mutant("conv-bias-grad-added-to", "dpbp/nn/conv.py",
           "                dW_db[1][...] = 0\n",
           "                pass\n",
           ("tests/test_conv.py::test_conv2d_matches_the_reference",)),
    Mutant("conv-input-grad-scratch-kept", "dpbp/nn/conv.py",
           "        padded[...] = 0\n",
           "",
           ("tests/test_conv.py::test_conv2d_matches_the_reference",)),
    Mutant("maxpool-uncovered-rows-kept", "dpbp/nn/conv.py",
           "        self.zero_outside(dx, y.shape[1:3]) if apart else dx.fill(0)",
           "        None if apart else dx.fill(0)",
           ("tests/test_conv.py::test_pooling_matches_the_reference",)),
    Mutant("conv-scratch-grows-with-the-batch", "dpbp/nn/conv.py",
           "        self.dpart = rows_of(self.dpart, BLOCK * Ho * Wo, (C,), dx.dtype)",
           "        self.dpart = rows_of(self.dpart, len(self.x) * Ho * Wo, (C,), dx.dtype)",
           ("tests/test_conv.py::test_a_convolutions_scratch_is_bounded_whatever_the_batch",)),
    Mutant("flatten-in-memory-order", "dpbp/nn/conv.py",
           "        np.copyto(self.y[:B].reshape(x.shape), x)",
           "        np.copyto(self.y[:B], np.reshape(np.asarray(x).ravel(order='K'), (B, D)))",
           ("tests/test_conv.py::test_flatten_takes_torchs_order_from_channels_last_memory",)),
    Mutant("dropout-units-in-memory-order", "dpbp/nn/layers.py",
           "        kept = np.greater_equal(bits.reshape(B, *F), self.threshold, out=self.kept[:B])",
           "        kept = np.greater_equal(bits.reshape(B, *F[1:], F[0]).transpose(0, 3, 1, 2)\n"
           "                                if len(F) == 3 else bits.reshape(B, *F), self.threshold,\n"
           "                                out=self.kept[:B])",
           ("tests/test_conv.py::test_dropout_masks_images_in_torchs_unit_order_in_any_layout",)),
    Mutant("layers-beside-hidden-accepted", "dpbp/service/config.py",
           '    _unused(m, ("hidden", "activation", "dropout"), ModelConfig(),',
           '    _unused(m, (), ModelConfig(),',
           ("tests/test_cnn.py::test_layers_that_make_no_network_are_refused_by_name",)),
    Mutant("last-layer-width-unchecked", "dpbp/service/network.py",
           "    if model.output_shape[0] != data.num_outputs:",
           "    if False:",
           ("tests/test_cnn.py::test_networks_that_do_not_fit_the_data_are_refused_naming_layer_and_shapes",)),
    Mutant("resume-changes-the-layers", "dpbp/service/resume.py",
           '"model.layers", "train.loss"', '"train.loss"',
           ("tests/test_cnn.py::test_resume_and_evaluate_keep_the_layers",)),
    # Batch normalisation over the global batch, and the one pass per rank it needs.
    Mutant("batchnorm-statistics-of-the-shard", "dpbp/nn/norm.py",
           "        totals = ctx.batch_sum(partials)                    # DP",
           "        totals = partials.sum(axis=0)                    # DP",
           ("tests/test_norm.py::test_n_ranks_match_one_process_in_float64",
            "tests/test_batchnorm_runs.py::test_n_ranks_match_one_process_and_the_statistics_moved")),
    Mutant("batchnorm-one-pass-variance", "dpbp/nn/norm.py",
           "        squares = np.square(x_hat, out=self.scratch[:B])\n"
           "        var = ctx.batch_sum(self.sums(squares, segments, partials[:, 1:])) / self.M",
           "        squares = np.square(x, out=self.scratch[:B])\n"
           "        var = ctx.batch_sum(self.sums(squares, segments, partials[:, 1:])) / self.M"
           " - mean ** 2",
           ("tests/test_norm.py::test_float32_variance_of_a_channel_far_from_zero",)),
    Mutant("batchnorm-biased-running-var", "dpbp/nn/norm.py",
           "var * (self.M / (self.M - 1))", "var * 1.0",
           ("tests/test_norm.py",)),
    Mutant("running-statistics-kept-on-a-skipped-step", "dpbp/parallel/step.py",
           "        model.restore_buffers(kept)\n", "",
           ("tests/test_norm.py::test_a_skipped_step_leaves_the_running_statistics",)),
    Mutant("linear-one-product-per-pass", "dpbp/nn/layers.py",
           "        for s in ctx.segments_of(B):\n"
           "            np.matmul(x[s], self.W.T, out=y[s])",
           "        np.matmul(x, self.W.T, out=y)",
           ("tests/test_norm.py::test_deterministic_bits_at_any_world_size",)),
    Mutant("batchnorm-last-batch-unchecked", "dpbp/service/network.py",
           "        sizes = {min(tc.batch_size, n), n % tc.batch_size or tc.batch_size}",
           "        sizes = {min(tc.batch_size, n)}",
           ("tests/test_batchnorm_runs.py::test_refused_at_start_up",)),
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
    baseline = "--baseline" in argv
    argv = [a for a in argv if a != "--baseline"]
    chosen = [m for m in MUTANTS if not argv or m.name in argv]
    unknown = set(argv) - {m.name for m in MUTANTS}
    if unknown:
        print(f"no such mutant: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    survived = 0
    with tempfile.TemporaryDirectory(prefix="dpbp-mutants-") as tmp:
        copy = Path(tmp)
        copy_checkout(copy)
        if baseline:   # a mutant is only killed by tests that pass without it
            for m in chosen:
                outcome, seconds, failed, tail = run_tests(copy, m.tests, timeout=900)
                if outcome != "SURVIVED":
                    print(f"{m.name}: its tests fail without the mutant:\n{tail}")
                    return 2
            print(f"baseline: the tests of {len(chosen)} mutants pass without them", flush=True)
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
