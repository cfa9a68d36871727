"""The adversarial patch term of an autoencoder fit: a small convolutional critic scores each patch of an image as
real or reconstructed, and the decoder is charged for patches the critic can tell apart.

A pixel loss (L1, MSE, even the image-gradient term) is minimised by the average of the plausible images, which is
blurred wherever the latents leave the detail uncertain: roof edges, crop rows. SD's autoencoders (Rombach et al.
2022, after Esser et al. 2021's VQGAN) add a patch discriminator with the hinge loss for that reason, its weight set
adaptively as the ratio of the reconstruction and adversarial gradients at the decoder's last layer. This file holds
that recipe at the toy's scale: the critic, its hinge losses and the adaptive weight.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchCritic(nn.Module):
    """Strided 4x4 convolutions with leaky ReLUs and a 1-channel head: one real/fake score per patch (a 64 px image
    gives 15x15 scores with `depth` 3, each seeing 30 px)."""

    def __init__(self, in_channels: int = 3, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for level in range(depth):
            out = width * 2 ** min(level, 2)
            stride = 2 if level < depth - 1 else 1
            layers += [nn.Conv2d(channels, out, 4, stride=stride, padding=1), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def critic_hinge_loss(critic: PatchCritic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss: real patches pushed above +1, reconstructed ones below -1 (`fake` is detached, so
    only the critic learns from it)."""
    return 0.5 * (torch.relu(1 - critic(real)).mean() + torch.relu(1 + critic(fake.detach())).mean())


def adaptive_weight(
    reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor, last_layer: torch.Tensor, limit: float = 1e4
) -> torch.Tensor:
    """||grad of the reconstruction loss|| / ||grad of the adversarial loss|| at the decoder's last weights (detached):
    the adversarial term then pulls as hard as the pixel loss whatever their scales, and its own factor says how
    much harder or softer."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, limit).detach()
