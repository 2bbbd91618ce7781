"""Typed, frozen configuration: one dataclass per TOML section, defaults in one place.

`load(path, overrides)` reads a TOML file (or starts from the defaults), applies
`section.key=VALUE` overrides (VALUE in TOML syntax) and validates everything. Unknown
keys, wrong types and out-of-range values are UserErrors that name the key.
`configs/default.toml` spells out the defaults below; a test keeps the two equal.
"""

import dataclasses
import difflib
import json
import math
import os
import stat
import typing
from dataclasses import dataclass

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from dpbp.errors import UserError
from dpbp.nn import model as layer_specs


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"      # run directory: metrics.jsonl, config.toml, checkpoints/
    seed: int = 0                  # initial weights, shuffling, validation split, synthetic data
    keep_checkpoints: int = 3      # newest checkpoints kept; older ones deleted (0 = keep all)
    sync_check_steps: int = 100    # compare a checksum of every rank's parameters (0 = off)
    watchdog_seconds: float = 600.0  # no step ends for this long: dump stacks, end (0 = off)
    log_every_steps: int = 0       # also log every this many steps to steps.jsonl (0 = off)
    keep_best: bool = False        # keep checkpoints/best.npz: the epoch of the best best_metric
    best_metric: str = "val_loss"  # "val_loss" (lower is better) | "val_accuracy" (higher):
                                   # what keep_best, early stopping and plateau watch


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"      # "synthetic" | "npz" | "npy" | "csv" | "mnist"
    path: str = ""                 # npz/csv: the file; npy: the folder of x.npy, y.npy; mnist: IDX folder
    val_fraction: float = 0.1      # held out for validation when the source has no val set
    shuffle: bool = True           # one permutation per epoch, from (seed, epoch)
    samples: int = 20000           # synthetic only: samples generated (train + val)
    mnist_t10k: str = "test"       # mnist only: the t10k pair is the "test" set (evaluate
                                   # --split test) or, as in runs made before this key, "val"


@dataclass(frozen=True)
class ModelConfig:
    hidden: tuple[int, ...] = (256, 128)   # hidden widths; in/out widths come from the data
    activation: str = "relu"               # "relu" | "tanh" | "sigmoid"
    dtype: str = "float32"                 # "float32" | "float64"
    init: str = ""                         # .npz of model.* weights to start from
    classes: int = 0                       # classes of a classifier; 0 = the training
                                           # labels' largest + 1 (set it when they lack some)
    dropout: float = 0.0                   # drop probability after each hidden activation
    layers: tuple[dict, ...] = ()          # the network as a list of layers, one table each,
                                           # e.g. {type = "conv2d", out_channels = 8,
                                           # kernel_size = 3}; replaces the keys hidden,
                                           # activation and dropout (left at their defaults)


