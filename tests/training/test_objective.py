"""crfm.training.objective, in-process: the SD3 rectified-flow loss by hand, its random draws, what the model sees."""

from __future__ import annotations

import math

import pytest
import torch

from crfm.models.conditioning import encode_mask_condition, encode_mask_latents
from crfm.models.mmdit import MaskSD3Transformer2DModel
from crfm.models.trained_weights import configure_training
from crfm.training.objective import (
    FlowMatchingConfig,
    TrainTimesteps,
    class_balanced_weights,
    flow_matching_loss,
    mask_following_losses,
    step_generator,
)
from crfm.utils.errors import UsageError
from tests.helpers import NUM_CLS

BATCH, SIDE, TOKENS = 3, 32, 7


@pytest.fixture(scope="module")
def parts(tiny_sd35_dir) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    vae = AutoencoderKL.from_pretrained(tiny_sd35_dir, subfolder="vae").requires_grad_(False).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd35_dir, subfolder="scheduler")
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir)
    configure_training(model, "full")
    cfg = model.transformer.config
    gen = torch.Generator().manual_seed(0)
    # Asymmetric left/right (a ramp and a class gradient), so a horizontal flip changes everything.
    ramp = torch.linspace(-1, 1, SIDE)
    image = (ramp.expand(BATCH, 3, SIDE, SIDE) + 0.2 * torch.rand(BATCH, 3, SIDE, SIDE, generator=gen)).clamp(-1, 1)
    label = torch.stack([(torch.arange(SIDE) * NUM_CLS // SIDE + i) % NUM_CLS for i in range(BATCH)])
    label = label[:, None, :].expand(BATCH, SIDE, SIDE).clone()
    label[:, :4] = 255  # the ignore index, top rows only
    batch = {
        "image": image,
        "label": label,
        "prompt_embeds": torch.randn(BATCH, TOKENS, cfg.joint_attention_dim, generator=gen),
        "pooled_prompt_embeds": torch.randn(BATCH, cfg.pooled_projection_dim, generator=gen),
    }
    empty = {
        "prompt_embeds": torch.randn(TOKENS, cfg.joint_attention_dim, generator=gen),
        "pooled_prompt_embeds": torch.randn(cfg.pooled_projection_dim, generator=gen),
    }
    return {
        "vae": vae,
        "scheduler": scheduler,
        "timesteps": TrainTimesteps.from_scheduler(scheduler),
        "model": model,
        "batch": batch,
        "empty": empty,
    }


class RecordingModel(torch.nn.Module):
    """Stands in for the MM-DiT: records what it is given, predicts w · x_t (differentiable)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[dict] = []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, **kwargs):
        self.calls.append(
            {
                "noisy": hidden_states,
                "embeds": encoder_hidden_states,
                "pooled": pooled_projections,
                "timestep": timestep,
                **kwargs,
            }
        )
        return (self.weight * hidden_states,)


class Items:
    """The `parts` batch as a dataset (what mask_following_losses reads)."""

    def __init__(self, parts: dict) -> None:
        self.batch = parts["batch"]

    def __len__(self) -> int:
        return BATCH

    def __getitem__(self, i: int) -> dict:
        return {key: value[i] for key, value in self.batch.items()}


def loss_of(parts, model, seed: int = 1, batch: dict | None = None, **config):
    config = FlowMatchingConfig(num_cls=NUM_CLS, **{"mask_encoding": "grey", **config})  # the `parts` model's
    gen = step_generator(seed, 0, 3)
    return flow_matching_loss(
        model, parts["vae"], batch or parts["batch"], gen, config, parts["timesteps"], parts["empty"]
    )


@pytest.mark.parametrize("scheme", ["logit_normal", "cosmap", "sigma_sqrt"])
def test_loss_is_the_sd3_formula(parts, scheme):
    """The same generator, drawn by hand in the documented order, reproduces the loss of the SD3 recipe."""
    model, vae, scheduler, batch, empty = (parts[k] for k in ("model", "vae", "scheduler", "batch", "empty"))
    kwargs = {"weighting_scheme": scheme, "logit_mean": 0.3, "logit_std": 0.8, "prompt_dropout": 0.5, "flip_prob": 0.5}
    with torch.no_grad():
        got = loss_of(parts, model, seed=4, **kwargs)

        gen = step_generator(4, 0, 3)
        flip = torch.rand(BATCH, generator=gen) < 0.5
        image = torch.stack([im.flip(-1) if f else im for im, f in zip(batch["image"], flip, strict=True)])
        label = torch.stack([lb.flip(-1) if f else lb for lb, f in zip(batch["label"], flip, strict=True)])
        posterior = vae.encode(image).latent_dist
        x0 = (posterior.sample(generator=gen) - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        if scheme == "logit_normal":
            u = torch.sigmoid(torch.normal(0.3, 0.8, size=(BATCH,), generator=gen))
        else:
            u = torch.rand(BATCH, generator=gen)
        index = (u * 1000).long().clamp_max(len(scheduler.timesteps) - 1)
        sigma, t = scheduler.sigmas[index], scheduler.timesteps[index]
        assert torch.allclose(t, sigma * 1000)  # flow matching: t = 1000 σ on the training grid
        drop = torch.rand(BATCH, generator=gen) < 0.5
        embeds = torch.stack(
            [empty["prompt_embeds"] if d else e for e, d in zip(batch["prompt_embeds"], drop, strict=True)]
        )
        pooled = torch.stack(
            [
                empty["pooled_prompt_embeds"] if d else p
                for p, d in zip(batch["pooled_prompt_embeds"], drop, strict=True)
            ]
        )
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        mask = encode_mask_latents(vae, label, NUM_CLS)
        velocity = model(x_t, embeds, pooled, t, mask_hidden_states=mask).sample
        weight = {
            "logit_normal": torch.ones_like(s),
            "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s**2)),
            "sigma_sqrt": s**-2,
        }
        per_sample = (weight[scheme] * (velocity - (noise - x0)) ** 2).flatten(1).mean(1)

    assert 0 < flip.sum() < BATCH and 0 < drop.sum() < BATCH, "pick a seed whose draws mix both cases"
    assert torch.equal(got.timesteps, t) and torch.equal(got.sigmas.flatten(), sigma)
    torch.testing.assert_close(got.per_sample, per_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, per_sample.mean(), rtol=1e-5, atol=1e-6)
    assert got.loss.item() > 0


def test_same_generator_same_loss_other_generator_other_loss(parts):
    first = loss_of(parts, parts["model"], seed=4)
    again = loss_of(parts, parts["model"], seed=4)
    other = loss_of(parts, parts["model"], seed=5)
    assert torch.equal(first.loss, again.loss) and torch.equal(first.per_sample, again.per_sample)
    assert not torch.equal(first.per_sample, other.per_sample)
    # Per (seed, rank, micro-step): every coordinate changes the draws.
    draws = {
        tuple(torch.rand(4, generator=step_generator(*key)).tolist())
        for key in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
    }
    assert len(draws) == 4


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_prompt_dropout_swaps_in_the_empty_prompt(parts, dropout):
    stub = RecordingModel()
    loss_of(parts, stub, prompt_dropout=dropout)
    (call,) = stub.calls
    source = parts["empty"] if dropout == 1.0 else {k: parts["batch"][k] for k in parts["empty"]}
    expected_embeds = source["prompt_embeds"].expand(BATCH, -1, -1)
    expected_pooled = source["pooled_prompt_embeds"].expand(BATCH, -1)
    assert torch.equal(call["embeds"], expected_embeds)
    assert torch.equal(call["pooled"], expected_pooled)


def test_flip_flips_image_and_mask_together(parts):
    batch = parts["batch"]
    flipped = {**batch, "image": batch["image"].flip(-1), "label": batch["label"].flip(-1)}
    runs = {}
    for name, data, flip_prob in (("flip", batch, 1.0), ("pre_flipped", flipped, 0.0), ("plain", batch, 0.0)):
        stub = RecordingModel()
        loss_of(parts, stub, batch=data, flip_prob=flip_prob)
        runs[name] = stub.calls[0]
    # The flip draw is made either way, so with every item flipped the later draws are those of the flipped batch.
    assert torch.equal(runs["flip"]["noisy"], runs["pre_flipped"]["noisy"])
    assert torch.equal(runs["flip"]["mask_hidden_states"], runs["pre_flipped"]["mask_hidden_states"])
    expected_mask = encode_mask_latents(parts["vae"], batch["label"].flip(-1), NUM_CLS)
    assert torch.equal(runs["flip"]["mask_hidden_states"], expected_mask)
    assert not torch.allclose(runs["flip"]["noisy"], runs["plain"]["noisy"])
    assert not torch.allclose(runs["flip"]["mask_hidden_states"], runs["plain"]["mask_hidden_states"])


def assert_noised_from(vae, image: torch.Tensor, gen: torch.Generator, noisy: torch.Tensor) -> None:
    """`noisy` lies on the line from `image`'s latents x0 to the noise, x_t = (1 - σ) x0 + σ ε, for each item's σ,
    with x0's posterior sample and ε the next draws of `gen` (the step's draws after the flip, turns and shifts)."""
    with torch.no_grad():
        x0 = vae.encode(image).latent_dist.sample(generator=gen)
    x0 = (x0 - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=gen)
    direction = (noise - x0).flatten(1)
    sigma = ((noisy - x0).flatten(1) * direction).sum(1) / direction.pow(2).sum(1)
    assert torch.allclose(noisy, x0 + sigma[:, None, None, None] * (noise - x0), atol=1e-5)


def test_quarter_turns_turn_image_and_mask_together(parts):
    """--rot90 draws one turn per item after the flip draw; the model sees the hand-turned pair's encoding."""
    batch, seed = parts["batch"], 5
    gen = step_generator(seed, 0, 3)
    torch.rand(BATCH, generator=gen)  # the flip draw (flip_prob 0: nothing flipped)
    turns = torch.randint(4, (BATCH,), generator=gen).tolist()
    assert len(set(turns)) > 1  # the seed turns items differently
    turned = {
        **batch,
        "image": torch.stack([im.rot90(k, dims=(-2, -1)) for im, k in zip(batch["image"], turns, strict=True)]),
        "label": torch.stack([lb.rot90(k, dims=(-2, -1)) for lb, k in zip(batch["label"], turns, strict=True)]),
    }
    runs = {}
    for name, rot90 in (("rot90", True), ("plain", False)):
        stub = RecordingModel()
        loss_of(parts, stub, seed=seed, flip_prob=0.0, rot90=rot90)
        runs[name] = stub.calls[0]
    expected_mask = encode_mask_latents(parts["vae"], turned["label"], NUM_CLS)
    assert torch.equal(runs["rot90"]["mask_hidden_states"], expected_mask)
    assert not torch.allclose(runs["rot90"]["mask_hidden_states"], runs["plain"]["mask_hidden_states"])
    # The image by hand, draws in the documented order.
    assert_noised_from(parts["vae"], turned["image"], gen, runs["rot90"]["noisy"])
    assert not torch.allclose(runs["rot90"]["noisy"], runs["plain"]["noisy"])


def test_translations_roll_image_and_mask_together(parts):
    """--translate draws one (rows, columns) shift per item after the turns; the model sees the hand-rolled pair."""
    batch, seed, reach = parts["batch"], 5, 3
    gen = step_generator(seed, 0, 3)
    torch.rand(BATCH, generator=gen)  # the flip draw (flip_prob 0: nothing flipped)
    shifts = torch.randint(-reach, reach + 1, (BATCH, 2), generator=gen)
    assert shifts.abs().max() > 0 and len({tuple(s) for s in shifts.tolist()}) > 1
    rolled = {
        key: torch.stack([x.roll(s.tolist(), dims=(-2, -1)) for x, s in zip(batch[key], shifts, strict=True)])
        for key in ("image", "label")
    }
    runs = {}
    for name, translate in (("translate", reach), ("plain", 0)):
        stub = RecordingModel()
        loss_of(parts, stub, seed=seed, flip_prob=0.0, translate=translate)
        runs[name] = stub.calls[0]
    assert torch.equal(
        runs["translate"]["mask_hidden_states"], encode_mask_latents(parts["vae"], rolled["label"], NUM_CLS)
    )
    assert not torch.allclose(runs["translate"]["mask_hidden_states"], runs["plain"]["mask_hidden_states"])
    # The image rolled alike, draws in the documented order.
    assert_noised_from(parts["vae"], rolled["image"], gen, runs["translate"]["noisy"])
    assert not torch.allclose(runs["translate"]["noisy"], runs["plain"]["noisy"])


@pytest.mark.parametrize("use_mask", [True, False])
def test_use_mask(parts, use_mask):
    stub = RecordingModel()
    loss_of(parts, stub, use_mask=use_mask, flip_prob=0.0)
    (call,) = stub.calls
    if use_mask:
        assert torch.equal(
            call["mask_hidden_states"], encode_mask_latents(parts["vae"], parts["batch"]["label"], NUM_CLS)
        )
    else:  # the model is called without the mask argument (so a plain SD3 transformer works too)
        assert "mask_hidden_states" not in call
    assert call["return_dict"] is False


@pytest.mark.parametrize("encoding", ["palette", "onehot"])
def test_the_mask_is_encoded_as_configured(parts, encoding):
    stub = RecordingModel()
    loss_of(parts, stub, mask_encoding=encoding, flip_prob=0.0)
    (call,) = stub.calls
    expected = encode_mask_condition(parts["vae"], parts["batch"]["label"], NUM_CLS, encoding)
    assert torch.equal(call["mask_hidden_states"], expected)
    latent_shape = call["noisy"].shape
    channels = NUM_CLS if encoding == "onehot" else latent_shape[1]
    assert call["mask_hidden_states"].shape == (BATCH, channels, *latent_shape[2:])


def test_onehot_model_trains_through_the_loss(parts, tiny_sd35_dir):
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir, mask_in_channels=NUM_CLS)
    configure_training(model, "full")
    loss_of(parts, model, mask_encoding="onehot").loss.backward()
    assert model.mask_embed.proj.weight.grad.abs().sum() > 0
    losses = mask_following_losses(model, parts["vae"], Items(parts), NUM_CLS, "onehot", sigmas=(0.5,), seed=2)
    assert losses["own_mask"] != losses["other_mask"]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradients_reach_only_trainable_parameters(parts, tiny_sd35_dir, mode):
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir)
    configure_training(model, mode, lora_rank=4)
    loss_of(parts, model).loss.backward()
    named = dict(model.named_parameters())
    trained = {n for n, p in named.items() if p.requires_grad}
    assert trained and len(trained) < len(named)
    assert all(named[n].grad is not None for n in trained)
    assert all(p.grad is None for n, p in named.items() if n not in trained)
    assert all(p.grad is None for p in parts["vae"].parameters())
    # The mask branch is trained in both modes, and the loss does depend on it.
    assert any(n.startswith("mask_blocks.") and named[n].grad.abs().sum() > 0 for n in trained)
    if mode == "lora":
        assert all("lora_" in n or n.startswith(("mask_embed.", "mask_blocks.")) for n in trained)


