"""Apply a trained network to new inputs: class probabilities or regression outputs.

    python -m dpbp.predict --checkpoint runs/default/checkpoints/epoch-0010.npz \
                           --input x.npy --output probabilities.npy

The input is a .npy of n rows of the shape the network was trained on (its checkpoint
records it): (n, features), or images (n, C, H, W) for a network of model.layers that
takes them. For a cross-entropy network the output is float64 (n, classes): the softmax of the
network's outputs, each row summing to 1. For an MSE network it is the outputs
themselves, float64 (n, outputs) (with integer labels, the per-class scores). Under
`mpirun -n N` every rank computes its share of the rows, in blocks at fixed offsets (so
each row's output is the same at any world size), the shares are gathered, and rank 0
alone writes the file, atomically; the input is never overwritten.
"""

import argparse
import os

import numpy as np

from dpbp.errors import ArgumentParser, UserError
from dpbp.parallel import comm as mpi
from dpbp.parallel.evaluation import outputs
from dpbp.parallel.threads import limit_blas_threads
from dpbp.service import config
from dpbp.service.data import rows_described
from dpbp.service.files import write_atomic
from dpbp.service.restore import load_checkpoint, restore_model


def open_input(path, input_shape):
    """The input array at `path`, memory-mapped, checked against a network that takes
    rows of `input_shape`; UserError naming the file otherwise."""
    if not os.path.isfile(path):
        raise UserError(f"--input: no such file {path}")
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise ValueError("it does not start with the .npy magic string; save the "
                                 "inputs with numpy.save")
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"--input {path}: not a readable .npy file ({e})") from None
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UserError(f"--input {path}: must hold numbers, got dtype {x.dtype}")
    takes = f"(n, {', '.join(map(str, input_shape))})"
    if x.shape == tuple(input_shape):
        raise UserError(f"--input {path}: shape {x.shape} is one sample; the network takes "
                        f"{takes}: save it as x[None]")
    if x.shape[1:] != tuple(input_shape) or x.ndim == 0:
        raise UserError(f"--input {path}: shape {x.shape}, but the network takes "
                        f"{takes}: n samples of {rows_described(input_shape)}")
    return x


def check_output(path, input_path):
    """The output may be written: a .npy path, not the input, in an existing folder."""
    if not path.endswith(".npy"):
        raise UserError(f"--output {path}: must name a .npy file")
    if os.path.realpath(path) == os.path.realpath(input_path) or (
            os.path.exists(path) and os.path.samefile(path, input_path)):
        raise UserError(f"--output {path} is the input file; choose another name")
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a folder; name a .npy file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--output {path}: {folder} is not a writable folder")


def main(argv=None):
    comm = mpi.init()
    with mpi.agreement(comm):
        args = PARSER.parse_args(argv)
    if PARSER.answered(args, print if comm.rank == 0 else lambda *a: None):
        return 0
    state, saved_toml, layers, args.checkpoint = load_checkpoint(comm, args.checkpoint)
    with mpi.agreement(comm):
        cfg = config.from_toml(saved_toml, f"checkpoint {args.checkpoint}")
        if comm.rank == 0:
            check_output(args.output, args.input)
    limit_blas_threads(comm.ranks_sharing_cores, cfg.train.deterministic)   # as the run
    model = restore_model(comm, state, args.checkpoint, layers, cfg.model.dtype)
    with mpi.agreement(comm):
        x = open_input(args.input, model.input_shape)
    probabilities = cfg.train.loss == "cross_entropy"
    out = outputs(model, x, cfg.model.dtype, probabilities, comm, f"--input {args.input}")
    with mpi.agreement(comm):
        if comm.rank == 0:
            try:
                write_atomic(args.output, lambda f: np.save(f, out))
            except OSError as e:
                raise UserError(f"--output {args.output}: cannot write it ({e.strerror})"
                                ) from None
            what = "class probabilities" if probabilities else "outputs"
            print(f"wrote {args.output}: {what} {out.shape} float64 for {len(x)} samples "
                  f"of {args.input}")
    return 0


PARSER = ArgumentParser(
    prog="python -m dpbp.predict", add_help=False,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Apply a checkpoint's network to new inputs. A cross-entropy network "
                "gives class\nprobabilities (n, classes), rows summing to 1; an MSE network "
                "its outputs (n, outputs).\nBoth are float64. Under mpirun -n N the rows are "
                "shared over the ranks; rank 0 writes.",
    epilog="exit codes: 0 done; 2 bad input (checkpoint, input, output path), reported once.")
PARSER.add_argument("-h", "--help", action="store_true", help="show this help and exit")
PARSER.add_argument("--checkpoint", metavar="PATH", required=True,
                    help="a checkpoint written by dpbp.train, or a run directory: its newest "
                         "valid checkpoint")
PARSER.add_argument("--input", metavar="X.npy", required=True,
                    help="inputs, a .npy of shape (n, features), or (n, C, H, W) for a "
                         "network that takes images; numbers, finite")
PARSER.add_argument("--output", metavar="Y.npy", required=True,
                    help="where to write the predictions (.npy, written atomically; "
                         "never the input)")


def cli():
    mpi.run(main)


if __name__ == "__main__":
    cli()
