"""Auxiliary losses of the shared backbone. Each takes router outputs (or their tensors) and returns a scalar."""
from __future__ import annotations

import math

import torch

from .routing.output import RouterOutput, token_mask_weights
from .stats import expert_counts


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def switch_balance_loss(router_outputs: RouterOutput | list[RouterOutput], *, num_experts: int | None = None,
                        attention_mask: torch.Tensor | None = None, global_batch: bool = False,
                        group=None, normalize: str = "tokens") -> torch.Tensor:
    """Switch/Mixtral load-balancing loss ``E * sum_e f_e * P_e`` (micro-batch, or global-batch).

    ``f_e`` is the fraction of routing slots (token x top-k) sent to expert e, ``P_e`` the mean router probability.
    Several layers are concatenated along tokens, as transformers' ``load_balancing_loss_func`` does (the layers may
    have different slot widths, e.g. top-p or expert-choice routers). ``num_experts`` defaults to the router's full
    expert space (zero-FLOP experts included); sentinel slots count for no expert.

    ``global_batch=True`` (Qwen's global-batch balance): when ``torch.distributed`` is initialised, the expert slot
    counts and token counts are summed over the ranks of ``group`` (all-reduce, no gradient) so ``f_e`` is the
    global-batch frequency, and the local probability sums are normalised by the global token count times the world
    size. The *mean over ranks* of the returned loss is then exactly the loss of the concatenated global batch, and
    so is its data-parallel-averaged gradient (DDP / accelerate average gradients), whatever each rank's token count.
    Without an initialised process group it equals the micro-batch loss.

    ``normalize``: ``"tokens"`` (transformers / Switch: ``f_e = slots_e / tokens``, so ``sum_e f_e = k``) or
    ``"slots"`` (DeepSeek-MoE / DiT-MoE / ProMoE: ``f_e = slots_e / all routed slots``, i.e. ``count_e / (T * k)``
    for fixed k; the ``"tokens"`` value divided by k).
    """
    if normalize not in ("tokens", "slots"):
        raise ValueError(f"normalize must be 'tokens' or 'slots', got {normalize!r}")
    if isinstance(router_outputs, RouterOutput):
        router_outputs = [router_outputs]
    if not router_outputs:
        raise ValueError("router_outputs must hold at least one RouterOutput")
    R = router_outputs[0].num_experts
    E = num_experts or R
    device = router_outputs[0].probs.device
    counts = torch.zeros(R, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(R, dtype=torch.float32, device=device)
    n_tokens = torch.zeros((), dtype=torch.float32, device=device)
    for ro in router_outputs:
        if ro.num_experts != R:
            raise ValueError(f"all router_outputs must share num_experts; got {ro.num_experts} and {R}")
        probs = ro.probs.reshape(-1, R).float()
        layer_mask = _with_token_mask(attention_mask, ro)
        mask = token_mask_weights(layer_mask, probs.shape[0], device)
        counts = counts + expert_counts(ro, layer_mask).to(device)
        if mask is None:
            prob_sum = prob_sum + probs.sum(0)
            n_tokens = n_tokens + probs.shape[0]
        else:
            prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
            n_tokens = n_tokens + mask.sum()
    if global_batch and _dist_ready():
        import torch.distributed as dist

        buf = torch.cat([counts, n_tokens.reshape(1)]).detach()
        dist.all_reduce(buf, group=group)
        world = dist.get_world_size(group)
        f = buf[:R] / (buf[:R].sum() if normalize == "slots" else buf[R]).clamp_min(1e-30)
        p = prob_sum * (world / buf[R].clamp_min(1e-30))
    else:
        f = counts / (counts.sum() if normalize == "slots" else n_tokens).clamp_min(1e-30)
        p = prob_sum / n_tokens.clamp_min(1e-30)
    return (f * p).sum() * E


def _with_token_mask(attention_mask, ro: RouterOutput):
    """``attention_mask`` restricted to the tokens a router output covers: routers that route a subset of the tokens
    with static shapes (the compiled path of ``UnconditionalRouter``) keep all rows and flag the covered ones in
    ``extras["token_mask"]`` (T,); the losses then see exactly the tokens of the subset."""
    tm = ro.extras.get("token_mask") if ro.extras else None
    if tm is None:
        return attention_mask
    tm = tm.reshape(-1)
    if attention_mask is None:
        return tm
    return token_mask_weights(attention_mask, tm.numel(), tm.device) * tm


def router_z_loss(router_outputs: RouterOutput | list[RouterOutput]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2`` (tokens outside an output's
    ``extras["token_mask"]`` left out)."""
    if isinstance(router_outputs, RouterOutput):
        router_outputs = [router_outputs]
    logits = torch.cat([ro.logits.reshape(-1, ro.logits.shape[-1]).float() for ro in router_outputs], 0)
    z = torch.logsumexp(logits, dim=-1).pow(2)
    masks = [ro.extras.get("token_mask") for ro in router_outputs]
    if all(m is None for m in masks):
        return z.mean()
    w = torch.cat([z.new_ones(ro.logits.reshape(-1, ro.logits.shape[-1]).shape[0]) if m is None
                   else m.reshape(-1).to(z.dtype) for ro, m in zip(router_outputs, masks)])
    return (z * w).sum() / w.sum().clamp_min(1.0)



def moe_aux_loss(router_outputs, *, balance_coef: float = 0.0, z_coef: float = 0.0,
                 attention_mask: torch.Tensor | None = None, per_layer_balance: bool = False,
                 normalize: str = "tokens", select=None, terms=()) -> torch.Tensor | None:
    """The one auxiliary-loss aggregator of moezoo models (None when there is no router output).

    ``balance_coef * balance + z_coef * z + sum(routers' own aux losses) + sum(terms)``:

    - balance: :func:`switch_balance_loss` of the layers concatenated along tokens (transformers' convention), or the
      sum of the per-layer losses with ``per_layer_balance=True`` (DiT-MoE / ProMoE; also used when the layers route
      over different expert counts); ``normalize`` and ``attention_mask`` as in :func:`switch_balance_loss`;
    - z: the mean over layers of :func:`router_z_loss` (ST-MoE);
    - ``select``: maps each layer's output to the part the losses see (e.g. the routed tokens of an unconditional-expert
      router); layers left with no token add nothing but still count in the z-loss mean;
    - ``terms``: family-specific extra losses, already weighted (None entries are skipped).
    """
    ros = [ro for ro in router_outputs if ro is not None]
    if not ros:
        return None
    total = torch.zeros((), device=ros[0].logits.device, dtype=torch.float32)
    chosen = [select(ro) if select is not None else ro for ro in ros]
    live = [ro for ro in chosen if ro.indices.shape[0]]
    if balance_coef and live:
        if per_layer_balance or len({ro.num_experts for ro in live}) > 1:
            balance = sum(switch_balance_loss(ro, attention_mask=attention_mask, normalize=normalize) for ro in live)
        else:
            balance = switch_balance_loss(live, attention_mask=attention_mask, normalize=normalize)
        total = total + balance_coef * balance
    if z_coef and live:
        total = total + z_coef * sum(router_z_loss(ro) for ro in live) / len(ros)
    for ro in ros:
        if ro.aux_loss is not None:
            total = total + ro.aux_loss.float()
    for term in terms:
        if term is not None:
            total = total + term.float()
    return total

def _load_vector(load, attention_mask=None) -> torch.Tensor:
    """(R,) float32 expert load from counts/fractions, a RouterOutput, or a list of RouterOutputs (summed)."""
    if isinstance(load, RouterOutput):
        return expert_counts(load, attention_mask)
    if isinstance(load, (list, tuple)) and load and all(isinstance(x, RouterOutput) for x in load):
        R = load[0].num_experts
        if any(ro.num_experts != R for ro in load):
            raise ValueError("all router outputs in `load` must share num_experts")
        return sum(expert_counts(ro, attention_mask) for ro in load)
    if isinstance(load, torch.Tensor) and load.dim() == 1:
        return load.detach().float()
    raise ValueError("load must be an (R,) tensor of expert counts or fractions, a RouterOutput or a list of them; "
                     f"got {type(load).__name__}{'' if not isinstance(load, torch.Tensor) else tuple(load.shape)}")


@torch.no_grad()
def update_selection_bias(router, load, gamma: float = 1e-3, *, attention_mask: torch.Tensor | None = None,
                          group=None, all_reduce: bool = True) -> torch.Tensor:
    """DeepSeek-V3 auxiliary-loss-free balancing: ``bias_e += gamma * sign(mean(load) - load_e)``.

    Call it from the training loop after each step (outside autograd), once per MoE layer::

        out, ro = layer(x)
        ...
        update_selection_bias(layer.gate, ro, gamma=1e-3)

    Args:
        router: a router with an ``e_score_correction_bias`` buffer (``TopKRouter(use_selection_bias=True)``), a module
            holding one as ``.gate`` (a ``MoELayer``), or the (R,) bias tensor itself (updated in place).
        load: (R,) slot counts or load fractions per expert, a :class:`RouterOutput`, or a list of them (summed; e.g.
            the router outputs of the micro-batches of one optimizer step).
        gamma: bias update speed (DeepSeek-V3 uses 0.001, then 0 for the last part of training).
        attention_mask: excludes padding tokens when ``load`` holds router outputs.
        group, all_reduce: when ``torch.distributed`` is initialised the load is summed over ``group`` first, so every
            data-parallel rank applies the same update and the biases stay identical.
    Returns the (R,) update that was added. Overloaded experts go down, underloaded ones up; equal loads stay put.
    """
    bias = router
    if isinstance(router, torch.nn.Module):
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is None and isinstance(getattr(router, "gate", None), torch.nn.Module):
            bias = getattr(router.gate, "e_score_correction_bias", None)
        if bias is None:
            raise ValueError(f"{type(router).__name__} has no e_score_correction_bias; build the router with "
                             "use_selection_bias=True")
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1:
        raise ValueError("router must be a router module with an e_score_correction_bias or a 1-D bias tensor")
    if not isinstance(gamma, (int, float)) or gamma < 0:
        raise ValueError(f"gamma must be a non-negative number, got {gamma!r}")
    vec = _load_vector(load, attention_mask).to(bias.device)
    if vec.numel() != bias.numel():
        raise ValueError(f"load has {vec.numel()} experts, the selection bias {bias.numel()}")
    if all_reduce and _dist_ready():
        vec = vec.clone()
        torch.distributed.all_reduce(vec, group=group)
    delta = (gamma * torch.sign(vec.mean() - vec)).to(bias.dtype)
    bias.add_(delta)
    return delta


class CoefficientSchedule:
    """A loss coefficient as a function of the training step: ``coef = schedule(step)``.

    Args:
        value: the coefficient after warm-up (and before decay).
        kind: ``"constant"`` (``value`` always), ``"linear_warmup"`` (0 -> ``value`` linearly over ``warmup_steps``,
            then constant) or ``"cosine"`` (optional linear warm-up, then cosine from ``value`` to ``final_value`` over
            ``decay_steps``, then ``final_value``) or ``"linear_decay"`` (optional linear warm-up, then linear from
            ``value`` to ``final_value`` over ``decay_steps``, then ``final_value``; UniMoE-Audio's aux-loss weight).
        warmup_steps: linear warm-up length (``linear_warmup`` needs > 0; optional for ``cosine``).
        decay_steps: cosine length after warm-up (``cosine`` only).
        final_value: the value the cosine ends at.
        start_value: the value warm-up starts from (0 by default).
    """

    KINDS = ("constant", "linear_warmup", "cosine", "linear_decay")

    def __init__(self, value: float, kind: str = "constant", *, warmup_steps: int = 0, decay_steps: int | None = None,
                 final_value: float = 0.0, start_value: float = 0.0):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        if kind == "linear_warmup" and warmup_steps == 0:
            raise ValueError("kind='linear_warmup' needs warmup_steps > 0")
        if kind in ("cosine", "linear_decay") and (not isinstance(decay_steps, int) or decay_steps <= 0):
            raise ValueError(f"kind={kind!r} needs decay_steps, a positive int; got {decay_steps!r}")
        self.value, self.kind, self.warmup_steps = float(value), kind, warmup_steps
        self.decay_steps, self.final_value, self.start_value = decay_steps, float(final_value), float(start_value)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.kind == "constant":
            return self.value
        if step < self.warmup_steps:
            return self.start_value + (self.value - self.start_value) * step / self.warmup_steps
        if self.kind == "linear_warmup":
            return self.value
        t = min(step - self.warmup_steps, self.decay_steps) / self.decay_steps
        if self.kind == "linear_decay":
            return self.value - (self.value - self.final_value) * t
        return self.final_value + 0.5 * (self.value - self.final_value) * (1.0 + math.cos(math.pi * t))

    def __repr__(self) -> str:
        return (f"CoefficientSchedule(value={self.value}, kind={self.kind!r}, warmup_steps={self.warmup_steps}, "
                f"decay_steps={self.decay_steps}, final_value={self.final_value})")


@torch.no_grad()
def null_expert_usage(router_outputs: RouterOutput | list[RouterOutput], null_ids,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of the (non-sentinel) routing slots that went to null experts (a statistic, no gradient).

    ``null_ids``: the null/zero expert ids, e.g. ``layer.zero_flop.null_ids()`` (a range), a list or a tensor.
    """
    if isinstance(router_outputs, RouterOutput):
        router_outputs = [router_outputs]
    ids = torch.as_tensor(list(null_ids), dtype=torch.long)
    total = torch.zeros((), dtype=torch.float32)
    null = torch.zeros((), dtype=torch.float32)
    for ro in router_outputs:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= ro.num_experts):
            raise ValueError(f"null_ids must lie in [0, {ro.num_experts}), got {ids.tolist()}")
        counts = expert_counts(ro, attention_mask).cpu()
        total += counts.sum()
        null += counts[ids].sum()
    return null / total.clamp_min(1.0)


def unimoe_audio_balance_loss(router_outputs: RouterOutput | list[RouterOutput], *, fixed_expert_ids=None,
                              aux_balance_weight: torch.Tensor | None = None) -> torch.Tensor:
    """UniMoE-Audio's masked balance loss over the dynamic (top-p) experts, null experts included.

    Over the dynamic columns (all ids except ``fixed_expert_ids``, by default ``extras["fixed_expert_ids"]`` of the
    router output): ``m`` = 0/1 selection mask (padding tokens select nothing), ``P`` = softmax of the logits with the
    unselected entries filled with ``finfo.min`` (a token with no selection -> uniform).  The loss is
    ``D * sum_e f_e * p_e`` with ``f``, ``p`` the token means of ``m`` and ``P`` — weighted means with per-token
    weights ``aux_balance_weight`` (any shape, one entry per token; e.g. the attention mask, or a 0/1 task weight already
    multiplied by it) when given.  ``D`` counts the dynamic experts.  Several layers are concatenated along tokens
    (the weights repeated per layer).  Not multiplied by any coefficient.
    """
    if isinstance(router_outputs, RouterOutput):
        router_outputs = [router_outputs]
    R = router_outputs[0].num_experts
    fixed = router_outputs[0].extras.get("fixed_expert_ids", []) if fixed_expert_ids is None else fixed_expert_ids
    fixed = {int(i) for i in fixed}
    dyn = torch.tensor([i for i in range(R) if i not in fixed], dtype=torch.long, device=router_outputs[0].logits.device)
    if dyn.numel() == 0:
        raise ValueError(f"fixed_expert_ids={sorted(fixed)} leave no dynamic expert among {R}")
    logits = torch.cat([ro.logits.reshape(-1, R).float().index_select(1, dyn) for ro in router_outputs], 0)
    mask = torch.cat([ro.expert_mask().reshape(-1, R).index_select(1, dyn) for ro in router_outputs], 0).float()
    probs = logits.masked_fill(mask == 0, torch.finfo(logits.dtype).min).softmax(dim=-1)
    if aux_balance_weight is None:
        f, p = mask.mean(0), probs.mean(0)
    else:
        w = aux_balance_weight.reshape(-1).to(device=logits.device, dtype=torch.float32)
        if w.numel() * len(router_outputs) != logits.shape[0]:
            raise ValueError(f"aux_balance_weight has {w.numel()} entries, expected one per token "
                             f"({logits.shape[0] // len(router_outputs)})")
        w = w.repeat(len(router_outputs))
        denom = w.sum().clamp_min(torch.finfo(torch.float32).tiny)
        f = (mask * w[:, None]).sum(0) / denom
        p = (probs * w[:, None]).sum(0) / denom
    return (f * p).sum() * dyn.numel()


# ----------------------------------------------------------------------------------------------------------------------
# Conditional-routing losses: DeepSeek sequence-level balance, HiMoE mutual information, per-modality Switch (MoIIE)
# ----------------------------------------------------------------------------------------------------------------------


def sequence_balance_loss(router_outputs: RouterOutput | list[RouterOutput], *, batch_size: int | None = None,
                          num_experts: int | None = None, top_k: int | None = None,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek's sequence-level balance loss (``seq_aux``), per layer, summed over layers.

    Per sample b: ``ce_e = count_e * E / (S * k)`` (count_e = routing slots of the sample's S tokens sent to e) and
    ``P_e = mean_t p_e``; the loss is ``mean_b sum_e ce_e * P_e`` (multiply by the coefficient yourself). Tokens are
    grouped into samples by ``batch_size`` (rows are (B, S) row-major) or by 3-D ``probs``/``indices`` of a reshaped
    output. ``num_experts`` (E) defaults to the router's expert space; ``top_k`` (k) to the slot width.
    ``attention_mask`` (B, S): padding is left out of counts and means and S becomes each sample's real length (the
    official loss has no mask).
    """
    if isinstance(router_outputs, RouterOutput):
        router_outputs = [router_outputs]
    if not router_outputs:
        raise ValueError("router_outputs must hold at least one RouterOutput")
    total = None
    for ro in router_outputs:
        R = ro.num_experts
        E = num_experts or R
        probs = ro.probs.float()
        idx = ro.indices
        if probs.dim() == 3:
            B = probs.shape[0]
        elif batch_size is None:
            raise ValueError("sequence_balance_loss needs batch_size= (flattened (batch*seq) tokens) or a RouterOutput "
                             "reshaped to (batch, seq, ...)")
        else:
            B = batch_size
        T = probs.reshape(-1, R).shape[0]
        if not isinstance(B, int) or B <= 0 or T % B:
            raise ValueError(f"batch_size={B!r} does not divide the {T} tokens of the router output")
        S = T // B
        probs = probs.reshape(B, S, R)
        idx = idx.reshape(B, S, -1)
        k = top_k or idx.shape[-1]
        if attention_mask is None:
            m = torch.ones(B, S, dtype=torch.float32, device=probs.device)
        else:
            if attention_mask.numel() != T:
                raise ValueError(f"attention_mask has {attention_mask.numel()} entries, expected one per token ({T})")
            m = (attention_mask.reshape(B, S) != 0).to(device=probs.device, dtype=torch.float32)
        slot_w = m.unsqueeze(-1).expand(B, S, idx.shape[-1]).reshape(B, -1)
        counts = torch.zeros(B, R + 1, dtype=torch.float32, device=probs.device).scatter_add_(
            1, idx.reshape(B, -1).clamp(0, R), slot_w)[:, :R]
        n = m.sum(1, keepdim=True)
        ce = counts * E / (n * k).clamp_min(1e-30)
        p = (probs * m.unsqueeze(-1)).sum(1) / n.clamp_min(1e-30)
        loss = (ce * p).sum(-1).mean()
        total = loss if total is None else total + loss
    return total


def mutual_information_loss(features, condition: torch.Tensor | None = None, *, temperature: float = 0.1,
                            threshold: float = 0.99, eps: float = 1e-8) -> torch.Tensor:
    """HiMoE-VLA's mutual-information (InfoNCE) routing loss over all T tokens.

    ``features`` (T, D) (HiMoE: the router's softmax scores; or a RouterOutput: its ``probs``, and ``condition``
    defaults to its ``extras["condition"]``) are L2-normalised; ``sim = exp(f f^T / temperature)``. Positives of token i
    are the OTHER tokens j whose normalised conditions have cosine ``> threshold`` (same sample, or an identical
    condition elsewhere); ``loss = mean_i -log(sum_pos sim / (sum_all sim + eps) + eps)`` (denominator includes i
    itself). Computed with the exponent shifted by ``-1/temperature`` (same value, no overflow for small temperatures).
    Memory is O(T^2). Multiply by the coefficient yourself (HiMoE ``aux_loss_alpha``).
    """
    if isinstance(features, RouterOutput):
        if condition is None:
            condition = features.extras.get("condition")
        features = features.probs
    if condition is None:
        raise ValueError("mutual_information_loss needs condition= (tokens, condition_dim), one row per token")
    f = features.reshape(-1, features.shape[-1]).float()
    c = condition.reshape(-1, condition.shape[-1]).float().to(f.device)
    if c.shape[0] != f.shape[0]:
        raise ValueError(f"condition has {c.shape[0]} rows, expected one per token ({f.shape[0]})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    f = torch.nn.functional.normalize(f, dim=-1)
    cn = torch.nn.functional.normalize(c, dim=-1)
    pos = (cn @ cn.T) > threshold
    pos.fill_diagonal_(False)
    shift = 1.0 / temperature
    sim = torch.exp(f @ f.T / temperature - shift)
    num = (sim * pos).sum(1)
    den = sim.sum(1) + eps * math.exp(-shift)
    return (-torch.log(num / den + eps)).mean()


def modality_balance_loss(router_output: RouterOutput, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-modality Switch balance loss of a :class:`moezoo.core.routing.ModalityRouter` output -> (M,) losses.

    For modality m, over its tokens (``attention_mask`` entries of those tokens as the mask): the Switch loss in the
    modality's own pool — ``w_m * sum_e f_e P_e`` with ``f`` the masked fraction of routing slots (per rank slot, summed)
    and ``P`` the mean probability over the pool (MoIIE's ``load_balancing_loss_func`` on each modality's router logits,
    times the gate width, not E). A modality without tokens gives 0. Multiply by the per-modality coefficients yourself.
    """
    ex = router_output.extras
    if "pool_token_index" not in ex or "expert_pools" not in ex:
        raise ValueError("modality_balance_loss needs the output of a ModalityRouter (extras pool_token_index, "
                         "expert_pools)")
    R = router_output.num_experts
    probs_all = router_output.probs.reshape(-1, R)
    k = router_output.indices.shape[-1]
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1)
        if mask.numel() != probs_all.shape[0]:
            raise ValueError(f"attention_mask has {mask.numel()} entries, expected one per token ({probs_all.shape[0]})")
    losses = []
    for rows, pool in zip(ex["pool_token_index"], ex["expert_pools"]):
        if rows.numel() == 0:
            losses.append(probs_all.new_zeros((), dtype=torch.float32))
            continue
        cols = torch.as_tensor(pool, dtype=torch.long, device=probs_all.device)
        p = probs_all[rows][:, cols].float()
        local = p.topk(k, dim=-1).indices
        sub = RouterOutput(p, p, local, torch.ones_like(p[:, :k]), torch.full_like(local[:, 0], k), len(pool))
        losses.append(switch_balance_loss(sub, attention_mask=None if mask is None else mask[rows.to(mask.device)]))
    return torch.stack(losses)


# ----------------------------------------------------------------------------------------------------------------------
# ProMoE routing contrastive loss
# ----------------------------------------------------------------------------------------------------------------------


def routing_contrastive_loss(prototypes: torch.Tensor, hidden_states: torch.Tensor, indices, *,
                             temperature: float = 0.07, use_top_k: bool = True,
                             token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ProMoE's routing contrastive loss (RCL) of one MoE layer (multiply by its coefficient yourself).

    For every prototype c (``prototypes`` (E, H)) with at least one assigned token, ``m_c`` = mean of the router
    inputs (``hidden_states`` (T, H)) of its tokens; a token is assigned to c if any of its top-k slots is c
    (``use_top_k=True``, ProMoE's configs) or only its first slot (``use_top_k=False``). With V the valid
    prototypes: ``logits = cos(prototype_v, m_w) / temperature`` (V, V) and the loss is the cross-entropy with the
    diagonal as targets. 0 when fewer than two prototypes are valid.

    ``indices``: (T, k) expert ids (ids outside [0, E) - sentinels, an unconditional expert - assign nothing), or a
    :class:`RouterOutput` (its ``indices``). ``token_mask`` (T,) bool keeps only those tokens (e.g. the conditional
    ones). Vectorised: no Python loop over prototypes.
    """
    if isinstance(indices, RouterOutput):
        indices = indices.indices
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if prototypes.dim() != 2:
        raise ValueError(f"prototypes must be (num_experts, hidden), got shape {tuple(prototypes.shape)}")
    E, H = prototypes.shape
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    if x.shape[-1] != H:
        raise ValueError(f"hidden_states have width {x.shape[-1]}, the prototypes {H}")
    idx = indices.reshape(x.shape[0], -1) if indices.numel() else indices.reshape(x.shape[0], 0)
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"indices hold {idx.shape[0]} tokens, hidden_states {x.shape[0]}")
    if not use_top_k:
        idx = idx[:, :1]
    idx = idx.to(x.device)
    valid_slot = (idx >= 0) & (idx < E)
    assign = torch.zeros(x.shape[0], E + 1, dtype=x.dtype, device=x.device)
    assign.scatter_(1, torch.where(valid_slot, idx, E), 1.0)
    assign = assign[:, :E]  # (T, E) 1 if the token is assigned to the prototype (any slot)
    if token_mask is not None:
        keep = token_mask.reshape(-1).to(device=x.device)
        if keep.numel() != x.shape[0]:
            raise ValueError(f"token_mask has {keep.numel()} entries, expected one per token ({x.shape[0]})")
        assign = assign * keep.to(assign.dtype)[:, None]
    # static shapes (no host sync, compile-clean): every prototype takes part, the ones without tokens are masked out
    # of the logits and the targets; with fewer than two valid prototypes the loss is 0
    counts = assign.sum(0)
    valid = counts > 0
    means = (assign.T @ x) / counts.clamp_min(1.0)[:, None]
    centers = torch.nn.functional.normalize(prototypes, p=2, dim=1)
    means = torch.nn.functional.normalize(means.to(centers.dtype), p=2, dim=1)
    logits = (centers @ means.T / temperature).masked_fill(~valid[None, :], torch.finfo(centers.dtype).min)
    target = torch.where(valid, torch.arange(E, device=logits.device), -100)
    n_valid = valid.sum()
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    return torch.where(n_valid >= 2, loss / n_valid.clamp_min(1).to(loss.dtype), torch.zeros((), dtype=loss.dtype,
                                                                                             device=loss.device))


def router_supervision_loss(logits: torch.Tensor, labels: torch.Tensor, *, gamma: float = 0.0,
                            alpha: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Supervised routing: (focal) cross-entropy between per-sample router logits (N, R) and target ids (N,).

    DriveMoE supervises its camera router with the annotated relevant view and its action router with the scenario
    (skill) label, both with a focal loss ``alpha_y * (1 - p_y)^gamma * CE`` (``gamma=0`` and ``alpha=None`` is plain
    cross-entropy). ``alpha`` (R,) weighs classes (DriveMoE: normalised inverse class frequencies). Targets equal to
    ``ignore_index`` are left out; with no valid target the loss is 0 (still connected to ``logits``).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (samples, num_choices), got {tuple(logits.shape)}")
    labels = torch.as_tensor(labels, device=logits.device).long().reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries, expected one per sample ({logits.shape[0]})")
    valid = labels != ignore_index
    R = logits.shape[-1]
    if bool(((labels[valid] < 0) | (labels[valid] >= R)).any()):
        raise ValueError(f"labels must be in [0, {R}) (or ignore_index={ignore_index}), got {labels.tolist()}")
    if not bool(valid.any()):
        return logits.sum() * 0.0
    lg, y = logits[valid].float(), labels[valid]
    ce = torch.nn.functional.cross_entropy(lg, y, reduction="none")
    loss = ce if gamma == 0 else (1 - torch.exp(-ce)).pow(gamma) * ce
    if alpha is not None:
        alpha = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device).reshape(-1)
        if alpha.shape[0] != R:
            raise ValueError(f"alpha has {alpha.shape[0]} entries, expected num_choices={R}")
        loss = alpha[y] * loss
    return loss.mean()