def test_config_from_args_and_bad_scheme():
    from crfm.training.train import build_parser

    args = build_parser().parse_args(
        ["--pretrained_model_name_or_path", "p", "--data_root", "d", "--vectors_path", "v", "--num_cls", "6"]
        + ["--no_mask", "--weighting_scheme", "mode", "--flip_prob", "0.25", "--mask_encoding", "palette"]
    )
    config = FlowMatchingConfig.from_args(args)
    expected = FlowMatchingConfig(
        num_cls=6, weighting_scheme="mode", flip_prob=0.25, use_mask=False, mask_encoding="palette"
    )
    assert config == expected
    with pytest.raises(ValueError, match="weighting_scheme"):
        FlowMatchingConfig(num_cls=6, weighting_scheme="uniform")
    with pytest.raises(ValueError, match="mask encoding"):
        FlowMatchingConfig(num_cls=6, mask_encoding="rgb")


def test_mask_following_losses_see_the_mask(parts):
    """Own / other / no mask differ for a model with a mask branch and are reproducible for a seed."""
    model = parts["model"]
    first = mask_following_losses(model, parts["vae"], Items(parts), NUM_CLS, "grey", sigmas=(0.5,), seed=2)
    again = mask_following_losses(model, parts["vae"], Items(parts), NUM_CLS, "grey", sigmas=(0.5,), seed=2)
    assert first == again
    assert set(first) == {"own_mask", "other_mask", "no_mask"}
    assert len(set(first.values())) == 3 and all(v > 0 for v in first.values())


