"""Straightness of a flow along its own sampling paths (Liu et al., rectified flow; per segment as in SeqRF).

S = ∫₀¹ E ‖(x₁ − x₀) − v(x_t, t)‖² dt: how far the velocities the sampler follows stray from the chord between the
path's ends (here noise at σ = 1 and the sample at σ = 0; squared norms averaged over latent elements). A straight
flow (S = 0) is integrated exactly by one Euler step. With K segments the chord is taken per segment,
(z_k − z_{k+1}) / (σ_k − σ_{k+1}); S_K = 0 means K Euler steps on those boundaries are exact (k-SeqRF's target).
Measured on a fine Euler path of the uniform grid, the integral is the Riemann sum over its steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class VelocityRecorder:
    """An observer for `MaskToImagePipeline(observe=...)`: keeps (σ, latents, velocity) of every evaluation."""

    sigmas: list[float] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    velocities: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, index: int, sigma: torch.Tensor, latents: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        self.sigmas.append(float(sigma))
        self.latents.append(latents.detach().float().cpu())
        self.velocities.append(velocity.detach().float().cpu())
        return velocity


def straightness(recorder: VelocityRecorder, final: torch.Tensor, segments: int = 1) -> dict[str, object]:
    """S_K of one Euler path (N evaluations at σ_0 = 1 > … > σ_{N−1}, ending in `final` at σ = 0), per item then
    averaged: `value` (S_K) and `per_segment` (each segment's mean squared deviation from its chord)."""
    steps = len(recorder.sigmas)
    if steps % segments:
        raise ValueError(f"{segments} segments do not divide an Euler path of {steps} steps")
    sigmas = recorder.sigmas + [0.0]
    states = recorder.latents + [final.detach().float().cpu()]
    stride = steps // segments
    total = torch.zeros(final.shape[0])
    per_segment = []
    for k in range(segments):
        first, last = k * stride, (k + 1) * stride
        length = sigmas[first] - sigmas[last]
        chord = (states[first] - states[last]) / length
        deviation = torch.zeros(final.shape[0])
        for i in range(first, last):
            squared = (chord - recorder.velocities[i]).pow(2).flatten(1).mean(dim=1)
            deviation += (sigmas[i] - sigmas[i + 1]) * squared
        total += deviation
        per_segment.append(float((deviation / length).mean()))
    return {"segments": segments, "value": float(total.mean()), "per_segment": per_segment}
