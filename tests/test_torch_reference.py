"""dpbp against PyTorch itself, where PyTorch happens to be installed (it is never a
dependency; CI skips this file). Weights move both ways with no conversion, and training
follows torch.nn.CrossEntropyLoss / MSELoss and torch.optim.SGD to float64 rounding."""

import numpy as np
import pytest

from dpbp.nn import noise
from tests.conftest import model_arrays, run_train

torch = pytest.importorskip("torch")

ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}


def assert_weights_are_torchs(checkpoint, net):
    """The checkpoint's weights are net's state dict, name for name, to 1e-10; returns
    them (model.0.weight, ...)."""
    final = model_arrays(checkpoint)
    want = {f"model.{k}": v.detach().numpy() for k, v in net.state_dict().items()}
    assert final.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(final[name], want[name], rtol=0, atol=1e-10, err_msg=name)
    return final


def state_dict(final):
    """A checkpoint's weights as a torch nn.Sequential's state dict: no conversion."""
    return {k[len("model."):]: torch.from_numpy(v) for k, v in final.items()}


def torch_mlp(widths, activation):
    layers = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(d_in, d_out, dtype=torch.float64))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("ranks,activation,loss", [
    (None, "relu", "cross_entropy"), (3, "tanh", "cross_entropy"), (2, "sigmoid", "mse")])
def test_training_matches_torch(tmp_path, ranks, activation, loss):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(17, 5))
    y = rng.integers(0, 3, size=17) if loss == "cross_entropy" else rng.normal(size=(17, 3))
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)

    torch.manual_seed(0)
    net = torch_mlp([5, 6, 4, 3], activation)
    init = tmp_path / "init.npz"
    np.savez(init, **{f"model.{k}": v.numpy() for k, v in net.state_dict().items()})

    sets = {"data.source": '"npz"', "data.path": f'"{data}"', "data.val_fraction": 0,
            "data.shuffle": "false", "model.hidden": "[6, 4]", "model.dtype": '"float64"',
            "model.activation": f'"{activation}"', "model.init": f'"{init}"',
            "train.loss": f'"{loss}"', "train.epochs": 2, "train.batch_size": 8,
            "train.lr": 0.1, "train.momentum": 0.9, "train.nesterov": "true",
            "train.weight_decay": 0.01, "run.dir": f'"{tmp_path / "run"}"'}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    r = run_train(args, ranks=ranks)
    assert r.returncode == 0, r.stderr

    criterion = torch.nn.CrossEntropyLoss() if loss == "cross_entropy" else torch.nn.MSELoss()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(2):
        for k in range(0, 17, 8):   # file order, global batches of 8, 8 and 1
            opt.zero_grad()
            criterion(net(xt[k:k + 8]), yt[k:k + 8]).backward()
            opt.step()

    final = assert_weights_are_torchs(tmp_path / "run" / "checkpoints" / "epoch-0002.npz", net)
    # and back: the checkpoint loads into torch with no conversion
    net.load_state_dict(state_dict(final))


class MaskDropout(torch.nn.Module):
    """Dropout with dpbp's masks (a function of seed, step, sample index, layer index and
    unit), so that both frameworks drop the same units; everything else, the scaling by
    1 / (1 - p), the place in the network and the gradient, is torch's."""

    def __init__(self, p, index):
        super().__init__()
        self.p, self.index, self.keys = p, index, None

    def forward(self, x):   # unit u of a row: its index in the row flattened, (C, H, W)
        out = np.empty((x.shape[0], int(np.prod(x.shape[1:]))), np.uint64)
        bits = noise.bits(self.keys, self.index, out, np.empty_like(out))
        kept = torch.from_numpy(bits >= np.uint64(int(self.p * 2.0**64))).reshape(x.shape)
        return x * kept * (1.0 / (1.0 - self.p))   # as torch.nn.Dropout scales


def torch_mlp_with_dropout(widths, p):
    layers = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(d_in, d_out, dtype=torch.float64))
        if i < len(widths) - 2:
            layers += [torch.nn.ReLU(), MaskDropout(p, len(layers) + 1)]
    return torch.nn.Sequential(*layers)


ADAMW_CASES = {   # ranks, and the train keys beyond optimizer = "adamw" and lr
    "serial-decay": (None, {"train.weight_decay": 0.01}),
    "2-amsgrad-cosine-warmup": (2, {"train.weight_decay": 0.05, "train.amsgrad": "true",
                                    "train.betas": "[0.8, 0.99]", "train.eps": 1e-6,
                                    "train.schedule": '"cosine"', "train.warmup_epochs": 1}),
    "3-clipped-warmup": (3, {"train.weight_decay": 0.01, "train.clip_grad_norm": 0.3,
                             "train.warmup_epochs": 1.5}),
    "3-amsgrad-dropout": (3, {"train.amsgrad": "true", "model.dropout": 0.3}),
}


