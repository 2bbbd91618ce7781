"""The run around the algorithm: config, data, files, the run directory, checkpoints, supervision."""