@dataclass(frozen=True)
class TrainConfig:
    loss: str = "cross_entropy"    # "cross_entropy" | "mse"
    epochs: int = 10
    batch_size: int = 128          # the GLOBAL minibatch, split across ranks
    optimizer: str = "sgd"         # "sgd" | "adamw" (as torch.optim.SGD, torch.optim.AdamW)
    lr: float = 0.05
    momentum: float = 0.9          # sgd only
    nesterov: bool = False         # sgd only
    weight_decay: float = 0.0      # sgd: L2 added to the gradient; adamw: decoupled
    betas: tuple[float, ...] = (0.9, 0.999)   # adamw only: decay of the moment averages
    eps: float = 1e-8              # adamw only: added to the root of the second moment
    amsgrad: bool = False          # adamw only: use the largest second moment so far
    schedule: str = "constant"     # "constant" | "step" | "cosine" (to 0 at the last epoch)
                                   # | "plateau" (torch's ReduceLROnPlateau on run.best_metric)
    milestones: tuple[int, ...] = ()   # step schedule: epochs after which lr *= gamma
    gamma: float = 0.1             # step schedule: the factor at each milestone
    plateau_factor: float = 0.1    # plateau: lr *= factor after a plateau
    plateau_patience: int = 10     # plateau: epochs without improvement that are a plateau
    plateau_threshold: float = 1e-4   # plateau: an improvement beats the best by this (relative)
    plateau_cooldown: int = 0      # plateau: epochs after a reduction that are not counted
    min_lr: float = 0.0            # plateau: the lr is never reduced below this
    warmup_epochs: float = 0.0     # linear warmup from 0, ramped per step
    lr_scaling: str = "none"       # "none" | "linear": lr * batch_size / base_batch_size
    base_batch_size: int = 256     # the batch size that lr was tuned for (linear scaling)
    accumulation_steps: int = 1    # micro-batches per global batch, one update after all
    clip_grad_norm: float = 0.0    # clip the global gradient norm to this (0 = off)
    comm_dtype: str = "float32"    # gradient Allreduce in "float32" | "float16" | "bfloat16"
    on_nonfinite: str = "stop"     # a non-finite loss or gradient: "stop" | "skip" the step
    checkpoint_every_steps: int = 0  # also checkpoint mid-epoch every this many steps (0 = off)
    deterministic: bool = False    # the same bits at every world size (see README)
    grains: int = 4                # deterministic: equal parts of each batch, shared by ranks
    early_stopping_patience: int = 0   # stop after this many epochs without improvement (0 = off)
    early_stopping_min_delta: float = 0.0   # an improvement: beats the best run.best_metric by
                                            # more than this (in its unit: accuracy a fraction)


@dataclass(frozen=True)
class Config:
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


PLATEAU_KEYS = ("plateau_factor", "plateau_patience", "plateau_threshold", "plateau_cooldown",
                "min_lr")
MAX_CLASSES = 1 << 16   # a larger label is a mistake, not a network to build
MAX_INT = 2 ** 63 - 1   # integers are int64 where they are saved (checkpoints) and used
MAX_CONFIG_BYTES = 1 << 20   # a config file is a few hundred bytes: a larger one is a mistake
MAX_GRAINS = 1024   # train.grains: a grain's float32 gradient keeps 21 - ceil(log2 grains) bits

CHOICES = {
    "run.best_metric": ("val_loss", "val_accuracy"),
    "data.source": ("synthetic", "npz", "npy", "csv", "mnist"),
    "data.mnist_t10k": ("test", "val"),
    "model.activation": ("relu", "tanh", "sigmoid"),
    "model.dtype": ("float32", "float64"),
    "train.loss": ("cross_entropy", "mse"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("constant", "step", "cosine", "plateau"),
    "train.lr_scaling": ("none", "linear"),
    "train.comm_dtype": ("float32", "float16", "bfloat16"),
    "train.on_nonfinite": ("stop", "skip"),
}


def _sections():
    return {f.name: f.type for f in dataclasses.fields(Config)}


def _keys(section_cls):
    return typing.get_type_hints(section_cls)


def _type_name(t):
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            tuple[int, ...]: "a list of integers", tuple[float, ...]: "a list of numbers",
            tuple[dict, ...]: "a list of tables, like [{type = \"linear\", out_features = 10}]"
            }[t]


def _convert(key, value, t, where):
    """`value` as type `t`, or a UserError naming the key."""
    is_int = (lambda v: isinstance(v, int) and not isinstance(v, bool))
    if t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = is_int(value)
    elif t is float:
        ok = is_int(value) or isinstance(value, float)
    elif t is str:
        ok = isinstance(value, str)
    elif t == tuple[int, ...]:
        ok = isinstance(value, list) and all(is_int(v) for v in value)
    elif t == tuple[float, ...]:
        ok = isinstance(value, list) and all(is_int(v) or isinstance(v, float) for v in value)
    elif t == tuple[dict, ...]:
        ok = isinstance(value, list) and all(isinstance(v, dict) for v in value)
    else:
        raise TypeError(f"config field {key} has a type the loader does not know: {t}")
    if not ok:
        raise UserError(f"{where}: {key} must be {_type_name(t)}, got "
                        f"{shown(toml_value(value))}")
    if t is int and not -MAX_INT - 1 <= value <= MAX_INT:   # TOML's own bound, too
        raise UserError(f"{where}: {key} must be an integer of 64 bits (at most {MAX_INT} "
                        f"in magnitude), got {shown(value)}")
    if t is str and not _utf8(value):
        raise UserError(f"{where}: {key} must be UTF-8 text, got {ascii(value)} (a path "
                        "with bytes that are not UTF-8 cannot be saved in config.toml)")
    if t == tuple[float, ...]:
        return tuple(float(v) for v in value)
    if t == tuple[dict, ...]:
        return tuple(dict(v) for v in value)
    return tuple(value) if t == tuple[int, ...] else t(value)


