"""Training-checkpoint formats (.pth.tar, .ckpt, wrapped state dicts, DDP prefixes) load as their plain
weights; pickles of anything but tensors, containers and argparse.Namespace stay refused."""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
import pytest
from reference import small_timm, torch

import dgmr_jax as dj
from dgmr_jax.convert import CheckpointError, load_state_dict


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.weight": torch.randn(3, 4, generator=gen),
        "blocks.0.bias": torch.randn(3, generator=gen).to(torch.bfloat16),
        "head.num_batches_tracked": torch.tensor(7),
    }


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def assert_same(got: dict[str, np.ndarray], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        expected = load_state_dict({key: value})[key]  # the plain state dict's arrays (bfloat16 kept)
        assert got[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(got[key], expected, err_msg=key)


SD = tensors()
OPTIMIZER = {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
FORMATS = {
    "plain.pth": SD,
    "plain.pth.tar": SD,
    "plain.tar": SD,
    "lightning.ckpt": {"state_dict": SD, "epoch": 3, "global_step": 30, "hyper_parameters": {"lr": 0.1}},
    "args.pth": {"state_dict": SD, "epoch": 3, "args": argparse.Namespace(lr=0.1)},
    "ddp.pth.tar": {"model": prefixed(SD, "module.")},
    "deit.pth": {
        "model": prefixed(SD, "module."),
        "args": argparse.Namespace(lr=0.1),
        "epoch": 3,
        "optimizer": OPTIMIZER,
    },
    "compiled_ddp.pt": {"module": prefixed(SD, "module._orig_mod.")},
    "timm_train.pth.tar": {"epoch": 3, "arch": "vit", "state_dict": SD, "state_dict_ema": tensors(1), "metric": 0.5},
    "metadata_beside.bin": {**SD, "epoch": 3, "args": argparse.Namespace(lr=0.1)},
}


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_loads_the_plain_state_dict(name, tmp_path):
    path = tmp_path / name
    torch.save(FORMATS[name], path)
    assert_same(load_state_dict(path), SD)


def test_legacy_non_zip_file_with_namespace(tmp_path):
    path = tmp_path / "legacy.pth.tar"
    torch.save({"model": SD, "args": argparse.Namespace(lr=0.1)}, path, _use_new_zipfile_serialization=False)
    assert_same(load_state_dict(path), SD)


def test_wrapper_preference_and_prefix_rules():
    ema = tensors(1)
    assert_same(load_state_dict({"model_ema": ema, "model": SD}), SD)  # raw weights before the EMA copy
    assert_same(load_state_dict({"model": ema, "state_dict": SD}), SD)  # state_dict first
    assert_same(load_state_dict({"model": {"arch": "vit"}, "model_ema": ema}), ema)  # no tensors under "model"
    assert_same(load_state_dict({"model": SD, "pos_embed": torch.zeros(1)}), SD)  # a wrapper wins over tensors
    mixed = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    assert list(load_state_dict(mixed)) == ["module.a", "b"]  # stripped only when every key has it


def test_unrecognised_structure_lists_top_level_keys(tmp_path):
    path = tmp_path / "notes.ckpt"
    torch.save({"epoch": 3, "optimizer": OPTIMIZER, "weights": [torch.ones(1)]}, path)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    assert str(err.value) == (
        f"{path} is not a checkpoint: expected a mapping of parameter names to tensors, optionally under one of "
        "the keys state_dict, model, module, params, model_ema, state_dict_ema or beside plain metadata "
        "(numbers, strings, argparse.Namespace); got top-level keys 'epoch' (int), 'optimizer' (dict of 2), "
        "'weights' (list)"
    )
    # tensors beside a nested container: dropping the container could drop weights, so refuse
    with pytest.raises(CheckpointError, match=r"got top-level keys 'x' \(Tensor\), 'optimizer' \(dict of 2\)$"):
        load_state_dict({"x": torch.ones(1), "optimizer": OPTIMIZER})
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: .* got list$"):
        load_state_dict(path)


class Custom:
    """Any class outside the allow-list."""


class RunsCode:
    """Unpickling this runs a shell command (the classic malicious pickle)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_arbitrary_pickles_are_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": SD, "hook": RunsCode(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(
        CheckpointError,
        match=r"evil\.pth pickles \w+\.system, which is not allowed: only tensors, plain containers and "
        r"argparse\.Namespace are loaded, because unpickling arbitrary objects can run arbitrary code",
    ):
        load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
    torch.save({"state_dict": SD, "config": Custom()}, tmp_path / "custom.ckpt")
    with pytest.raises(CheckpointError, match=r"custom\.ckpt pickles \S*Custom, which is not allowed"):
        load_state_dict(tmp_path / "custom.ckpt")


def test_from_torch_reads_a_wrapped_timm_training_checkpoint(tmp_path):
    model, cfg, _ = small_timm("vit_tiny_patch16_224")
    sd = model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(
        {
            "model": prefixed(sd, "module."),
            "args": argparse.Namespace(model="vit_tiny_patch16_224", lr=0.1),
            "epoch": 3,
            "optimizer": optimizer.state_dict(),
        },
        path,
    )
    _, want = dj.convert.from_torch({k: v.numpy() for k, v in sd.items()}, family="timm", arch=cfg)
    _, got = dj.convert.from_torch(path, family="timm", arch=cfg)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)