def test_class_balanced_weights_favour_rare_classes():
    """Two classes, 3 cells of class 0 and 1 of class 1 (share 3/4 and 1/4): at power 1 a class-1 cell weighs 3x a
    class-0 cell; a cell half ignored, half class 1 takes the mean class weight for its ignored half; mean 1."""
    fractions = torch.zeros(1, 2, 1, 4)
    fractions[0, 0, 0, :3] = 1.0
    fractions[0, 1, 0, 3] = 1.0
    weights = class_balanced_weights(fractions, 1.0).flatten()
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0]))
    assert torch.equal(class_balanced_weights(fractions, 0.0), torch.ones(1, 1, 1, 4))  # power 0: the plain loss
    half = fractions.clone()
    half[0, 1, 0, 3] = 0.5  # shares 3/3.5 and 0.5/3.5: class weights 7/6 and 7, mean 49/12
    raw = torch.tensor([7 / 6, 7 / 6, 7 / 6, 0.5 * 7 + 0.5 * 49 / 12])
    torch.testing.assert_close(class_balanced_weights(half, 1.0).flatten(), raw / raw.mean())


def test_class_balance_weights_the_loss_by_the_batch_labels(parts):
    """The same draws: a batch of one class everywhere gets weight 1 per cell (the plain loss, exactly); a small
    square of a rare class changes the loss, which stays differentiable."""
    model = RecordingModel()
    uniform = {**parts["batch"], "label": torch.zeros_like(parts["batch"]["label"])}
    plain = loss_of(parts, model, batch=uniform)
    torch.testing.assert_close(loss_of(parts, model, batch=uniform, class_balance=0.5).loss, plain.loss)
    rare = uniform["label"].clone()
    rare[:, 8:16, 8:16] = 1
    mixed_batch = {**uniform, "label": rare}
    mixed_plain = loss_of(parts, model, batch=mixed_batch)
    mixed = loss_of(parts, model, batch=mixed_batch, class_balance=0.5)
    assert not torch.allclose(mixed.loss, mixed_plain.loss)
    mixed.loss.backward()
    assert torch.isfinite(model.weight.grad)