def _utf8(text):
    try:
        text.encode("utf-8")   # an argument holding non-UTF-8 bytes arrives as surrogates
        return True
    except UnicodeEncodeError:
        return False


# What other trainers call some of dpbp's keys, for "did you mean".
SYNONYMS = {
    "learning_rate": "train.lr", "lr_rate": "train.lr",
    "hidden_sizes": "model.hidden", "hidden_layers": "model.hidden", "hidden_dims": "model.hidden",
    "num_epochs": "train.epochs", "n_epochs": "train.epochs", "max_epochs": "train.epochs",
    "batch": "train.batch_size", "global_batch_size": "train.batch_size",
    "scheduler": "train.schedule", "lr_scheduler": "train.schedule",
    "lr_schedule": "train.schedule", "warmup": "train.warmup_epochs",
    "grad_clip": "train.clip_grad_norm", "max_grad_norm": "train.clip_grad_norm",
    "gradient_clip_val": "train.clip_grad_norm", "output_dir": "run.dir", "out_dir": "run.dir",
    "save_dir": "run.dir", "checkpoint_dir": "run.dir", "gradient_accumulation_steps":
    "train.accumulation_steps", "precision": "model.dtype",
    "optim": "train.optimizer", "opt": "train.optimizer", "epsilon": "train.eps",
    "adam_epsilon": "train.eps", "patience": "train.early_stopping_patience",
    "min_delta": "train.early_stopping_min_delta", "dropout_rate": "model.dropout",
    "drop_rate": "model.dropout", "save_best": "run.keep_best", "save_best_only": "run.keep_best",
    "monitor": "run.best_metric", "metric": "run.best_metric", "factor": "train.plateau_factor",
    "cooldown": "train.plateau_cooldown", "threshold": "train.plateau_threshold",
    "eta_min": "train.min_lr",
}


def _suggestion(section, key):
    """The key meant by an unknown section.key: a synonym, the same name in another
    section, or a close spelling; None when nothing is close."""
    known = [f"{s}.{k}" for s, cls in _sections().items() for k in _keys(cls)]
    if key in SYNONYMS:
        return SYNONYMS[key]
    elsewhere = [k for k in known if k.split(".")[1] == key]
    close = elsewhere or difflib.get_close_matches(f"{section}.{key}", known, n=1, cutoff=0.8)
    return close[0] if close else None


def _unknown(what, name, known, where, suggestion=None):
    if suggestion is None:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        suggestion = close[0] if close else None
    hint = f" (did you mean {suggestion}?)" if suggestion else f" (known: {', '.join(known)})"
    return UserError(f"{where}: unknown {what} {shown(name)}{hint}")


