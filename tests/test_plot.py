"""`python -m dpbp.plot`: a readable PNG (PDF, SVG) of a real run's curves, and clear
refusals."""

import json
import struct
import sys

import pytest

from tests.conftest import run_train, run_with_timeout

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def plot(args, env=None):
    return run_with_timeout([sys.executable, "-m", "dpbp.plot", *args], 120, env=env)


def png_size(path):
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plot") / "run"
    r = run_train(["--set", "data.samples=400", "--set", "train.epochs=2",
                   "--set", "model.hidden=[8]", "--set", f'run.dir="{run_dir}"'])
    assert r.returncode == 0, r.stderr
    return run_dir


def test_plot_writes_a_png_of_sensible_size(run_dir):
    pytest.importorskip("matplotlib")
    r = plot([str(run_dir)])
    assert r.returncode == 0 and r.stdout.strip() == f"wrote {run_dir / 'curves.png'}", r.stderr
    assert png_size(run_dir / "curves.png") == (1300, 400)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp-")]


def test_plot_to_another_file_and_without_accuracy(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "run").mkdir()
    lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    with open(tmp_path / "run" / "metrics.jsonl", "w") as f:   # as a regression run has them
        for m in lines:
            f.write(json.dumps(dict(m, val_accuracy=None)) + "\n")
    r = plot([str(tmp_path / "run"), "-o", str(tmp_path / "c.png")])
    assert r.returncode == 0, r.stderr
    assert png_size(tmp_path / "c.png") == (1300, 400)


@pytest.mark.parametrize("case,message", [
    ("absent", "no such run directory"),
    ("empty", "no metrics to plot"),
    ("malformed", "metrics.jsonl is malformed"),
    ("txt", "must name a .png, .pdf or .svg file"),
    ("no-dir", "RUN_DIR is required"),
])
def test_plot_refuses_bad_input(tmp_path, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "malformed").mkdir()
    (tmp_path / "malformed" / "metrics.jsonl").write_text("{not json\n")
    args = {"absent": [str(tmp_path / "absent")], "empty": [str(tmp_path / "empty")],
            "malformed": [str(tmp_path / "malformed")],
            "txt": [str(tmp_path / "empty"), "-o", str(tmp_path / "c.txt")], "no-dir": []}[case]
    r = plot(args)
    assert r.returncode == 2 and r.stderr.strip().startswith("dpbp: error: "), r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_plot_without_matplotlib_says_how_to_get_it(run_dir, tmp_path):
    blocker = tmp_path / "block" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    r = plot([str(run_dir), "-o", str(tmp_path / "c.png")],
             env={"PYTHONPATH": str(tmp_path / "block")})
    assert r.returncode == 2, r.stderr
    assert "pip install matplotlib (from a checkout of dpbp: pip install -e '.[plot]')" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "c.png").exists()


# ----------------------------------------------------------------------------- the panels

def figure_of(tmp_path, name, *sets):
    """The figure dpbp.plot draws for a fresh tiny run with `sets`."""
    pytest.importorskip("matplotlib")
    from dpbp import plot as plotting
    run_dir = tmp_path / name
    args = ["--set", "data.samples=200", "--set", "model.hidden=[4]",
            "--set", f'run.dir="{run_dir}"']
    for pair in sets:
        args += ["--set", pair]
    r = run_train(args)
    assert r.returncode == 0, r.stderr
    curves = plotting.load_curves(str(run_dir))
    return plotting.draw(curves, name), curves


def test_a_schedule_is_drawn_step_by_step(tmp_path):
    """A warmup and a cosine: the lr at every step, from the run's config, not straight
    lines between each epoch's last lr."""
    from dpbp.nn.schedule import lr_at
    from dpbp.service import config
    fig, curves = figure_of(tmp_path, "cos", "train.epochs=3", "train.schedule=cosine",
                            "train.warmup_epochs=1", "train.batch_size=30")
    assert len(fig.axes) == 3
    xs, lrs = fig.axes[2].get_lines()[0].get_data()
    tc = config.load(str(tmp_path / "cos" / "config.toml")).train
    assert len(lrs) == 18 and list(lrs) == [lr_at(tc, s, 6) for s in range(18)]   # 6 per epoch
    assert xs[0] == pytest.approx(1 / 6) and xs[-1] == 3


def test_a_constant_lr_takes_no_panel_and_one_epoch_one_tick(tmp_path):
    fig, _ = figure_of(tmp_path, "one", "train.epochs=1")
    assert len(fig.axes) == 2 and "lr 0.05 (constant)" in fig._suptitle.get_text()
    assert "one: 1 epoch" in fig._suptitle.get_text()
    assert [list(ax.get_xticks()) for ax in fig.axes] == [[1], [1]]


def test_logged_steps_are_drawn_behind_the_epochs(tmp_path):
    fig, curves = figure_of(tmp_path, "steps", "train.epochs=2", "run.log_every_steps=1")
    assert len(curves["steps"]) == 4   # 180 samples at 128: 2 steps per epoch
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["training, single steps", "training", "validation"]


def test_the_usage_names_run_dir_as_required():
    r = plot(["--help"])
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m dpbp.plot RUN_DIR ")


def test_pdf_and_svg_by_the_suffix(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from dpbp import plot as plotting
    for name, head in (("c.pdf", b"%PDF-"), ("c.SVG", b"<svg")):
        assert plotting.main([str(run_dir), "-o", str(tmp_path / name)]) == 0
        assert head in (tmp_path / name).read_bytes()[:400], name
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'c.SVG'}"


def test_the_plateau_schedule_is_drawn_from_the_logged_rates(tmp_path):
    """Its rate follows from the validation metrics, so the plot takes each epoch's logged
    lr (after the warmup, which it draws step by step from the config)."""
    pytest.importorskip("matplotlib")
    from dpbp import plot as plotting
    from dpbp.service import config
    run_dir = tmp_path / "plateau"
    run_dir.mkdir()
    cfg = config.from_dict({"train": dict(schedule="plateau", lr=0.1, warmup_epochs=1)})
    (run_dir / "config.toml").write_text(config.to_toml(cfg))
    lrs = [0.1, 0.1, 0.05, 0.05, 0.025]   # epoch 1's: its last step's, at the warmup's end
    with open(run_dir / "metrics.jsonl", "w") as f:
        for e, lr in enumerate(lrs, start=1):
            f.write(json.dumps(dict(epoch=e, train_loss=1 / e, val_loss=1 / e,
                                    val_accuracy=0.5, lr=lr, step=4 * e)) + "\n")
    fig = plotting.draw(plotting.load_curves(str(run_dir)), "plateau")
    _, drawn = fig.axes[2].get_lines()[0].get_data()
    assert list(drawn) == pytest.approx([0.025, 0.05, 0.075, 0.1] + [lr for lr in lrs[1:]
                                                                     for _ in range(4)])
