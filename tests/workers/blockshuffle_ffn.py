"""The paper's BlockShuffle FFN written from the spec's formulas, and its comparison with the model's MLP.

The reference is ``fc2(gelu_tanh(fc1(x)))`` with each linear the explicit
matrix ``P_out · blockdiag(W2) · P_mid · blockdiag(W1)`` (structured-ffn
spec, section 1): 0/1 permutation matrices written from the index formulas
``z_c[a] = h[a·B + c]`` and ``y[t·B + c] = u_c[t]``, block-diagonal matrices
from ``torch.block_diag``.  Nothing here calls the project's structured code,
so a hidden-unit order that differs from the paper's between fc1 and fc2 shows
up as a wrong output, not as an agreement of two copies of one bug.

The MLP under test is megatron's ``MLP`` with the fc1/fc2 of the spec factory,
built exactly as the model builds it.  It receives the reference's weights
through each module's own conversion from the pure layer's factors
(``_full_from_pure``, then ``local_view`` for this rank's part), and its
gradients are compared through the same linear map.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

WIDTHS = [(32, 128), (48, 192)]  # (d, f): two widths, f = 4d
BLOCKS = [2, 4, 8]
TOKENS = (3, 2)  # [s, b]
TOLERANCE = 1e-5


def _permutation(size: int, moves, dtype: torch.dtype) -> torch.Tensor:
    """0/1 matrix with a one at every ``(row, column)`` of ``moves``."""
    p = torch.zeros(size, size, dtype=dtype)
    for row, column in moves:
        p[row, column] = 1
    return p


def shuffle_matrix(blocks: int, q: int, dtype: torch.dtype) -> torch.Tensor:
    """The middle shuffle: group c position a receives h[a*B + c] (z is block-major)."""
    return _permutation(blocks * q, ((c * q + a, a * blocks + c) for c in range(blocks) for a in range(q)), dtype)


def interleave_matrix(blocks: int, s: int, dtype: torch.dtype) -> torch.Tensor:
    """The output interleave: y[t*B + c] = u_c[t] = u[c*s + t]."""
    return _permutation(blocks * s, ((t * blocks + c, c * s + t) for c in range(blocks) for t in range(s)), dtype)


def blockshuffle_matrix(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``P_out · blockdiag(w2) · P_mid · blockdiag(w1)`` for ``w1 (B, q, n)``, ``w2 (B, s, q)``."""
    blocks, q, _ = w1.shape
    s = w2.shape[1]
    p_out, p_mid = interleave_matrix(blocks, s, w1.dtype), shuffle_matrix(blocks, q, w1.dtype)
    return p_out @ torch.block_diag(*w2) @ p_mid @ torch.block_diag(*w1)


@dataclass(frozen=True)
class SpecCase:
    hidden: int
    ffn_hidden: int
    blocks: int
    strategy: str = "auto"

    @property
    def name(self) -> str:
        return f"d{self.hidden}-f{self.ffn_hidden}-B{self.blocks}-{self.strategy}"


def spec_cases(strategies: tuple[str, ...] = ("auto",)) -> list[SpecCase]:
    return [SpecCase(d, f, b, s) for d, f in WIDTHS for b in BLOCKS for s in strategies]


def spec_weights(case: SpecCase, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full factors in the spec's shapes (up: W1 (B, d/B, d/B), W2 (B, f/B, d/B); down: W1 (B, d/B, f/B),
    W2 (B, d/B, d/B)) and nonzero biases, scaled so that GELU works in its curved range."""
    d, f, b = case.hidden, case.ffn_hidden, case.blocks
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    return {
        "linear_fc1.w1": draw(b, d // b, d // b),
        "linear_fc1.w2": draw(b, f // b, d // b),
        "linear_fc1.bias": 0.5 * torch.randn(f, generator=gen),
        "linear_fc2.w1": draw(b, d // b, f // b),
        "linear_fc2.w2": draw(b, d // b, d // b),
        "linear_fc2.bias": 0.5 * torch.randn(d, generator=gen),
    }


def spec_ffn(
    weights: dict[str, torch.Tensor], x: torch.Tensor, hidden_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's FFN on ``x (..., d)`` from explicit matrices; ``hidden_mask`` multiplies the hidden units."""
    fc1 = blockshuffle_matrix(weights["linear_fc1.w1"], weights["linear_fc1.w2"])
    fc2 = blockshuffle_matrix(weights["linear_fc2.w1"], weights["linear_fc2.w2"])
    hidden = F.gelu(x @ fc1.T + weights["linear_fc1.bias"], approximate="tanh")
    if hidden_mask is not None:
        hidden = hidden * hidden_mask
    return hidden @ fc2.T + weights["linear_fc2.bias"]


@dataclass(frozen=True)
class HiddenDraw:
    """A hidden-unit subset for :func:`compare_with_spec`: the draw and its rate p_M."""

    subset: Any  # megatron_sffn.est.Subset over the B² (fc2 block k, fc1 group c) cells, stratum k*B + c
    rate: float