def shown(text, limit=60):
    """`text` for a message: as it is when short, else its start and its length."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def from_dict(tree, base=None, check=True, where="config"):
    """A Config from nested dicts {section: {key: value}} on top of `base`, validated
    unless check=False (when more overrides are still to come). `where` names the source
    (a file, a --set) in error messages."""
    base = base or Config()
    sections = _sections()
    for section, values in tree.items():
        if section not in sections and not isinstance(values, dict):
            owners = [f"[{s}]" for s in sections if section in _keys(sections[s])]
            hint = f"; it belongs under {owners[0]}" if owners else ""
            raise UserError(f"{where}: {shown(section)} = {shown(toml_value(values))} is "
                            f"outside any [section]{hint}")
        if section not in sections:
            raise _unknown("section", f"[{section}]", [f"[{s}]" for s in sections], where)
        if not isinstance(values, dict):
            raise UserError(f"{where}: [{section}] must be a table of keys, got "
                            f"{shown(repr(values))}")
        hints = _keys(sections[section])
        changes = {}
        for key, value in values.items():
            if key not in hints:
                raise _unknown("key", f"{section}.{key}", [f"{section}.{k}" for k in hints],
                               where, _suggestion(section, key))
            changes[key] = _convert(f"{section}.{key}", value, hints[key], where)
        base = dataclasses.replace(
            base, **{section: dataclasses.replace(getattr(base, section), **changes)})
    if check:
        validate(base)
    return base


def _check(ok, key, want, value, hint=""):
    if not ok:
        raise UserError(f"config: {key} must be {want}, got {shown(toml_value(value))}{hint}")


def _unused(section, keys, defaults, why):
    """Keys of `section` (a config section) that have no effect, `why` (e.g. 'with
    data.source = "npz"'), must keep their `defaults`' values: a value there would be
    silently ignored. A config that lists every key (--print-config) still loads."""
    name = {DataConfig: "data", TrainConfig: "train", ModelConfig: "model"}[type(section)]
    for key in keys:
        default = getattr(defaults, key)
        _check(getattr(section, key) == default, f"{name}.{key}",
               f"left at its default {toml_value(default)}: it has no effect {why}",
               getattr(section, key))


def _check_choice(cfg, key, choices):
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    close = difflib.get_close_matches(str(value).lower(), choices, n=1, cutoff=0.6)
    _check(value in choices, key, "one of " + ", ".join(f'"{c}"' for c in choices), value,
           f' (did you mean "{close[0]}"?)' if close else "")


def validate(cfg):
    """Range checks that no type can express; each error names the key."""
    for key, choices in CHOICES.items():
        _check_choice(cfg, key, choices)
    t, d, m = cfg.train, cfg.data, cfg.model
    _check(cfg.run.dir.strip() != "", "run.dir", "a non-empty path", cfg.run.dir)
    _check(0 <= cfg.run.seed <= MAX_INT, "run.seed", f"in [0, {MAX_INT}] (2**63 - 1)",
           cfg.run.seed)
    _check(d.source == "synthetic" or d.path != "", "data.path",
           f'set for data.source = "{d.source}"', d.path)
    _check(0 <= d.val_fraction < 1, "data.val_fraction", "in [0, 1)", d.val_fraction)
    _check(d.samples >= 2, "data.samples", ">= 2", d.samples)
    _check(all(w >= 1 for w in m.hidden), "model.hidden",
           "a list of widths >= 1", list(m.hidden))
    _check(m.classes == 0 or 2 <= m.classes <= MAX_CLASSES, "model.classes",
           f"0 (from the labels) or in [2, {MAX_CLASSES}]", m.classes)
    _check(t.epochs >= 1, "train.epochs", ">= 1", t.epochs)
    _check(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
    _check(math.isfinite(t.lr) and t.lr > 0, "train.lr", "a number > 0", t.lr)
    _check(0 <= t.momentum < 1, "train.momentum", "in [0, 1)", t.momentum)
    _check(not t.nesterov or t.momentum > 0, "train.nesterov",
           "false when train.momentum = 0 (Nesterov needs momentum)", t.nesterov)
    _check(math.isfinite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", ">= 0",
           t.weight_decay)
    r = cfg.run
    _check(r.keep_checkpoints >= 0, "run.keep_checkpoints", ">= 0 (0 keeps all)",
           r.keep_checkpoints)
    _check(r.sync_check_steps >= 0, "run.sync_check_steps", ">= 0 (0 = off)",
           r.sync_check_steps)
    _check(math.isfinite(r.watchdog_seconds) and r.watchdog_seconds >= 0,
           "run.watchdog_seconds", ">= 0 (0 = off)", r.watchdog_seconds)
    _check(r.log_every_steps >= 0, "run.log_every_steps", ">= 0 (0 = off)", r.log_every_steps)
    _check(all(m >= 1 for m in t.milestones) and list(t.milestones) == sorted(set(t.milestones)),
           "train.milestones", "increasing epochs >= 1", list(t.milestones))
    _check(math.isfinite(t.gamma) and t.gamma > 0, "train.gamma", "a number > 0", t.gamma)
    _check(math.isfinite(t.warmup_epochs) and 0 <= t.warmup_epochs <= t.epochs,
           "train.warmup_epochs", f"in [0, train.epochs = {t.epochs}]", t.warmup_epochs)
    _check(t.base_batch_size >= 1, "train.base_batch_size", ">= 1", t.base_batch_size)
    _check(1 <= t.accumulation_steps <= t.batch_size, "train.accumulation_steps",
           f"in [1, train.batch_size = {t.batch_size}]", t.accumulation_steps)
    _check(math.isfinite(t.clip_grad_norm) and t.clip_grad_norm >= 0, "train.clip_grad_norm",
           ">= 0 (0 = off)", t.clip_grad_norm)
    _check(t.comm_dtype == "float32" or m.dtype == "float32", "train.comm_dtype",
           f'"float32" when model.dtype = "{m.dtype}" (16-bit sums are of float32 gradients)',
           t.comm_dtype)
    _check(1 <= t.grains <= MAX_GRAINS, "train.grains", f"in [1, {MAX_GRAINS}]", t.grains)
    _check(not t.deterministic or t.grains <= t.batch_size, "train.grains",
           f"<= train.batch_size = {t.batch_size} when train.deterministic = true (a grain "
           "is at least one row)", t.grains)
    _check(not t.deterministic or t.accumulation_steps == 1, "train.accumulation_steps",
           "1 when train.deterministic = true (each rank already cuts its rows into "
           "grains: train.grains)", t.accumulation_steps)
    _check(not t.deterministic or t.comm_dtype == "float32", "train.comm_dtype",
           '"float32" when train.deterministic = true (16-bit sums are rounded in an order '
           "that depends on the world size)", t.comm_dtype)
    _check(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", ">= 0 (0 = off)",
           t.checkpoint_every_steps)
    validate_features(cfg)


def validate_features(cfg):
    """Range checks of the optimizer's keys, dropout and early stopping. Keys with no
    effect must keep their defaults (a value there would be ignored): those of the
    optimizer not chosen, and those of the data sources not chosen."""
    t, m, defaults = cfg.train, cfg.model, TrainConfig()
    _check(math.isfinite(m.dropout) and 0 <= m.dropout < 1, "model.dropout", "in [0, 1)",
           m.dropout)
    validate_layers(m)
    _check(len(t.betas) == 2 and all(math.isfinite(b) and 0 <= b < 1 for b in t.betas),
           "train.betas", "two numbers in [0, 1), [beta1, beta2]", list(t.betas))
    _check(math.isfinite(t.eps) and t.eps > 0, "train.eps", "a number > 0", t.eps)
    _unused(t, ("momentum", "nesterov") if t.optimizer == "adamw" else ("betas", "eps", "amsgrad"),
            defaults, f'with train.optimizer = "{t.optimizer}"')
    _unused(cfg.data, unused_data_keys(cfg.data.source), DataConfig(),
            f'with data.source = "{cfg.data.source}"')
    _check(t.early_stopping_patience >= 0, "train.early_stopping_patience", ">= 0 (0 = off)",
           t.early_stopping_patience)
    _check(math.isfinite(t.early_stopping_min_delta) and t.early_stopping_min_delta >= 0,
           "train.early_stopping_min_delta", ">= 0", t.early_stopping_min_delta)
    _check(cfg.run.best_metric != "val_accuracy" or t.loss == "cross_entropy", "run.best_metric",
           '"val_loss" when train.loss = "mse" (val_accuracy is a classifier\'s)',
           cfg.run.best_metric)
    validate_plateau(t, defaults)


def validate_plateau(t, defaults):
    """The plateau schedule's keys: in range, and at their defaults under another
    schedule, where they would have no effect."""
    _check(math.isfinite(t.plateau_factor) and 0 < t.plateau_factor < 1,
           "train.plateau_factor", "in (0, 1)", t.plateau_factor)
    _check(t.plateau_patience >= 0, "train.plateau_patience", ">= 0", t.plateau_patience)
    _check(math.isfinite(t.plateau_threshold) and t.plateau_threshold >= 0,
           "train.plateau_threshold", ">= 0", t.plateau_threshold)
    _check(t.plateau_cooldown >= 0, "train.plateau_cooldown", ">= 0", t.plateau_cooldown)
    _check(math.isfinite(t.min_lr) and t.min_lr >= 0, "train.min_lr", ">= 0", t.min_lr)
    if t.schedule != "plateau":
        for key in PLATEAU_KEYS:
            default = getattr(defaults, key)
            _check(getattr(t, key) == default, f"train.{key}",
                   f'left at its default {toml_value(default)}: it has no effect with '
                   f'train.schedule = "{t.schedule}" (it is the plateau schedule\'s)',
                   getattr(t, key))


def validate_layers(m):
    """model.layers: each table a layer that dpbp has, with arguments it takes (their
    shapes are checked against the data's at start-up); beside it, the keys of the
    multilayer perceptron at their defaults."""
    if not m.layers:
        return
    for i, spec in enumerate(m.layers):
        try:
            layer_specs.make(spec, i)
        except ValueError as e:
            raise UserError(f"config: model.layers: {e}") from None
    _unused(m, ("hidden", "activation", "dropout"), ModelConfig(),
            "beside model.layers, which gives the whole network")


def unused_data_keys(source):
    """The keys of [data] that have no effect with data.source = `source`."""
    return (["path"] if source == "synthetic" else ["samples"]) + (
        [] if source == "mnist" else ["mnist_t10k"])


def _parse_toml(text, where):
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: invalid TOML: {e}") from None
    except RecursionError:   # tomllib parses nested arrays and tables recursively
        raise UserError(f"{where}: invalid TOML: arrays or tables nested too deeply") from None


def named_set(text):
    """'--set TEXT' for a message, on one line (a value that spans lines, escaped)."""
    return f"--set {shown(text if chr(10) not in text else ascii(text)[1:-1])}"


def parse_override(text):
    """'section.key=VALUE' as {section: {key: value}}. VALUE is one TOML value (0.05,
    true, [256, 128], "npz"; an array may span lines); what is not TOML is taken as a
    bare string (npz, ~/data/x.npz), which the key's type then accepts or refuses. A
    value that spans lines must be one TOML value: text that parses as more than one
    (`0.1` and a line `x = 2` after it) is refused, never cut short."""
    name, sep, value = text.partition("=")
    parts = name.strip().split(".")
    where = named_set(text)
    if not sep or len(parts) != 2 or not all(parts):
        raise UserError(f"{where}: expected section.key=VALUE, e.g. --set train.lr=0.05")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")
    except (tomllib.TOMLDecodeError, RecursionError):
        parsed = None
    if parsed is not None and list(parsed) != ["v"]:
        raise UserError(f"{where}: the value holds more than one TOML value (a line "
                        f"{shown(', '.join(k for k in parsed if k != 'v'))} = ... after it); "
                        "give one value per --set")
    if parsed is None and "\n" in value.strip():
        raise UserError(f"{where}: the value spans lines but is not one TOML value; a bare "
                        "word (a string without quotes) is one line")
    return {parts[0]: {parts[1]: value.strip() if parsed is None else parsed["v"]}}


def load(path=None, overrides=(), base=None, check=True):
    """The resolved Config: `base` (the defaults unless given), then the TOML file at
    `path`, then each override; its file paths made absolute (resolved_paths). Unknown
    keys and wrong types are refused at once. Where they change the base's data.source,
    the base's keys of its old source go back to their defaults (a key that `path` or an
    override names stays, and is checked). check=False: types only, no ranges (a resumed
    run checks them once the checkpoint's config is the base)."""
    cfg = base or Config()
    if path:
        cfg = from_dict(_read_file(path), cfg, check=False, where=f"config file {path}")
    for text in overrides:
        cfg = from_dict(parse_override(text), cfg, check=False, where=named_set(text))
    if base is not None and cfg.data.source != base.data.source:
        named = named_keys(path, overrides)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **{
            key: getattr(DataConfig(), key) for key in unused_data_keys(cfg.data.source)
            if f"data.{key}" not in named}))
    if check:
        validate(cfg)
    return resolved_paths(cfg)


