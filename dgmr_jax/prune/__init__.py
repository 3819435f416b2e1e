"""DGMR pruning: neuron selection, functional MLP slicing, cost accounting."""

from dgmr_jax.prune.cost import count_flops, count_params, layer_macs
from dgmr_jax.prune.select import select_neurons

__all__ = ["count_flops", "count_params", "layer_macs", "select_neurons"]