@pytest.mark.parametrize("case", sorted(ADAMW_CASES))
def test_adamw_training_matches_torch(tmp_path, case):
    """AdamW for 4 epochs at 1, 2 and 3 ranks (global batches of 8, 8 and 1: uneven shards
    and ranks without rows), with weight decay, amsgrad, a schedule with warmup, clipping
    and dropout: the weights and moments of torch.optim.AdamW to 1e-10."""
    from dpbp.nn import schedule
    from dpbp.service import config

    ranks, keys = ADAMW_CASES[case]
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(17, 5)), rng.integers(0, 3, size=17)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    sets = {"data.source": '"npz"', "data.path": f'"{data}"', "data.val_fraction": 0,
            "data.shuffle": "false", "model.hidden": "[6, 4]", "model.dtype": '"float64"',
            "train.epochs": 4, "train.batch_size": 8, "train.optimizer": '"adamw"',
            "train.lr": 0.01, "run.dir": f'"{tmp_path / "run"}"', **keys}
    cfg = config.load(None, [f"{k}={v}" for k, v in sets.items()])
    tc, p = cfg.train, cfg.model.dropout

    torch.manual_seed(0)
    net = torch_mlp_with_dropout([5, 6, 4, 3], p) if p else torch_mlp([5, 6, 4, 3], "relu")
    init = tmp_path / "init.npz"
    np.savez(init, **{f"model.{k}": v.numpy() for k, v in net.state_dict().items()})
    r = run_train([a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
                  + ["--set", f'model.init="{init}"'], ranks=ranks)
    assert r.returncode == 0, r.stderr

    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, betas=tc.betas, eps=tc.eps,
                            weight_decay=tc.weight_decay, amsgrad=tc.amsgrad)
    criterion, xt, yt = torch.nn.CrossEntropyLoss(), torch.from_numpy(x), torch.from_numpy(y)
    for step in range(4 * 3):
        rows = np.arange(17)[(step % 3) * 8:][:8]     # file order, batches of 8, 8 and 1
        for module in net:
            if isinstance(module, MaskDropout):
                module.keys = noise.row_keys(cfg.run.seed, step, rows)
        for group in opt.param_groups:
            group["lr"] = schedule.lr_at(tc, step, 3)
        opt.zero_grad()
        criterion(net(xt[rows]), yt[rows]).backward()
        if tc.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(net.parameters(), tc.clip_grad_norm)
        opt.step()

    path = tmp_path / "run" / "checkpoints" / "epoch-0004.npz"
    final = assert_weights_are_torchs(path, net)
    if p:   # docs/operations.md's recipe: torch.nn.Dropout modules take the same places
        recipe = torch.nn.Sequential(
            torch.nn.Linear(5, 6, dtype=torch.float64), torch.nn.ReLU(), torch.nn.Dropout(p),
            torch.nn.Linear(6, 4, dtype=torch.float64), torch.nn.ReLU(), torch.nn.Dropout(p),
            torch.nn.Linear(4, 3, dtype=torch.float64))
        recipe.load_state_dict(state_dict(final))
    moments = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
    if tc.amsgrad:
        moments["max_exp_avg_sq"] = "max_exp_avg_sq"
    with np.load(path) as f:
        assert int(f["optimizer.step"]) == 12
        for name, torch_name in moments.items():
            flat = np.concatenate([opt.state[q][torch_name].numpy().ravel()
                                   for q in net.parameters()])
            np.testing.assert_allclose(f[f"optimizer.{name}"], flat, rtol=1e-9, atol=1e-12,
                                       err_msg=name)


# ----------------------------------------------------------------------------- images

def torch_layer(spec, shape):
    """torch.nn's module for a dpbp spec, for rows of `shape`."""
    from dpbp.bench import TORCH_LAYERS
    arguments = {k: v for k, v in spec.items() if k != "type"}
    return TORCH_LAYERS[spec["type"]](torch.nn, shape, **arguments).double()


