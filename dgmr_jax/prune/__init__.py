"""DGMR pruning: neuron selection, functional MLP slicing, streamed pruning (and the cost counters of
dgmr_jax.models.cost, re-exported as the public API names them)."""

from dgmr_jax.models.cost import count_flops, count_params, layer_macs
from dgmr_jax.prune.mlp import LayerReport, prune_mlp, prune_source, prune_to_dir, target_widths
from dgmr_jax.prune.select import select_neurons

__all__ = [
    "LayerReport",
    "count_flops",
    "count_params",
    "layer_macs",
    "prune_mlp",
    "prune_source",
    "prune_to_dir",
    "select_neurons",
    "target_widths",
]
