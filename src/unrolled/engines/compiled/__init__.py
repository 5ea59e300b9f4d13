"""The compiled engine: a plan from the folded graph, code generated from it, the strategies that run it."""
