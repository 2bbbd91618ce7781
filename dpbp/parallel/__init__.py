"""The data-parallel layer: MPI verbs, the sharding of rows, BLAS threads, exact sums, the training step and sharded evaluation."""
