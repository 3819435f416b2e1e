"""`dgmr-jax finetune-text`: fine-tune a CLIP text tower contrastively against a frozen (pruned, distilled)
image tower, the last DGMR stage.

The image tower never changes, so every image is embedded once, before training, and the embeddings are kept
in the workdir (image_embeddings.npy, pairs.json) for resumed runs. Training records are (image embedding,
one caption's tokens) pairs; the trained set is the whole text tower and the logit scale. The run goes through
the shared train loop (train/loop.py): Orbax resume with the grain iterator state, SIGTERM save-and-stop,
metrics.jsonl / TensorBoard, retrieval recall (and zero-shot accuracy) as the in-loop evaluation (the evaluators
of eval/evaluators.py, run on the text params with the image embeddings fixed), best.json. At
the end WORKDIR/text holds the tower in the checkpoint's own layout (and, for CLIP-family vision towers, a
merged CLIP state dict).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.parallel import (
    batch_sharding,
    check_batch,
    make_mesh,
    maybe_initialize_distributed,
    replicated,
    sync_processes,
    to_host,
)
from dgmr_jax.core.paths import PathLike, as_path, canonical, is_uri
from dgmr_jax.data import EvalBatches, Pairs, require_good, warn_bad
from dgmr_jax.eval.evaluators import Context, Embedded, EvalSpec, Evaluator, RetrievalEval, TextTower, ZeroShotEval
from dgmr_jax.eval.features import extract_features
from dgmr_jax.io.checkpoint_io import open_state_dict, save_safetensors
from dgmr_jax.io.clip import clip_embedding, text_source
from dgmr_jax.io.hf_config import TEXT_CLASSES, hf_class
from dgmr_jax.io.open import open_model
from dgmr_jax.io.text_convert import text_from_torch, text_layout, text_to_torch
from dgmr_jax.models.preprocess import Preprocess
from dgmr_jax.models.text import TextConfig, encode_text, init_text_params, text_logical_axes, text_param_shapes
from dgmr_jax.models.tokenizer import Tokenizer
from dgmr_jax.text_stage.pairs import read_pairs
from dgmr_jax.train import workdir as workdir_lib
from dgmr_jax.train.checkpoint import abstract_with_shardings
from dgmr_jax.train.defaults import loop_settings
from dgmr_jax.train.logs import JsonlLog, read_rows
from dgmr_jax.train.loop import Loop, run_loop
from dgmr_jax.train.run import optim_config, use_compile_cache
from dgmr_jax.train.state import (
    OptimConfig,
    TrainState,
    init_state,
    lr_schedule,
    make_optimizer,
    shardings_like_params,
)

EMBEDDINGS, PAIRS_FILE, TEXT_DIR = "image_embeddings.npy", "pairs.json", "text"
MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the learned temperature to at most 100
BEST_METRIC = "eval/retrieval/mean_recall"


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Symmetric CLIP loss of a batch of matching (image, text) rows: L2-normalize both, logits =
    exp(min(logit_scale, log 100)) * img @ txt.T, mean of the cross-entropies over rows (image -> text) and
    columns (text -> image), the diagonal being the positives.

    Inside a jitted step over a globally sharded batch the (b, b) matmul spans every device's examples, so
    each example's negatives are the whole global batch, as open_clip's gather_with_grad (all-gather of the
    features, gradients flowing through) gives them; XLA inserts the collectives.
    """
    image_emb = image_emb / jnp.linalg.norm(image_emb, axis=-1, keepdims=True)
    text_emb = text_emb / jnp.linalg.norm(text_emb, axis=-1, keepdims=True)
    scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE))
    logits = scale * image_emb @ text_emb.T
    labels = jnp.arange(len(logits))
    rows = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    cols = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return (rows.mean() + cols.mean()) / 2


