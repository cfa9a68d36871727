"""Pretraining the tiny base (`python -m crfm.toy.tiny OUT --pretrain_on INDEX`) and the base crfm ships."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, subprocess_env

SMALL = ["--layers", "2", "--heads", "2", "--head_dim", "8", "--vae_channels", "8,8", "--latent_channels", "4"]
SMALL += ["--sample_size", "8", "--pos_embed_max_size", "4", "--vae_size", "16", "--vae_steps", "3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from crfm.toy.toydata import write_dataset

    return write_dataset(tmp_path_factory.mktemp("corpus"), 6, 32, seed=1000, progress=False)


@pytest.fixture(scope="module")
def fresh_base(tmp_path_factory) -> Path:
    """One random build, copied by each test: tokenizer training is not bit-reproducible across builds."""
    out = tmp_path_factory.mktemp("fresh") / "base"
    proc = subprocess.run([sys.executable, "-m", "crfm.toy.tiny", str(out), *SMALL[:-4], "--no_progress"],
                          env=subprocess_env(), cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _pretrain(out: Path, corpus: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "crfm.toy.tiny", str(out), *SMALL, "--pretrain_on", str(corpus), "--no_progress"]
    cmd += ["--pretrain_steps", str(steps), "--pretrain_batch_size", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.with_name(out.name + ".work").joinpath("loss.jsonl").open()]


def test_pretraining_writes_a_loadable_base_with_a_model_card(corpus, fresh_base, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    out = tmp_path / "base"
    proc = _pretrain(out, corpus, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pretrained" in proc.stdout and "4 steps" in proc.stdout
    card = (out / "README.md").read_text()
    # The card names both commands that rebuild the base: the corpus and the pretraining.
    assert "python -m crfm.toy.toydata" in card and "--seed 1000" in card and "--pretrain_on" in card
    # Only the shipped folder's card may say that the demo starts from it.
    assert "not the shipped base" in card and "start from the shipped `crfm/toy/tiny_sd35_base`, not from" in card
    assert (out / "samples.png").is_file()
    report = json.loads((out / "pretrain_report.json").read_text())
    assert report["transformer_steps"] == 4 and report["corpus_images"] == 6
    assert [r["step"] for r in _losses(out)] == [1, 2, 3, 4]
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    # The VAE's scaling was refitted and the transformer holds trained (EMA) weights, not the random ones.
    assert pipe.vae.config.scaling_factor != 1.5305
    fresh = fresh_base
    trained = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    initial = load_file(str(fresh / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert trained.keys() == initial.keys() and any(not torch.equal(trained[k], initial[k]) for k in trained)


def test_an_interrupted_pretraining_resumes_to_the_same_losses(corpus, fresh_base, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for folder in (whole, parts):
        shutil.copytree(fresh_base, folder)  # an existing folder of the same configuration is resumed, not rebuilt
    assert _pretrain(whole, corpus, 4).returncode == 0
    # Stop after 2 steps (the last step is always checkpointed), then run the same command to 4.
    assert _pretrain(parts, corpus, 2).returncode == 0
    proc = _pretrain(parts, corpus, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(parts) == _losses(whole)


def test_pretraining_refuses_a_folder_of_another_configuration(corpus, tmp_path):
    out = tmp_path / "base"
    assert _pretrain(out, corpus, 1).returncode == 0
    proc = _pretrain(out, corpus, 2, "--layers", "3")
    assert proc.returncode == 2 and "other settings (layers: 2 -> 3)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_shipped_base_loads_offline_and_is_documented():
    from diffusers import StableDiffusion3Pipeline

    from crfm.toy.pretrain import SHIPPED_BASE, continued_phases

    files = [f for f in SHIPPED_BASE.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 60e6  # the base stays small enough to ship in git
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]  # weights only as safetensors
    pipe = StableDiffusion3Pipeline.from_pretrained(SHIPPED_BASE)
    report = json.loads((SHIPPED_BASE / "pretrain_report.json").read_text())
    card = (SHIPPED_BASE / "README.md").read_text()
    assert "embedded default" in card and "The demo, `train.sh` and `test.sh` start from it." in card
    assert report["command"] in card and report["corpus"]["command"] in card
    # The shipped script is the command the card names (same flags), so the base can be rebuilt.
    script = (REPO / "scripts" / "pretrain_base.sh").read_text()
    for flag in ("--pretrain_steps", "--layers", "--head_dim", "--vae_steps"):
        value = report["command"].split(flag + " ")[1].split()[0]
        assert f"{flag} {value}" in script, flag
    assert pipe.transformer.config.num_layers == int(report["command"].split("--layers ")[1].split()[0])
    # The demo's prompt length is the one the base was pretrained with (a literal default, so that the flag table shows
    # it): a rebuilt base of another length must move it too.
    from crfm.toy.demo.settings import DemoSettings

    assert DemoSettings().max_sequence_length == report["settings"]["max_sequence_length"]
    phases = continued_phases(report)
    # Each later pretraining phase: the card and the script name it too, in order, with its flags.
    assert len(script.split("--continue_pretraining_on")) == len(phases) + 1
    for phase, step in zip(phases, script.split("--continue_pretraining_on")[1:], strict=True):
        assert phase["command"] in card
        for flag in ("--pretrain_steps", "--pretrain_lr_schedule", "--scheduler_shift"):
            assert f"{flag} {phase['command'].split(flag + ' ')[1].split()[0]}" in step.split("python -m")[0], flag
    if phases:
        shift = json.loads((SHIPPED_BASE / "scheduler" / "scheduler_config.json").read_text())["shift"]
        assert shift == phases[-1]["settings"]["scheduler_shift"]  # the folder samples with the shift it was trained at
    refit = report.get("vae_decoder_refit")
    if refit is not None:  # the decoder fitted again: the card and the script name that step too
        assert refit["command"] in card and "--refit_vae_decoder_on" in script
        refit_step = script.split("--refit_vae_decoder_on")[1]
        for flag in (
            "--vae_steps",
            "--vae_edge_weight",
            *(["--vae_adversarial_weight"] if "adversarial_weight" in refit else []),
        ):
            assert f"{flag} {refit['command'].split(flag + ' ')[1].split()[0]}" in refit_step, flag


@pytest.mark.parametrize("adversarial_weight", [0.0, 0.5])
def test_an_interrupted_vae_fit_resumes_to_the_same_weights(
    corpus, fresh_base, tmp_path, monkeypatch, adversarial_weight
):
    """Also with the patch critic, whose weights and optimizer resume with the VAE's."""
    from safetensors.torch import load_file

    import crfm.toy.pretrain as pretrain

    index = corpus  # the index file write_dataset returned
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for folder in (whole, parts):
        shutil.copytree(fresh_base, folder)
    fit = dict(
        steps=4, size=16, batch_size=2, progress=False, checkpoint_every=2, adversarial_weight=adversarial_weight
    )
    pretrain.fit_vae(whole, index, work_dir=tmp_path / "whole.work", **fit)

    calls = {"n": 0}
    edge_loss = pretrain.edge_loss

    def interrupted(recon, target):  # the power goes at the fourth step, after the step-2 checkpoint
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return edge_loss(recon, target)

    monkeypatch.setattr(pretrain, "edge_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain.fit_vae(parts, index, work_dir=tmp_path / "parts.work", **fit)
    checkpoint = tmp_path / "parts.work" / pretrain.VAE_CHECKPOINT
    assert json.loads((checkpoint / "step.json").read_text())["step"] == 2
    assert (checkpoint / "critic.safetensors").is_file() == (adversarial_weight > 0)
    monkeypatch.setattr(pretrain, "edge_loss", edge_loss)
    pretrain.fit_vae(parts, index, work_dir=tmp_path / "parts.work", **fit)
    resumed = load_file(str(parts / "vae" / "diffusion_pytorch_model.safetensors"))
    uninterrupted = load_file(str(whole / "vae" / "diffusion_pytorch_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_edge_loss_charges_a_blurred_edge_and_not_a_shift_in_level():
    from crfm.toy.pretrain import edge_loss

    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0
    blurred = step.clone()
    blurred[..., 3:5] = 0.5
    assert edge_loss(step, step) == 0
    assert edge_loss(step + 0.3, step) < 1e-6  # a constant offset has the same gradients (up to rounding)
    assert edge_loss(blurred, step) > 0.1


def test_a_decoder_refit_changes_only_the_decoder_and_is_recorded(corpus, tmp_path):
    """`--refit_vae_decoder_on`: the decoder learns; the encoder, the latent scaling and the transformer stay
    bit-identical (a transformer trained on the latents stays valid); the report and card record it; a re-run
    finds it done."""
    from safetensors.torch import load_file, save_file

    from crfm.toy.pretrain import shares_latent_space

    out = tmp_path / "base"
    assert _pretrain(out, corpus, 2).returncode == 0
    shutil.copytree(out, tmp_path / "before")
    grid = (out / "samples.png").read_bytes()
    before = {part: load_file(str(next((out / part).glob("*.safetensors")))) for part in ("vae", "transformer")}
    scaling = json.loads((out / "vae" / "config.json").read_text())
    cmd = [sys.executable, "-m", "crfm.toy.tiny", str(out), "--refit_vae_decoder_on", str(corpus), "--vae_steps", "3"]
    cmd += ["--vae_size", "16", "--vae_adversarial_weight", "0.5", "--no_progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vae = load_file(str(next((out / "vae").glob("*.safetensors"))))
    changed = {key for key in vae if not torch.equal(vae[key], before["vae"][key])}
    assert changed and all(key.startswith(("decoder.", "post_quant_conv.")) for key in changed)
    transformer = load_file(str(next((out / "transformer").glob("*.safetensors"))))
    assert all(torch.equal(transformer[k], before["transformer"][k]) for k in transformer)
    config = json.loads((out / "vae" / "config.json").read_text())
    assert (config["shift_factor"], config["scaling_factor"]) == (scaling["shift_factor"], scaling["scaling_factor"])
    report = json.loads((out / "pretrain_report.json").read_text())
    card = (out / "README.md").read_text()
    assert report["vae_decoder_refit"]["steps"] == 3 and "--refit_vae_decoder_on" in card
    assert report["vae_decoder_refit"]["adversarial_weight"] == 0.5 and "0.5 x the patch critic's" in card
    assert (out / "samples.png").read_bytes() != grid  # the card's samples decode through the new decoder
    # A generator fine-tuned on the base before the refit is the one the refitted base would train...
    assert shares_latent_space(out, tmp_path / "before")
    # ...but not when the encoder differs (another latent space).
    other = shutil.copytree(tmp_path / "before", tmp_path / "other_encoder")
    weights = other / "vae" / "diffusion_pytorch_model.safetensors"
    changed_encoder = load_file(str(weights))
    key = next(k for k in changed_encoder if k.startswith("encoder."))
    changed_encoder[key] = changed_encoder[key] + 1e-3
    save_file(changed_encoder, str(weights))
    assert not shares_latent_space(out, other)
    again = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert again.returncode == 0 and torch.equal(
        load_file(str(next((out / "vae").glob("*.safetensors"))))[sorted(changed)[0]], vae[sorted(changed)[0]]
    )


def test_a_second_pretraining_phase_trains_only_the_transformer_once_and_is_recorded(corpus, tmp_path):
    """`--continue_pretraining_on`: the transformer goes on learning from its shipped weights, with the first phase's
    data settings and its own schedule and scheduler shift; VAE and text encoders stay bit-identical; report, card
    and samples record it; a re-run of the same command finds it done and leaves the weights alone."""
    from safetensors.torch import load_file

    out = tmp_path / "base"
    assert _pretrain(out, corpus, 2).returncode == 0
    parts = ("vae", "transformer", "text_encoder", "text_encoder_3")
    before = {part: load_file(str(next((out / part).glob("*.safetensors")))) for part in parts}
    cmd = [sys.executable, "-m", "crfm.toy.tiny", str(out), "--continue_pretraining_on", str(corpus), "--no_progress"]
    cmd += ["--pretrain_steps", "3", "--pretrain_batch_size", "2", "--pretrain_lr_schedule", "cosine"]
    cmd += ["--scheduler_shift", "1.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {part: load_file(str(next((out / part).glob("*.safetensors")))) for part in parts}
    for part in parts:
        same = all(torch.equal(after[part][k], before[part][k]) for k in after[part])
        assert same == (part != "transformer"), part
    report = json.loads((out / "pretrain_report.json").read_text())
    [phase] = report["continued"]
    assert report["transformer_steps"] == 2 and phase["transformer_steps"] == 3
    assert phase["settings"]["lr_schedule"] == "cosine" and phase["settings"]["resolution"] == 16  # the first's data
    # The shift it trained with is the folder's from now on: fine-tuning and sampling read it there.
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == 1.5
    losses = [json.loads(line) for line in (tmp_path / "base.continued" / "loss.jsonl").open()]
    assert [r["step"] for r in losses] == [1, 2, 3]
    card = (out / "README.md").read_text()
    assert phase["command"] in card and report["command"] in card and "second phase" in card
    again = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # Re-running the whole recipe (both commands, as scripts/pretrain_base.sh does) leaves the second phase's weights.
    assert _pretrain(out, corpus, 2).returncode == 0
    kept = load_file(str(next((out / "transformer").glob("*.safetensors"))))
    assert all(torch.equal(kept[k], after["transformer"][k]) for k in kept)
    assert json.loads((out / "pretrain_report.json").read_text())["continued"] == [phase]
    # A third phase (its own work folder) trains on from the second's weights with draws of its own, and is appended.
    third = cmd[:-2] + ["--scheduler_shift", "1.0", "--pretrain_work_dir", str(tmp_path / "base.third")]
    proc = subprocess.run(third, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads((out / "pretrain_report.json").read_text())["continued"]
    assert phases[0] == phase and phases[1]["stream"] == 2 and phase["stream"] == 1
    latest = load_file(str(next((out / "transformer").glob("*.safetensors"))))
    assert not all(torch.equal(latest[k], kept[k]) for k in kept)
    card = (out / "README.md").read_text()
    assert "second phase" in card and "third phase" in card and phases[1]["command"] in card
    # Re-running every phase's command changes nothing more.
    for again_cmd in (cmd, third):
        rerun = subprocess.run(again_cmd, capture_output=True, env=subprocess_env(), cwd=REPO, timeout=600)
        assert rerun.returncode == 0
    assert json.loads((out / "pretrain_report.json").read_text())["continued"] == phases
    final = load_file(str(next((out / "transformer").glob("*.safetensors"))))
    assert all(torch.equal(final[k], latest[k]) for k in latest)


def test_a_second_phase_needs_a_pretrained_folder(corpus, fresh_base, tmp_path):
    cmd = [sys.executable, "-m", "crfm.toy.tiny", str(fresh_base), "--continue_pretraining_on", str(corpus)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 2 and "--pretrain_on" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
