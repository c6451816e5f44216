"""Conditional routers: the experts of a token depend on a signal besides the token.

- :class:`ConditionRouter` routes on a per-sample condition vector (HiMoE-VLA's action-space AS-MoE; DiT class/time
  conditioning);
- :class:`PooledRouter` routes whole samples on pooled logits (DriveMoE's scene-aware action experts);
- :class:`ModalityRouter` gives each modality its own gate and expert pool (MoIIE, Uni-MoE modality experts);
- :class:`UnconditionalRouter` wraps any router and sends flagged tokens (e.g. null-class samples) to one extra expert
  (ProMoE's conditional routing).
"""
from __future__ import annotations

import torch
from torch import nn

from ..losses import mutual_information_loss
from .base import Router, register_router
from .output import (RouterOutput, check_router_input, check_top_k, expand_per_sample, samples_of_tokens,
                     topk_weights)
from .topk import TopKRouter


@register_router("condition")
class ConditionRouter(TopKRouter):
    """Routes on a per-sample condition vector instead of the token (HiMoE-VLA's action-space AS-MoE).

    ``forward(hidden_states (T, H), condition=(B, C) | (B, S, C) | (T, C), token_shape=(B, S))``: the condition of a
    sample is repeated over its ``S = T // B`` tokens (so every token of a sample gets the same experts), then the
    top-k routing of :class:`TopKRouter` runs on it (``weight`` is (E, C); every TopKRouter option applies).
    Boolean conditions (HiMoE's action-dimension ``data_mask``) are cast to float.

    ``mi_loss_coef > 0``: in training the router returns ``aux_loss = coef * mutual_information_loss(probs, condition)``
    (HiMoE's InfoNCE between routing distributions of tokens with the same condition; see
    :func:`moezoo.core.losses.mutual_information_loss`, ``mi_temperature`` / ``mi_threshold``).
    ``extras["condition"]`` holds the per-token (T, C) condition.

    HiMoE top-1 uses the raw softmax probability (``norm_topk_prob=False``); its official code renormalises only when
    ``top_k > 1``, with ``renorm_eps=1e-20``.
    """

    signals = ("condition",)
    uses_token_shape = True

    def __init__(self, condition_dim: int, num_experts: int, top_k: int, *, hidden_size: int | None = None,
                 mi_loss_coef: float = 0.0, mi_temperature: float = 0.1, mi_threshold: float = 0.99, **kwargs):
        if not isinstance(condition_dim, int) or condition_dim <= 0:
            raise ValueError(f"condition_dim must be a positive int, got {condition_dim!r}")
        super().__init__(condition_dim, num_experts, top_k, **kwargs)
        self.condition_dim = condition_dim
        self.token_hidden_size = hidden_size
        self.mi_loss_coef, self.mi_temperature, self.mi_threshold = mi_loss_coef, mi_temperature, mi_threshold

    def expand_condition(self, condition, num_tokens: int, token_shape=None) -> torch.Tensor:
        if condition is None:
            raise ValueError("ConditionRouter needs the signal condition= of shape (batch, condition_dim="
                             f"{self.condition_dim}) (one condition vector per sample)")
        if not torch.is_tensor(condition):
            raise ValueError(f"condition must be a tensor of shape (batch, {self.condition_dim}), "
                             f"got {type(condition).__name__}")
        if condition.dim() < 2 or condition.shape[-1] != self.condition_dim:
            raise ValueError(f"condition has shape {tuple(condition.shape)}, expected (batch, condition_dim="
                             f"{self.condition_dim}) or (batch, seq, {self.condition_dim})")
        cond = condition if condition.is_floating_point() else condition.to(self.weight.dtype)
        if cond.dim() > 2:  # already per token
            cond = cond.reshape(-1, self.condition_dim)
            if cond.shape[0] != num_tokens:
                raise ValueError(f"condition has shape {tuple(condition.shape)} = {cond.shape[0]} tokens, "
                                 f"expected {num_tokens} tokens (or one row per sample)")
            return cond
        return expand_per_sample(cond, num_tokens, token_shape, "condition")

    def forward(self, hidden_states: torch.Tensor, condition: torch.Tensor | None = None, token_shape=None,
                **signals) -> RouterOutput:
        check_router_input(hidden_states, self.token_hidden_size)
        cond = self.expand_condition(condition, hidden_states.shape[0], token_shape)
        out = super().forward(cond, **signals)
        out.extras["condition"] = cond
        if self.training and self.mi_loss_coef > 0:
            mi = mutual_information_loss(out.probs, cond, temperature=self.mi_temperature,
                                         threshold=self.mi_threshold) * self.mi_loss_coef
            out.aux_loss = mi if out.aux_loss is None else out.aux_loss + mi
        return out


