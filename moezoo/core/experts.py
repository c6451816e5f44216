"""Expert modules of the shared backbone.

Routed experts are stored as 3-D parameters ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] so that
transformers' experts interface (``set_experts_implementation``), its expert-parallel plans and peft's
``target_parameters`` apply unchanged.  The forward signature is transformers' one:
``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``; ids ``>= num_experts`` are
sentinels (dynamic-k padding, zero-FLOP experts) and cost nothing.

``moezoo`` (registered in :data:`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`) is the default implementation:
a sort-based dispatch with one custom autograd function that runs grouped matmuls forward and backward, so no 3-D
parameter is ever indexed per expert under autograd.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2CLS, ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation

# the opt-in CPU buffer pool: POOL.empty is plain torch.empty unless the user enabled it
from .cpu_pool import POOL

# moezoo's config name for tanh-approximated GELU (configs and converted checkpoints use it) -> transformers' name
ACTIVATION_ALIASES = {"gelu_tanh": "gelu_pytorch_tanh"}

DEFAULT_EXPERTS_IMPLEMENTATION = "moezoo"


def get_activation(name: str):
    """transformers' activation module ``ACT2FN[name]`` (``"gelu_tanh"`` is ``"gelu_pytorch_tanh"``)."""
    key = ACTIVATION_ALIASES.get(name, name)
    if not isinstance(key, str) or key not in ACT2CLS:
        raise ValueError(f"hidden_act={name!r} is not supported; expected one of transformers' ACT2FN names "
                         f"{sorted(ACT2CLS)} or {sorted(ACTIVATION_ALIASES)}")
    return ACT2FN[key]


@dataclass
class ExpertsImplementationConfig:
    """Minimal stand-in for a ``PretrainedConfig`` when the core is used on its own.

    transformers' ``use_experts_implementation`` reads ``self.config._experts_implementation`` at every forward; inside a
    moezoo model the experts share the model's config object, so ``model.set_experts_implementation(...)`` reaches them.
    """

    _experts_implementation: str | None = DEFAULT_EXPERTS_IMPLEMENTATION