def _read_file(path):
    """The TOML file at `path` as nested dicts: a regular file of at most
    MAX_CONFIG_BYTES (a device, a pipe or a folder is refused before anything is read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)   # a pipe: no wait for a writer
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"config file {path}: not a regular file (a device, a pipe or "
                            "a folder); give a TOML file")
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise UserError(f"config file {path}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UserError(f"config file {path}: larger than {MAX_CONFIG_BYTES:,} bytes; a dpbp "
                        "config is a few hundred bytes of TOML: is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config file {path}: not UTF-8 text (TOML files are UTF-8)") from None
    return _parse_toml(text, f"config file {path}")


def named_keys(path=None, overrides=()):
    """The dotted keys that a config file and --set overrides name (load checked them)."""
    trees = ([_read_file(path)] if path else []) + [parse_override(t) for t in overrides]
    return {f"{section}.{key}" for tree in trees for section, values in tree.items()
            if isinstance(values, dict) for key in values}


def resolved_paths(cfg):
    """cfg with data.path and model.init absolute (~ expanded), so that the run
    remembers what it read wherever it is resumed or evaluated from. run.dir stays as
    given: it names the run in messages."""
    absolute = lambda p: os.path.abspath(os.path.expanduser(p)) if p else p   # noqa: E731
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, path=absolute(cfg.data.path)),
        model=dataclasses.replace(cfg.model, init=absolute(cfg.model.init)))


def from_toml(text, where="config"):
    """A Config from TOML text that dpbp saved (a checkpoint's, --print-config's). A key
    that it lacks was added after it was saved: it takes the value that stands for what
    the run did then (recorded_before), so an earlier run goes on as it was recorded."""
    return from_dict(recorded_before(_parse_toml(text, where)), where=where)


def recorded_before(tree):
    """`tree` (a saved config's {section: {key: value}}) as the run it was saved by
    behaved: keys added since then take the value of what the run did (data.mnist_t10k =
    "val": the mnist source validated on the t10k pair), and keys of the data sources
    that its run did not use, which had no effect (and are refused now), their defaults."""
    data = tree.get("data")
    if isinstance(data, dict):
        source = data.get("source", DataConfig.source)
        if source == "mnist" and "mnist_t10k" not in data:
            data["mnist_t10k"] = "val"
        for key in unused_data_keys(source) if source in CHOICES["data.source"] else ():
            data.pop(key, None)
    return tree


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):   # an inline table
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):   # a TOML basic string: JSON's escapes, and DEL's too
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(value)


def toml_key(key):
    """A key of an inline table: bare where TOML allows, else quoted."""
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else toml_value(key)


def to_toml(cfg):
    """The whole config as TOML text; `from_toml(to_toml(cfg)) == cfg`. A list of tables
    (model.layers) takes a line per table."""
    lines = []
    for section in _sections():
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            if value and isinstance(value, tuple) and isinstance(value[0], dict):
                lines += [f"{key} = ["] + [f"    {toml_value(v)}," for v in value] + ["]"]
                continue
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def defaults_by_section():
    """{section: {key: default as TOML text}}, for --help."""
    return {s: {k: toml_value(v) for k, v in dataclasses.asdict(getattr(Config(), s)).items()}
            for s in _sections()}


def flat(cfg):
    """{'section.key': value} for every key, for comparing two configs."""
    return {f"{s}.{k}": v for s in _sections()
            for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
