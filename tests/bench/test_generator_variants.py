"""bench/generator_variants.py: variants that differ only in how they sample share one fine-tuning."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from crfm.toy.demo.settings import DemoSettings
from crfm.toy.pretrain import SHIPPED_BASE
from tests.helpers import load_script


@pytest.fixture(scope="module")
def bench():
    """bench/generator_variants.py (bench scripts are not a package)."""
    return load_script("bench/generator_variants.py")


def test_sampling_only_variants_share_the_fine_tuning_of_the_first(bench):
    variants = {
        "default": "",
        "guided": "--mask_guidance_scale 2 --num_inference_steps 20",  # the default fine-tuning, sampled otherwise
        "drop": "--mask_dropout 0.2",
        "drop_g2": "--mask_dropout 0.2 --mask_guidance_scale 2",
        "drop_more": "--mask_dropout 0.3 --mask_guidance_scale 2",
    }
    today = dataclasses.asdict(DemoSettings(seed=3))  # runs made with today's defaults
    assert bench.generator_owners(variants, today, SHIPPED_BASE) == {
        "default": "default", "guided": "default", "drop": "drop", "drop_g2": "drop", "drop_more": "drop_more",
    }  # fmt: skip


def test_a_variant_changes_only_its_knobs_of_the_runs_recorded_settings(bench):
    """Runs made before a default changed: `default` is their generator, a variant keeps their other settings."""
    older = json.loads(json.dumps(dataclasses.asdict(DemoSettings(learning_rate=1e-3, seed=2))))  # demo_settings.json
    drop = bench.knob_settings("--mask_dropout 0.2", older)
    assert (drop.learning_rate, drop.mask_dropout, drop.seed) == (1e-3, 0.2, 2)
    variants = {"default": "", "today": f"--learning_rate {DemoSettings().learning_rate}",
                "guided": "--mask_guidance_scale 2"}  # fmt: skip
    owners = bench.generator_owners(variants, older, SHIPPED_BASE)
    assert owners == {"default": "default", "today": "today", "guided": "default"}


def test_a_variant_base_must_encode_prompts_as_the_run_base_does(bench, tmp_path):
    """A `--base FOLDER` variant reuses the run's prompt vectors: refused when the text encoders differ."""
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


def test_a_decoder_only_base_shares_the_fine_tuning_its_other_knobs_select(bench, tmp_path):
    """A base whose decoder alone differs trains what the run's base trains: with no fine-tuning knob it reuses the
    run's generator, with one (e.g. --train_steps) it shares the fine-tuning of the variant with the same knob."""
    run_base, decoder, other = tmp_path / "run_base", tmp_path / "decoder", tmp_path / "other"
    for folder in (run_base, decoder, other):
        shutil.copytree(SHIPPED_BASE, folder)
    weights = "diffusion_pytorch_model.safetensors"
    vae = load_file(str(decoder / "vae" / weights))
    save_file({k: v + 1 if k.startswith("decoder.") else v for k, v in vae.items()}, str(decoder / "vae" / weights))
    transformer = load_file(str(other / "transformer" / weights))
    save_file({k: v + 1 for k, v in transformer.items()}, str(other / "transformer" / weights))

    recorded = json.loads(json.dumps(dataclasses.asdict(DemoSettings(base=str(run_base), seed=1))))
    longer = f"--train_steps {DemoSettings().train_steps + 600}"
    variants = {
        "default": "", "decoder": f"--base {decoder}", "decoder_guided": f"--base {decoder} --mask_guidance_scale 3",
        "longer": longer, "decoder_longer": f"--base {decoder} {longer}", "other": f"--base {other}",
    }  # fmt: skip
    assert bench.generator_owners(variants, recorded, run_base) == {
        "default": "default", "decoder": "default", "decoder_guided": "default",
        "longer": "longer", "decoder_longer": "longer", "other": "other",
    }  # fmt: skip