IMAGE_NETWORKS = {
    "conv-pad-relu-max": ([{"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
                           {"type": "relu"}, {"type": "maxpool2d", "kernel_size": 2}], (2, 9, 11)),
    "conv-stride-avg-pad": ([{"type": "conv2d", "out_channels": 3, "kernel_size": [2, 3],
                              "stride": [2, 1], "padding": [1, 2]},
                             {"type": "avgpool2d", "kernel_size": 3, "stride": 2, "padding": 1}],
                            (3, 8, 7)),
    "nobias-max-overlapping": ([{"type": "conv2d", "out_channels": 2, "kernel_size": 1,
                                 "bias": False}, {"type": "tanh"},
                                {"type": "maxpool2d", "kernel_size": 3, "stride": 1,
                                 "padding": 1}], (3, 5, 5)),
}


@pytest.mark.parametrize("name", sorted(IMAGE_NETWORKS))
def test_image_layers_match_torch(name):
    """Forward, the input's gradient and the weights' in float64, then flatten and a
    linear: dpbp's weights loaded into torch.nn.Sequential with no conversion. Inputs
    rounded and rectified, so max pooling meets ties (torch's pick: the first largest)."""
    from dpbp.nn.model import Model, walk
    specs, shape = IMAGE_NETWORKS[name]
    specs = specs + [{"type": "flatten"}, {"type": "linear", "out_features": 3}]
    model = Model(specs, shape, np.float64)
    model.init_(np.random.default_rng(0))
    net = torch.nn.Sequential(*[torch_layer(spec, in_shape) for spec, (_, in_shape, _)
                                in zip(specs, walk(specs, shape)[0])])
    net.load_state_dict({k[len("model."):]: torch.from_numpy(v.copy())
                         for k, v in model.state_dict().items()})
    rng = np.random.default_rng(1)
    x = np.maximum(np.round(rng.normal(size=(2 + 19, *shape)), 1), 0)   # ties
    xt = torch.from_numpy(x)
    y, yt = model.forward(x), net(xt)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=1e-12)
    dy = rng.normal(size=y.shape)
    yt.backward(torch.from_numpy(dy))
    model.backward(dy.copy())
    grads = dict(zip(model.names, model.split(model.grads)))
    for key, param in net.named_parameters():
        np.testing.assert_allclose(grads[f"model.{key}"], param.grad.numpy(), rtol=0,
                                   atol=1e-11, err_msg=key)


def test_cnn_training_matches_torch(tmp_path, train):
    """A CNN with both poolings and dropout, from torch's initial weights (model.init),
    trained 2 epochs with SGD (momentum, Nesterov, weight decay): torch's weights to
    1e-10, and the checkpoint loads into the same torch.nn.Sequential."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(17, 1, 8, 8)), rng.integers(0, 3, size=17)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(3, 4, 2), torch.nn.AvgPool2d(2, stride=1, padding=1),
        MaskDropout(0.25, 5), torch.nn.Flatten(), torch.nn.Linear(64, 3)).double()
    init = tmp_path / "init.npz"
    np.savez(init, **{f"model.{k}": v.numpy() for k, v in net.state_dict().items()})
    layers = ('[{type = "conv2d", out_channels = 3, kernel_size = 3, padding = 1}, '
              '{type = "relu"}, {type = "maxpool2d", kernel_size = 2}, '
              '{type = "conv2d", out_channels = 4, kernel_size = 2}, '
              '{type = "avgpool2d", kernel_size = 2, stride = 1, padding = 1}, '
              '{type = "dropout", p = 0.25}, {type = "flatten"}, '
              '{type = "linear", out_features = 3}]')
    sets = {"data.source": '"npz"', "data.path": f'"{data}"', "data.val_fraction": 0,
            "data.shuffle": "false", "model.layers": layers, "model.dtype": '"float64"',
            "model.init": f'"{init}"', "train.epochs": 2, "train.batch_size": 8,
            "train.lr": 0.1, "train.momentum": 0.9, "train.nesterov": "true",
            "train.weight_decay": 0.01, "run.dir": f'"{tmp_path / "run"}"'}
    code, _, err = train([a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert code == 0, err

    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=0.01)
    criterion, xt, yt = torch.nn.CrossEntropyLoss(), torch.from_numpy(x), torch.from_numpy(y)
    for step in range(2 * 3):
        rows = np.arange(17)[(step % 3) * 8:][:8]     # file order, batches of 8, 8 and 1
        net[5].keys = noise.row_keys(0, step, rows)
        opt.zero_grad()
        criterion(net(xt[rows]), yt[rows]).backward()
        opt.step()
    final = assert_weights_are_torchs(tmp_path / "run" / "checkpoints" / "epoch-0002.npz", net)
    # docs/operations.md: the checkpoint into torch, with torch's own Dropout
    recipe = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(3, 4, 2), torch.nn.AvgPool2d(2, stride=1, padding=1),
        torch.nn.Dropout(0.25), torch.nn.Flatten(), torch.nn.Linear(64, 3)).double()
    recipe.load_state_dict(state_dict(final))
