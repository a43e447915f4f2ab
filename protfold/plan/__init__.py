"""The memory plan: a fitted cost model of a training step per memory preset, and the `auto` choice."""
