"""The calibrated methods on one decoder layer, each result checked against plain rounding on held-out inputs.

`gptq_layer` and `awq_layer` quantize one decoder layer by the plan's method (`LAYER_METHODS` maps
the method's name to its function; bound to the plan, each is a `calibrate.QuantizeLayerFn`):

- `gptq`: per linear, the candidates are round-to-nearest (min-max), the MSE range search
  (`quantize.quantize_int(mse=True)`), AWQ's clipping search on the calibration Hessian
  (`awq.search_clip`; not for q/k), and GPTQ at each damping of `gptq.GPTQ_PERCDAMP_GRID` within
  the clipping search's group ranges (q/k: the MSE search's). GPTQ then only chooses the
  integers: with min-max ranges it was worse off the calibration's domain, and the clipped ranges
  lower its geometric mean over the held-out texts below the MSE search's at group 64, group 32
  and asymmetric (docs/quality.md). The one with the least output
  error on the held-out calibration inputs (`gptq.output_error` with their Hessian) is stored. A
  linear is therefore never stored worse than its RTN version on inputs its fit did not see, and
  the damping is chosen by measurement, per linear.
- `awq`: per group of linears reading one input, the activation-aware scales (`awq.py`), folded
  into what produces that input: q/k/v into `input_layernorm`, gate/up into
  `post_attention_layernorm`, down into the rows of `up_proj`. `o_proj` is rounded unscaled: its
  input is the attention's, which with grouped-query attention no single weight produces per
  channel. The scaled group is kept only when its held-out error beats unscaled rounding. Then
  each linear gets AWQ's clipping search (`awq.search_clip`) on its group ranges, kept
  when its held-out error beats min-max's.

Each choice is recorded in the manifest entry of the linear, returned in `LayerResult.entries`
(`choice`, and the held-out error relative to round-to-nearest's, `heldout_error_vs_minmax`; for
AWQ's scaled groups also the group's, `group_heldout_error_vs_minmax`, the one its shared scales
guarantee below 1). It does not gather the statistics (`calibrate.py`), keep the conversion's
report or write files (`convert.py`).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch

from .awq import scaled_error, search_clip, search_scales
from .calibrate import INPUT_GROUPS, LayerResult, LayerStats
from .formats import packed_int_tensors
from .gptq import GPTQ_PERCDAMP_GRID, gptq_quantize_dampings, output_error
from .manifest import int_entry
from .plan import Plan
from .quantize import IntQuantized, quantize_int, scale_dtype

logger = logging.getLogger(__name__)

# The input group -> the float weight that produces its input, and whether its rows (a linear)
# or its entries (a norm) take the inverse scale. None: not scaled.
_AWQ_FOLD: dict[str, tuple[str, str] | None] = {
    "self_attn.q_proj": ("input_layernorm.weight", "norm"),
    "self_attn.o_proj": None,
    "mlp.gate_proj": ("post_attention_layernorm.weight", "norm"),
    "mlp.down_proj": ("mlp.up_proj", "rows"),
}
# Linears whose GPTQ ranges come from the MSE search, not the clipping search: their outputs meet
# in q k^T, where a linear's own output error says little (AutoAWQ does not clip them either).
# Clipping them too, measured on the held-out texts of docs/quality.md, helped AWQ but not GPTQ.
_GPTQ_MSE_RANGES = ("self_attn.q_proj", "self_attn.k_proj")


class AwqInput(NamedTuple):
    """What AWQ decided for a linear's input: the group it is read from, that group's statistics,
    the input scale s folded into the linear (ones when unscaled) and why it is unscaled (None
    when scaled)."""

    source: str
    pair: LayerStats
    s: torch.Tensor
    unscaled: str | None


def gptq_layer(plan: Plan, prefix: str, weights: dict[str, torch.Tensor], stats: dict[str, LayerStats]) -> LayerResult:
    """GPTQ's candidates for each quantized linear of one decoder layer; the best on held-out inputs is kept.

    Args:
        plan: the conversion's plan (`calibration` "gptq").
        prefix: the layer's name prefix, `model.layers.3.`.
        weights: the layer's tensors as stored, by checkpoint name.
        stats: the layer's input statistics, by member name (`self_attn.q_proj`).

    Returns:
        The packed tensors and restored weights of the layer's quantized linears, and their
        manifest entries.
    """
    tensors, restored, entries = {}, {}, {}
    # The members that read one input share its Hessian, so GPTQ runs on them stacked (rows are
    # independent given H), at every damping in the same pass.
    readers: dict[int, list[str]] = {}
    for member, pair in stats.items():
        if prefix + member in plan.quantized:
            readers.setdefault(id(pair), []).append(member)
    for members in readers.values():
        pair = stats[members[0]]
        check = _check_hessian(pair)
        weights_of = {m: weights[prefix + m + ".weight"] for m in members}
        candidates_of, ranges_of = {}, {}
        for member, weight in weights_of.items():
            # Round-to-nearest first (a tie keeps it), then the range searches; GPTQ keeps the
            # clipped ranges (the MSE search's for q/k) and only chooses the integers within them.
            mse = quantize_int(
                weight, num_bits=plan.num_bits, group_size=plan.group_size, symmetric=plan.symmetric, mse=True,
                scale_dtype=scale_dtype(weight),
            )
            candidates = candidates_of[member] = {"minmax": _rtn(plan, weight), "mse": mse}
            ranges_of[member] = mse
            if not member.endswith(_GPTQ_MSE_RANGES):
                ranges_of[member] = candidates["clip"] = search_clip(
                    weight, pair.fit.value().float(), num_bits=plan.num_bits, group_size=plan.group_size,
                    symmetric=plan.symmetric, scale_dtype=scale_dtype(weight),
                )
        for damp, stacked in zip(GPTQ_PERCDAMP_GRID, _gptq_stacked(plan, weights_of, ranges_of, pair.fit.value())):
            for member, q in stacked.items():
                candidates_of[member][f"gptq damping {damp:g}"] = q
        for member, weight in weights_of.items():
            module = prefix + member
            candidates = candidates_of[member]
            dequantized = {name: q.dequantize().float() for name, q in candidates.items()}
            errors = {name: output_error(weight, d, check) for name, d in dequantized.items()}
            choice = min(errors, key=errors.__getitem__)
            q = candidates[choice]
            label = "gptq" if choice.startswith("gptq") else choice
            entries[module] = _entry(weight, q, label, choice, errors[choice] / max(errors["minmax"], 1e-30))
            tensors[module + ".weight"] = packed_int_tensors(module, q)
            restored[module + ".weight"] = dequantized[choice]
    return LayerResult(tensors, restored, entries)


def awq_layer(plan: Plan, prefix: str, weights: dict[str, torch.Tensor], stats: dict[str, LayerStats]) -> LayerResult:
    """AWQ on one decoder layer: the input groups' scales, folded, then each linear rounded.

    Args:
        plan: the conversion's plan (`calibration` "awq").
        prefix, weights, stats: as `gptq_layer` takes them.

    Returns:
        The packed tensors of the layer's quantized linears and any float weight the scales
        rescaled, the weights the next layers must see, and the quantized linears' manifest entries.
    """
    folded, inputs = _awq_scales(plan, prefix, weights, stats)
    tensors, restored, entries = {}, {}, {}
    # scaled input group -> held-out errors summed over its linears: (stored, unscaled min-max)
    group_errors: dict[str, list[float]] = {}
    for name, w in folded.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in plan.quantized:
            given = inputs[name]
            q, entries[module], stored, plain = _awq_round(plan, w.to(weights[name].dtype), weights[name], given)
            if given.unscaled is None:
                totals = group_errors.setdefault(given.source, [0.0, 0.0])
                totals[0] += stored
                totals[1] += plain
            tensors[name] = packed_int_tensors(module, q)
            restored[name] = q.dequantize().float()
        elif not torch.equal(w, weights[name].float()):  # a rescaled norm or float linear
            tensors[name] = [(name, w.to(weights[name].dtype))]
            restored[name] = w
    # One scale serves the whole group, so the guarantee is the group's: one of its linears may
    # be worse than its own min-max while the group's sum is better.
    for name, given in inputs.items():
        if given.unscaled is None and name.removesuffix(".weight") in entries:
            stored, plain = group_errors[given.source]
            entries[name.removesuffix(".weight")]["group_heldout_error_vs_minmax"] = round(stored / max(plain, 1e-30), 4)
    return LayerResult(tensors, restored, entries)


# The calibrated methods by name; `functools.partial(LAYER_METHODS[name], plan)` is a `calibrate.QuantizeLayerFn`.
LAYER_METHODS = {"gptq": gptq_layer, "awq": awq_layer}


def _rtn(plan: Plan, w: torch.Tensor) -> IntQuantized:
    """Round-to-nearest (min-max) with the plan's scheme."""
    return quantize_int(
        w, num_bits=plan.num_bits, group_size=plan.group_size, symmetric=plan.symmetric, scale_dtype=scale_dtype(w)
    )