class _ExpertsBase(nn.Module):
    """E gated (or plain) FFN experts stored as 3-D tensors.

    Args:
        config: any object with an ``_experts_implementation`` attribute (a ``PretrainedConfig`` inside models).
        num_experts, hidden_size, intermediate_size: E, H, I.
        hidden_act: activation of the gate half (``silu`` -> SwiGLU, ``gelu``, ``gelu_tanh``, ``relu``).
        gated: SwiGLU-style ``act(gate) * up`` (``gate_up_proj`` [E, 2I, H]) or plain ``act(up)`` (``up_proj`` [E, I, H]).
        up_first: the fused projection holds [up; gate] instead of [gate; up] (some official checkpoints).
    """

    def __init__(
        self,
        config=None,
        *,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        gated: bool = True,
        up_first: bool = False,
    ):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.hidden_act = hidden_act
        self.act_fn = get_activation(hidden_act)
        self.up_first = up_first
        self.gated = gated
        width = 2 * intermediate_size if gated else intermediate_size
        if gated:
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, width, hidden_size))
        else:
            self.up_proj = nn.Parameter(torch.empty(num_experts, width, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if self._bias:
            setattr(self, "gate_up_proj_bias" if gated else "up_proj_bias", nn.Parameter(torch.zeros(num_experts, width)))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.reset_parameters()

    _bias = False

    @property
    def in_proj(self) -> torch.Tensor:
        return self.gate_up_proj if self.gated else self.up_proj

    @property
    def in_proj_bias(self):
        if not self._bias:
            return None
        return self.gate_up_proj_bias if self.gated else self.up_proj_bias

    def reset_parameters(self, std: float | None = None) -> None:
        # nn.Linear's default (kaiming-uniform) per expert slice unless a std is given
        for w in (self.in_proj, self.down_proj):
            if std is None:
                bound = 1.0 / math.sqrt(w.shape[-1])
                nn.init.uniform_(w, -bound, bound)
            else:
                nn.init.normal_(w, 0.0, std)
        if self._bias:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.down_proj_bias)

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.act_fn(gate_up_out)
        first, second = gate_up_out.chunk(2, dim=-1)
        gate, up = (second, first) if self.up_first else (first, second)
        return self.act_fn(gate) * up

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on (N, H) inputs, without any routing (reference path, also used by converters' tests)."""
        h = F.linear(x, self.in_proj[expert], None if self.in_proj_bias is None else self.in_proj_bias[expert])
        h = self._apply_gate(h)
        return F.linear(h, self.down_proj[expert], self.down_proj_bias[expert] if self._bias else None)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Eager reference: a loop over the experts that were hit (transformers' ``eager``)."""
        out = torch.zeros_like(hidden_states)
        flat_idx = top_k_index.reshape(-1)
        flat_w = top_k_weights.reshape(-1)
        k = top_k_index.shape[-1]
        for e in torch.unique(flat_idx[flat_idx < self.num_experts]).tolist():
            pos = (flat_idx == e).nonzero().squeeze(-1)
            tok = pos // k
            y = self.expert_forward(e, hidden_states[tok]) * flat_w[pos, None].to(hidden_states.dtype)
            out.index_add_(0, tok, y)
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"act={self.hidden_act}, gated={self.gated}, bias={self._bias}")


@use_experts_implementation
class Experts(_ExpertsBase):
    """Bias-free experts (SwiGLU by default)."""


@use_experts_implementation(has_bias=True)
class BiasedExperts(_ExpertsBase):
    """Experts with biases on both projections."""

    _bias = True


@use_experts_implementation(has_gate=False)
class PlainExperts(_ExpertsBase):
    """Non-gated experts ``down(act(up x))`` (``up_proj`` [E, I, H])."""

    def __init__(self, config=None, **kwargs):
        kwargs["gated"] = False
        super().__init__(config, **kwargs)


@use_experts_implementation(has_gate=False, has_bias=True)
class PlainBiasedExperts(_ExpertsBase):
    """Non-gated experts with biases (e.g. the classic ViT/DiT GELU MLP as experts)."""

    _bias = True

    def __init__(self, config=None, **kwargs):
        kwargs["gated"] = False
        super().__init__(config, **kwargs)


def build_experts(config=None, *, bias: bool = False, gated: bool = True, **kwargs) -> _ExpertsBase:
    cls = {(False, True): Experts, (True, True): BiasedExperts, (False, False): PlainExperts, (True, False): PlainBiasedExperts}[
        (bool(bias), bool(gated))
    ]
    if config is None:
        config = ExpertsImplementationConfig()
    if cls in (PlainExperts, PlainBiasedExperts):
        return cls(config, **kwargs)
    return cls(config, gated=gated, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# The fast path: sort-based dispatch + grouped matmuls in one autograd function
# ----------------------------------------------------------------------------------------------------------------------


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped matmul; ``a`` (S, K) rows grouped by ``offs`` times ``b`` (E, K, N) -> (S, N), or the 2-D x 2-D form."""
    return torch._grouped_mm(a, b, offs=offs)


def _has_grouped_mm(device: torch.device) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu"


def _loop_mm(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of ``a`` grouped by ``counts`` times ``b[e]`` (K, N) -> (S, N), one ``torch.mm`` per expert into one buffer."""
    out = POOL.empty((a.shape[0], b.shape[-1]), a.dtype, a.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a[start:start + n], b[e], out=out[start:start + n])
            start += n
    return out


def _loop_wgrad(a_t: torch.Tensor, b: torch.Tensor, counts: list[int], shape) -> torch.Tensor:
    out = POOL.empty(tuple(shape), a_t.dtype, a_t.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a_t[:, start:start + n], b[start:start + n], out=out[e])
        else:
            out[e].zero_()
        start += n
    return out


def _counts_tensor(counts, device) -> torch.Tensor:
    """Per-expert slot counts as a device tensor (a list on the CPU loop path, already a tensor on the grouped path)."""
    return counts if torch.is_tensor(counts) else torch.tensor(counts, device=device)


def _gate_from_spec(act: str, up_first: bool, gated: bool):
    """The ``_ExpertsBase._apply_gate`` of experts with these settings (the custom op receives names, not callables)."""
    act_fn = get_activation(act)

    def gate(h: torch.Tensor) -> torch.Tensor:
        if not gated:
            return act_fn(h)
        first, second = h.chunk(2, dim=-1)
        g, u = (second, first) if up_first else (first, second)
        return act_fn(g) * u

    return gate


# activations whose derivative the custom op computes with aten's backward kernels (it runs below autograd)
_ACT_BACKWARD = {
    "silu": lambda g, x: torch.ops.aten.silu_backward(g, x),
    "swish": lambda g, x: torch.ops.aten.silu_backward(g, x),
    "gelu": lambda g, x: torch.ops.aten.gelu_backward(g, x),
    "gelu_tanh": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    "relu": lambda g, x: torch.ops.aten.threshold_backward(g, x, 0),
}


def _gate_backward_from_spec(act: str, up_first: bool, gated: bool):
    """d(gate)/dh without autograd, for the activations of :data:`_ACT_BACKWARD`."""
    act_fn, act_bwd = get_activation(act), _ACT_BACKWARD[act]

    def gate_backward(h: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
        if not gated:
            return act_bwd(da, h)
        first, second = h.chunk(2, dim=-1)
        g, u = (second, first) if up_first else (first, second)
        dg, du = act_bwd(da * u, g), da * act_fn(g)
        return torch.cat((du, dg) if up_first else (dg, du), dim=-1)

    return gate_backward


def _sorted_forward(x, tok, w, offs, counts, W1, W2, b1, b2, gate_fn, use_gmm, fast_swiglu):
    """Forward of the sorted experts kernel: (out (T, H), tensors the backward needs)."""
    xs = torch.index_select(x, 0, tok, out=POOL.empty((tok.shape[0], x.shape[1]), x.dtype, x.device))
    W1t = W1.transpose(-2, -1)
    W2t = W2.transpose(-2, -1)
    h = _gmm(xs, W1t, offs) if use_gmm else _loop_mm(xs, W1t, counts)
    if b1 is not None:
        h = h + b1.repeat_interleave(_counts_tensor(counts, h.device), dim=0, output_size=h.shape[0])
    if fast_swiglu:
        g, u = h.chunk(2, dim=-1)
        sg = torch.ops.aten.silu.out(g, out=POOL.empty(g.shape, g.dtype, g.device))
        a = torch.mul(sg, u, out=POOL.empty(g.shape, g.dtype, g.device))
    else:
        sg = None
        a = gate_fn(h)
    y = _gmm(a, W2t, offs) if use_gmm else _loop_mm(a, W2t, counts)
    if b2 is not None:
        y = y + b2.repeat_interleave(_counts_tensor(counts, y.device), dim=0, output_size=y.shape[0])
    out = torch.zeros_like(x)
    out.index_add_(0, tok, torch.mul(y, w.unsqueeze(-1).to(y.dtype), out=POOL.empty(y.shape, y.dtype, y.device)))
    return out, (xs, h, sg, a, y)


def _sorted_backward(grad_out, tok, w, offs, counts, W1, W2, xs, h, sg, a, y, gate_fn, use_gmm, fast_swiglu,
                     has_b1, has_b2, needs_x=True, needs_w=True, needs_W1=True, needs_W2=True, gate_backward=None):
    """Backward of :func:`_sorted_forward`: (grad_x, grad_w (S,), dW1, dW2, db1, db2), None where not needed."""
    grad_out = grad_out.contiguous()
    gos = torch.index_select(grad_out, 0, tok, out=POOL.empty((tok.shape[0], grad_out.shape[1]), grad_out.dtype,
                                                               grad_out.device))
    grad_w = torch.linalg.vecdot(gos, y).to(w.dtype) if needs_w else None
    dy = gos.mul_(w.unsqueeze(-1).to(gos.dtype))
    da = _gmm(dy, W2, offs) if use_gmm else _loop_mm(dy, W2, counts)
    if fast_swiglu:
        g, u = h.chunk(2, dim=-1)
        inter = g.shape[-1]
        dh = POOL.empty(h.shape, h.dtype, h.device)
        torch.mul(da, sg, out=dh[:, inter:])
        torch.ops.aten.silu_backward.grad_input(da.mul_(u), g, grad_input=dh[:, :inter])
    elif gate_backward is not None:
        dh = gate_backward(h, da)
    else:
        with torch.enable_grad():
            h_ = h.detach().requires_grad_(True)
            a_ = gate_fn(h_)
        (dh,) = torch.autograd.grad(a_, h_, da)
    if use_gmm:
        dW2 = _gmm(dy.t(), a, offs) if needs_W2 else None
        dW1 = _gmm(dh.t(), xs, offs) if needs_W1 else None
    else:
        dW2 = _loop_wgrad(dy.t(), a, counts, W2.shape) if needs_W2 else None
        dW1 = _loop_wgrad(dh.t(), xs, counts, W1.shape) if needs_W1 else None
    grad_x = None
    if needs_x:
        dxs = _gmm(dh, W1, offs) if use_gmm else _loop_mm(dh, W1, counts)
        grad_x = torch.zeros(grad_out.shape, dtype=dxs.dtype, device=dxs.device)
        grad_x.index_add_(0, tok, dxs)
    db1 = db2 = None
    if has_b1 or has_b2:
        n_groups = W1.shape[0]
        seg = torch.repeat_interleave(torch.arange(n_groups, device=dy.device), _counts_tensor(counts, dy.device),
                                      output_size=dy.shape[0])
        if has_b1:
            db1 = torch.zeros(W1.shape[0], W1.shape[1], dtype=dh.dtype, device=dh.device).index_add_(0, seg, dh)
        if has_b2:
            db2 = torch.zeros(W2.shape[0], W2.shape[1], dtype=dy.dtype, device=dy.device).index_add_(0, seg, dy)
    return grad_x, grad_w, dW1, dW2, db1, db2


class _SortedExpertsFunction(torch.autograd.Function):
    """y[t] = sum_slots w * down_e(act(gate_up_e(x[t]))) for slots sorted by expert.

    Inputs are already sorted: ``tok`` (S,) token of each slot, ``w`` (S,) its weight, ``offs`` cumulative counts.
    SwiGLU (``silu``, [gate; up]) has a hand-written backward that writes the fused gradient in place (no chunk/cat);
    other activations recompute the elementwise part under autograd in backward.
    """

    @staticmethod
    def forward(ctx, x, tok, w, offs, counts, W1, W2, b1, b2, gate_fn, use_gmm, fast_swiglu):
        out, (xs, h, sg, a, y) = _sorted_forward(x, tok, w, offs, counts, W1, W2, b1, b2, gate_fn, use_gmm,
                                                 fast_swiglu)
        ctx.save_for_backward(xs, tok, w, offs, h, sg, a, y, W1, W2)
        ctx.counts, ctx.gate_fn, ctx.use_gmm, ctx.fast_swiglu = counts, gate_fn, use_gmm, fast_swiglu
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, tok, w, offs, h, sg, a, y, W1, W2 = ctx.saved_tensors
        n = ctx.needs_input_grad
        grad_x, grad_w, dW1, dW2, db1, db2 = _sorted_backward(
            grad_out, tok, w, offs, ctx.counts, W1, W2, xs, h, sg, a, y, ctx.gate_fn, ctx.use_gmm, ctx.fast_swiglu,
            ctx.has_b1, ctx.has_b2, needs_x=n[0], needs_w=n[2], needs_W1=n[5], needs_W2=n[6])
        return grad_x, None, grad_w, None, None, dW1, dW2, db1, db2, None, None, None


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int):
    """Sort the (T, k) routing slots by expert.

    Returns ``(order, token_of_slot, counts, offsets)`` where ``order`` indexes the flattened (T*k,) slots of *valid*
    experts only (sentinels ``>= num_experts`` are dropped), ``counts`` (E,) and ``offsets`` (E,) int32 cumulative.
    Dropping the sentinels reads their number on the host (a sync); :func:`sort_by_expert_static` does not.
    """
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    counts = torch.bincount(flat.clamp(max=num_experts), minlength=num_experts + 1)
    n_sentinel = int(counts[num_experts])
    counts = counts[:num_experts]
    if n_sentinel:  # compact first: sentinel slots (dynamic-k padding, zero-FLOP experts) are not even sorted
        pos = (flat < num_experts).nonzero().squeeze(-1)
        order = pos[torch.sort(flat[pos], stable=True)[1]]
    else:
        order = torch.sort(flat, stable=True)[1]
    return order, order // k, counts, counts.cumsum(0).to(torch.int32)


def sort_by_expert_static(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int):
    """Static-shape sort of ALL T*k slots by expert: no host sync, no data-dependent shape (compiled graphs, CUDA).

    Sentinel slots (ids ``>= num_experts``) go to the last expert with weight 0: they cost that expert some rows but
    contribute nothing to the output nor to any gradient. Returns ``(order, token_of_slot, weight_of_slot, valid_slot,
    counts, offsets)`` (all (T*k,) but counts/offsets (E,); offsets int32 cumulative).
    """
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    valid = flat < num_experts
    key = torch.where(valid, flat, num_experts - 1)
    sorted_ids, order = torch.sort(key, stable=True)
    # searchsorted instead of bincount: a static output shape for the compiler
    offs = torch.searchsorted(sorted_ids, torch.arange(num_experts, device=flat.device, dtype=sorted_ids.dtype),
                              right=True)
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    valid = valid[order]
    w = torch.where(valid, top_k_weights.reshape(-1)[order], torch.zeros((), dtype=top_k_weights.dtype,
                                                                            device=top_k_weights.device))
    return order, order // k, w, valid, counts, offs.to(torch.int32)


# ----------------------------------------------------------------------------------------------------------------------
# The compiled path: the same kernel as one opaque custom op (static shapes in, static shapes out)
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("moezoo::sorted_experts", mutates_args=())
def _experts_op(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, W1: torch.Tensor,
                W2: torch.Tensor, b1: torch.Tensor | None, b2: torch.Tensor | None, act: str, up_first: bool,
                gated: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor, torch.Tensor]:
    """Experts forward over all T*k slots (sentinels weighted 0); returns (out, order, xs, h, sg, a, y, counts)."""
    E = W1.shape[0]
    order, tok, w, _, counts, offs = sort_by_expert_static(top_k_index, top_k_weights, E)
    use_gmm = _use_grouped_mm(x.device)
    fast = _is_fast_swiglu(act, up_first, gated)
    with POOL.disabled():  # the outputs leave the op: never hand them out again
        out, (xs, h, sg, a, y) = _sorted_forward(x, tok, w, offs, counts if use_gmm else counts.tolist(), W1, W2,
                                                 b1, b2, _gate_from_spec(act, up_first, gated), use_gmm, fast)
    if sg is None:
        sg = x.new_empty(0)
    return out, order, xs, h.clone() if h._base is not None else h, sg, a, y, counts


@_experts_op.register_fake
def _(x, top_k_index, top_k_weights, W1, W2, b1, b2, act, up_first, gated):
    S = top_k_index.numel()
    inter = W2.shape[-1]
    fast = _is_fast_swiglu(act, up_first, gated)
    return (torch.empty_like(x), top_k_index.new_empty(S, dtype=torch.long), x.new_empty(S, x.shape[1]),
            x.new_empty(S, W1.shape[1]), x.new_empty((S, inter) if fast else (0,)), x.new_empty(S, inter),
            x.new_empty(S, W2.shape[1]), top_k_index.new_empty(W1.shape[0], dtype=torch.long))


@torch.library.custom_op("moezoo::sorted_experts_backward", mutates_args=())
def _experts_backward_op(grad_out: torch.Tensor, top_k_weights: torch.Tensor, order: torch.Tensor,
                         counts: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, xs: torch.Tensor, h: torch.Tensor,
                         sg: torch.Tensor, a: torch.Tensor, y: torch.Tensor, act: str, up_first: bool, gated: bool,
                         has_b1: bool, has_b2: bool) -> list[torch.Tensor]:
    """Gradients (x, top_k_weights, W1, W2, b1, b2) of :func:`_experts_op` (empty tensors for absent biases)."""
    E = W1.shape[0]
    k = top_k_weights.shape[-1]
    flat = top_k_weights.reshape(-1)
    use_gmm = _use_grouped_mm(grad_out.device)
    fast = _is_fast_swiglu(act, up_first, gated)
    offs = counts.cumsum(0).to(torch.int32)
    tok = order // k
    # sentinel slots: weight 0 in the forward; their flags are recomputed from the sorted expert of each slot
    w = flat[order]
    with POOL.disabled():
        gx, gw, dW1, dW2, db1, db2 = _sorted_backward(
            grad_out, tok, w, offs, counts if use_gmm else counts.tolist(), W1, W2, xs, h, sg if fast else None, a,
            y, _gate_from_spec(act, up_first, gated), use_gmm, fast, has_b1, has_b2,
            gate_backward=None if fast else _gate_backward_from_spec(act, up_first, gated))
    grad_w = torch.zeros_like(flat).index_copy_(0, order, gw).view_as(top_k_weights)
    return [gx, grad_w, dW1, dW2, db1 if db1 is not None else grad_out.new_empty(0),
            db2 if db2 is not None else grad_out.new_empty(0)]


@_experts_backward_op.register_fake
def _(grad_out, top_k_weights, order, counts, W1, W2, xs, h, sg, a, y, act, up_first, gated, has_b1, has_b2):
    return [torch.empty_like(grad_out), torch.empty_like(top_k_weights), torch.empty_like(W1), torch.empty_like(W2),
            grad_out.new_empty(W1.shape[:2] if has_b1 else (0,)), grad_out.new_empty(W2.shape[:2] if has_b2 else (0,))]


def _experts_op_setup(ctx, inputs, output):
    x, top_k_index, top_k_weights, W1, W2, b1, b2, act, up_first, gated = inputs
    _, order, xs, h, sg, a, y, counts = output
    valid = (top_k_index.reshape(-1) < W1.shape[0]).view_as(top_k_weights)
    ctx.save_for_backward(top_k_weights, valid, order, counts, W1, W2, xs, h, sg, a, y)
    ctx.spec = (act, up_first, gated, b1 is not None, b2 is not None)


def _experts_op_backward(ctx, grad_out, *_unused):
    top_k_weights, valid, order, counts, W1, W2, xs, h, sg, a, y = ctx.saved_tensors
    # sentinel slots carry weight 0 into the kernel, so zero them in the weights it sees
    w_in = torch.where(valid, top_k_weights, torch.zeros((), dtype=top_k_weights.dtype, device=top_k_weights.device))
    gx, gw, dW1, dW2, db1, db2 = _experts_backward_op(grad_out, w_in, order, counts, W1, W2, xs, h, sg, a, y,
                                                      *ctx.spec)
    gw = torch.where(valid, gw, torch.zeros((), dtype=gw.dtype, device=gw.device))
    act, up_first, gated, has_b1, has_b2 = ctx.spec
    return (gx, None, gw, dW1, dW2, db1 if has_b1 else None, db2 if has_b2 else None, None, None, None)


_experts_op.register_autograd(_experts_op_backward, setup_context=_experts_op_setup)


def _is_fast_swiglu(act, up_first: bool, gated: bool) -> bool:
    return bool(gated and not up_first and act in ("silu", "swish"))


def _use_grouped_mm(device: torch.device) -> bool:
    # CUDA (sm80+): one grouped-mm kernel per projection.  CPU: a per-expert ``torch.mm`` loop writing into one
    # buffer measured faster than torch's CPU grouped-mm kernel (eval/speed/moe_layer.py).
    return device.type == "cuda" and _has_grouped_mm(device)


def _sync_free_routing(device: torch.device) -> bool:
    """Whether the routed path must avoid host syncs (everything but the CPU, where reading counts is free)."""
    return device.type != "cpu"


def moezoo_experts_forward(self: _ExpertsBase, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """moezoo's experts implementation (registered as ``"moezoo"``): sort-based dropless dispatch, grouped matmuls.

    Three paths, chosen at run time, one kernel (:func:`_sorted_forward` / :func:`_sorted_backward`):

    - eager on CPU: sentinel slots dropped (host-side counts), a per-expert ``torch.mm`` loop into one buffer;
    - accelerators (CUDA sm80+ runs ``torch._grouped_mm``): the static-shape sort, counts stay on the device, no
      host sync anywhere in the routed path;
    - under ``torch.compile``: the same kernel as the opaque custom op ``moezoo::sorted_experts`` (static shapes in and
      out, its own backward op), so the compiled graph neither breaks nor recompiles on routing decisions.
    """
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be (tokens, hidden), got shape {tuple(hidden_states.shape)}")
    if not isinstance(self, _ExpertsBase):  # a transformers experts class (model.set_experts_implementation("moezoo"))
        self = _TransformersExpertsView(self)
    W1, W2 = self.in_proj, self.down_proj
    if hidden_states.dtype != W1.dtype:
        hidden_states = hidden_states.to(W1.dtype)
    b1 = self.in_proj_bias
    b2 = self.down_proj_bias if self._bias else None
    standard_gate = isinstance(self, _ExpertsBase) and type(self)._apply_gate is _ExpertsBase._apply_gate
    fast_swiglu = standard_gate and _is_fast_swiglu(self.hidden_act, self.up_first, self.gated)
    if torch.compiler.is_compiling() and standard_gate and self.hidden_act in _ACT_BACKWARD:
        return _experts_op(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype), W1, W2, b1, b2,
                           self.hidden_act, self.up_first, self.gated)[0]
    use_gmm = _use_grouped_mm(hidden_states.device)
    if not _sync_free_routing(hidden_states.device):
        order, tok, counts, offs = sort_by_expert(top_k_index, self.num_experts)
        w = top_k_weights.reshape(-1)[order]
    else:  # no host sync: every slot goes through, sentinels with weight 0
        _, tok, w, _, counts, offs = sort_by_expert_static(top_k_index, top_k_weights, self.num_experts)
    # the per-expert loop needs host-side counts; the grouped-mm path keeps them on the device (no sync)
    counts_arg = counts if use_gmm else counts.tolist()
    return _SortedExpertsFunction.apply(hidden_states, tok, w, offs, counts_arg, W1, W2, b1, b2, self._apply_gate,
                                        use_gmm, fast_swiglu)


class _TransformersExpertsView:
    """The attributes ``moezoo_experts_forward`` reads, taken from a transformers ``@use_experts_implementation`` class
    (Mixtral/Qwen2-MoE/DeepSeek-V3/OLMoE experts...), so ``"moezoo"`` also runs transformers' own models."""

    def __init__(self, module):
        if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True) \
                or getattr(module, "has_post_expert_norm", False):
            raise ValueError(f"experts_implementation='moezoo' supports concatenated, non-transposed experts without a "
                             f"post-expert norm; {type(module).__name__} is not")
        has_gate = getattr(module, "has_gate", True)
        self.num_experts = module.num_experts
        self.in_proj = module.gate_up_proj if has_gate else module.up_proj
        self.down_proj = module.down_proj
        self._bias = bool(getattr(module, "has_bias", False))
        self.in_proj_bias = (module.gate_up_proj_bias if has_gate else module.up_proj_bias) if self._bias else None
        self.down_proj_bias = module.down_proj_bias if self._bias else None
        # hidden_act=None: never moezoo's SwiGLU fast path, the module's own gate function runs
        self.gated, self.up_first, self.hidden_act = has_gate, False, None
        self._apply_gate = module._apply_gate if has_gate else module.act_fn


ALL_EXPERTS_FUNCTIONS.register(DEFAULT_EXPERTS_IMPLEMENTATION, moezoo_experts_forward)


# ----------------------------------------------------------------------------------------------------------------------
# Shared (always-on) experts and zero-FLOP experts
# ----------------------------------------------------------------------------------------------------------------------


class SharedExpert(nn.Module):
    """A dense gated MLP applied to every token (Qwen2-MoE / DeepSeek shared experts; several fuse into one)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ZeroFlopExperts(nn.Module):
    """Experts that cost (almost) no FLOPs, placed after the ``num_routed`` FFN experts in the router's id space.

    In order: ``num_null`` null experts (AdaMoE; output 0), ``num_zero`` zero experts (MoE++; output 0),
    ``num_copy`` copy experts (output = input), ``num_constant`` constant experts (MoE++:
    ``softmax(W_c x)[0] * x + softmax(W_c x)[1] * v_c`` with a learned vector ``v_c``).
    Null and zero experts are both "skip" slots; they are kept apart because official checkpoints weight them differently.
    """

    def __init__(self, hidden_size: int, num_routed: int, *, num_null: int = 0, num_zero: int = 0, num_copy: int = 0,
                 num_constant: int = 0):
        super().__init__()
        self.num_routed = num_routed
        self.num_null, self.num_zero, self.num_copy, self.num_constant = num_null, num_zero, num_copy, num_constant
        self.count = num_null + num_zero + num_copy + num_constant
        self.copy_start = num_routed + num_null + num_zero
        self.constant_start = self.copy_start + num_copy
        if num_constant:
            self.constant = nn.Parameter(torch.empty(num_constant, hidden_size))
            self.constant_gate = nn.Parameter(torch.empty(num_constant, 2, hidden_size))
            nn.init.normal_(self.constant, std=hidden_size ** -0.5)
            nn.init.normal_(self.constant_gate, std=hidden_size ** -0.5)

    @property
    def has_output(self) -> bool:
        return bool(self.num_copy or self.num_constant)

    def null_ids(self) -> range:
        """Ids of experts whose output is zero (null and zero experts)."""
        return range(self.num_routed, self.copy_start)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        if self.num_copy:
            sel = (indices >= self.copy_start) & (indices < self.constant_start)
            out = out + (weights * sel).sum(-1, keepdim=True).to(x.dtype) * x
        for c in range(self.num_constant):
            sel = indices == self.constant_start + c
            wc = (weights * sel).sum(-1, keepdim=True).to(x.dtype)
            rows = sel.any(-1)
            if not rows.any():
                continue
            mix = torch.nn.functional.linear(x, self.constant_gate[c]).softmax(-1)
            out = out + wc * (mix[:, :1] * x + mix[:, 1:] * self.constant[c])
        return out
