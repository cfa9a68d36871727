"""bench/generator_variants.py: variants that differ only in how they sample share one fine-tuning."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil

import pytest

from crfm.toy.demo.settings import DemoSettings
from tests.helpers import REPO


@pytest.fixture(scope="module")
def bench():
    """bench/generator_variants.py (bench scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("generator_variants", REPO / "bench" / "generator_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampling_only_variants_share_the_fine_tuning_of_the_first(bench):
    variants = {
        "default": "",
        "guided": "--mask_guidance_scale 2 --num_inference_steps 20",  # the default fine-tuning, sampled otherwise
        "drop": "--mask_dropout 0.2",
        "drop_g2": "--mask_dropout 0.2 --mask_guidance_scale 2",
        "drop_more": "--mask_dropout 0.3 --mask_guidance_scale 2",
    }
    today = dataclasses.asdict(DemoSettings(seed=3))  # runs made with today's defaults
    assert bench.generator_owners(variants, today) == {
        "default": "default", "guided": "default", "drop": "drop", "drop_g2": "drop", "drop_more": "drop_more",
    }  # fmt: skip


def test_a_variant_changes_only_its_knobs_of_the_runs_recorded_settings(bench):
    """Runs made before a default changed: `default` is their generator, a variant keeps their other settings."""
    older = json.loads(json.dumps(dataclasses.asdict(DemoSettings(learning_rate=1e-3, seed=2))))  # demo_settings.json
    drop = bench.knob_settings("--mask_dropout 0.2", older)
    assert (drop.learning_rate, drop.mask_dropout, drop.seed) == (1e-3, 0.2, 2)
    variants = {"default": "", "today": f"--learning_rate {DemoSettings().learning_rate}",
                "guided": "--mask_guidance_scale 2"}  # fmt: skip
    assert bench.generator_owners(variants, older) == {"default": "default", "today": "today", "guided": "default"}


def test_a_variant_base_must_encode_prompts_as_the_run_base_does(bench, tmp_path):
    """A `--base FOLDER` variant reuses the run's prompt vectors: refused when the text encoders differ."""
    from crfm.toy.pretrain import SHIPPED_BASE

    run_base, candidate = tmp_path / "run", tmp_path / "candidate"
    for folder in (run_base, candidate):
        shutil.copytree(SHIPPED_BASE, folder, ignore=shutil.ignore_patterns("transformer", "vae"))
    bench.check_same_text_encoders(candidate, run_base)  # the same encoders: the vectors fit
    (candidate / "tokenizer_3" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(SystemExit, match="tokenizer_3/tokenizer_config.json differs"):
        bench.check_same_text_encoders(candidate, run_base)


def test_paired_differences_are_taken_to_the_reference_variant(bench):
    """`--reference`: a candidate is compared with the variant it should beat (e.g. the shipped base), run by run."""
    results = {
        "default": [{"plain": 60.0}, {"plain": 70.0}],
        "shipped": [{"plain": 61.0}, {"plain": 72.0}],
        "longer": [{"plain": 64.0}, {"plain": 73.0}],
    }
    to_default = bench.table(results).split("Paired difference to `default`")[1]
    assert "| plain | 1.50 ± 0.71 | 3.50 ± 0.71 |" in to_default
    to_shipped = bench.table(results, "shipped").split("Paired difference to `shipped`")[1]
    assert "| quantity | default | longer |" in to_shipped
    assert "| plain | -1.50 ± 0.71 | 2.00 ± 1.41 |" in to_shipped


def test_a_decoder_only_base_shares_the_runs_fine_tuning_unless_a_knob_changes_it(bench):
    """A base whose decoder alone differs reuses the run's generator; with --train_steps it must fine-tune anew."""
    from crfm.toy.pretrain import SHIPPED_BASE

    recorded = json.loads(json.dumps(dataclasses.asdict(DemoSettings(seed=1))))
    same = bench.knob_settings(f"--base {SHIPPED_BASE}", recorded)
    longer = bench.knob_settings(f"--base {SHIPPED_BASE} --train_steps {DemoSettings().train_steps + 600}", recorded)
    guided = bench.knob_settings(f"--base {SHIPPED_BASE} --mask_guidance_scale 3", recorded)
    assert bench.shares_run_fine_tuning(same, recorded, SHIPPED_BASE)
    assert bench.shares_run_fine_tuning(guided, recorded, SHIPPED_BASE)  # a sampling knob leaves the generator
    assert not bench.shares_run_fine_tuning(longer, recorded, SHIPPED_BASE)
    assert not bench.shares_run_fine_tuning(bench.knob_settings("", recorded), recorded, SHIPPED_BASE)
