"""UVC (Unified Visual Transformer Compression, Yu et al., ICLR 2022): the search math.

flops: the resource function R; masks: counts -> unit masks; config: SearchConfig and its checks; state: the
search pytree; objective: the Lagrangian's terms and the dual / proximal updates; search: the pure search step;
extract: the Plan of a finished search and its greedy budget repair.
"""

from dgmr_jax.uvc.config import SearchConfig, check_search
from dgmr_jax.uvc.extract import Extraction, extract, repair_bounds
from dgmr_jax.uvc.flops import flops_ratio, layer_flops, masks_ratio, model_flops, plan_flops, plan_ratio
from dgmr_jax.uvc.masks import GroupNorms, Masks, group_norms, masks_from_counts, unit_mask
from dgmr_jax.uvc.search import (
    Optimizers,
    deterministic_ratio,
    init_search_state,
    make_optimizers,
    make_search_step,
)
from dgmr_jax.uvc.state import Counts, Duals, SearchState, SearchVars

__all__ = [
    "Counts",
    "Duals",
    "Extraction",
    "GroupNorms",
    "Masks",
    "Optimizers",
    "SearchConfig",
    "SearchState",
    "SearchVars",
    "check_search",
    "deterministic_ratio",
    "extract",
    "flops_ratio",
    "group_norms",
    "init_search_state",
    "layer_flops",
    "make_optimizers",
    "make_search_step",
    "masks_from_counts",
    "masks_ratio",
    "model_flops",
    "plan_flops",
    "plan_ratio",
    "repair_bounds",
    "unit_mask",
]
