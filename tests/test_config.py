"""Config: defaults, TOML files, --set overrides, and a clear error for every bad input."""

import dataclasses
import os

import pytest

from dpbp.errors import UserError
from dpbp.service import config
from tests.conftest import ROOT


def test_default_toml_spells_out_the_builtin_defaults():
    assert config.load(ROOT / "configs" / "default.toml") == config.Config()


def test_every_shipped_config_loads():
    for path in (ROOT / "configs").glob("*.toml"):
        config.load(path)


def test_overrides_use_toml_syntax():
    cfg = config.load(None, ["train.lr=0.1", "model.hidden=[64, 32]", 'data.source="npz"',
                             'data.path="x.npz"', "train.nesterov=true", "train.epochs=3"])
    assert cfg.train.lr == 0.1 and cfg.model.hidden == (64, 32)
    assert cfg.data.source == "npz" and cfg.train.nesterov is True and cfg.train.epochs == 3


def test_integer_accepted_where_a_float_is_expected():
    assert config.load(None, ["train.lr=1"]).train.lr == 1.0


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 0.2\nepochs = 4\n")
    cfg = config.load(path, ["train.epochs=7"])
    assert (cfg.train.lr, cfg.train.epochs) == (0.2, 7)


def test_toml_round_trip():
    cfg = config.load(None, ['run.dir="a \\"quoted\\" dir, é, \\\\ and 😀"', "model.hidden=[]",
                             "train.weight_decay=1e-05"])
    assert config.from_toml(config.to_toml(cfg)) == cfg


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.Config().train.lr = 1.0


