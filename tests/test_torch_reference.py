"""dpbp against PyTorch itself, where PyTorch happens to be installed (it is never a
dependency; CI skips this file). Weights move both ways with no conversion, and training
follows torch.nn.CrossEntropyLoss / MSELoss and torch.optim.SGD to float64 rounding."""

import numpy as np
import pytest

from tests.conftest import model_arrays, run_train

torch = pytest.importorskip("torch")

ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}


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

    final = model_arrays(tmp_path / "run" / "checkpoints" / "epoch-0002.npz")
    want = {f"model.{k}": v.detach().numpy() for k, v in net.state_dict().items()}
    assert final.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(final[name], want[name], rtol=0, atol=1e-10, err_msg=name)
    # and back: the checkpoint loads into torch with no conversion
    net.load_state_dict({k[len("model."):]: torch.from_numpy(v) for k, v in final.items()})
