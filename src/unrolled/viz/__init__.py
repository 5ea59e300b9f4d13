"""Pictures: the folded and unrolled graphs, gradients through time."""
