"""The patch critic of the VAE fit's adversarial term (`crfm.toy.patch_critic`)."""

from __future__ import annotations

import torch

from crfm.toy.patch_critic import PatchCritic, adaptive_weight, critic_hinge_loss


def _stripes(n: int, blur: bool) -> torch.Tensor:
    """Images of one-pixel crop rows (+-1) at random phases; blurred, the rows melt into grey."""
    gen = torch.Generator().manual_seed(n)
    rows = (torch.arange(32)[None, :] + torch.randint(2, (n, 1), generator=gen)) % 2 * 2.0 - 1
    images = rows[:, None, :, None].expand(n, 3, 32, 32).clone()
    if blur:
        images = 0.5 * (images + images.roll(1, dims=2))
    return images


def test_the_critic_scores_each_patch():
    scores = PatchCritic()(torch.zeros(2, 3, 64, 64))
    assert scores.shape == (2, 1, 15, 15)


def test_the_critic_learns_to_tell_sharp_rows_from_blurred_ones():
    torch.manual_seed(0)
    critic = PatchCritic(width=8)
    optimizer = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.9))
    sharp, blurred = _stripes(8, blur=False), _stripes(8, blur=True)
    first = critic_hinge_loss(critic, sharp, blurred).item()
    for _ in range(60):
        loss = critic_hinge_loss(critic, sharp, blurred)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    with torch.no_grad():
        assert critic(_stripes(4, blur=False)).mean() > critic(_stripes(4, blur=True)).mean()


def test_the_critic_loss_does_not_train_what_made_the_fake():
    maker = torch.nn.Conv2d(3, 3, 1)
    critic_hinge_loss(PatchCritic(width=8), _stripes(2, blur=False), maker(_stripes(2, blur=True))).backward()
    assert maker.weight.grad is None


def test_the_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    layer = torch.nn.Conv2d(3, 3, 3, padding=1)
    out = layer(_stripes(2, blur=True))
    pixel = (out - _stripes(2, blur=False)).abs().mean()
    fooled = -PatchCritic(width=8)(out).mean()
    weight = adaptive_weight(pixel, fooled, layer.weight)
    grads = [torch.autograd.grad(loss, layer.weight, retain_graph=True)[0].norm() for loss in (pixel, fooled)]
    assert torch.isclose(weight, grads[0] / (grads[1] + 1e-4), rtol=1e-5)
    # The scale of the adversarial loss does not matter: ten times the loss, a tenth of the weight.
    assert torch.isclose(adaptive_weight(pixel, 10 * fooled, layer.weight) * 10, weight, rtol=1e-3)
    assert not weight.requires_grad
