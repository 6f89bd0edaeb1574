"""The training loop, objectives, checkpoints and run outputs."""
