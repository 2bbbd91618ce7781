"""A recipe's accuracy in dpbp next to the same recipe in PyTorch, seed by seed, side by side.

    python launch/recipe_vs_torch.py --config configs/mnist-cnn.toml \
        [--set SECTION.KEY=VALUE ...] [--seeds 0 1 2] [--ranks 2] [--split test] [--out DIR]

For each seed in turn: dpbp trains the config under `mpirun -n RANKS` (run.seed = the
seed, run.dir under --out) and dpbp.evaluate measures its last checkpoint on --split
(test: mnist's t10k pair; val for data without a test set, as the synthetic digits);
then PyTorch trains the same recipe in this process and is measured on the same rows.
Prints one line per run and the mean of each side; --json adds a JSON summary.

The same recipe in PyTorch means: the same data and split (read by dpbp's own loader,
with the seed), the same network as torch.nn modules (dpbp.bench's table), torch's own
initial weights (torch.manual_seed(seed)) and its own dropout masks, torch.optim.SGD or
AdamW with the config's settings, the learning rate of every step from dpbp's schedule
(warmup, cosine, ...), the same global batches in the same order (dpbp's epoch order for
the seed), cross-entropy averaged over each batch, and evaluation in eval() mode. Both
sides compute in the config's dtype. PyTorch uses --torch-threads threads (default: as
many as dpbp's ranks use in all).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import mpi_launcher   # launch/mpi_launcher.py, beside this script

from dpbp.bench import Net, torch_network
from dpbp.nn.schedule import base_lr, lr_at
from dpbp.parallel import sharding
from dpbp.service import config, data, network


def dpbp_run(args, seed, run_dir):
    """(accuracy, seconds) of dpbp on the recipe at `seed`."""
    sets = [a for s in args.set + [f"run.seed={seed}", f'run.dir="{run_dir}"']
            for a in ("--set", s)]
    start = time.perf_counter()
    subprocess.run(mpi_launcher.mpirun(args.ranks, "recipe_vs_torch")
                   + [sys.executable, "-m", "dpbp.train", "--config", args.config, *sets],
                   check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    out = subprocess.run(mpi_launcher.mpirun(args.ranks, "recipe_vs_torch")
                         + [sys.executable, "-m", "dpbp.evaluate", "--checkpoint", str(run_dir),
                            "--split", args.split, "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["accuracy"], seconds


def torch_run(torch, cfg, seed, threads, split):
    """(accuracy on `split`, seconds) of PyTorch on the recipe `cfg` (run.seed = seed)."""
    torch.set_num_threads(threads)
    tc, images = cfg.train, bool(cfg.model.layers)
    d = data.load(cfg.data, tc.loss, cfg.model.dtype, seed, cfg.model.classes, images=images)
    if split == "test":
        x_eval, y_eval = data.load_test(cfg.data, tc.loss, cfg.model.dtype, d, images=images)
    else:
        x_eval, y_eval = d.x_val, d.y_val
    torch.manual_seed(seed)
    specs = network.from_config(cfg.model, d.num_outputs)
    net = torch_network(torch, Net(specs, d.row_shape, cfg.model.dtype))
    if tc.optimizer == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=base_lr(tc), betas=tc.betas, eps=tc.eps,
                                weight_decay=tc.weight_decay, amsgrad=tc.amsgrad)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=base_lr(tc), momentum=tc.momentum,
                              nesterov=tc.nesterov, weight_decay=tc.weight_decay)
    x, y = torch.from_numpy(np.asarray(d.x)), torch.from_numpy(d.y)
    criterion, steps, step = torch.nn.CrossEntropyLoss(), sharding.num_batches(len(x),
                                                                               tc.batch_size), 0
    start = time.perf_counter()
    net.train()
    for epoch in range(tc.epochs):
        order = sharding.epoch_order(len(x), seed, epoch, cfg.data.shuffle)
        for rows in sharding.global_batches(order, tc.batch_size):
            for group in opt.param_groups:
                group["lr"] = lr_at(tc, step, steps)
            rows = torch.from_numpy(rows)
            opt.zero_grad()
            criterion(net(x[rows]), y[rows]).backward()
            if tc.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(net.parameters(), tc.clip_grad_norm)
            opt.step()
            step += 1
    seconds = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(torch.from_numpy(np.asarray(x_eval[k:k + 1000]))).argmax(1)
                               for k in range(0, len(x_eval), 1000)])
    return float((predicted.numpy() == y_eval).mean()), seconds


PARSER = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
PARSER.add_argument("--config", required=True)
PARSER.add_argument("--set", action="append", default=[])
PARSER.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
PARSER.add_argument("--ranks", type=int, default=2)
PARSER.add_argument("--torch-threads", type=int)
PARSER.add_argument("--split", choices=("test", "val"), default="test")
PARSER.add_argument("--out", default="runs/recipe-vs-torch")
PARSER.add_argument("--json", action="store_true")

if __name__ == "__main__":
    args = PARSER.parse_args()
    import torch
    cfg = config.load(args.config, args.set)
    threads = args.torch_threads or args.ranks * int(os.environ.get("OMP_NUM_THREADS", "1"))
    results = {"dpbp": [], "torch": []}
    for seed in args.seeds:
        acc, s = dpbp_run(args, seed, os.path.join(args.out, f"seed-{seed}"))
        results["dpbp"].append(acc)
        print(f"seed {seed}  dpbp   {100 * acc:.2f} %  {s:.0f} s (mpirun -n {args.ranks}, "
              "training and start-up)", flush=True)
        seeded = config.load(args.config, args.set + [f"run.seed={seed}"])
        acc, s = torch_run(torch, seeded, seed, threads, args.split)
        results["torch"].append(acc)
        print(f"seed {seed}  torch  {100 * acc:.2f} %  {s:.0f} s ({threads} threads, "
              "training)", flush=True)
    means = {k: statistics.mean(v) for k, v in results.items()}
    print(f"mean ({args.split}, {len(args.seeds)} seeds): dpbp {100 * means['dpbp']:.2f} %, "
          f"torch {100 * means['torch']:.2f} %, difference "
          f"{100 * (means['dpbp'] - means['torch']):+.2f} points")
    if args.json:
        print(json.dumps({"split": args.split, "seeds": args.seeds, **results}))
