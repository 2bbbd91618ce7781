"""launch/ scripts: valid shell, and local.sh really runs a short training."""

import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_with_timeout

SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_local_sh_trains(tmp_path):
    r = run_with_timeout(
        ["bash", str(ROOT / "launch" / "local.sh"), "-n", "2", "--set", "train.epochs=1",
         "--set", "data.samples=1000", "--set", f'run.dir="{tmp_path / "run"}"'],
        timeout=120, env={"PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    assert "2 ranks" in r.stdout and "epoch 1/1" in r.stdout
    assert (tmp_path / "run" / "checkpoints" / "epoch-0001.npz").exists()


def test_local_sh_rejects_a_bad_rank_count():
    r = run_with_timeout(["bash", str(ROOT / "launch" / "local.sh"), "-n", "zero"], timeout=30,
                         env={"PYTHON": sys.executable})
    assert r.returncode == 2 and "-n needs a rank count" in r.stderr