def _gptq_stacked(
    plan: Plan, weights: dict[str, torch.Tensor], ranges: dict[str, IntQuantized], hessian: torch.Tensor
) -> list[dict[str, IntQuantized]]:
    """GPTQ on the linears that read one input, stacked by rows, at each damping of the grid.

    Returns, per damping of `GPTQ_PERCDAMP_GRID`, each linear's result within its `ranges`.
    """
    members = list(weights)
    first = weights[members[0]]
    zeros = [ranges[m].zero_point for m in members]
    stacked = gptq_quantize_dampings(
        torch.cat([weights[m] for m in members]), hessian, GPTQ_PERCDAMP_GRID, num_bits=plan.num_bits,
        group_size=plan.group_size, symmetric=plan.symmetric, scale_dtype=scale_dtype(first), actorder=plan.actorder,
        ranges=(torch.cat([ranges[m].scale for m in members]), None if zeros[0] is None else torch.cat(zeros)),
    )
    bounds = torch.tensor([0] + [weights[m].shape[0] for m in members]).cumsum(0).tolist()
    return [
        {
            m: IntQuantized(
                q=q.q[a:b], scale=q.scale[a:b], zero_point=None if q.zero_point is None else q.zero_point[a:b],
                num_bits=q.num_bits,
            )
            for m, a, b in zip(members, bounds, bounds[1:])
        }
        for q in stacked
    ]


