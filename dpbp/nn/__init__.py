"""The learning math: layers, losses, the model, optimizers, schedules. No MPI, no files, no config."""