@pytest.mark.parametrize("overrides,message", [
    (["train.lrr=0.1"], "unknown key train.lrr (did you mean train.lr?)"),
    (["trian.lr=0.1"], "unknown section [trian] (did you mean [train]?)"),
    (["train.lr=\"fast\""], 'train.lr must be a number, got "fast"'),
    (["train.epochs=2.5"], "train.epochs must be an integer, got 2.5"),
    (["train.nesterov=1"], "train.nesterov must be true or false, got 1"),
    (["model.hidden=[64, \"a\"]"], "model.hidden must be a list of integers"),
    (["model.hidden=64"], "model.hidden must be a list of integers, got 64"),
    (["train.lr=-0.1"], "train.lr must be a number > 0, got -0.1"),
    (['train.comm_dtype="bfloat16"', 'model.dtype="float64"'],
     'train.comm_dtype must be "float32" when model.dtype = "float64"'),
    (["train.warmup_epochs=11"], "train.warmup_epochs must be in [0, train.epochs = 10]"),
    (["train.accumulation_steps=129"], "train.accumulation_steps must be in [1, train.batch"),
    (["train.milestones=[3, 2]"], "train.milestones must be increasing epochs >= 1"),
    (["train.lr=0"], "train.lr must be a number > 0"),
    (["train.lr=nan"], "train.lr must be a number > 0"),
    (["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
    (["train.epochs=0"], "train.epochs must be >= 1"),
    (["train.momentum=1.0"], "train.momentum must be in [0, 1), got 1.0"),
    (["train.momentum=-0.5"], "train.momentum must be in [0, 1)"),
    (["train.momentum=0", "train.nesterov=true"], "Nesterov needs momentum"),
    (["train.weight_decay=-1"], "train.weight_decay must be >= 0"),
    (["data.val_fraction=1"], "data.val_fraction must be in [0, 1)"),
    (["data.source=\"hdf5\""], 'data.source must be one of "synthetic", "npz", "npy", "csv", "mnist"'),
    (["data.source=\"npz\""], "data.path must be set"),
    (["model.activation=\"gelu\""], "model.activation must be one of"),
    (["model.dtype=\"float16\""], "model.dtype must be one of"),
    (["train.loss=\"l1\""], "train.loss must be one of"),
    (["model.hidden=[64, 0]"], "model.hidden must be a list of widths >= 1"),
    (["train.lr"], "expected section.key=VALUE"),
    (["lr=0.1"], "expected section.key=VALUE"),
    (["train.epochs=ten"], 'train.epochs must be an integer, got "ten"'),
    (["model.hidden=[8, 8"], 'model.hidden must be a list of integers, got "[8, 8"'),
    (["train.learning_rate=0.1"], "unknown key train.learning_rate (did you mean train.lr?)"),
    (["model.layers=[8]"], "model.layers must be a list of tables, like [{type = "),
    (["train.layers=[]"], "unknown key train.layers (did you mean model.layers?)"),
    (["train.seed=1"], "unknown key train.seed (did you mean run.seed?)"),
    (["train.batchsize=8"], "unknown key train.batchsize (did you mean train.batch_size?)"),
    (["model.classes=1"], "model.classes must be 0 (from the labels) or in [2, 65536], got 1"),
    (["run.log_every_steps=-1"], "run.log_every_steps must be >= 0 (0 = off), got -1"),
    (["train.optimizer=adam"], 'train.optimizer must be one of "sgd", "adamw", got "adam" '
                               '(did you mean "adamw"?)'),
    (["data.path=d.npz"], 'data.path must be left at its default "": it has no effect with '
                          'data.source = "synthetic", got "d.npz"'),
    (["data.source=mnist", "data.path=m", "data.samples=500"], "data.samples must be left at "
     'its default 20000: it has no effect with data.source = "mnist", got 500'),
    (["data.source=npz", "data.path=d.npz", "data.mnist_t10k=val"], "data.mnist_t10k must be "
     'left at its default "test": it has no effect with data.source = "npz"'),
    (["run.best_metric=\"val_acc\""], 'run.best_metric must be one of "val_loss", '
                                       '"val_accuracy"'),
    (["run.best_metric=val_accuracy", "train.loss=mse"],
     'run.best_metric must be "val_loss" when train.loss = "mse"'),
    (["train.plateau_patience=3"], 'train.plateau_patience must be left at its default 10: '
                                   'it has no effect with train.schedule = "constant"'),
    (["train.schedule=cosine", "train.min_lr=0.001"], "train.min_lr must be left at its"),
    (["train.schedule=plateau", "train.plateau_factor=1"],
     "train.plateau_factor must be in (0, 1), got 1.0"),
    (["train.schedule=plateau", "train.plateau_cooldown=-1"], "train.plateau_cooldown must be"),
    (["train.factor=0.5"], "unknown key train.factor (did you mean train.plateau_factor?)"),
    (["run.seed=9223372036854775808"], "run.seed must be an integer of 64 bits"),
    (["run.seed=-1"], "run.seed must be in [0, 9223372036854775807] (2**63 - 1), got -1"),
    (["train.epochs=99999999999999999999"], "train.epochs must be an integer of 64 bits"),
    (["train.lr=0.1\nx = 2"], r"--set train.lr=0.1\nx = 2: the value holds more than one "
                               "TOML value (a line x = ... after it)"),
    (["train.lr=1\n[run]\nseed = 3"], "holds more than one TOML value (a line run = ..."),
    (['run.dir=a\nb'], r"--set run.dir=a\nb: the value spans lines but is not one TOML value"),
    (["run.watchdog_seconds=-1"], "run.watchdog_seconds must be >= 0 (0 = off), got -1.0"),
    (["run.watchdog_seconds=inf"], "run.watchdog_seconds must be >= 0 (0 = off), got inf"),
    (["run.keep_checkpoints=-1"], "run.keep_checkpoints must be >= 0 (0 keeps all), got -1"),
    (["run.sync_check_steps=-1"], "run.sync_check_steps must be >= 0 (0 = off), got -1"),
    (["data.samples=1"], "data.samples must be >= 2, got 1"),
    (["train.base_batch_size=0"], "train.base_batch_size must be >= 1, got 0"),
    (["train.checkpoint_every_steps=-1"],
     "train.checkpoint_every_steps must be >= 0 (0 = off), got -1"),
    (["train.clip_grad_norm=-1"], "train.clip_grad_norm must be >= 0 (0 = off), got -1.0"),
    (["train.gamma=0"], "train.gamma must be a number > 0, got 0.0"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(UserError, match=".*" + __import__("re").escape(message)):
        config.load(None, overrides)


def test_multi_line_values_that_are_one_value_are_taken_whole():
    cfg = config.load(None, ["model.hidden=[16,\n 8]", "train.lr=0.5  # a comment"])
    assert cfg.model.hidden == (16, 8) and cfg.train.lr == 0.5


def test_a_config_file_is_a_regular_file_of_bounded_size(tmp_path):
    """/dev/zero would be read until memory ran out; a pipe would wait for a writer."""
    os.mkfifo(tmp_path / "pipe")
    for path in ("/dev/zero", tmp_path / "pipe", tmp_path):
        with pytest.raises(UserError, match="not a regular file"):
            config.load(path)
    (tmp_path / "big.toml").write_text("# padding\n" * 200_000)
    with pytest.raises(UserError, match=r"big.toml: larger than 1,048,576 bytes"):
        config.load(tmp_path / "big.toml")


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file .*nope.toml: No such file"):
        config.load(tmp_path / "nope.toml")


def test_invalid_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train\nlr = \n")
    with pytest.raises(UserError, match="bad.toml: invalid TOML"):
        config.load(path)


def test_section_that_is_not_a_table(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("train = 3\n")
    with pytest.raises(UserError, match=r"\[train\] must be a table"):
        config.load(path)


def test_errors_name_their_source(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[train]\nepochs = \"ten\"\n")
    with pytest.raises(UserError, match=r"config file .*mine.toml: train.epochs must be an "
                                        r"integer, got \"ten\""):
        config.load(path)
    with pytest.raises(UserError, match=r"--set model.hiden=\[8\]: unknown key model.hiden"):
        config.load(None, ["model.hiden=[8]"])


def test_top_level_key_is_pointed_to_its_section(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text("lr = 0.1\n")
    with pytest.raises(UserError, match=r"lr = 0.1 is outside any \[section\]; it belongs "
                                        r"under \[train\]"):
        config.load(path)


def test_file_and_overrides_apply_on_top_of_a_base(tmp_path):
    base = config.load(None, ["train.lr=0.3", "train.epochs=2"])
    path = tmp_path / "more.toml"
    path.write_text("[train]\nepochs = 5\n")
    cfg = config.load(path, ["train.momentum=0.5"], base=base)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.momentum) == (0.3, 5, 0.5)


def test_default_toml_lists_every_key_and_the_readme_table_matches():
    """configs/default.toml and the table in docs/configuration.md name every key with its default."""
    with open(ROOT / "configs" / "default.toml", "rb") as f:
        written = config.tomllib.load(f)
    defaults = config.flat(config.Config())
    assert {f"{s}.{k}" for s, keys in written.items() for k in keys} == set(defaults)
    readme = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        m = __import__("re").match(r"^\| `(\w+\.\w+)` \| `(.*?)` \|", line)
        if m:
            readme[m.group(1)] = m.group(2)
    assert readme == {k: config.toml_value(v) for k, v in defaults.items()}


def test_config_file_that_is_not_text(tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00[train]")
    with pytest.raises(UserError, match="binary.toml: not UTF-8 text"):
        config.load(path)


def test_a_string_key_takes_a_bare_word_and_paths_expand_the_home_folder():
    cfg = config.load(None, ["data.source=npz", "data.path=~/d.npz", "model.init=w.npz"])
    assert cfg.data.source == "npz" and cfg.data.path == os.path.expanduser("~/d.npz")
    assert cfg.model.init == os.path.abspath("w.npz")   # relative paths: from here
    assert config.load(None, ['data.source="npz"', 'data.path="~/d.npz"']) == \
        config.load(None, ["data.source=npz", "data.path=~/d.npz"])


def test_an_unknown_key_far_from_every_key_lists_the_known_ones():
    with pytest.raises(UserError, match=r"unknown key train.zzz \(known: train.loss, "):
        config.load(None, ["train.zzz=1"])


def test_a_huge_value_is_shown_once_and_shortened():
    """A 10 MB value in an error names its start and length, not the value (twice)."""
    value = "9" * 10_000_000
    with pytest.raises(UserError) as refused:
        config.load(None, [f'train.epochs="{value}"'])
    message = str(refused.value)
    assert len(message) < 400 and "10,000,002 characters" in message
    assert "train.epochs must be an integer" in message


def test_keys_of_a_saved_configs_old_source_go_back_to_their_defaults():
    """evaluate --set data.source=npz on a synthetic run: its data.samples no longer
    counts (named on the command line, it is refused)."""
    saved = config.load(None, ["data.samples=600"])
    assert config.load(None, ["data.source=npz", "data.path=d.npz"], base=saved).data.samples \
        == config.DataConfig.samples
    with pytest.raises(UserError, match="data.samples must be left at its default"):
        config.load(None, ["data.source=npz", "data.path=d.npz", "data.samples=500"], base=saved)


def test_a_saved_config_reads_as_its_run_behaved():
    mnist = config.load(None, ["data.source=mnist", "data.path=m"])
    text = config.to_toml(mnist)
    assert config.from_toml(text) == mnist   # "test", as saved now
    before = text.replace('mnist_t10k = "test"\n', "")
    assert config.from_toml(before).data.mnist_t10k == "val"
    assert config.from_toml(config.to_toml(config.Config()).replace(
        'mnist_t10k = "test"\n', "")) == config.Config()   # other sources: no such key
    # a key that had no effect, saved before such keys were refused: its default
    npz = config.load(None, ["data.source=npz", "data.path=/d.npz"])
    saved = config.to_toml(npz).replace("samples = 20000", "samples = 600")
    assert config.from_toml(saved) == npz
