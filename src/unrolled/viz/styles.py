"""The look shared by both renderers (DOT and matplotlib): fills, colours, abbreviations.

One table, so that the Graphviz picture and the matplotlib picture of a graph
use the same colour for the same kind of node.
"""

# Fill colours by node kind.
FILL = {
    "input": "#cfe2f3",
    "op": "#ffffff",
    "state": "#fff2cc",
    "output": "#d9ead3",
    "loss": "#f4cccc",
    "param": "#e6e6e6",
    "init": "#fff2cc",
}
DELAY_COLOR = "#cc0000"
# One colour per parameter for its edges in the unrolled picture (cycled).
PARAM_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")

OP_ABBREVIATIONS = {"cross_entropy": "x-entropy", "log_softmax": "log_smax", "one_minus": "1-x", "embedding": "embed"}
