"""Flow-matching sampling of the mask-conditioned MM-DiT (one sampler for everything that samples).

Solvers (`SolverConfig`): `euler` (the scheduler's own step, as `StableDiffusion3Pipeline` takes it), `heun`
(second order on the same σ grid: two evaluations per step, the last step Euler, 2N−1 evaluations) and `rk45`
(adaptive Dormand–Prince from scipy's `solve_ivp`, with `rtol`/`atol`; the number of evaluations is what it takes).

The σ grid of N steps is `diffusers` (the scheduler's `set_timesteps(N)`, exactly as `StableDiffusion3Pipeline`
sets it, dynamic shift included) or `uniform` (the shifted points 1, (N−1)/N, …, 1/N, then 0). diffusers' grid
ends with a step from σ ≈ 0.009 to 0, so at 1–4 steps almost all of the path is one jump; the uniform grid splits
it evenly, and its K-step grid is a subset of its N-step grid whenever K divides N (few-step models use it).

Classifier-free guidance uses the stored empty-prompt embedding, mask guidance the null mask condition (a model
fine-tuned with mask dropout); one function evaluation (NFE) is then one transformer call on a doubled batch.
Initial noise is drawn per item from (seed, item id), so an item's image does not depend on the batch it is sampled
in (rk45 adapts its steps to the whole batch it is given; the pipeline gives it one image at a time for that
reason).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from crfm.utils.flags import add_settings_flags, option, positive_float, settings_from_args
from crfm.utils.quiet import sd3_pipeline_module

# Called on each velocity the model gives: (grid index, sigma, latents, velocity) -> velocity. The grid index of σ is
# the Euler step of the N-step grid whose interval (σ_{i+1}, σ_i] holds σ (see `grid_index`).
VelocityHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SOLVERS = ("euler", "heun", "rk45")
SIGMA_GRIDS = ("diffusers", "uniform")


@dataclass(frozen=True)
class SolverConfig:
    """How the flow is integrated; `add_flags` makes the fields command-line flags, `from_args` reads them back."""

    solver: str = option("euler", "ODE solver (heun: 2N-1 calls; rk45: adaptive)", choices=SOLVERS)
    sigma_grid: str = option(
        "diffusers",
        "sigma grid of N steps: the scheduler's (diffusers) or evenly split (uniform, few steps)",
        choices=SIGMA_GRIDS,
    )
    rtol: float = option(1e-3, "rk45 relative tolerance", kind=positive_float)
    atol: float = option(1e-3, "rk45 absolute tolerance (latents have std ~1)", kind=positive_float)

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.sigma_grid not in SIGMA_GRIDS:
            raise ValueError(f"sigma_grid must be one of {SIGMA_GRIDS}, got {self.sigma_grid!r}")
        if self.rtol <= 0 or self.atol <= 0:
            raise ValueError("rtol and atol must be > 0")

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        add_settings_flags(cls, parser.add_argument_group("solver"))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SolverConfig:
        return settings_from_args(cls, args)

    def describe(self, num_inference_steps: int) -> str:
        if self.solver == "rk45":
            return f"rk45 (rtol {self.rtol:g}, atol {self.atol:g})"
        return f"{self.solver}, {num_inference_steps} steps on the {self.sigma_grid} grid"


@dataclass
class FlowSolution:
    latents: torch.Tensor  # the final latents (σ = 0)
    nfe: int  # velocity evaluations (transformer calls; a CFG call counts once)
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # grid index i -> latents at σ_i (as asked)


def initial_noise(
    item_ids: Sequence[int], seed: int, shape: tuple[int, int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[B, C, H, W] standard normal noise, item `i` drawn from its own generator seeded by (seed, i)."""
    rows = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)), dtype=dtype)
        for i in item_ids
    ]
    return torch.stack(rows)