@register_router("pooled")
class PooledRouter(Router):
    """Per-sample routing: token logits averaged over each sample, divided by a learnable temperature (DriveMoE).

    ``sample_logits = mean_s(W h_s) / |temperature|`` (B, R); ``probs = softmax`` in fp32; top-k; weights renormalised to
    sum 1 (``renorm_eps`` added to the denominator, 0 = DriveMoE); all tokens of a sample share experts and weights.

    Where the logits come from (signals of ``forward``):
      - ``router_logits=`` (B, R): already pooled logits (DriveMoE computes them once and reuses them in every MoE
        layer); used as they are.
      - ``router_hidden_states=`` (B, S', H): hidden states of another layer (DriveMoE: the layer before the first MoE
        layer) pooled instead of the layer's own input.
      - otherwise the layer's own tokens, grouped into samples by ``token_shape`` (MoELayer passes it).
    ``attention_mask=`` (B, S) of the pooled tokens: with ``mask_padding=True`` (default) padding is left out of the
    mean; ``mask_padding=False`` is the official plain mean over all positions.
    ``use_linear=False`` builds a router without weights that only accepts ``router_logits=``.

    ``extras``: ``sample_logits``, ``sample_probs``, ``sample_indices``, ``sample_weights`` (per-sample tensors);
    ``logits``/``probs``/``indices``/``weights`` of the RouterOutput are those repeated over each sample's tokens.
    """

    signals = ("router_hidden_states", "router_logits", "attention_mask")
    uses_token_shape = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, temperature: float = 1.0,
                 learnable_temperature: bool = True, use_linear: bool = True, bias: bool = False,
                 norm_topk_prob: bool = True, renorm_eps: float = 0.0, mask_padding: bool = True,
                 router_dtype: torch.dtype = torch.float32):
        check_top_k(top_k, num_experts)
        if temperature == 0:
            raise ValueError("temperature must be non-zero (logits are divided by |temperature|)")
        super().__init__(hidden_size, num_experts, bias=bias, router_dtype=router_dtype, linear=use_linear)
        self.top_k = top_k
        self.norm_topk_prob, self.renorm_eps, self.mask_padding = norm_topk_prob, renorm_eps, mask_padding
        t = torch.tensor([float(temperature)])
        if learnable_temperature:
            self.temperature = nn.Parameter(t)
        else:
            self.register_buffer("temperature", t)

    def pooled_logits(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, H) -> (B, R) ``mean_s(W h) / |temperature|``."""
        if self.weight is None:
            raise ValueError("this PooledRouter has no weights (use_linear=False): pass router_logits= (batch, "
                             f"num_experts={self.num_experts})")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden states to pool must have shape (batch, seq, {self.hidden_size}), "
                             f"got {tuple(hidden_states.shape)}")
        check_router_input(hidden_states, self.hidden_size)
        dt = self.router_dtype
        tok = self.compute_logits(hidden_states)
        if attention_mask is not None and self.mask_padding:
            if tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{tuple(hidden_states.shape[:2])} (batch, seq)")
            m = (attention_mask != 0).to(dt).unsqueeze(-1)
            pooled = (tok * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            pooled = tok.mean(1)
        return pooled / self.temperature.abs().to(dt)

    def route_samples(self, sample_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, R) logits -> probs (B, R), indices (B, k), weights (B, k)."""
        probs = sample_logits.float().softmax(dim=-1)
        weights, indices = topk_weights(probs, self.top_k, self.norm_topk_prob, self.renorm_eps)
        return probs, indices, weights

    def forward(self, hidden_states: torch.Tensor, *, token_shape=None, router_hidden_states: torch.Tensor | None = None,
                router_logits: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **_) -> RouterOutput:
        T = hidden_states.shape[0]
        if router_logits is not None:
            if not torch.is_tensor(router_logits) or router_logits.dim() != 2 or router_logits.shape[-1] != self.num_experts:
                shape = tuple(router_logits.shape) if torch.is_tensor(router_logits) else type(router_logits).__name__
                raise ValueError(f"router_logits must have shape (batch, num_experts={self.num_experts}), got {shape}")
            sample_logits = router_logits
        elif router_hidden_states is not None:
            if not torch.is_tensor(router_hidden_states):
                raise ValueError("router_hidden_states must be a tensor of shape (batch, seq, hidden)")
            sample_logits = self.pooled_logits(router_hidden_states, attention_mask
                                               if attention_mask is not None and tuple(attention_mask.shape)
                                               == tuple(router_hidden_states.shape[:2]) else None)
        else:
            if token_shape is None or len(token_shape) < 2:
                raise ValueError("PooledRouter needs samples: call the MoELayer with hidden_states (batch, seq, hidden), "
                                 "or pass token_shape=(batch, seq), router_hidden_states= or router_logits=")
            B = int(token_shape[0])
            samples_of_tokens(T, B, token_shape, "token_shape")
            sample_logits = self.pooled_logits(hidden_states.reshape(B, -1, hidden_states.shape[-1]), attention_mask)
        probs, indices, weights = self.route_samples(sample_logits)
        per = samples_of_tokens(T, sample_logits.shape[0], token_shape, "router logits")

        def rep(t):
            return t.repeat_interleave(per, dim=0) if per != 1 else t
        return RouterOutput.from_selection(rep(sample_logits), rep(probs), rep(indices), rep(weights), self.num_experts,
                      sample_logits=sample_logits, sample_probs=probs, sample_indices=indices, sample_weights=weights)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}"


