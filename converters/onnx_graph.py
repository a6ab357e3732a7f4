"""The decoder as an ONNX graph of onnxruntime's fused CPU operators, built node by node.

Built directly with `onnx.helper` (as onnxruntime-genai's builder does) rather than traced from
the torch model: the graph is exactly the operators chosen for speed, loads fast, and tracing
could not emit the contrib ops anyway. Per layer: `SkipSimplifiedLayerNormalization` (RMSNorm with
the residual add), one `MatMulNBits` for fused q/k/v, `GroupQueryAttention` with fused rotary
embedding over a KV cache that shares its past and present buffers, `MatMulNBits` o_proj, fused
gate/up, SiLU, down. `num_logits_to_keep` (default 0 = every position) lets a generator compute
the vocabulary projection for the last position only.

Interface (onnxruntime-genai's names): `input_ids` int64 [B, S], `attention_mask` int64 [B, total],
`past_key_values.{i}.key|value` float32 [B, kv_heads, past, D] -> `logits` float32 [B, S', V],
`present.{i}.key|value`. LoRA slots add `{module}.lora_A` [K, r] and `{module}.lora_B` [r, N]
(scale folded into B) as inputs whose zero-rank initializers make them optional.

This file builds the graph from weights already in MatMulNBits layout; it reads no checkpoint and
writes no file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_weights import NBitsWeight

OPSET = 21
MS_DOMAIN = "com.microsoft"
IR_VERSION = 10
ACCURACY_LEVELS = (0, 1, 4)  # MatMulNBits' compute: 0/1 float32, 4 int8 activations (the fast CPU path)


@dataclass
class LayerWeights:
    """One decoder layer, its projections already fused and in MatMulNBits layout."""

    input_norm: np.ndarray
    post_norm: np.ndarray
    qkv: NBitsWeight
    qkv_bias: np.ndarray | None
    o: NBitsWeight
    o_bias: np.ndarray | None
    gate_up: NBitsWeight
    down: NBitsWeight


@dataclass
class DecoderWeights:
    """Everything the graph holds. `lora` maps a fused projection ("qkv", "o", "gate_up", "down")
    of a layer to the module names (in fusion order, with their out features) that carry LoRA slots."""

    embed: np.ndarray
    layers: list[LayerWeights]
    norm: np.ndarray
    lm_head: NBitsWeight | np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    lora: dict[tuple[int, str], list[tuple[str, int, int]]] = field(default_factory=dict)


@dataclass
class Shape:
    """The model dimensions the graph needs."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float


def build_decoder(weights: DecoderWeights, shape: Shape, accuracy_level: int = 4) -> onnx.ModelProto:
    """Build the decoder graph.

    Args:
        weights: the model's weights in graph layout.
        shape: its dimensions.
        accuracy_level: MatMulNBits' compute precision, one of `ACCURACY_LEVELS`: 4 quantizes
            activations to int8 per block (fast on CPU), 1 computes in float32 (the exact
            reference of the weights).

    Returns:
        The model (opset 21 + com.microsoft 1), initializers held in memory.
    """
    assert accuracy_level in ACCURACY_LEVELS, accuracy_level
    return _Builder(weights, shape, accuracy_level).build()


