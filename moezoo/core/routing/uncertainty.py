"""Uncertainty-aware router (MoFME's UaR, reformulated so that it trains): Monte-Carlo router samples calibrate the
routing weights by their disagreement.

The official UaR is unusable as released (its router is deterministic, so its 5 "samples" are identical, the
covariance is zero and the normalised weights vanish; its einsum only runs when batch == tokens == experts; and its
uncertainty list grows across layers and calls).  This router keeps the idea and fixes the mechanics:

1. **Samples.**  ``S = num_samples`` stochastic router evaluations ``l_s = W drop_s(x) + b + sigma * eps_s``
   (inverted dropout ``input_dropout`` on the router input, Gaussian noise ``logit_noise_std`` on the logits).
2. **Moments.**  Per token and expert the sample mean ``mu_e`` and (biased) variance ``v_e`` of the logits; the mean
   and variance of the sample probabilities ``softmax(l_s)`` are reported too (``extras``).
3. **Calibration (probit approximation).**  ``z_e = mu_e / sqrt(1 + pi * v_e / 8)``.  If the logits are Gaussian
   ``N(mu, v)``, ``E[sigmoid(l)] ~= sigmoid(mu / sqrt(1 + pi v / 8))`` (MacKay 1992); applied per logit this gives a
   softmax that is as confident as the samples agree: experts whose score the samples disagree on are pulled towards
   0 (a flatter, higher-entropy distribution), unanimous scores keep their full margin.  Unlike
   ``mean - beta * std`` it needs no extra hyper-parameter and leaves ``z = mu`` exactly when ``v = 0``.
4. **Selection.**  Top-k of ``z``; weights = softmax over the k selected ``z`` (``softmax_after_topk``, MoFME's
   KeepTopK-softmax) or softmax over all experts gathered and renormalised (``norm_topk_prob``).

Training: the samples use the global RNG (or ``generator=``).  Evaluation (``eval_mode``): ``"deterministic"``
(default) uses the noise-free logits (``v = 0``, the expectation of the dropout logits); ``"mc"`` draws the same S
samples on every call from a fresh ``torch.Generator`` seeded with ``eval_seed`` (reproducible, no state kept).
No state is carried between calls or layers; any number of tokens works.  With ``input_dropout = logit_noise_std =
0`` (or ``num_samples = 1`` and no noise) the router equals :class:`moezoo.core.TopKRouter` with the same options.

``RouterOutput.logits`` holds the calibrated ``z``; ``probs = softmax(z)``; ``extras``: ``mean_logits``,
``logit_var``, ``prob_mean``, ``prob_var`` (each (T, E)).
"""
from __future__ import annotations

import math

import torch

from .base import Router, register_router
from .output import RouterOutput, check_router_input, check_top_k

EVAL_MODES = ("deterministic", "mc")


def probit_calibrate(mean_logits: torch.Tensor, logit_var: torch.Tensor) -> torch.Tensor:
    """``mean / sqrt(1 + pi * var / 8)`` (probit approximation of the expected softmax score)."""
    return mean_logits / torch.sqrt(1.0 + (math.pi / 8.0) * logit_var.clamp_min(0.0))


@register_router("uncertainty")
class UncertaintyRouter(Router):
    """Monte-Carlo, uncertainty-calibrated top-k router (see the module docstring for the formula).

    Args:
        hidden_size, num_experts, top_k: H, E, k.
        num_samples: S Monte-Carlo router samples (>= 1).
        input_dropout: dropout probability on the router input inside each sample.
        logit_noise_std: std of Gaussian noise added to each sample's logits.
        eval_mode: ``"deterministic"`` or ``"mc"`` (fixed-seed samples in eval), ``eval_seed`` its seed.
        softmax_after_topk: softmax over the k selected calibrated logits (default, as MoFME); else softmax over all
            experts, gathered, renormalised when ``norm_topk_prob``.
        bias: a bias on the router linear layer (MoFME has one).
    """

    signals = ("generator",)

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, num_samples: int = 4,
                 input_dropout: float = 0.1, logit_noise_std: float = 0.0, eval_mode: str = "deterministic",
                 eval_seed: int = 0, softmax_after_topk: bool = True, norm_topk_prob: bool = True, bias: bool = True,
                 router_dtype: torch.dtype = torch.float32):
        check_top_k(top_k, num_experts)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if isinstance(input_dropout, bool) or not 0.0 <= float(input_dropout) < 1.0:
            raise ValueError(f"input_dropout must be a probability in [0, 1), got {input_dropout!r}")
        if isinstance(logit_noise_std, bool) or float(logit_noise_std) < 0.0:
            raise ValueError(f"logit_noise_std must be >= 0, got {logit_noise_std!r}")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
        super().__init__(hidden_size, num_experts, bias=bias, router_dtype=router_dtype)
        self.top_k = top_k
        self.num_samples, self.input_dropout, self.logit_noise_std = num_samples, float(input_dropout), float(logit_noise_std)
        self.eval_mode, self.eval_seed = eval_mode, int(eval_seed)
        self.softmax_after_topk, self.norm_topk_prob = softmax_after_topk, norm_topk_prob

    @property
    def stochastic(self) -> bool:
        return self.input_dropout > 0 or self.logit_noise_std > 0

    def sample_logits(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(S, T, E) Monte-Carlo router logits for (T, H) inputs."""
        S, p = self.num_samples, self.input_dropout
        if p > 0:
            keep = torch.full((S, *x.shape), 1.0 - p, dtype=self.router_dtype, device=x.device)
            mask = torch.bernoulli(keep, generator=generator) / (1.0 - p)
            logits = self.compute_logits(x.to(self.router_dtype).unsqueeze(0) * mask)
        else:
            logits = self.compute_logits(x).unsqueeze(0).expand(S, -1, -1)
        if self.logit_noise_std > 0:
            noise = torch.randn(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
            logits = logits + self.logit_noise_std * noise
        return logits

    def forward(self, hidden_states: torch.Tensor, generator: torch.Generator | None = None, **_) -> RouterOutput:
        check_router_input(hidden_states, self.hidden_size)
        if hidden_states.dim() != 2:
            raise ValueError(f"hidden_states must be (tokens, {self.hidden_size}), got {tuple(hidden_states.shape)}")
        use_mc = self.stochastic and (self.training or self.eval_mode == "mc")
        if use_mc:
            if not self.training:
                generator = torch.Generator(device=hidden_states.device).manual_seed(self.eval_seed)
            samples = self.sample_logits(hidden_states, generator)
            mean = samples.mean(0)
            var = samples.var(0, unbiased=False)
            sample_probs = samples.softmax(-1)
            prob_mean, prob_var = sample_probs.mean(0), sample_probs.var(0, unbiased=False)
        else:
            mean = self.compute_logits(hidden_states)
            var = torch.zeros_like(mean)
            prob_mean, prob_var = mean.softmax(-1), torch.zeros_like(mean)
        z = probit_calibrate(mean, var)
        probs = z.softmax(-1)
        if self.softmax_after_topk:
            top, indices = z.topk(self.top_k, dim=-1)
            weights = top.softmax(-1)
        else:
            weights, indices = probs.topk(self.top_k, dim=-1)
            if self.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
        return RouterOutput.from_selection(z, probs, indices, weights, self.num_experts, mean_logits=mean, logit_var=var,
                      prob_mean=prob_mean, prob_var=prob_var)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"samples={self.num_samples}, input_dropout={self.input_dropout}, noise={self.logit_noise_std}, "
                f"eval_mode={self.eval_mode!r}")


__all__ = ["UncertaintyRouter", "probit_calibrate", "EVAL_MODES"]
