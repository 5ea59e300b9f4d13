"""The character-level language model: its data, its model and checkpoints, its training run, sampling."""