def spec_hidden_mask(case: SpecCase, draw: HiddenDraw) -> torch.Tensor:
    """Evolving subnetwork training's mask, from the definition: kept units 1/p, dropped 0.

    Hidden unit ``j*B + c`` is row j of fc1 group c; fc2 block k reads rows
    ``j`` in ``[k*s/B, (k+1)*s/B)`` of every group (s = f/B).  Cell (k, c)
    keeps rows ``k*s/B + kept[k*B + c]`` of group c.
    """
    b = case.blocks
    cell = case.ffn_hidden // b // b
    mask = torch.zeros(case.ffn_hidden)
    for k in range(b):
        for c in range(b):
            for position in draw.subset.kept[k * b + c].tolist():
                mask[(k * cell + position) * b + c] = 1.0 / draw.rate
    return mask


def _module_view(linear, factor_values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's stored tensors of ``linear`` for spec-shaped ``w1``/``w2`` (weights or their gradients)."""
    full = linear._full_from_pure(SimpleNamespace(**factor_values))
    return {name: linear.local_view(name, tensor) for name, tensor in full.items()}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare_with_spec(mlp, case: SpecCase, finish_grads=None, hidden: HiddenDraw | None = None) -> dict[str, float]:
    """Relative errors of ``mlp`` (already built for ``case``) against :func:`spec_ffn` on shared weights.

    ``finish_grads(mlp)`` completes gradients that ranks hold in part (the
    step ``finalize_model_grads`` performs in training).  With ``hidden``,
    ``mlp`` (a ``SubnetworkMLP``) computes only that subset and the reference
    is the full FFN under :func:`spec_hidden_mask`.
    """
    from megatron_sffn.parallel.layout import TPLayout
    from tests.workers.tp_structured import full_tensor_slice

    weights = spec_weights(case)
    layout = TPLayout(mlp.linear_fc1.layout.rank, mlp.linear_fc1.layout.size)
    with torch.no_grad():
        for role in ("linear_fc1", "linear_fc2"):
            linear = getattr(mlp, role)
            views = _module_view(linear, {k: weights[f"{role}.{k}"] for k in ("w1", "w2")})
            for name, value in views.items():
                getattr(linear, name).copy_(value)
            linear.bias.copy_(full_tensor_slice(linear.bias, weights[f"{role}.bias"], layout))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(*TOKENS, case.hidden, generator=gen)
    target = torch.randn(*TOKENS, case.hidden, generator=gen)

    reference = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    x_ref = x.clone().requires_grad_(True)
    y_ref = spec_ffn(reference, x_ref, spec_hidden_mask(case, hidden) if hidden is not None else None)
    loss_ref = (y_ref - target).square().sum()
    loss_ref.backward()

    if hidden is not None:
        mlp.select_hidden(hidden.subset, hidden.rate)
    x_mlp = x.clone().requires_grad_(True)
    out, bias = mlp(x_mlp)
    y = out + bias
    loss = (y - target).square().sum()
    loss.backward()
    if finish_grads is not None:
        finish_grads(mlp)

    errors = {
        "output": _relative_error(y.detach(), y_ref.detach()),
        "loss": _relative_error(loss, loss_ref),
        "input_grad": _relative_error(x_mlp.grad, x_ref.grad),
    }
    for role in ("linear_fc1", "linear_fc2"):
        linear = getattr(mlp, role)
        expected_views = _module_view(linear, {k: reference[f"{role}.{k}"].grad for k in ("w1", "w2")})
        for name, expected in expected_views.items():
            errors[f"grad:{role}.{name}"] = _relative_error(getattr(linear, name).grad, expected)
        expected_bias = full_tensor_slice(linear.bias, reference[f"{role}.bias"].grad, layout)
        errors[f"grad:{role}.bias"] = _relative_error(linear.bias.grad, expected_bias)
    return errors


def build_spec_mlp(case: SpecCase, tp_group: Any, subnetwork: bool = False):
    """megatron's MLP with the BlockShuffle fc1/fc2 of the spec factory, as the model builds it.

    ``subnetwork``: the MLP that can run a hidden-unit subset (evolving subnetwork training's).
    """
    from megatron_sffn.parallel.subnetwork import SubnetworkMLP
    from tests.workers.tp_structured import Case, build_mlp

    model_case = Case(
        "blockshuffle", blocks=case.blocks, strategy=case.strategy, hidden=case.hidden, ffn_hidden=case.ffn_hidden
    )
    return build_mlp(model_case, tp_group, mlp_class=SubnetworkMLP if subnetwork else None)


SUBSET_BLOCKS = [2, 4]
SUBSET_RATES = [0.5, 0.25]


def subset_cases(strategies: tuple[str, ...] = ("auto",)) -> list[tuple[SpecCase, float]]:
    """Each width, B in {2, 4}, each strategy, with the rates of :data:`SUBSET_RATES`."""
    return [
        (SpecCase(d, f, b, s), rate)
        for d, f in WIDTHS
        for b in SUBSET_BLOCKS
        for s in strategies
        for rate in SUBSET_RATES
    ]


def subset_case_name(case: SpecCase, rate: float) -> str:
    return f"{case.name}-p{rate}"


def hidden_draw(case: SpecCase, rate: float, step: int = 3, layer: int = 1) -> HiddenDraw:
    """The draw a BlockShuffle layer of a plan gets: ``rate`` of every cell, from the counters."""
    from megatron_sffn.est.draws import HIDDEN, draw_subset, kept_count

    b = case.blocks
    keep = kept_count(rate, case.ffn_hidden // b // b)
    return HiddenDraw(
        draw_subset(11, step, HIDDEN, layer, total=case.ffn_hidden, strata=b * b, keep=keep, groups=b), rate
    )


def blockshuffle_subset_matches_spec() -> dict[str, dict[str, float]]:
    """TP=2 (gloo): hidden-unit subsets of every subset case and both fc1 strategies against the masked spec FFN."""
    from megatron_sffn.parallel.grads import average_token_split_grads
    from tests.workers.tp_structured import _init, _tp_group

    _init(2)
    group = _tp_group()
    results = {}
    for case, rate in subset_cases(("replicated/reduce", "split/reduce")):
        mlp = build_spec_mlp(case, None, subnetwork=True)
        results[subset_case_name(case, rate)] = compare_with_spec(
            mlp, case, lambda m: average_token_split_grads([m], group), hidden_draw(case, rate)
        )
    return results


def blockshuffle_ffn_matches_spec() -> dict[str, dict[str, float]]:
    """TP=2 (gloo): every case and both fc1 strategies against the spec's FFN."""
    from megatron_sffn.parallel.grads import average_token_split_grads
    from tests.workers.tp_structured import _init, _tp_group

    _init(2)
    group = _tp_group()
    results = {}
    for case in spec_cases(("replicated/reduce", "split/reduce")):
        mlp = build_spec_mlp(case, None)
        results[case.name] = compare_with_spec(mlp, case, lambda m: average_token_split_grads([m], group))
    return results


def block_major_mlp(tp_group: Any):
    """An MLP that writes checkpoints the way BlockShuffle did with block-major hidden units.

    fc1 stored ``w1`` "group-major" ``(B, B, d/B², d/B)`` and neither linear
    recorded a hidden-unit order (``_extra_state`` None).  Only the storage
    matters here, so the weights are not drawn.
    """
    from megatron_sffn.parallel.blockshuffle import BlockShuffleFC1, BlockShuffleFC2
    from megatron_sffn.parallel.layout import SHARDED, FactorSpec
    from tests.workers.tp_structured import Case, build_mlp

    class BlockMajorFC1(BlockShuffleFC1):
        def _factor_specs(self):
            b, d = self.shape.blocks, self.input_size
            return {
                "w1": FactorSpec((b, b, d // b // b, d // b), SHARDED, 0, strided=True),
                "w2": FactorSpec((b, self.output_size // b, d // b), SHARDED, 0, strided=True),
            }

        def get_extra_state(self) -> None:
            return None

    class BlockMajorFC2(BlockShuffleFC2):
        def get_extra_state(self) -> None:
            return None

    return build_mlp(
        Case("blockshuffle", blocks=4), tp_group, linears=(BlockMajorFC1, BlockMajorFC2), perform_initialization=False
    )


def block_major_checkpoint_refused() -> dict[str, str]:
    """Save a block-major BlockShuffle MLP at TP=2 as a training checkpoint; load it with ``load_checkpoint``.

    Returns the error message of the load (and of a plain ``load_state_dict``
    of the same state), or raises if either loaded.
    """
    from megatron.core import dist_checkpointing

    from megatron_sffn import cpu_compat
    from megatron_sffn.training.checkpointing import CHECKPOINT_FORMAT, load_checkpoint
    from tests.mp_harness import scratch_dir
    from tests.workers.tp_structured import Case, _init, build_mlp

    cpu_compat.enable_if_no_cuda()
    _init(2)
    legacy = block_major_mlp(None)
    path = scratch_dir() / "block-major"
    if torch.distributed.get_rank() == 0:
        path.mkdir()
    torch.distributed.barrier()
    state = {"format": CHECKPOINT_FORMAT, "layout": {}, "model": legacy.sharded_state_dict()}
    dist_checkpointing.save(state, str(path))
    messages = {}
    current = build_mlp(Case("blockshuffle", blocks=4), None)
    for name, load in (
        ("load_checkpoint", lambda: load_checkpoint(path, model=[current])),
        ("load_state_dict", lambda: current.load_state_dict(legacy.state_dict())),
    ):
        try:
            load()
        except ValueError as err:
            messages[name] = str(err)
        else:
            raise AssertionError(f"{name} loaded a block-major BlockShuffle checkpoint")
    return messages