def decay_mask(params: Any) -> Any:
    """open_clip's weight-decay rule: matrices decay; gains, biases and logit_scale (ndim < 2) do not."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_text_step(text_cfg: TextConfig, optimizer: optax.GradientTransformation, opt: OptimConfig):
    """Pure step (state, {"image_emb", "tokens"}) -> (state, metrics): text forward, CLIP loss against the
    frozen image embeddings, AdamW update, logit_scale clamped to [0, log 100] as open_clip does after each step."""
    schedule = lr_schedule(opt)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        def loss_fn(params):
            text = encode_text(text_cfg, params, batch["tokens"]).astype(jnp.float32)
            return clip_loss(batch["image_emb"].astype(jnp.float32), text, params["logit_scale"])

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)}
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "logit_scale": jnp.exp(params["logit_scale"]),
        }
        return TrainState(state.step + 1, params, opt_state, None), metrics

    return step


class CaptionRecords:
    """Grain source of training records: record j is caption j with the embedding of its image."""

    def __init__(self, image_emb: np.ndarray, tokens: np.ndarray, owners: np.ndarray, fingerprint: str) -> None:
        self.image_emb, self.tokens, self.owners, self.fingerprint = image_emb, tokens, owners, fingerprint

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, j: int) -> dict[str, np.ndarray]:
        return {
            "image_emb": self.image_emb[self.owners[j]],
            "tokens": self.tokens[j],
            "index": np.int64(j),
            "skipped": np.int32(0),
        }

    def __repr__(self) -> str:  # in the iterator state: a resume on other pairs fails
        return f"CaptionRecords(pairs={self.fingerprint[:16]}, captions={len(self)})"


def make_caption_loader(
    records: CaptionRecords, global_batch: int, seed: int, shard_index: int = 0, shard_count: int = 1
) -> grain.DataLoader:
    """Per-host batches {"image_emb" (b, E) float32, "tokens" (b, L) int32, "index" (b,) int64, "skipped" (b,)
    int32 zeros}, b = global_batch // shard_count, shuffled by `seed`, repeating forever. As data.make_loader:
    one global stream, host h taking positions h, h + P, ..., so global batch k is the same on 1 or P hosts."""
    per_host = global_batch // shard_count
    if len(records) // shard_count < per_host:
        raise UserError(
            f"{len(records)} captions are fewer than one global batch of {global_batch}: lower "
            "--config.global_batch or add pairs"
        )
    sampler = grain.samplers.IndexSampler(
        num_records=len(records), shard_options=grain.sharding.NoSharding(), shuffle=True, num_epochs=None, seed=seed
    )
    return grain.DataLoader(
        data_source=records,
        sampler=sampler,
        operations=[grain.transforms.Batch(per_host, drop_remainder=True)],
        worker_count=0,
        shard_options=grain.sharding.ShardOptions(
            shard_index=shard_index, shard_count=shard_count, drop_remainder=True
        ),
    )


@dataclasses.dataclass
class TextStep:
    text_cfg: TextConfig  # with the compute dtype of config.text.dtype
    state_shapes: TrainState
    state_sh: TrainState
    fn: Any  # jitted (state, {"image_emb", "tokens"}) -> (state, metrics)
    init: Any  # float32 text params -> fresh TrainState


def build_text_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, text_cfg: TextConfig) -> TextStep:
    """The sharded, jitted text-tower step: params by their logical axes (optimizer moments like their param),
    batches over the mesh's data axes."""
    opt = optim_config(config)
    text_cfg = text_cfg.replace(dtype=config.text.dtype)
    tx = make_optimizer(opt, decay_mask=decay_mask)
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), text_param_shapes(text_cfg))
    init = lambda params: init_state(params, tx, ema=False)  # noqa: E731
    state_shapes = jax.eval_shape(init, shapes)
    state_sh = shardings_like_params(text_logical_axes(text_cfg), shapes, state_shapes, mesh, "text params")
    bs = batch_sharding(mesh)
    fn = jax.jit(
        make_text_step(text_cfg, tx, opt),
        in_shardings=(state_sh, {"image_emb": bs, "tokens": bs}),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=(0,),
    )
    return TextStep(text_cfg, state_shapes, state_sh, fn, init)


def signature(config: ml_collections.ConfigDict, model: str, clip_text: str, text_arch: str, pairs: str) -> dict:
    """What a text run's checkpoints and data-iterator state depend on (not the schedule: runs may be extended)."""
    d = config.data
    sig = {
        "model": canonical(model),
        "clip_text": canonical(clip_text),
        "text_arch": text_arch,
        "pairs": canonical(pairs),
    }
    if pairs.startswith("tfds:"):
        sig.update({f"data.{k}": d[k] for k in ("split", "data_dir", "image_key", "caption_key")})
    if pairs == "mnist5k":
        sig["data.split"] = d.split
    sig.update({"data.img_size": d.img_size, "data.seed": d.seed, "global_batch": config.global_batch})
    return sig