def set_timesteps(
    scheduler,
    num_inference_steps: int,
    latent_hw: tuple[int, int],
    patch_size: int,
    device,
    sigma_grid: str = "diffusers",
) -> torch.Tensor:
    """Set `scheduler`'s grid of `num_inference_steps` steps (diffusers': as `StableDiffusion3Pipeline` would for
    latents of this size); returns its timesteps. `scheduler.sigmas` then holds the N + 1 grid points."""
    sd3 = sd3_pipeline_module()
    calculate_shift, retrieve_timesteps = sd3.calculate_shift, sd3.retrieve_timesteps
    if sigma_grid not in SIGMA_GRIDS:
        raise ValueError(f"sigma_grid must be one of {SIGMA_GRIDS}, got {sigma_grid!r}")
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        seq_len = (latent_hw[0] // patch_size) * (latent_hw[1] // patch_size)
        kwargs["mu"] = calculate_shift(
            seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.16),
        )
    if sigma_grid == "uniform":  # the scheduler shifts these and appends σ = 0
        kwargs["sigmas"] = [1.0 - i / num_inference_steps for i in range(num_inference_steps)]
        timesteps, _ = retrieve_timesteps(scheduler, None, device, **kwargs)
    else:
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, **kwargs)
    return timesteps


def grid_index(sigma: float, grid: torch.Tensor) -> int:
    """The step i of the grid σ_0 = 1 > … > σ_N = 0 with σ in (σ_{i+1}, σ_i] (σ_i itself is step i's start)."""
    return max(0, int((grid[:-1] >= float(sigma) - 1e-7).sum().item()) - 1)