def next_token_modality_ids(modality_ids: torch.Tensor, modalities=(1,), fallback: int = 0) -> torch.Tensor:
    """MoIIE's vision mask as modality ids: a token keeps modality m (in ``modalities``) only if the NEXT token of the
    same sequence has modality m too; otherwise (last token of a run, last position) it becomes ``fallback``.

    ``modality_ids`` (B, S) (or (S,)); returns a tensor of the same shape.
    """
    if modality_ids.dim() == 1:
        return next_token_modality_ids(modality_ids[None], modalities, fallback)[0]
    nxt = torch.cat([modality_ids[:, 1:], torch.full_like(modality_ids[:, :1], -1)], dim=1)
    out = modality_ids
    for m in modalities:
        out = torch.where((modality_ids == m) & (nxt != m), torch.full_like(modality_ids, fallback), out)
    return out


@register_router("modality")
class ModalityRouter(Router):
    """Modality-aware routing: one gate and one expert pool per modality (MoIIE; Uni-MoE-style modality experts).

    ``expert_pools[m]`` lists the expert ids that modality m may use, in the order of its gate's outputs (default:
    every modality uses all experts). ``weight`` (sum of pool widths, H) stacks the gates: modality m's gate is rows
    ``[offset_m, offset_m + len(pool_m))`` (``gate_weight(m)``). A token of modality m gets ``softmax`` over its pool's
    logits, top-k inside the pool, weights renormalised (``norm_topk_prob``, default True as in MoIIE), and the local
    picks are mapped to the pool's expert ids. Outside its pool a token's logits are ``-inf`` and its probs 0.

    ``forward(hidden_states (T, H), modality_ids=(B, S) | (T,), token_shape=)`` — ints in ``[0, num_modalities)``.
    ``next_token_modalities=(1,)``: a token of those modalities whose next token differs is routed as
    ``fallback_modality`` (MoIIE's official vision mask ``type == 1 and next type == 1``; needs (B, S) ids or
    ``token_shape``). ``extras``: ``modality_ids`` (T,) effective ids, ``pool_logits`` / ``pool_token_index`` (per
    modality: its tokens' (n_m, w_m) pool logits and (n_m,) token positions, row-major) for
    :func:`moezoo.core.losses.modality_balance_loss`.
    MoIIE (E=4): pools ``[[1, 2, 3], [0, 1, 2]]`` (language = modality 0 uses ``gate``, vision = 1 uses ``gate_vis``).
    """

    signals = ("modality_ids",)
    uses_token_shape = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, expert_pools=None, num_modalities: int = 2,
                 scoring_func: str = "softmax", norm_topk_prob: bool = True, renorm_eps: float = 0.0, bias: bool = False,
                 next_token_modalities=(), fallback_modality: int = 0, jitter_noise: float = 0.0,
                 router_dtype: torch.dtype = torch.float32):
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if expert_pools is None:
            if not isinstance(num_modalities, int) or num_modalities < 1:
                raise ValueError(f"num_modalities must be a positive int, got {num_modalities!r}")
            expert_pools = [list(range(num_experts))] * num_modalities
        pools = [[int(e) for e in p] for p in expert_pools]
        if not pools:
            raise ValueError("expert_pools must hold one list of expert ids per modality")
        for m, p in enumerate(pools):
            if not p or len(set(p)) != len(p) or any(not 0 <= e < num_experts for e in p):
                raise ValueError(f"expert_pools[{m}]={p} must be distinct expert ids in [0, num_experts={num_experts})")
            check_top_k(top_k, len(p), f"num_experts_per_tok (pool of modality {m} has {len(p)} experts)")
        M = len(pools)
        bad = [m for m in list(next_token_modalities) + [fallback_modality] if not 0 <= int(m) < M]
        if bad:
            raise ValueError(f"next_token_modalities / fallback_modality must be modality ids in [0, {M}), got {bad}")
        widths = [len(p) for p in pools]
        super().__init__(hidden_size, num_experts, bias=bias, scoring_func=scoring_func, jitter_noise=jitter_noise,
                         router_dtype=router_dtype, gate_outputs=sum(widths))
        self.top_k = top_k
        self.expert_pools, self.num_modalities = pools, M
        self.norm_topk_prob, self.renorm_eps = norm_topk_prob, renorm_eps
        self.next_token_modalities = tuple(int(m) for m in next_token_modalities)
        self.fallback_modality = int(fallback_modality)
        self.offsets = [sum(widths[:m]) for m in range(M)]
        # expert ids of each pool per device, built on first use: not buffers, because transformers materialises
        # non-persistent buffers empty when loading and skips the init of loaded modules
        self._pool_ids: dict[torch.device, list[torch.Tensor]] = {}

    def pool_ids(self, modality: int, device: torch.device) -> torch.Tensor:
        """The expert ids (long) of one modality's pool on ``device``."""
        ids = self._pool_ids.get(device)
        if ids is None:
            ids = self._pool_ids[device] = [torch.tensor(p, dtype=torch.long, device=device) for p in self.expert_pools]
        return ids[modality]

    def gate_weight(self, modality: int) -> torch.Tensor:
        """The (w_m, H) gate rows of one modality (a view of ``weight``)."""
        o = self.offsets[modality]
        return self.weight[o: o + len(self.expert_pools[modality])]

    def resolve_modality_ids(self, modality_ids, num_tokens: int, token_shape=None) -> torch.Tensor:
        if modality_ids is None:
            raise ValueError(f"ModalityRouter needs the signal modality_ids= (batch, seq) or (tokens,) with ints in "
                             f"[0, {self.num_modalities})")
        if not torch.is_tensor(modality_ids) or modality_ids.is_floating_point() or modality_ids.is_complex():
            raise ValueError("modality_ids must be an integer (or bool) tensor with one id per token")
        if modality_ids.numel() != num_tokens:
            raise ValueError(f"modality_ids has shape {tuple(modality_ids.shape)} ({modality_ids.numel()} ids), "
                             f"expected one id per token ({num_tokens})")
        ids = modality_ids.long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_modalities):
            raise ValueError(f"modality_ids must lie in [0, {self.num_modalities}) (one expert pool per modality), "
                             f"got values in [{int(ids.min())}, {int(ids.max())}]")
        if self.next_token_modalities:
            if ids.dim() < 2:
                if token_shape is None or len(token_shape) < 2:
                    raise ValueError("next_token_modalities needs modality_ids of shape (batch, seq) or token_shape")
                ids = ids.reshape(int(token_shape[0]), -1)
            ids = next_token_modality_ids(ids.reshape(ids.shape[0], -1), self.next_token_modalities,
                                          self.fallback_modality)
        return ids.reshape(-1).to(self.weight.device)

    def forward(self, hidden_states: torch.Tensor, modality_ids: torch.Tensor | None = None, token_shape=None,
                **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        T, R, k = hidden_states.shape[0], self.num_experts, self.top_k
        mids = self.resolve_modality_ids(modality_ids, T, token_shape)
        dt = self.router_dtype
        all_logits = self.compute_logits(self.jitter(hidden_states))
        logits = all_logits.new_full((T, R), float("-inf"))
        probs = all_logits.new_zeros((T, R))
        indices = torch.zeros(T, k, dtype=torch.long, device=all_logits.device)
        weights = all_logits.new_zeros((T, k))
        pool_logits, pool_index = [], []
        for m, pool in enumerate(self.expert_pools):
            rows = (mids == m).nonzero().squeeze(-1)
            o, w = self.offsets[m], len(pool)
            lm = all_logits[rows, o: o + w]
            pool_logits.append(lm)
            pool_index.append(rows)
            if rows.numel() == 0:
                continue
            pm = torch.sigmoid(lm) if self.scoring_func == "sigmoid" else lm.float().softmax(dim=-1).to(dt)
            wm, li = topk_weights(pm, k, self.norm_topk_prob, self.renorm_eps)
            ids = self.pool_ids(m, lm.device)
            cols = ids.unsqueeze(0).expand(rows.numel(), -1)
            r2 = rows.unsqueeze(-1).expand(-1, w)
            logits = logits.index_put((r2, cols), lm)
            probs = probs.index_put((r2, cols), pm)
            indices = indices.index_put((rows,), ids[li])
            weights = weights.index_put((rows,), wm)
        return RouterOutput.from_selection(logits, probs, indices, weights, R, modality_ids=mids, pool_logits=pool_logits,
                      pool_token_index=pool_index, expert_pools=self.expert_pools)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, pools={self.expert_pools}"


class UnconditionalRouter(Router):
    """ProMoE's conditional routing as a wrapper of any router: tokens flagged by the ``uncond_mask=`` signal go to one
    extra FFN expert (id ``expert_id``, after the routed experts) with weight 1, bypassing the router; the router sees
    only the other tokens and routes them over its own experts (``routed_capacity`` applies to those only).

    ``UnconditionalRouter.wrap(router, expert_id=E)`` turns ``router`` into an instance of
    ``Unconditional<RouterClass>`` (a subclass of both), so its parameters keep their paths (``...mlp.gate.weight``)
    and ``isinstance(router, type(router))`` still holds. ``uncond_mask``: bool, one entry per sample (B,) or per token
    ((B, S) / (T,)). Tensor signals are cut to the routed tokens: per-sample ones (leading dim B) by sample when the
    mask is per-sample, per-token ones (leading T, or (B, S)) by token; ``token_shape`` becomes
    ``(routed samples, S)`` for per-sample masks (so per-sample routers keep working).

    The returned output lives in the layer's expert space (routed, unconditional, zero-FLOP experts): logits are
    ``finfo.min`` where a token cannot go (0 for the unconditional column of flagged tokens), probs 0 / 1 there.
    ``extras``: ``routed_output`` (the router's own output on the routed tokens, for balance / contrastive losses),
    ``routed_token_index`` (n,), ``uncond_token_mask`` (T,), ``uncond_expert_id``.
    """

    num_extra_experts = 1
    uses_token_shape = True
    base_uses_token_shape = False
    expert_id: int = 0
    routed_capacity = None  # a moezoo.core.layer.Capacity for the routed tokens (set by MoELayer)

    @staticmethod
    def wrap(router: Router, *, expert_id: int) -> "UnconditionalRouter":
        base = type(router)
        if isinstance(router, UnconditionalRouter):
            raise ValueError("this router already has an unconditional expert")
        if not isinstance(router, Router):
            raise ValueError(f"UnconditionalRouter.wrap expects a moezoo.core.Router, got {base.__name__}")
        if not isinstance(expert_id, int) or not 0 <= expert_id <= router.num_experts:
            raise ValueError(f"expert_id must be an int in [0, {router.num_experts}], got {expert_id!r}")
        cls = _UNCONDITIONAL_CLASSES.get(base)
        if cls is None:
            cls = type(f"Unconditional{base.__name__}", (UnconditionalRouter, base),
                       {"__module__": __name__, "__doc__": UnconditionalRouter.__doc__,
                        "signals": ("uncond_mask",) + tuple(base.signals),
                        "base_uses_token_shape": bool(getattr(base, "uses_token_shape", False))})
            _UNCONDITIONAL_CLASSES[base] = cls
            globals()[cls.__name__] = cls  # importable by name (pickle)
        router.__class__ = cls
        router.expert_id = expert_id
        return router

    def route_tokens(self, x: torch.Tensor, **signals) -> RouterOutput:
        """The wrapped router's own decision (no unconditional expert)."""
        return super(UnconditionalRouter, self).forward(x, **signals)

    def forward(self, x: torch.Tensor, *, uncond_mask=None, **signals) -> RouterOutput:
        if uncond_mask is None:
            raise ValueError("a MoELayer with unconditional_expert=True needs the signal uncond_mask= (bool, one entry "
                             "per sample (batch,) or per token), True for tokens that go to the unconditional expert")
        if not torch.is_tensor(uncond_mask) or uncond_mask.is_floating_point() or uncond_mask.is_complex():
            raise ValueError("uncond_mask must be a bool (or integer 0/1) tensor")
        T = x.shape[0]
        token_shape = signals.pop("token_shape", None)
        flat = uncond_mask.reshape(-1).to(device=x.device).bool()
        sample_keep = None
        if flat.numel() == T:
            null_tok = flat
        else:
            B = flat.numel()
            per = samples_of_tokens(T, B, token_shape, "uncond_mask")
            null_tok = flat.repeat_interleave(per)
            sample_keep = ~flat
        keep = ~null_tok
        if torch.compiler.is_compiling() and not self.base_uses_token_shape and self.routed_capacity is None:
            return self._forward_static(x, null_tok, signals)
        cond_idx = keep.nonzero().squeeze(-1)
        lead = tuple(int(v) for v in token_shape) if token_shape is not None else None
        sub = {k: _subset_signal(v, T, lead, keep, sample_keep) for k, v in signals.items()}
        if self.base_uses_token_shape:
            if sample_keep is not None and lead is not None and len(lead) >= 2:
                sub["token_shape"] = (int(sample_keep.sum()), *lead[1:])
            else:
                sub["token_shape"] = None
        if cond_idx.numel():
            base = self.route_tokens(x.index_select(0, cond_idx), **sub)
        else:  # nothing to route: run the router on every token once for the output widths, keep no row
            if self.base_uses_token_shape:
                signals["token_shape"] = token_shape
            full = self.route_tokens(x, **signals)
            base = RouterOutput(full.logits[:0], full.probs[:0], full.indices[:0], full.weights[:0],
                                full.experts_per_token[:0], full.num_experts, None, {})
        if self.routed_capacity is not None:
            base = self.routed_capacity.apply(base)
        E = self.expert_id
        R = base.num_experts + 1
        K = base.indices.shape[-1]
        dev = x.device
        mapped = base.indices + (base.indices >= E).long()  # make room for the unconditional id E
        indices = torch.full((T, K), R, dtype=torch.long, device=dev)
        indices[:, 0] = torch.where(null_tok, E, R)
        indices = indices.index_copy(0, cond_idx, mapped)
        w_null = torch.zeros(T, K, dtype=base.weights.dtype, device=dev)
        w_null[:, 0] = null_tok.to(w_null.dtype)
        weights = w_null.index_copy(0, cond_idx, base.weights)

        def widen(t: torch.Tensor, fill: float, null_value: float) -> torch.Tensor:
            full = torch.full((T, R), fill, dtype=t.dtype, device=dev)
            full[:, E] = torch.where(null_tok, torch.full_like(null_tok, null_value, dtype=t.dtype),
                                     torch.full_like(null_tok, fill, dtype=t.dtype))
            col = torch.full((t.shape[0], 1), fill, dtype=t.dtype, device=dev)
            return full.index_copy(0, cond_idx, torch.cat([t[:, :E], col, t[:, E:]], 1))

        logits = widen(base.logits, torch.finfo(base.logits.dtype).min, 0.0)
        probs = widen(base.probs, 0.0, 1.0)
        return RouterOutput.from_selection(logits, probs, indices, weights, R, base.aux_loss, routed_output=base,
                                           routed_token_index=cond_idx, uncond_token_mask=null_tok,
                                           uncond_expert_id=E)


    def _forward_static(self, x: torch.Tensor, null_tok: torch.Tensor, signals: dict) -> RouterOutput:
        """The compiled path (no data-dependent shape): the wrapped router sees every token and the flagged tokens'
        decisions are overwritten. Exact for per-token routers without a routed capacity (the only ones it is used
        for): a routed token's decision does not depend on the other tokens. ``routed_output`` keeps all T rows with
        ``extras["token_mask"]`` (T,) = routed tokens, which the balance / z / contrastive losses honour."""
        T = x.shape[0]
        keep = ~null_tok
        base = self.route_tokens(x, **signals)
        base = RouterOutput(base.logits, base.probs, base.indices, base.weights, base.experts_per_token,
                            base.num_experts, base.aux_loss, {**base.extras, "token_mask": keep})
        E, R, K = self.expert_id, base.num_experts + 1, base.indices.shape[-1]
        nt = null_tok.unsqueeze(-1)
        mapped = base.indices + (base.indices >= E).long()
        first = torch.full_like(mapped, R)
        first[:, 0] = E
        indices = torch.where(nt, first, mapped)
        w_first = torch.zeros_like(base.weights)
        w_first[:, 0] = 1.0
        weights = torch.where(nt, w_first, base.weights)

        def widen(t: torch.Tensor, fill: float, null_value: float) -> torch.Tensor:
            col = torch.full((T, 1), fill, dtype=t.dtype, device=t.device)
            routed = torch.cat([t[:, :E], col, t[:, E:]], 1)
            flagged = torch.full_like(routed, fill)
            flagged[:, E] = null_value
            return torch.where(nt, flagged, routed)

        logits = widen(base.logits, torch.finfo(base.logits.dtype).min, 0.0)
        probs = widen(base.probs, 0.0, 1.0)
        return RouterOutput.from_selection(logits, probs, indices, weights, R, base.aux_loss, routed_output=base,
                                           uncond_token_mask=null_tok, uncond_expert_id=E)


_UNCONDITIONAL_CLASSES: dict[type, type] = {}


def _subset_signal(value, num_tokens: int, token_shape, keep: torch.Tensor, sample_keep: torch.Tensor | None):
    """Cut a router signal to the routed tokens (see :class:`UnconditionalRouter`)."""
    if not torch.is_tensor(value) or value.dim() == 0:
        return value
    n = value.shape[0]
    B = None if sample_keep is None else sample_keep.numel()
    if B is not None and n == B and B != num_tokens:
        return value[sample_keep.to(value.device)]
    if n == num_tokens:
        return value[keep.to(value.device)]
    if token_shape is not None and len(token_shape) >= 2 and tuple(value.shape[:2]) == tuple(token_shape[:2]):
        return value.reshape(num_tokens, *value.shape[2:])[keep.to(value.device)]
    if token_shape is not None and len(token_shape) >= 2 and n == token_shape[0]:  # per-sample, per-token mask
        per = num_tokens // n
        return value.repeat_interleave(per, dim=0)[keep.to(value.device)]
    return value