def _embed(cfg, params, meta, source: Any, img_size: int, batch: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """CLIP image embeddings of the readable images of an image source and the index of each row."""
    key = clip_embedding(cfg)[0]
    view = Preprocess.from_meta(meta, cfg.name).eval_view(img_size)
    batches = EvalBatches(source, batch_size=batch, img_size=img_size, **view)
    desc = f"{what} image embeddings ({len(source)} images, {img_size} px)"
    # every process embeds every image on its own devices: the embeddings are host arrays each process holds
    mesh = make_mesh(devices=jax.local_devices())
    return extract_features(cfg, params, batches, key, return_index=True, desc=desc, mesh=mesh)


def tokenize(tokenizer: Tokenizer, captions: list[str], length: int, chunk: int = 4096) -> np.ndarray:
    """(len(captions), length) token ids, with a progress bar for long lists (the BPE runs in Python)."""
    from tqdm.auto import tqdm

    starts = range(0, len(captions), chunk)
    bar = tqdm(starts, desc=f"tokenizing {len(captions)} captions", unit="chunk", disable=len(captions) <= 4 * chunk)
    return np.concatenate([tokenizer(captions[i : i + chunk], context_length=length) for i in bar])


def _unreadable(pairs: Pairs, kept: np.ndarray) -> dict[int, str]:
    return {int(i): "unreadable image" for i in np.setdiff1d(np.arange(len(pairs)), kept)}


def frozen_embeddings(
    workdir: epath.Path,
    pairs: Pairs,
    model_spec: str,
    source: Any,
    params: Callable[[], Any],
    img_size: int,
    batch: int,
) -> tuple[Pairs, np.ndarray]:
    """(the pairs whose image decodes, their image embeddings): computed once and kept in the workdir; a
    resumed run reads them back after checking they belong to the same pairs, model and size (before the run's
    first saved step, embeddings of other inputs are replaced)."""
    record = {"fingerprint": pairs.fingerprint(), "model": canonical(model_spec), "img_size": img_size}
    meta_path, emb_path = workdir / PAIRS_FILE, workdir / EMBEDDINGS
    saved = json.loads(meta_path.read_text()) if meta_path.exists() and emb_path.exists() else None
    diffs = [k for k in record if saved and not workdir_lib.same_input(saved.get(k), record[k])]
    if diffs and workdir_lib.saved_steps(workdir):
        raise UserError(
            f"{meta_path} holds image embeddings of other inputs ({', '.join(diffs)} differ): the pairs changed "
            "since the run started; use a new --workdir"
        )
    if saved and not diffs:
        with emb_path.open("rb") as f:
            emb = np.load(f)
        kept = np.asarray(saved["kept"], np.int64)
        if emb.shape[0] != len(kept):
            raise UserError(f"{emb_path} has {emb.shape[0]} rows for {len(kept)} images: use a new --workdir")
        print(f"finetune-text: reusing the {len(kept)} image embeddings in {emb_path}", file=sys.stderr)
    else:
        emb, kept = _embed(source.cfg, params(), source.meta, pairs.source, img_size, batch, "training")
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
            with emb_path.open("wb") as f:
                np.save(f, emb.astype(np.float32))
            unreadable = [pairs.names[i] for i in _unreadable(pairs, kept)]
            meta_path.write_text(json.dumps({**record, "kept": kept.tolist(), "unreadable": unreadable}, indent=1))
        sync_processes(f"dgmr_jax.text_embeddings:{workdir}")
    return pairs.drop(_unreadable(pairs, kept)), emb.astype(np.float32)


@dataclasses.dataclass
class _Inputs:
    """Everything finetune-text reads and checks before any image is embedded."""

    source: Any  # the frozen image tower (io.open_model)
    clip_text: str
    train: Pairs
    held_out: Pairs | None
    tokenizer: Tokenizer
    text_cfg: TextConfig
    text_params: Any
    layout: str  # the checkpoint's text-tower layout (io.text_convert.LAYOUTS), kept on export
    prefix: str  # the checkpoint's text-tower key prefix, kept on export
    dtypes: Any  # the checkpoint's dtypes, kept on export
    sig: dict
    img_size: int


def _read_pairs(config: ml_collections.ConfigDict, pairs: str, eval_pairs: str | None) -> tuple[Pairs, Pairs | None]:
    d = config.data
    read = dict(split=d.split, data_dir=d.data_dir or None, image_key=d.image_key, caption_key=d.caption_key)
    train = read_pairs(pairs, **read)
    require_good(train)
    held_out = read_pairs(eval_pairs, **read) if eval_pairs else None
    if held_out is not None:
        require_good(held_out)
    return train, held_out


def open_inputs(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    model: str,
    clip_text: str | None,
    pairs: str,
    text_arch: str | None,
    eval_pairs: str | None,
    bpe_vocab: str | None,
) -> _Inputs:
    """Open the image tower, read the pairs, check a resumed run's inputs and read the text tower: everything
    that can fail on a bad input fails here, before any image is embedded."""
    source = open_model(model, img_size=config.data.img_size or None)  # (the size of a preset or ONNX tower)
    # the embedding widths agree and the tokenizer fits, before any read
    _, text_cfg, tokenizer = text_source(clip_text, source.cfg, text_arch, bpe_vocab)
    train, held_out = _read_pairs(config, pairs, eval_pairs)
    if config.text.random_init:
        clip_text = f"random init of {text_cfg.name} (seed {config.text.seed})"
    sig = signature(config, model, clip_text, text_cfg.name, pairs)
    workdir_lib.check_resume(workdir, sig)
    use_compile_cache(config, workdir)
    if config.text.random_init:
        layout, prefix, text_params = "open_clip", "", init_text_params(text_cfg, config.text.seed)
    else:
        raw = open_state_dict(clip_text)
        layout, prefix = text_layout(raw)
        text_cfg, text_params = text_from_torch(raw, text_cfg, layout)
        del raw
    dtypes = jax.tree_util.tree_map(lambda p: np.asarray(p).dtype, text_params)
    img_size = config.data.img_size or source.cfg.img_size
    return _Inputs(
        source, clip_text, train, held_out, tokenizer, text_cfg, text_params, layout, prefix, dtypes, sig, img_size
    )


class _VisionParams:
    """The frozen image tower's weights, read on first use (a resume reuses the stored embeddings) and dropped
    before training."""

    def __init__(self, source: Any) -> None:
        self.source, self.params = source, None

    def __call__(self) -> Any:
        if self.params is None:
            self.params = self.source.load()
        return self.params


def _eval_retrieval(
    config: ml_collections.ConfigDict, inputs: _Inputs, train: tuple[Pairs, np.ndarray], vision: _VisionParams
) -> tuple[Pairs, np.ndarray]:
    """(pairs, image embeddings) that retrieval is evaluated on: the held-out pairs (embedded here, their
    unreadable images left out) or else the training pairs; the first config.eval_images of them."""
    pairs, emb = train
    if inputs.held_out is not None:
        d, cfg = config.data, inputs.source.cfg
        emb, kept = _embed(
            cfg, vision(), inputs.source.meta, inputs.held_out.source, inputs.img_size, d.embed_batch, "eval"
        )
        pairs = inputs.held_out.drop(_unreadable(inputs.held_out, kept))
        warn_bad(pairs, "eval pairs")
    pairs = pairs.first(config.eval_images)
    return pairs, emb[: len(pairs)]


def text_evaluators(
    config: ml_collections.ConfigDict,
    inputs: _Inputs,
    text_cfg: TextConfig,
    train: tuple[Pairs, np.ndarray],
    vision: _VisionParams,
) -> dict[str, Evaluator]:
    """The in-loop evaluators of the text tower being trained (eval/evaluators.py, on fixed image embeddings):
    retrieval recall, and zero-shot accuracy on config.zeroshot's test split when set."""
    mesh = make_mesh(devices=jax.local_devices())  # each process evaluates on its own devices
    ctx = Context(inputs.source.cfg, inputs.source.meta, inputs.img_size, mesh=mesh, progress=True)
    tower = TextTower(text_cfg, None, inputs.tokenizer, batch=config.eval_batch, mesh=mesh)
    pairs, emb = _eval_retrieval(config, inputs, train, vision)
    captions, _ = pairs.flat_captions()
    tokens = tokenize(inputs.tokenizer, captions, text_cfg.context_length)
    images = Embedded("retrieval", emb, np.arange(len(pairs)))
    spec = EvalSpec("retrieval", retrieval=pairs.spec, clip_text=str(inputs.clip_text))
    evaluators = {"retrieval": RetrievalEval(spec, ctx, pairs=pairs, images=images, text=tower, tokens=tokens)}
    if config.zeroshot:
        names = dict(test=config.zeroshot, templates=config.zeroshot_templates, batch=config.data.embed_batch)
        spec = EvalSpec("zeroshot", clip_text=str(inputs.clip_text), **names)
        evaluators["zeroshot"] = ZeroShotEval(spec, ctx, text=tower)
        evaluators["zeroshot"].freeze(vision())  # the test images embedded once
    return evaluators


def _evaluate_fn(evaluators: dict[str, Evaluator]) -> Callable[[TrainState, int], dict[str, float]]:
    """The loop's evaluate(state, step): every process gets the same numbers (text params gathered to each host
    when the mesh spans several)."""

    def evaluate(state: TrainState, done: int) -> dict[str, float]:
        params = to_host(state.params) if jax.process_count() > 1 else state.params
        row = {f"eval/retrieval/{k}": v for k, v in evaluators["retrieval"].run(text_params=params).items()}
        row[BEST_METRIC] = float(np.mean(list(row.values())))
        if "zeroshot" in evaluators:
            row.update({f"eval/zeroshot/{k}": v for k, v in evaluators["zeroshot"].run(text_params=params).items()})
        return row

    return evaluate


def _export(
    workdir: epath.Path,
    text_cfg: TextConfig,
    params: Any,
    inputs: _Inputs,
    vision: tuple[Any, Any, str] | None,
    info: dict,
) -> epath.Path:
    """WORKDIR/text: text.safetensors (the tower in the checkpoint's own layout and dtypes: open_clip's, or
    transformers' CLIPModel names), text_config.json, clip.safetensors (vision tower under "visual." + the text
    tower) when `vision` is given, export.json."""
    out = workdir / TEXT_DIR
    out.mkdir(parents=True, exist_ok=True)
    params = jax.tree_util.tree_map(lambda p, d: np.asarray(p).astype(d), params, inputs.dtypes)
    prefix = inputs.prefix
    text_sd = text_to_torch(text_cfg, params, prefix, inputs.layout)
    files = {"text.safetensors": text_sd}
    if vision is not None:
        from dgmr_jax.io.convert import to_torch

        cfg, vparams, family = vision
        files["clip.safetensors"] = {**to_torch(cfg, vparams, family=family, prefix="visual."), **text_sd}
    for name, sd in files.items():
        if is_uri(out):  # the writer needs a local file: write one, copy it up
            with tempfile.TemporaryDirectory() as tmp:
                save_safetensors(Path(tmp) / name, sd)
                (out / name).write_bytes((Path(tmp) / name).read_bytes())
        else:
            save_safetensors(Path(out) / name, sd)
    (out / "text_config.json").write_text(text_cfg.replace(dtype="float32").to_json())
    record = {**info, "files": sorted(files), "layout": inputs.layout, "prefix": prefix}
    (out / "export.json").write_text(json.dumps(record, indent=2))
    return out


def _compile(config: ml_collections.ConfigDict, mesh: Mesh, step: TextStep, emb_dim: int, length: int):
    """(the step compiled for global batches of (image embedding, caption tokens), the abstract state)."""
    start = time.perf_counter()
    bs = batch_sharding(mesh)
    batch_shapes = {
        "image_emb": jax.ShapeDtypeStruct((config.global_batch, emb_dim), np.float32, sharding=bs),
        "tokens": jax.ShapeDtypeStruct((config.global_batch, length), np.int32, sharding=bs),
    }
    abstract_state = abstract_with_shardings(step.state_shapes, step.state_sh)
    compiled = step.fn.lower(abstract_state, batch_shapes).compile()
    if jax.process_index() == 0:
        print(f"finetune-text: compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return compiled, abstract_state


def _eval_start(workdir: epath.Path, evaluate: Callable, state: TrainState) -> dict | None:
    """Recall of the original tower, logged as step 0 on a fresh run (eval_start.json; read back on a resume)."""
    if not workdir_lib.saved_steps(workdir):
        eval_start = {"step": 0, **evaluate(state, 0)}
        if jax.process_index() == 0:
            JsonlLog(workdir / "metrics.jsonl").write(eval_start)  # appends (rewrites whole on gs://)
            (workdir / "eval_start.json").write_text(json.dumps(eval_start, indent=2))
        return eval_start
    if (workdir / "eval_start.json").exists():
        return json.loads((workdir / "eval_start.json").read_text())
    return None


def _train_loop(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    mesh: Mesh,
    run: _TextRun,
    evaluate: Callable,
    compiled: tuple[Any, TrainState],
) -> Any:
    """The shared train loop over the caption records (checkpoints, logs, in-loop evaluation, best.json)."""
    step_fn, abstract_state = compiled
    loader = make_caption_loader(
        run.records, config.global_batch, config.data.seed, jax.process_index(), jax.process_count()
    )
    return run_loop(
        Loop(
            workdir=workdir,
            mesh=mesh,
            step_fn=step_fn,
            state=run.state,
            abstract_state=abstract_state,
            loader=loader,
            batch_key=("image_emb", "tokens"),
            desc="finetune-text",
            shown=("loss", "logit_scale", "lr", "images_per_s"),
            evaluate=evaluate,
            best_metric=BEST_METRIC,
            **loop_settings(config),
        )
    )


@dataclasses.dataclass
class _TextRun:
    """What the train loop runs: the step, the initial state, the training records, the evaluators."""

    step: TextStep
    state: TrainState
    records: CaptionRecords
    emb_dim: int
    pairs: Pairs
    captions: int
    evaluators: dict[str, Evaluator]


def _prepare(
    config: ml_collections.ConfigDict, workdir: epath.Path, mesh: Mesh, inputs: _Inputs, model: str
) -> _TextRun:
    """Embed the images once (or read them back), tokenize the captions, build the evaluators and the step."""
    step = build_text_step(config, mesh, inputs.text_cfg)
    vision = _VisionParams(inputs.source)
    train = frozen_embeddings(
        workdir, inputs.train, model, inputs.source, vision, inputs.img_size, config.data.embed_batch
    )
    pairs, emb = train
    warn_bad(pairs)
    require_good(pairs)
    captions, owners = pairs.flat_captions()
    tokens = tokenize(inputs.tokenizer, captions, inputs.text_cfg.context_length)
    evaluators = text_evaluators(config, inputs, step.text_cfg, train, vision)
    vision.params = None  # the vision weights are read again for the export: not held during training
    info = {"clip_text": str(inputs.clip_text), "layout": inputs.layout, "layout_prefix": inputs.prefix}
    workdir_lib.record_run(workdir, inputs.sig, inputs.text_cfg, info)
    fresh = step.init(jax.tree_util.tree_map(lambda p: np.asarray(p, np.float32), inputs.text_params))
    inputs.text_params = None
    state = jax.device_put(fresh, step.state_sh)
    records = CaptionRecords(emb, tokens, owners, pairs.fingerprint())
    return _TextRun(step, state, records, emb.shape[1], pairs, len(captions), evaluators)


def _summary(result: Any, run: _TextRun, workdir: epath.Path, pairs: str, eval_start: dict | None) -> dict:
    bad = run.pairs.bad
    return {
        "reason": result.reason,
        "step": int(result.state.step),
        "metrics": result.metrics,
        "eval_start": eval_start,
        "eval_end": _last_eval(workdir) if jax.process_index() == 0 else None,
        "pairs": {
            "spec": pairs,
            "images": len(run.pairs),
            "captions": run.captions,
            "bad": len(bad),
            "bad_examples": [f"{n}: {w}" for n, w in bad[:10]],
        },
        "eval_pairs": run.evaluators["retrieval"].pairs.spec,
        "text_dir": None,
    }


def _finish(result: Any, summary: dict, workdir: epath.Path, inputs: _Inputs, text_cfg: TextConfig, model: str):
    """Export WORKDIR/text (and summary.json) when the run is done: the tower in the checkpoint's own layout, and
    for CLIP-family vision towers beside an open_clip text tower a merged CLIP state dict."""
    params_host = to_host(result.state.params)  # every process takes part in the gather
    family = inputs.source.meta.get("family", "")
    # vision layouts of a whole open_clip state dict; a transformers text tower is exported alone, in its names
    merged = family in ("open_clip", "eva_clip") and inputs.layout == "open_clip"
    vision = (inputs.source.cfg, inputs.source.load(), family) if merged else None  # a collective restore too
    if jax.process_index() == 0:
        info = {
            "step": summary["step"],
            "clip_text": str(inputs.clip_text),
            "model": str(model),
            "text_arch": text_cfg.name,
        }
        export = _export(workdir, text_cfg, params_host, inputs, vision, info)
        summary["text_dir"] = str(export)
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    sync_processes(f"dgmr_jax.text_export:{workdir}")


def _check_clip_text(clip_text: str | None, random_init: bool) -> None:
    """The text tower comes from exactly one place: --clip-text's checkpoint, or a random init asked for."""
    if random_init and clip_text:
        raise UserError(
            "--clip-text and --config.text.random_init=true exclude each other: drop one (a random init ignores "
            "the checkpoint's weights)"
        )
    if random_init:
        return
    if not clip_text:
        raise UserError(
            "give --clip-text: the open_clip / EVA-CLIP checkpoint or transformers CLIPModel directory holding the "
            "text tower (or, for a quick try, --config.text.random_init=true to start from a seeded random init "
            "of --text-arch)"
        )
    if not as_path(clip_text).exists():
        raise FileNotFoundError(
            f"--clip-text {clip_text} does not exist: give the open_clip / EVA-CLIP checkpoint "
            "or transformers CLIPModel directory"
        )
    name = hf_class(clip_text)
    if TEXT_CLASSES.get(name, ("",))[0] == "hf_siglip":  # the text towers scored by a sigmoid
        raise UserError(
            f"--clip-text {clip_text} is a {name} directory: finetune-text trains with CLIP's softmax loss, not "
            "SigLIP's sigmoid loss, so a SigLIP text tower is not fine-tuned yet (`dgmr-jax eval` reads it)"
        )


def finetune_text(
    config: ml_collections.ConfigDict,
    workdir: PathLike,
    model: str,
    clip_text: str | None,
    pairs: str,
    text_arch: str | None = None,
    eval_pairs: str | None = None,
    bpe_vocab: str | None = None,
    devices: list | None = None,
) -> dict[str, Any]:
    """Fine-tune the text tower of `clip_text` (None with config.text.random_init) against the frozen image tower
    `model` on `pairs` for config.optim.total_steps steps (resuming from `workdir`); returns a summary (also
    WORKDIR/summary.json).
    `devices`: the mesh's devices (default all)."""
    workdir = as_path(workdir)
    maybe_initialize_distributed()
    if config.eval_every < 0 or config.eval_images < 0:
        raise UserError("--config.eval_every and --config.eval_images must be >= 0")
    _check_clip_text(clip_text, config.text.random_init)
    mesh = make_mesh(**dict(config.mesh), devices=devices)
    check_batch(config.global_batch, mesh)
    inputs = open_inputs(config, workdir, model, clip_text, pairs, text_arch, eval_pairs, bpe_vocab)
    run = _prepare(config, workdir, mesh, inputs, model)
    if jax.process_index() == 0:
        print(
            f"finetune-text: {len(run.pairs)} images, {run.captions} captions ({len(run.pairs.bad)} bad pairs "
            f"skipped); compiling the train step ({config.global_batch} captions) ...",
            file=sys.stderr,
        )
    compiled, abstract_state = _compile(config, mesh, run.step, run.emb_dim, run.records.tokens.shape[1])
    evaluate = _evaluate_fn(run.evaluators)
    eval_start = _eval_start(workdir, evaluate, run.state)
    result = _train_loop(config, workdir, mesh, run, evaluate, (compiled, abstract_state))
    summary = _summary(result, run, workdir, pairs, eval_start)
    if result.reason == "done":
        _finish(result, summary, workdir, inputs, run.step.text_cfg, model)
    summary["state"] = result.state
    return summary


def _last_eval(workdir: epath.Path) -> dict | None:
    """The last evaluation row of metrics.jsonl."""
    path = workdir / "metrics.jsonl"
    rows = read_rows(path) if path.exists() else []
    evals = [r for r in rows if BEST_METRIC in r]
    return evals[-1] if evals else None