def test_class_balance_needs_the_labels():
    from crfm.training.objective import FlowMatchingObjective
    from crfm.training.train import build_parser

    base = ["--pretrained_model_name_or_path", "p", "--data_root", "d", "--vectors_path", "v", "--num_cls", "6"]
    for extra in (["--no_mask"], ["--latents_path", "c", "--mask_encoding", "grey"]):
        args = build_parser().parse_args([*base, "--class_balance", "0.5", *extra])
        with pytest.raises(UsageError, match="class_balance"):
            FlowMatchingObjective(args).check()


def test_mask_dropout_gives_the_null_mask_to_the_drawn_items(parts):
    """Mask dropout swaps whole items' onehot conditions for the null one (all -1) and draws after everything else:
    the noise, timesteps and prompts of a run without it are unchanged, and about the asked share is dropped."""
    from crfm.models.conditioning import NULL_MASK_VALUE

    model = RecordingModel()
    plain = loss_of(parts, model, mask_encoding="onehot")
    shown = model.calls[-1]["mask_hidden_states"]
    assert shown.min() >= 0  # class fractions
    dropped_all = loss_of(parts, model, mask_encoding="onehot", mask_dropout=1.0)
    call = model.calls[-1]
    assert torch.equal(call["mask_hidden_states"], torch.full_like(shown, NULL_MASK_VALUE))
    assert torch.equal(call["noisy"], model.calls[0]["noisy"]) and torch.equal(call["embeds"], model.calls[0]["embeds"])
    torch.testing.assert_close(dropped_all.timesteps, plain.timesteps)
    kept = [0, 0]
    for seed in range(40):
        loss_of(parts, model, seed=seed, mask_encoding="onehot", mask_dropout=0.25)
        conditions = model.calls[-1]["mask_hidden_states"]
        for item in conditions:
            assert torch.equal(item, torch.full_like(item, NULL_MASK_VALUE)) or item.min() >= 0  # whole items
            kept[bool(item.min() >= 0)] += 1
    assert 0.12 < kept[0] / sum(kept) < 0.4  # 120 draws of p = 0.25


