"""Training objectives of the DiT-MoE family: DDPM (epsilon, optionally DiT's learned sigma) and rectified flow.

Both are callables ``objective(model, batch) -> (loss, logs)`` that plug into :class:`moezoo.trainer.Trainer` as
``loss_fn``; ``batch`` is ``{"sample": (B, C, H, W) clean image/latent, "class_labels": (B,) long}``. Noise and
timesteps come from torch's global RNG (the trainer checkpoints it, so resumed runs draw the same values). Class dropout
is the model's own label dropout (``config.class_dropout_prob``, active in ``model.train()``). The model's ``aux_loss``
(already ``router_aux_loss_coef`` x switch balance (+ z-loss)) and ``routing_contrastive_loss`` (already x
``routing_contrastive_coef``) are added to the diffusion loss.

Conventions (the ones diffusers' schedulers sample with, so a trained model drops into :class:`DiTMoEPipeline`):

* **DDPM** (``DDPMScheduler`` alphas, default linear betas 1e-4..0.02 over 1000 steps as DiT):
  ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (``scheduler.add_noise``), integer ``t`` in [0, 999] is the model's
  timestep input, the first ``C`` output channels predict ``eps``. With ``learn_sigma`` the other ``C`` channels ``v``
  in [-1, 1] interpolate the log-variance ``frac * log(beta_t) + (1 - frac) * log(posterior_var_t)``,
  ``frac = (v + 1) / 2`` (diffusers' ``variance_type="learned_range"``), trained like DiT/iDDPM by the
  variational-bound term: ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` in bits per dimension with the mean of
  ``p`` built from the *detached* eps prediction (so the VB term only trains the variance), and at ``t = 0`` the
  discretised-Gaussian decoder NLL (256 bins over [-1, 1]). Loss = ``mse(eps) + vb`` (DiT's ``LossType.MSE``).
  Only this VB term is written here; everything else uses the scheduler's tensors.
* **Rectified flow** (``FlowMatchEulerDiscreteScheduler``, SD3 convention): ``sigma = t ~ sigmoid(N(m, s))``
  (logit-normal, ``diffusers.training_utils.compute_density_for_timestep_sampling``),
  ``x_t = (1 - sigma) x_0 + sigma * noise`` (``sigma = 1`` is pure noise), the model's timestep input is
  ``sigma * num_train_timesteps`` (the scheduler's ``timesteps``), and the model predicts the velocity
  ``v = noise - x_0 = d x_t / d sigma``; the Euler step ``x_{sigma'} = x_sigma + (sigma' - sigma) v`` then moves toward
  data as ``sigma`` decreases. With ``learn_sigma`` models only the first ``C`` output channels are used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DDPMObjective", "RectifiedFlowObjective", "build_objective", "normal_kl", "discretized_gaussian_log_likelihood",
           "add_model_losses"]


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales, num_bins: int = 256):
    """Elementwise log-likelihood of data ``x`` in [-1, 1] discretised into ``num_bins`` under N(means, exp(log_scales)^2).

    Bin width ``2 / (num_bins - 1)``; the edge bins extend to -inf / +inf (as in DDPM's decoder).
    """
    half = 1.0 / (num_bins - 1)
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + half))
    cdf_min = torch.special.ndtr(inv_std * (centered - half))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs


def _mean_flat(x):
    return x.reshape(x.shape[0], -1).mean(dim=1)


def add_model_losses(loss: torch.Tensor, out, logs: dict) -> torch.Tensor:
    """``loss`` + the model output's ``aux_loss`` and ``routing_contrastive_loss`` (each already weighted by the
    config coefficient); their values go into ``logs``."""
    for key, name in (("aux_loss", "aux"), ("routing_contrastive_loss", "rcl")):
        v = getattr(out, key, None)
        if v is not None:
            loss = loss + v.to(loss.dtype)
            logs[name] = float(v.detach())
    return loss


def _unpack(batch):
    if not isinstance(batch, dict) or "sample" not in batch or "class_labels" not in batch:
        raise ValueError("batch must be a dict with 'sample' (B, C, H, W) and 'class_labels' (B,), got "
                         f"{type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, dict) else ''}")
    x0, y = batch["sample"], batch["class_labels"]
    if x0.dim() != 4:
        raise ValueError(f"batch['sample'] must be (B, C, H, W), got shape {tuple(x0.shape)}")
    return x0, y.reshape(-1).long()


class DDPMObjective:
    """DDPM epsilon objective with DiT's learned-sigma variational-bound term (see the module docstring).

    Args:
        scheduler: a diffusers ``DDPMScheduler`` (its ``alphas_cumprod`` / ``betas`` define the forward process);
            default: 1000 linear steps 1e-4..0.02, ``variance_type="learned_range"``.
        learn_sigma: train the variance channels; default: ``model.config.learn_sigma`` at call time.
        vb_weight: multiplier of the VB term (1.0 = DiT).
    """

    name = "ddpm"

    def __init__(self, scheduler=None, learn_sigma: bool | None = None, vb_weight: float = 1.0):
        if scheduler is None:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                      variance_type="learned_range", clip_sample=False)
        self.scheduler = scheduler
        self.learn_sigma = learn_sigma
        self.vb_weight = float(vb_weight)
        acp = scheduler.alphas_cumprod.double()
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        betas = 1.0 - acp / acp_prev
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        # log of the posterior variance, clipped at t = 0 (where it is 0) with the t = 1 value, as iDDPM/DiT
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self._buf = {
            "sqrt_acp": acp.sqrt(), "sqrt_1m_acp": (1 - acp).sqrt(), "betas_log": betas.log(),
            "post_logvar": post_logvar,
            "coef_x0": betas * acp_prev.sqrt() / (1.0 - acp),
            "coef_xt": (1.0 - acp_prev) * (1.0 - betas).sqrt() / (1.0 - acp),
        }
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def _get(self, name, t, like):
        return self._buf[name].to(like.device)[t].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def vb_term(self, x0, xt, t, eps_pred, var_pred):
        """(B,) VB term in bits/dim for the variance output ``var_pred`` (eps_pred is detached here)."""
        x0_pred = (xt - self._get("sqrt_1m_acp", t, xt) * eps_pred.detach()) / self._get("sqrt_acp", t, xt)
        model_mean = self._get("coef_x0", t, xt) * x0_pred + self._get("coef_xt", t, xt) * xt
        frac = (var_pred + 1) / 2
        min_log, max_log = self._get("post_logvar", t, xt), self._get("betas_log", t, xt)
        model_logvar = frac * max_log + (1 - frac) * min_log
        true_mean = self._get("coef_x0", t, xt) * x0 + self._get("coef_xt", t, xt) * xt
        kl = _mean_flat(normal_kl(true_mean, min_log.expand_as(xt), model_mean, model_logvar)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def __call__(self, model, batch, return_output: bool = False):
        x0, y = _unpack(batch)
        B, C = x0.shape[:2]
        t = torch.randint(0, self.num_train_timesteps, (B,), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.scheduler.add_noise(x0, noise, t)
        out = model(sample=xt, timestep=t, class_labels=y)
        pred = out.sample
        base = getattr(model, "module", model)  # DDP-wrapped under accelerate
        learn_sigma = self.learn_sigma if self.learn_sigma is not None else bool(getattr(base.config, "learn_sigma", False))
        if learn_sigma and pred.shape[1] != 2 * C:
            raise ValueError(f"learn_sigma needs {2 * C} output channels, the model gives {pred.shape[1]}")
        eps_pred = pred[:, :C]
        mse = _mean_flat((noise.float() - eps_pred.float()) ** 2)
        logs = {"mse": float(mse.mean().detach())}
        loss = mse
        if learn_sigma:
            vb = self.vb_term(x0.float(), xt.float(), t, eps_pred.float(), pred[:, C:2 * C].float())
            loss = loss + self.vb_weight * vb
            logs["vb"] = float(vb.mean().detach())
        loss = add_model_losses(loss.mean(), out, logs)
        logs["loss"] = float(loss.detach())
        return (loss, logs, out) if return_output else (loss, logs)


class RectifiedFlowObjective:
    """Rectified flow with logit-normal ``sigma`` (SD3), velocity target ``noise - x_0`` (see the module docstring).

    Args:
        num_train_timesteps: the model's timestep input is ``sigma * num_train_timesteps`` (must match the
            ``FlowMatchEulerDiscreteScheduler`` used for sampling).
        logit_mean, logit_std: of the logit-normal density (SD3: 0, 1); ``weighting_scheme="uniform"`` samples
            ``sigma ~ U(0, 1)`` instead.
    """

    name = "rectified_flow"

    def __init__(self, num_train_timesteps: int = 1000, logit_mean: float = 0.0, logit_std: float = 1.0,
                 weighting_scheme: str = "logit_normal"):
        if weighting_scheme not in ("logit_normal", "uniform"):
            raise ValueError(f"weighting_scheme must be 'logit_normal' or 'uniform', got {weighting_scheme!r}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.logit_mean, self.logit_std, self.weighting_scheme = float(logit_mean), float(logit_std), weighting_scheme

    def sample_sigmas(self, batch_size: int, device) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        return compute_density_for_timestep_sampling(self.weighting_scheme, batch_size, logit_mean=self.logit_mean,
                                                     logit_std=self.logit_std, device=device)

    @staticmethod
    def interpolate(x0, noise, sigma):
        """``x_sigma = (1 - sigma) x0 + sigma noise`` (``sigma`` (B,))."""
        s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    @staticmethod
    def velocity(x0, noise):
        """The regression target ``noise - x0`` (what ``FlowMatchEulerDiscreteScheduler.step`` integrates)."""
        return noise - x0

    def __call__(self, model, batch, return_output: bool = False):
        x0, y = _unpack(batch)
        C = x0.shape[1]
        sigma = self.sample_sigmas(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        xt = self.interpolate(x0, noise, sigma)
        out = model(sample=xt, timestep=sigma * self.num_train_timesteps, class_labels=y)
        v_pred = out.sample[:, :C]
        mse = _mean_flat((v_pred.float() - self.velocity(x0, noise).float()) ** 2).mean()
        logs = {"mse": float(mse.detach())}
        loss = add_model_losses(mse, out, logs)
        logs["loss"] = float(loss.detach())
        return (loss, logs, out) if return_output else (loss, logs)


def build_objective(kind: str, **kwargs):
    """``"ddpm"`` -> :class:`DDPMObjective`, ``"rectified_flow"`` (alias ``"rf"``, ``"flow"``) -> :class:`RectifiedFlowObjective`.

    DDPM kwargs: ``num_train_timesteps``, ``beta_schedule``, ``beta_start``, ``beta_end``, ``learn_sigma``, ``vb_weight``.
    """
    kind = kind.lower()
    if kind == "ddpm":
        from diffusers import DDPMScheduler

        sched_kw = {k: kwargs.pop(k) for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
                    if k in kwargs}
        sched = DDPMScheduler(**{"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
                                 "beta_end": 0.02, **sched_kw}, variance_type="learned_range", clip_sample=False)
        return DDPMObjective(sched, **kwargs)
    if kind in ("rectified_flow", "rf", "flow"):
        return RectifiedFlowObjective(**kwargs)
    raise ValueError(f"objective type must be 'ddpm' or 'rectified_flow', got {kind!r}")