def sample_latents(
    model,
    scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    mask_latents: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    num_inference_steps: int = 28,
    guidance_scale: float = 1.0,
    velocity_hook: VelocityHook | None = None,
    progress: bool = False,
    solver: SolverConfig | None = None,
    save_at: Sequence[int] = (),
    mask_guidance_scale: float = 1.0,
    null_mask_latents: torch.Tensor | None = None,
) -> FlowSolution:
    """Integrate the flow from noise `latents` (σ = 1) to clean latents (σ = 0).

    `model` is a `MaskSD3Transformer2DModel` (or diffusers' `SD3Transformer2DModel` when `mask_latents` is None).
    Guidance is on when `guidance_scale > 1`; the negative embeddings (the empty prompt) are then required.
    Mask guidance is on when `mask_guidance_scale > 1`: the same guidance with the null mask condition
    `null_mask_latents` (`crfm.models.conditioning.null_mask_condition`) as the unconditional branch, the prompt
    kept. One guidance at a time: both double the batch, and combining them is a third branch this does not draw.
    `velocity_hook` may rewrite each velocity (CRFM does); no gradient is taken through the model. `save_at`:
    grid indices i whose latents (at σ_i of the N-step grid) are returned in `states` (any solver).
    """
    solver = solver or SolverConfig()
    text_guided, mask_guided = guidance_scale > 1.0, mask_guidance_scale > 1.0
    guided = text_guided or mask_guided
    if text_guided and mask_guided:
        raise ValueError("guidance_scale and mask_guidance_scale: one at a time")
    if text_guided and (negative_prompt_embeds is None or negative_pooled_prompt_embeds is None):
        raise ValueError("guidance_scale > 1 needs the empty-prompt embeddings (negative_prompt_embeds)")
    if mask_guided and (mask_latents is None or null_mask_latents is None):
        raise ValueError("mask_guidance_scale > 1 needs the mask and the null mask condition (null_mask_latents)")
    if any(not 0 <= i <= num_inference_steps for i in save_at):
        raise ValueError(f"save_at indices must lie in [0, {num_inference_steps}], got {list(save_at)}")
    patch_size = (model.transformer if hasattr(model, "transformer") else model).config.patch_size
    timesteps = set_timesteps(
        scheduler, num_inference_steps, latents.shape[-2:], patch_size, latents.device, solver.sigma_grid
    )
    grid = scheduler.sigmas.detach().cpu()
    if text_guided:
        embeds = torch.cat([negative_prompt_embeds.expand_as(prompt_embeds), prompt_embeds])
        pooled = torch.cat([negative_pooled_prompt_embeds.expand_as(pooled_prompt_embeds), pooled_prompt_embeds])
        mask_in = None if mask_latents is None else torch.cat([mask_latents, mask_latents])
    elif mask_guided:
        embeds, pooled = torch.cat([prompt_embeds, prompt_embeds]), torch.cat([pooled_prompt_embeds] * 2)
        mask_in = torch.cat([null_mask_latents.expand_as(mask_latents), mask_latents])
    else:
        embeds, pooled, mask_in = prompt_embeds, pooled_prompt_embeds, mask_latents
    scale = guidance_scale if text_guided else mask_guidance_scale
    extra = {} if mask_in is None else {"mask_hidden_states": mask_in}
    calls = 0

    def velocity_at(x: torch.Tensor, timestep: torch.Tensor, index: int, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        model_input = torch.cat([x, x]) if guided else x
        with torch.no_grad():
            v = model(model_input, embeds, pooled, timestep.expand(model_input.shape[0]), return_dict=False, **extra)[0]
        if guided:
            uncond, cond = v.chunk(2)
            v = uncond + scale * (cond - uncond)
        return v if velocity_hook is None else velocity_hook(index, sigma.to(x.device), x, v)

    states = {0: latents.clone()} if 0 in save_at else {}
    if solver.solver == "rk45":
        latents = _solve_rk45(velocity_at, latents, grid, scheduler.config.num_train_timesteps, solver, save_at, states)
        return FlowSolution(latents, calls, states)

    from tqdm.auto import tqdm

    for index, t in enumerate(tqdm(timesteps, desc="sample", unit="step", leave=False, disable=not progress)):
        sigma = grid[index]
        velocity = velocity_at(latents, t, index, sigma)
        if solver.solver == "euler":  # the scheduler's own step: identical to StableDiffusion3Pipeline
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        else:  # heun: trapezoid on [σ_{i+1}, σ_i] with the velocity at Euler's end point; the last step (to 0) Euler
            sigma_next = grid[index + 1]
            step = (sigma_next - sigma).item()
            euler = latents.float() + step * velocity.float()
            if index < len(timesteps) - 1:
                corrected = velocity_at(euler.to(latents.dtype), timesteps[index + 1], index + 1, sigma_next)
                euler = latents.float() + step * 0.5 * (velocity.float() + corrected.float())
            latents = euler.to(latents.dtype)
        if index + 1 in save_at:
            states[index + 1] = latents.clone()
    return FlowSolution(latents, calls, states)


def _solve_rk45(
    velocity_at, latents: torch.Tensor, grid: torch.Tensor, train_steps: int, config: SolverConfig, save_at, states
) -> torch.Tensor:
    """Adaptive Dormand–Prince (scipy's RK45) in σ from 1 to 0 on the flattened batch (float64 state)."""
    from scipy.integrate import solve_ivp

    shape, dtype, device = latents.shape, latents.dtype, latents.device

    def rhs(sigma: float, flat: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(flat).view(shape).to(device, dtype)
        sigma_t = torch.tensor(sigma, dtype=torch.float32)
        v = velocity_at(x, (sigma_t * train_steps).to(device), grid_index(sigma, grid), sigma_t)
        return v.double().cpu().numpy().ravel()

    wanted = sorted({i for i in save_at if i > 0})  # increasing index: decreasing σ, solve_ivp's direction
    t_eval = [float(grid[i]) for i in wanted] + ([0.0] if not wanted or wanted[-1] != len(grid) - 1 else [])
    start = latents.double().cpu().numpy().ravel()
    result = solve_ivp(rhs, (1.0, 0.0), start, method="RK45", rtol=config.rtol, atol=config.atol, t_eval=t_eval)
    if not result.success:
        raise RuntimeError(f"rk45 failed: {result.message}")
    solutions = [torch.from_numpy(result.y[:, j].copy()).view(shape).to(device, dtype) for j in range(len(t_eval))]
    for i, state in zip(wanted, solutions, strict=False):
        states[i] = state
    return solutions[-1]


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD3-scaled latents -> images in [-1, 1] (float, [B, 3, H, W])."""
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0].clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[-1, 1] images [B, 3, H, W] -> list of HxWx3 uint8 arrays."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(array)
