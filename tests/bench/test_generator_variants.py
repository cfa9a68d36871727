"""bench/generator_variants.py: variants that differ only in how they sample share one fine-tuning."""

from __future__ import annotations

import importlib.util

from tests.helpers import REPO


def test_sampling_only_variants_share_the_fine_tuning_of_the_first():
    spec = importlib.util.spec_from_file_location("generator_variants", REPO / "bench" / "generator_variants.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    variants = {
        "default": "",
        "guided": "--mask_guidance_scale 2 --num_inference_steps 20",  # the default fine-tuning, sampled otherwise
        "drop": "--mask_dropout 0.2",
        "drop_g2": "--mask_dropout 0.2 --mask_guidance_scale 2",
        "drop_more": "--mask_dropout 0.3 --mask_guidance_scale 2",
    }
    assert bench.generator_owners(variants) == {
        "default": "default", "guided": "default", "drop": "drop", "drop_g2": "drop", "drop_more": "drop_more",
    }  # fmt: skip