def test_mask_dropout_needs_a_onehot_mask_and_is_recorded():
    from crfm.training.objective import FlowMatchingObjective
    from crfm.training.train import build_parser

    base = ["--pretrained_model_name_or_path", "p", "--data_root", "d", "--vectors_path", "v", "--num_cls", "6"]
    for extra in (["--no_mask"], ["--mask_encoding", "grey"], ["--mask_encoding", "palette"]):
        args = build_parser().parse_args([*base, "--mask_dropout", "0.1", *extra])
        with pytest.raises(UsageError, match="mask_dropout"):
            FlowMatchingObjective(args).check()
    args = build_parser().parse_args([*base, "--mask_dropout", "0.1"])
    FlowMatchingObjective(args).check()
    assert FlowMatchingObjective(args).record() == {"mask_dropout": 0.1}
    assert FlowMatchingObjective(build_parser().parse_args(base)).record() == {}


def test_uniform_timestep_share_reaches_the_clean_end_and_draws_only_when_on(parts):
    """The logit-normal density almost never draws the grid's clean end; a uniform share draws it as often as any
    other part. The share is per item: a vanishing one replaces no item's timestep."""
    model = RecordingModel()
    plain = loss_of(parts, model, seed=3)
    vanishing = loss_of(parts, model, seed=3, uniform_timestep_share=1e-9)
    torch.testing.assert_close(vanishing.timesteps, plain.timesteps)

    grid = parts["timesteps"].sigmas

    def clean_end_share(**config) -> float:
        """Share of the drawn grid positions in the last tenth of the grid (u >= 0.9, the smallest σ)."""
        drawn = torch.cat([loss_of(parts, model, seed=seed, **config).sigmas.flatten() for seed in range(80)])
        positions = torch.tensor([int((grid - sigma).abs().argmin()) for sigma in drawn])
        return float((positions >= 0.9 * len(grid)).float().mean())

    assert clean_end_share() < 0.05  # N(0, 1) beyond logit(0.9): 1.4 % of 240 draws
    assert 0.04 < clean_end_share(uniform_timestep_share=1.0) < 0.2  # uniform: 10 %