class _Builder:
    def __init__(self, weights: DecoderWeights, shape: Shape, accuracy_level: int) -> None:
        self.w, self.s, self.accuracy_level = weights, shape, accuracy_level
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.count = 0

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", names: list[str] | None = None, **attrs) -> list[str]:
        self.count += 1
        outs = names or [f"/{op}_{self.count}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"/{op}_{self.count}", domain=domain, **attrs))
        return outs

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def build(self) -> onnx.ModelProto:
        s, w = self.s, self.w
        kv_shape = ["batch_size", s.kv_heads, "past_sequence_length", s.head_dim]
        self.inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
        self._length_inputs()
        for i in range(len(w.layers)):
            for kind in ("key", "value"):
                self.inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_shape))
        self.inputs.append(helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, [1]))
        self.const("num_logits_to_keep", np.array([0], np.int64))
        self.seqlens_k, self.total_len = self._lengths()
        self.const("cos_cache", w.cos.astype(np.float32))
        self.const("sin_cache", w.sin.astype(np.float32))

        x = self.node("Gather", [self.const("model.embed_tokens.weight", w.embed), "input_ids"], axis=0)[0]
        residual = x
        hidden = self._rms_norm(x, self.const("model.layers.0.input_layernorm.weight", w.layers[0].input_norm))
        for i, layer in enumerate(w.layers):
            attn = self._attention(i, layer, hidden)
            post = self.const(f"model.layers.{i}.post_attention_layernorm.weight", layer.post_norm)
            hidden, residual = self._skip_norm(attn, residual, post)
            mlp = self._mlp(i, layer, hidden)
            if i + 1 < len(w.layers):
                gamma = self.const(f"model.layers.{i + 1}.input_layernorm.weight", w.layers[i + 1].input_norm)
            else:
                gamma = self.const("model.norm.weight", w.norm)
            hidden, residual = self._skip_norm(mlp, residual, gamma)

        # Keep the last `num_logits_to_keep` positions (0 keeps all: -0 is start 0).
        start = self.node("Neg", ["num_logits_to_keep"])[0]
        kept = self.node(
            "Slice", [hidden, start, self.const("/end", np.array([np.iinfo(np.int64).max], np.int64)), self.const("/axis1", np.array([1], np.int64))]
        )[0]
        if isinstance(w.lm_head, NBitsWeight):
            self._matmul_nbits(kept, w.lm_head, "lm_head", output="logits")
        else:
            self.node("MatMul", [kept, self.const("lm_head.weight.T", np.ascontiguousarray(w.lm_head.T))], names=["logits"])
        self.outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "logits_length", s.vocab]))

        graph = helper.make_graph(self.nodes, "quadapt_decoder", self.inputs, self.outputs, self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)], producer_name="quadapt"
        )
        model.ir_version = IR_VERSION
        return model

    def _length_inputs(self) -> None:
        """Declare the inputs GroupQueryAttention's lengths come from (here the attention mask)."""
        self.inputs.append(
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
        )

    def _lengths(self) -> tuple[str, str]:
        """GQA's lengths: seqlens_k = tokens seen per row - 1, total = the mask's length."""
        mask_sum = self.node("ReduceSum", ["attention_mask", self.const("/one_axis", np.array([1], np.int64))], keepdims=0)[0]
        seqlens = self.node("Sub", [mask_sum, self.const("/one", np.array(1, np.int64))])[0]
        seqlens_k = self.node("Cast", [seqlens], to=TensorProto.INT32)[0]
        total = self.node("Gather", [self.node("Shape", ["attention_mask"])[0], self.const("/idx1", np.array(1, np.int64))], axis=0)[0]
        return seqlens_k, self.node("Cast", [total], to=TensorProto.INT32)[0]

    def _rms_norm(self, x: str, gamma: str) -> str:
        # Plain ops (onnxruntime fuses them into SimplifiedLayerNormalization), so that
        # onnx.checker knows every default-domain op.
        square = self.node("Pow", [x, self.const("/two", np.array(2.0, np.float32))])[0]
        mean = self.node("ReduceMean", [square, self.const("/last_axis", np.array([-1], np.int64))], keepdims=1)[0]
        std = self.node("Sqrt", [self.node("Add", [mean, self.const("/eps", np.array(self.s.eps, np.float32))])[0]])[0]
        return self.node("Mul", [self.node("Div", [x, std])[0], gamma])[0]

    def _skip_norm(self, x: str, residual: str, gamma: str) -> tuple[str, str]:
        out = self.node("SkipSimplifiedLayerNormalization", [x, residual, gamma], n_out=4, domain=MS_DOMAIN, epsilon=self.s.eps)
        # Outputs 1 and 2 (mean, inverse std) are optional: unnamed, they are not written.
        self.nodes[-1].output[1] = self.nodes[-1].output[2] = ""
        return out[0], out[3]

    def _matmul_nbits(self, x: str, weight: NBitsWeight, name: str, output: str | None = None) -> str:
        inputs = [x, self.const(f"{name}.MatMulNBits.B", weight.packed()), self.const(f"{name}.MatMulNBits.scales", weight.scales)]
        zero = weight.packed_zero_points()
        if zero is not None:
            inputs.append(self.const(f"{name}.MatMulNBits.zero_points", zero))
        return self.node(
            "MatMulNBits", inputs, domain=MS_DOMAIN, names=[output] if output else None, K=weight.in_features,
            N=weight.out_features, bits=weight.bits, block_size=weight.block_size, accuracy_level=self.accuracy_level,
        )[0]

    def _projection(self, i: int, kind: str, x: str, weight: NBitsWeight, bias: np.ndarray | None) -> str:
        name = f"model.layers.{i}.{kind}"
        y = self._matmul_nbits(x, weight, name)
        if bias is not None:
            y = self.node("Add", [y, self.const(f"{name}.bias", bias.astype(np.float32))])[0]
        slots = self.w.lora.get((i, kind))
        if slots:
            deltas = [self._lora(module, x, k, n) for module, k, n in slots]
            delta = deltas[0] if len(deltas) == 1 else self.node("Concat", deltas, axis=-1)[0]
            y = self.node("Add", [y, delta])[0]
        return y

    def _lora(self, module: str, x: str, k: int, n: int) -> str:
        """x @ A @ B for one module's slot; the zero-rank defaults make it zeros [.., n]."""
        a, b = f"{module}.lora_A", f"{module}.lora_B"
        self.inputs.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, [k, f"{module}.rank"]))
        self.inputs.append(helper.make_tensor_value_info(b, TensorProto.FLOAT, [f"{module}.rank", n]))
        self.const(a, np.zeros((k, 0), np.float32))
        self.const(b, np.zeros((0, n), np.float32))
        return self.node("MatMul", [self.node("MatMul", [x, a])[0], b])[0]

    def _attention(self, i: int, layer: LayerWeights, x: str) -> str:
        s = self.s
        qkv = self._projection(i, "qkv", x, layer.qkv, layer.qkv_bias)
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        # The presents are graph outputs directly: bound to the past buffers, GQA writes in place.
        out = self.node(
            "GroupQueryAttention",
            [qkv, "", "", past_k, past_v, self.seqlens_k, self.total_len, "cos_cache", "sin_cache"],
            domain=MS_DOMAIN, names=[f"/attn_{i}/out", f"present.{i}.key", f"present.{i}.value"],
            num_heads=s.heads, kv_num_heads=s.kv_heads, do_rotary=1, rotary_interleaved=0, scale=float(s.head_dim) ** -0.5,
        )
        for kind in ("key", "value"):
            self.outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", TensorProto.FLOAT, ["batch_size", s.kv_heads, "total_sequence_length", s.head_dim]
                )
            )
        return self._projection(i, "o", out[0], layer.o, layer.o_bias)

    def _mlp(self, i: int, layer: LayerWeights, x: str) -> str:
        inter = self.s.intermediate
        gate_up = self._projection(i, "gate_up", x, layer.gate_up, None)
        gate, up = self.node("Split", [gate_up, self.const(f"/split_{i}", np.array([inter, inter], np.int64))], n_out=2, axis=-1)
        silu = self.node("Mul", [gate, self.node("Sigmoid", [gate])[0]])[0]
        return self._projection(i, "down", self.node("Mul", [silu, up])[0], layer.down, None)