def _entry(weight: torch.Tensor, q: IntQuantized, label: str, choice: str, relative: float) -> dict[str, Any]:
    """A calibrated linear's manifest entry: `int_entry`, the choice and its held-out error relative to min-max's."""
    return int_entry(weight, q, label) | {"choice": choice, "heldout_error_vs_minmax": round(relative, 4)}


def _awq_scales(
    plan: Plan, prefix: str, weights: dict[str, torch.Tensor], stats: dict[str, LayerStats]
) -> tuple[dict[str, torch.Tensor], dict[str, AwqInput]]:
    """Search each input group's scales, keep them where they beat no scaling on held-out
    inputs, and fold them. Returns the float32 weights with the scales folded in, and per
    quantized linear its `AwqInput`."""

    def round_fn(w: torch.Tensor) -> torch.Tensor:
        return _rtn(plan, w).dequantize().float()

    folded = {name: w.float() for name, w in weights.items()}
    inputs: dict[str, AwqInput] = {}
    for members, source in INPUT_GROUPS:
        if source not in stats:
            continue
        names = [prefix + m + ".weight" for m in members]
        pair = stats[source]
        fold = _AWQ_FOLD[source]
        s, unscaled = torch.ones(pair.fit.hessian.shape[0]), None
        if fold is None or not all(prefix + m in plan.quantized for m in members):
            unscaled = "input not scalable"
        else:
            group = [weights[name].float() for name in names]
            found, _ = search_scales(group, pair.fit.mean_abs(), pair.fit.value(), round_fn, plan.group_size)
            check = _check_hessian(pair)
            if scaled_error(group, found, check, round_fn) < scaled_error(group, s, check, round_fn):
                s = found
                _fold(folded, prefix, fold, names, s)
            else:
                unscaled = "scaling was worse on held-out inputs"
        for name in names:
            inputs[name] = AwqInput(source, pair, s, unscaled)
    return folded, inputs


def _awq_round(
    plan: Plan, w: torch.Tensor, original: torch.Tensor, given: AwqInput
) -> tuple[IntQuantized, dict[str, Any], float, float]:
    """Round one folded linear by min-max or by the clipping search, whichever has the lower
    output error on held-out inputs. Returns (the rounding, its manifest entry, its error, the
    error of min-max on the unscaled `original`)."""
    # The input as the folded weight sees it is x / s: its Hessian is H / (s s^T).
    inverse = torch.outer(given.s, given.s)
    check = _check_hessian(given.pair).float() / inverse
    candidates = {
        "minmax": _rtn(plan, w),
        "clip": search_clip(
            w, given.pair.fit.value().float() / inverse, num_bits=plan.num_bits, group_size=plan.group_size,
            symmetric=plan.symmetric, scale_dtype=scale_dtype(w),
        ),
    }
    errors = {key: output_error(w, q.dequantize(), check) for key, q in candidates.items()}
    key = min(errors, key=errors.__getitem__)  # a tie keeps min-max
    unscaled = given.unscaled
    choice = ("awq" if unscaled is None else f"minmax ({unscaled})") + (" + clip" if key == "clip" else "")
    plain = errors["minmax"]  # unscaled, w is the original weight
    if unscaled is None:
        plain = output_error(original, _rtn(plan, original).dequantize(), _check_hessian(given.pair))
    label = "awq" if unscaled is None or key == "clip" else "minmax"
    entry = _entry(w, candidates[key], label, choice, errors[key] / max(plain, 1e-30))
    return candidates[key], entry, errors[key], plain


def _fold(folded: dict[str, torch.Tensor], prefix: str, fold: tuple[str, str], names: list[str], s: torch.Tensor) -> None:
    """Scale the columns of the linears `names` by s and fold 1/s into what produces their input."""
    for name in names:
        folded[name] = folded[name] * s  # columns: W s
    target, how = fold
    if how == "norm":
        folded[prefix + target] = folded[prefix + target] / s
    else:  # a linear's output rows, and its bias
        folded[prefix + target + ".weight"] = folded[prefix + target + ".weight"] / s.unsqueeze(1)
        if prefix + target + ".bias" in folded:
            folded[prefix + target + ".bias"] = folded[prefix + target + ".bias"] / s


def _check_hessian(pair: LayerStats) -> torch.Tensor:
    """The held-out inputs' Hessian, or the fitting inputs' when none were held out."""
    return pair.heldout.value() if pair.heldout.count else pair.fit.value()
