"""Known-harmless library messages silenced where they arise, one precise pattern each, never globally: a run's
log then shows only what needs reading."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

# transformers warns, once per process, when diffusers' SD3 pipeline module imports its image processors: we never
# use them (no image encoder), so the fallback to the PIL implementation changes nothing.
TORCHVISION_FALLBACK = ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back to")
# diffusers warns on `ModelMixin.to(dtype)` with the list of modules to keep in float32; ours is empty.
NO_FP32_MODULES = ("diffusers.models.modeling_utils", r"should be kept in float32: \[\]")


@contextlib.contextmanager
def quiet(logger_name: str, pattern: str) -> Iterator[None]:
    """Within: records of the logger `logger_name` whose message matches `pattern` are dropped; others pass."""
    regex = re.compile(pattern)

    def keep(record: logging.LogRecord) -> bool:
        return not regex.search(record.getMessage())

    logger = logging.getLogger(logger_name)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def sd3_pipeline_module():
    """diffusers' SD3 pipeline module (its pipeline class and helpers), imported without the torchvision note."""
    with quiet(*TORCHVISION_FALLBACK):
        from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3

    return pipeline_stable_diffusion_3
