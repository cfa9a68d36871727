"""The flow solvers (euler, heun, rk45) and σ grids of `sample_latents`: accuracy, NFE, saved states, hook indices.

The tiny random MM-DiT's velocity oscillates in σ (its sinusoidal timestep embedding has periods down to ~6
timesteps, i.e. Δσ ≈ 0.006), so on it no solver shows its formal order; the order checks therefore also run on the
same model at a fixed timestep (a smooth, autonomous field v(x)), and exactness on a straight flow (v = noise − x0).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from types import SimpleNamespace

import pytest
import torch

from crfm.models.mmdit import MaskSD3Transformer2DModel
from crfm.sampling.pipeline import MaskToImagePipeline
from crfm.sampling.rectify import CRFMConfig
from crfm.sampling.sampler import FlowSolution, SolverConfig, grid_index, initial_noise, sample_latents
from tests.helpers import NUM_CLS, ColourSegmentor

SHAPE = (16, 8, 8)  # latents of a 64 px image


class Wrapped(torch.nn.Module):
    """The tiny MM-DiT, counting its forward calls; with `fixed_timestep` it is evaluated at that timestep only."""

    def __init__(self, model: MaskSD3Transformer2DModel, fixed_timestep: float | None = None) -> None:
        super().__init__()
        self.inner = model
        self.config = model.transformer.config  # sample_latents reads config.patch_size
        self.fixed_timestep = fixed_timestep
        self.calls = 0
        self.timesteps: list[float] = []  # the timestep of each call, as given

    def forward(self, hidden_states: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, timestep, **kwargs):
        self.calls += 1
        self.timesteps.append(float(timestep[0]))
        if self.fixed_timestep is not None:
            timestep = torch.full_like(timestep, self.fixed_timestep)
        return self.inner(hidden_states, embeds, pooled, timestep, **kwargs)


class StraightFlow(torch.nn.Module):
    """v = noise − x0 everywhere: x_σ = (1 − σ)·x0 + σ·noise solves it exactly, so every solver must land on x0."""

    def __init__(self, noise: torch.Tensor, target: torch.Tensor) -> None:
        super().__init__()
        self.config = SimpleNamespace(patch_size=2)
        self.velocity = noise - target
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        self.calls += 1
        return (self.velocity.expand_as(hidden_states).clone(),)


@pytest.fixture(scope="module")
def scheduler_config(tiny_sd35_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd35_dir, subfolder="scheduler").config


@pytest.fixture(scope="module")
def model(tiny_sd35_dir) -> MaskSD3Transformer2DModel:
    return MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir)


@pytest.fixture(scope="module")
def conditions(model) -> dict[str, torch.Tensor]:
    """Prompt vectors and random mask latents for one image, and its noise."""
    cfg, gen = model.transformer.config, torch.Generator().manual_seed(0)
    return {
        "prompt_embeds": torch.randn(1, 12, cfg.joint_attention_dim, generator=gen),
        "pooled_prompt_embeds": torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        "mask_latents": torch.randn(1, model.mask_channels, *SHAPE[1:], generator=gen),
        "noise": initial_noise([0], seed=0, shape=SHAPE),
    }


def solve(
    model: torch.nn.Module,
    scheduler_config,
    conditions: dict[str, torch.Tensor],
    steps: int,
    solver: str = "euler",
    grid: str = "uniform",
    **kwargs,
) -> FlowSolution:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    config = SolverConfig(solver=solver, sigma_grid=grid, **{k: kwargs.pop(k) for k in ("rtol", "atol") if k in kwargs})
    inputs = {k: v for k, v in conditions.items() if k != "noise"}
    return sample_latents(
        model, scheduler, conditions["noise"].clone(), **inputs, num_inference_steps=steps, solver=config, **kwargs
    )


def error(solution: FlowSolution, reference: torch.Tensor) -> float:
    return (solution.latents - reference).abs().max().item()


def grid_sigmas(scheduler_config, steps: int, grid: str) -> torch.Tensor:
    """The σ grid a run of `steps` steps integrates on (sample_latents leaves it in scheduler.sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    noise = torch.zeros(1, *SHAPE)
    sample_latents(StraightFlow(noise, noise), scheduler, noise, noise, noise, num_inference_steps=steps,
                   solver=SolverConfig(sigma_grid=grid))  # fmt: skip
    return scheduler.sigmas.clone()


def record(calls: list[tuple[int, float]]):
    """A velocity hook that records (grid index, σ) of each evaluation."""

    def hook(index: int, sigma: torch.Tensor, latents: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        calls.append((index, float(sigma)))
        return velocity

    return hook


# --- accuracy ---------------------------------------------------------------------------------------------------


def test_heun_is_second_order_and_rk45_converges_on_a_smooth_field(model, scheduler_config, conditions):
    """The MM-DiT at a fixed timestep (v depends on x only, smoothly). Measured (max abs error against the
    reference): diffusers grid, N = 4/8/16: euler 0.21/0.092/0.043, heun 0.017/0.0037/0.00083; uniform grid:
    euler 0.16/0.083/0.041, heun 0.118/0.041/0.0125 (its last step, from σ_{N−1} = 3/(N+2) to 0, is Euler);
    rk45 at tolerance 1e-5: 1e-5 (20 evaluations)."""
    smooth = Wrapped(model, fixed_timestep=500.0)
    # Richardson extrapolation of Euler (first order) on the uniform grid (the 100-step grid is in the 200-step one):
    # within 2e-5 of 2·E400 − E200 and of rk45 at 1e-6, where plain E200 is 3e-3 off.
    coarse, fine = (solve(smooth, scheduler_config, conditions, n).latents for n in (100, 200))
    reference = 2 * fine - coarse
    steps = (4, 8, 16)
    for grid in ("diffusers", "uniform"):
        euler = [error(solve(smooth, scheduler_config, conditions, n, "euler", grid), reference) for n in steps]
        heun = [error(solve(smooth, scheduler_config, conditions, n, "heun", grid), reference) for n in steps]
        assert all(h < e for h, e in zip(heun, euler, strict=True)), (grid, euler, heun)
        assert heun[0] > heun[1] > heun[2], (grid, heun)
        if grid == "diffusers":  # second order: ~4.5x per halving, where Euler gets ~2.2x
            assert all(h < 0.2 * e for h, e in zip(heun, euler, strict=True)), (euler, heun)
            assert heun[0] / heun[1] > 3 and heun[1] / heun[2] > 3, heun
        else:  # the first-order last step keeps heun's constant large: 9.4x from 4 to 16 steps
            assert heun[2] < 0.5 * euler[2] and heun[0] / heun[2] > 7, (euler, heun)
    for grid in ("diffusers", "uniform"):
        loose = solve(smooth, scheduler_config, conditions, 4, "rk45", grid, rtol=1e-2, atol=1e-2)
        tight = solve(smooth, scheduler_config, conditions, 4, "rk45", grid, rtol=1e-5, atol=1e-5)
        assert error(loose, reference) < 2e-3 and error(tight, reference) < 3e-4, (error(loose, reference), grid)
        assert tight.nfe >= loose.nfe


def test_heun_and_rk45_approach_a_fine_euler_reference_on_the_time_dependent_model(model, scheduler_config, conditions):
    """The MM-DiT as it samples. Measured against Euler at 200 uniform steps (itself ~7e-3 off, by Richardson):
    uniform grid, N = 4/8/16: euler 0.171/0.089/0.041, heun 0.131/0.054/0.030; diffusers grid: euler
    0.203/0.111/0.047, heun 0.045/0.029/0.0225; rk45 at tolerance 1e-5: 5.3e-3 (326 evaluations), 1e-2: 0.034."""
    reference = solve(model, scheduler_config, conditions, 200).latents
    steps = (4, 8, 16)
    for grid, ratio in (("uniform", 0.85), ("diffusers", 0.6)):
        euler = [error(solve(model, scheduler_config, conditions, n, "euler", grid), reference) for n in steps]
        heun = [error(solve(model, scheduler_config, conditions, n, "heun", grid), reference) for n in steps]
        assert all(h < ratio * e for h, e in zip(heun, euler, strict=True)), (grid, euler, heun)
        assert euler[0] > euler[1] > euler[2] and heun[0] > heun[1] > heun[2], (grid, euler, heun)
    tight = solve(model, scheduler_config, conditions, 4, "rk45", rtol=1e-5, atol=1e-5)
    assert error(tight, reference) < 0.015, error(tight, reference)
    assert tight.nfe > 100  # it did adapt to the oscillating field (a few dozen evaluations at the default 1e-3)


# --- NFE ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", ["diffusers", "uniform"])
@pytest.mark.parametrize("steps", [1, 3])
def test_nfe_counts_the_model_calls(model, scheduler_config, conditions, grid, steps):
    expected = {"euler": steps, "heun": 2 * steps - 1}
    for solver in ("euler", "heun", "rk45"):
        counted, hooked = Wrapped(model), []
        solution = solve(counted, scheduler_config, conditions, steps, solver, grid, velocity_hook=record(hooked))
        assert solution.nfe == counted.calls == len(hooked) > 0, (solver, solution.nfe, counted.calls)
        if solver in expected:
            assert solution.nfe == expected[solver], solver
    # With guidance one evaluation is one call on the doubled batch.
    counted = Wrapped(model)
    guided = solve(counted, scheduler_config, conditions, 3, "heun", grid, guidance_scale=3.0,
                   negative_prompt_embeds=torch.zeros_like(conditions["prompt_embeds"]),
                   negative_pooled_prompt_embeds=torch.zeros_like(conditions["pooled_prompt_embeds"]))  # fmt: skip
    assert guided.nfe == counted.calls == 5


# --- saved states --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", ["diffusers", "uniform"])
@pytest.mark.parametrize("solver", ["euler", "heun", "rk45"])
@pytest.mark.parametrize("save_at", [(0, 2, 3, 6), (3,), (1, 5), (6,), ()])
def test_every_solver_follows_a_straight_flow_exactly(scheduler_config, grid, solver, save_at):
    from diffusers import FlowMatchEulerDiscreteScheduler

    gen = torch.Generator().manual_seed(1)
    noise, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    flow, steps = StraightFlow(noise, target), 6
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    embeds = torch.zeros(2, 1, 1)
    solution = sample_latents(flow, scheduler, noise.clone(), embeds, embeds[:, 0], num_inference_steps=steps,
                              solver=SolverConfig(solver=solver, sigma_grid=grid), save_at=save_at)  # fmt: skip
    torch.testing.assert_close(solution.latents, target, rtol=0, atol=1e-5)
    assert solution.nfe == flow.calls
    sigmas = scheduler.sigmas
    if grid == "uniform":  # 1 − i/N, shifted (shift 3), then 0
        u = torch.tensor([1 - i / steps for i in range(steps)])
        expected = torch.cat([3 * u / (1 + 2 * u), torch.zeros(1)])
        assert expected[3] == pytest.approx(0.75)
    else:  # the scheduler's own grid, as StableDiffusion3Pipeline sets it
        reference = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        reference.set_timesteps(steps)
        expected = reference.sigmas
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=1e-6)
    assert sorted(solution.states) == sorted(set(save_at))
    for i, state in solution.states.items():
        torch.testing.assert_close(state, (1 - sigmas[i]) * target + sigmas[i] * noise, rtol=0, atol=1e-5)
    if 0 in save_at:
        assert torch.equal(solution.states[0], noise)
    if steps in save_at:
        assert torch.equal(solution.states[steps], solution.latents)


@pytest.mark.parametrize("solver", ["euler", "heun", "rk45"])
def test_saved_states_are_the_trajectory_and_do_not_change_it(model, scheduler_config, conditions, solver):
    steps = 4
    plain = solve(model, scheduler_config, conditions, steps, solver, "uniform")
    every = solve(model, scheduler_config, conditions, steps, solver, "uniform", save_at=range(steps + 1))
    one = solve(model, scheduler_config, conditions, steps, solver, "uniform", save_at=[2])
    assert plain.states == {} and sorted(every.states) == list(range(steps + 1)) and sorted(one.states) == [2]
    assert torch.equal(every.latents, plain.latents) and torch.equal(one.latents, plain.latents)
    assert torch.equal(every.states[0], conditions["noise"]) and torch.equal(every.states[steps], every.latents)
    assert torch.equal(one.states[2], every.states[2])
    assert all(every.states[i].shape == (1, *SHAPE) for i in every.states)
    with pytest.raises(ValueError, match="save_at"):
        solve(model, scheduler_config, conditions, steps, solver, save_at=[steps + 1])


def test_rk45_states_lie_on_the_fine_trajectory(model, scheduler_config, conditions):
    """The uniform 4-step grid's σ_i are the 200-step grid's σ_{50 i}: rk45's states there match fine Euler's."""
    smooth = Wrapped(model, fixed_timestep=500.0)
    fine = solve(smooth, scheduler_config, conditions, 200, save_at=(50, 100, 150, 200))
    rk45 = solve(smooth, scheduler_config, conditions, 4, "rk45", rtol=1e-5, atol=1e-5, save_at=(1, 2, 3, 4))
    for i in (1, 2, 3, 4):
        gap = (rk45.states[i] - fine.states[50 * i]).abs().max().item()
        assert gap < 0.01, (i, gap)  # measured ≤ 3.3e-3 (fine Euler's own error); neighbours differ by 0.3-0.9
        if i < 4:
            assert (rk45.states[i] - rk45.states[i + 1]).abs().max() > 0.1


# --- grid indices seen by a velocity hook --------------------------------------------------------------------------


def test_grid_index_maps_sigma_to_its_euler_step(scheduler_config):
    grid = grid_sigmas(scheduler_config, 5, "diffusers")
    assert [grid_index(float(s), grid) for s in grid[:-1]] == [0, 1, 2, 3, 4]
    assert [grid_index(float(grid[i] + grid[i + 1]) / 2, grid) for i in range(5)] == [0, 1, 2, 3, 4]
    assert grid_index(1.0, grid) == 0 and grid_index(0.0, grid) == 4 and grid_index(1e-6, grid) == 4


@pytest.mark.parametrize("grid", ["diffusers", "uniform"])
def test_hooks_see_the_grid_index_of_each_sigma(model, scheduler_config, conditions, grid):
    steps = 5
    sigmas = grid_sigmas(scheduler_config, steps, grid)
    euler, heun, rk45 = [], [], []
    for solver, calls, tolerance in (("euler", euler, {}), ("heun", heun, {}), ("rk45", rk45, {"rtol": 1e-4})):
        counted = Wrapped(model)
        solve(counted, scheduler_config, conditions, steps, solver, grid, velocity_hook=record(calls), **tolerance)
        # The model is asked for the velocity at the σ the hook is told (timestep = 1000 σ).
        assert counted.timesteps == [pytest.approx(1000 * s, rel=1e-6) for _, s in calls], solver
    assert euler == [(i, pytest.approx(float(sigmas[i]))) for i in range(steps)]
    # heun: step i's predictor at σ_i (index i), its corrector at σ_{i+1} (index i+1); the last step has no corrector.
    expected = [(0, sigmas[0])]
    for i in range(1, steps):
        expected += [(i, sigmas[i]), (i, sigmas[i])]
    assert heun == [(i, pytest.approx(float(s))) for i, s in expected]
    assert all(grid_index(s, sigmas) == i for i, s in heun)
    # rk45: any σ in [0, 1]; its index is grid_index's.
    assert rk45[0] == (0, 1.0) and all(0 <= s <= 1 for _, s in rk45)
    assert all(i == grid_index(s, sigmas) for i, s in rk45), rk45
    assert len({i for i, _ in rk45}) == steps  # (the time-dependent field sends it through every interval)


# --- configuration -------------------------------------------------------------------------------------------------


def test_solver_config_validates_and_round_trips_its_flags():
    assert SolverConfig() == SolverConfig("euler", "diffusers", 1e-3, 1e-3)
    for bad in ({"solver": "dpm"}, {"sigma_grid": "karras"}, {"rtol": 0.0}, {"atol": -1e-3}):
        with pytest.raises(ValueError):
            SolverConfig(**bad)
    parser = argparse.ArgumentParser()
    SolverConfig.add_flags(parser)
    assert SolverConfig.from_args(parser.parse_args([])) == SolverConfig()
    args = parser.parse_args(["--solver", "rk45", "--sigma_grid", "uniform", "--rtol", "1e-4", "--atol", "2e-5"])
    assert SolverConfig.from_args(args) == SolverConfig("rk45", "uniform", 1e-4, 2e-5)
    with pytest.raises(SystemExit):
        parser.parse_args(["--solver", "dpm"])
    assert SolverConfig("heun", "uniform").describe(8) == "heun, 8 steps on the uniform grid"
    assert SolverConfig("rk45", rtol=1e-4).describe(8) == "rk45 (rtol 0.0001, atol 0.001)"


# --- the pipeline --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(trained_checkpoint, tiny_sd35_dir) -> MaskToImagePipeline:
    pipe = MaskToImagePipeline.from_checkpoint(trained_checkpoint, tiny_sd35_dir, num_cls=NUM_CLS)
    pipe.segmentor = ColourSegmentor()
    return pipe


def pipeline_inputs(pipe: MaskToImagePipeline, batch: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, NUM_CLS, (batch, 8, 8), generator=gen).repeat_interleave(8, 1).repeat_interleave(8, 2)
    labels[:, :8] = 255
    cfg = pipe.transformer.transformer.config
    return (
        labels,
        torch.randn(batch, 12, cfg.joint_attention_dim, generator=gen),
        torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
    )


def run_pipe(pipe: MaskToImagePipeline, rows: Sequence[int], solver: SolverConfig, crfm: CRFMConfig | None):
    labels, embeds, pooled = pipeline_inputs(pipe, 2)
    return pipe(labels[rows], embeds[rows], pooled[rows], noise_ids=[10 + r for r in rows], seed=3,
                num_inference_steps=4, crfm=crfm, solver=solver, save_at=(0, 2, 4))  # fmt: skip


CRFM = CRFMConfig.paper(rectified_step=2, max_step_size=0.5, step_scheme="C", l2_norm=True)


def test_pipeline_heun_with_crfm_rectifies_the_first_grid_steps(pipe):
    solver = SolverConfig("heun", "uniform")
    out = run_pipe(pipe, [0, 1], solver, CRFM)
    assert out.nfe == 7 and out.images.shape == (2, 3, 64, 64)
    # Step 0's predictor (index 0) and corrector (index 1), step 1's predictor (index 1); later ones are not rectified.
    assert [t["step"] for t in out.crfm_trace] == [0, 1, 1] and all(len(t["loss"]) == 2 for t in out.crfm_trace)
    assert sorted(out.states) == [0, 2, 4] and torch.equal(out.states[4], out.latents)
    torch.testing.assert_close(out.states[0], initial_noise([10, 11], 3, SHAPE))
    plain = run_pipe(pipe, [0, 1], solver, None)
    assert plain.crfm_trace == [] and (plain.latents - out.latents).abs().max() > 1e-3
    alone = run_pipe(pipe, [1], solver, CRFM)
    torch.testing.assert_close(alone.latents, out.latents[1:], rtol=1e-4, atol=1e-5)


def test_pipeline_rk45_with_crfm_does_not_depend_on_the_batch(pipe):
    solver = SolverConfig("rk45", rtol=1e-3, atol=1e-3)
    together = run_pipe(pipe, [0, 1], solver, CRFM)
    alone = [run_pipe(pipe, [r], solver, CRFM) for r in (0, 1)]
    # The mask condition is VAE-encoded batch by batch (~3e-6 apart), hence no bitwise equality; measured 5e-7.
    torch.testing.assert_close(together.latents, torch.cat([a.latents for a in alone]), rtol=1e-4, atol=1e-5)
    for i in (0, 2, 4):
        torch.testing.assert_close(together.states[i], torch.cat([a.states[i] for a in alone]), rtol=1e-4, atol=1e-5)
    assert torch.equal(together.states[4], together.latents)
    assert together.nfe == round((alone[0].nfe + alone[1].nfe) / 2) and together.nfe > 0
    steps = [t["step"] for t in together.crfm_trace]
    assert steps and set(steps) <= {0, 1}  # only σ in the first 2 steps of the 4-step grid are rectified
    assert all(len(t["loss"]) == 1 for t in together.crfm_trace)  # rk45 runs image by image
    assert together.images.shape == (2, 3, 64, 64)
    plain = run_pipe(pipe, [0], solver, None)
    assert (plain.latents - alone[0].latents).abs().max() > 1e-3
