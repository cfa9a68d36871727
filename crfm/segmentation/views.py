"""Dihedral views of an image batch: the quarter turns and mirror images a segmentor can be asked about, and the
way back from a view to the image's pixels. A segmentor that follows what an image shows predicts alike in every
view; one pushed (e.g. by CRFM's gradient) toward beliefs bound to one orientation does not, which the FreeMask
filter's `--views` and CRFM's `--crfm_views` use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from crfm.utils.constants import VIEW_COUNTS

__all__ = ["VIEW_COUNTS", "back_from_view", "dihedral_views", "predict_in_view", "view_of"]


def dihedral_views(count: int) -> list[tuple[int, bool]]:
    """The first `count` of the 8 dihedral views as (quarter turns, mirrored): 1 the identity, 2 with its mirror
    image, 4 the quarter turns, 8 all."""
    if count not in VIEW_COUNTS:
        raise ValueError(f"views must be one of {VIEW_COUNTS}, got {count}")
    turns = range(4) if count >= 4 else range(1)
    mirrors = (False, True) if count in (2, 8) else (False,)
    return [(turn, mirror) for turn in turns for mirror in mirrors]


def view_of(images: torch.Tensor, turns: int, mirror: bool) -> torch.Tensor:
    """[..., H, W] turned `turns` quarter turns, then mirrored left-right."""
    turned = torch.rot90(images, turns, dims=(-2, -1))
    return turned.flip(-1) if mirror else turned


def back_from_view(maps: torch.Tensor, turns: int, mirror: bool) -> torch.Tensor:
    """The inverse of `view_of`: maps predicted on a view, put back on the image's pixels."""
    unmirrored = maps.flip(-1) if mirror else maps
    return torch.rot90(unmirrored, -turns, dims=(-2, -1))


def predict_in_view(
    segmentor: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, turns: int, mirror: bool
) -> torch.Tensor:
    """The segmentor's maps of `images` seen in one view, put back on the images' pixels."""
    return back_from_view(segmentor(view_of(images, turns, mirror)), turns, mirror)
