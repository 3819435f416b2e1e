"""Evaluation inside the train loop (`config.evals`, big_vision style): kNN, linear probe, CLIP zero-shot and
retrieval of the student every `config.eval_every` steps and at the end.

Each entry of `config.evals` is a dict (or the short form "KIND:DATA", e.g. "knn:mnist5k"):
  kind        knn | linear_probe | zeroshot | retrieval
  train       labeled images for the kNN memory bank / probe fit (split "train"): mnist5k, a class folder, tfds:NAME
  test        labeled images scored (split "test"; default: the train spec)
  retrieval   for kind retrieval: a jsonl of {"image": path, "captions": [...]}
  clip_text   for zeroshot / retrieval: the open_clip checkpoint of the (frozen) text tower, or a transformers
              CLIPModel / SiglipModel directory (its config.json gives the tower, its vocab.json + merges.txt /
              tokenizer.json or spiece.model the tokenizer)
  text_arch   for an open_clip checkpoint: its text preset or TextConfig .json (default: the model's arch name)
  bpe_vocab   CLIP's bpe_simple_vocab_16e6.txt.gz or a transformers directory with vocab.json + merges.txt
              (default: a CLIPModel directory's own, else the one open_clip_torch ships)
  classnames, templates   for zeroshot: files as for `dgmr-jax eval --classnames/--templates`
  name        the metrics' prefix, "eval/<name>/..." (default: the kind)
  batch, l2   eval batch and probe regularization (as `dgmr-jax eval`)
Every input is opened and checked, the text tower loaded, prompts embedded and image sets decoded once (those
that fit in CACHE_BYTES, whose captions are embedded then too) when the run starts, so a bad eval setting fails
before the first step. The student is evaluated exactly as `dgmr-jax eval` evaluates the model
directory the run would export at that step: the same evaluators (eval/evaluators.py) on the same config,
weights and preprocessing, on the run's mesh. The train step is not touched (the evaluation is its own jitted
forward): no recompile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh

from dgmr_jax.core.errors import UserError
from dgmr_jax.eval.evaluators import KINDS, Context, EvalSpec, make_evaluator, run_all
from dgmr_jax.models.config import ModelConfig

__all__ = ["KINDS", "EvalSpec", "InLoopEval", "parse_evals", "primary_metric"]

PRIMARY = {"knn": "knn@20", "linear_probe": "top1", "zeroshot": "top1", "retrieval": "image_to_text_R@1"}
CACHE_BYTES = 1 << 30  # eval images decoded once and kept in memory when they take at most this much


def parse_evals(entries: Any) -> list[EvalSpec]:
    """config.evals as EvalSpecs with unique names; "KIND:DATA" strings are short for {kind, train: DATA}."""
    specs, names = [], set()
    for entry in entries or ():
        if isinstance(entry, str):
            kind, sep, data = entry.partition(":")
            if not sep:
                raise UserError(f'config.evals entry {entry!r}: write "KIND:DATA" (e.g. "knn:mnist5k") or a dict')
            entry = {"kind": kind, "retrieval" if kind == "retrieval" else "train": data}
        if not isinstance(entry, Mapping):
            raise UserError(f"config.evals entries are dicts or 'KIND:DATA' strings, got {entry!r}")
        fields = {f.name for f in dataclasses.fields(EvalSpec)}
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise UserError(f"config.evals entry {dict(entry)}: unknown keys {unknown}; known: {sorted(fields)}")
        spec = EvalSpec(**dict(entry))
        name = spec.name or spec.kind
        if name in names:
            name = f"{name}_{len(specs)}"
        names.add(name)
        specs.append(dataclasses.replace(spec, name=name))
    return specs


def primary_metric(spec: EvalSpec) -> str:
    """The metric of an eval that best.json follows by default."""
    return f"eval/{spec.name}/{PRIMARY[spec.kind]}"


class InLoopEval:
    """The evals of a run, opened and checked up front; calling it scores one set of student weights."""

    def __init__(
        self, specs: list[EvalSpec], cfg: ModelConfig, meta: dict[str, Any], mesh: Mesh, img_size: int
    ) -> None:
        self.specs = specs
        self.ctx = Context(cfg, meta, img_size, mesh=mesh, cache_bytes=CACHE_BYTES)
        self.evaluators = [make_evaluator(spec, self.ctx) for spec in specs]

    def __call__(self, params: Any) -> dict[str, float]:
        """{"eval/<name>/<metric>": value} for every eval, on `params` (the student's weights as exported)."""
        out = {}
        for spec, metrics in zip(self.specs, run_all(self.evaluators, self.ctx, params), strict=True):
            out.update({f"eval/{spec.name}/{name}": value for name, value in metrics.items()})
        return out
