"""dpbp: data-parallel backpropagation for multilayer perceptrons on numpy and MPI."""

__version__ = "0.1.0"
