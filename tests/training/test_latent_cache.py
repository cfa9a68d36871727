"""The latent cache (`python -m crfm.training.cache_latents`) and `train.py --latents_path`, in-process.

Cached training must be the uncached training it replaces (same losses, flips on, a resumed run continuing
exactly) without loading the VAE; a cache of other settings and a damaged cached file are refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crfm.data.dataset import PairDataset
from crfm.data.index import read_index
from crfm.data.latents import LATENT_KEY, MANIFEST_FILE, MASK_KEY, item_latent_path
from crfm.models.conditioning import encode_mask_condition
from crfm.training.cache_latents import build_parser as cache_parser
from crfm.training.cache_latents import cache_latents
from crfm.training.cache_latents import main as cache_main
from crfm.training.objective import step_generator
from crfm.training.train import build_parser, main, train
from tests.helpers import vectorized_toy_data

RESOLUTION = 32  # 4x4 latents with the tiny VAE (factor 8)
NUM = 8


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def toy(tiny_sd35_dir, tmp_path_factory) -> dict:
    """8 toy scenes (64 px, trained at 32 px), their vectors, and a grey cache with flipped pairs."""
    root = tmp_path_factory.mktemp("latent_cache")
    found = vectorized_toy_data(root, tiny_sd35_dir, num=NUM, seed=7)
    found["cache"] = root / "cache"
    assert cache_main(cache_argv(found, found["cache"], "--batch_size", "3")) == 0
    return found


def cache_argv(toy: dict, out: Path, *extra: str, encoding: str = "grey", pipe: Path | None = None) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(pipe or toy["pipe"]), "--data_root", str(toy["data"]),
        "--json_file", "index_.jsonl", "--num_cls", "6", "--mask_encoding", encoding, "--resolution",
        str(RESOLUTION), "--work_dir", str(out), "--no_progress", *extra,
    ]  # fmt: skip


def train_argv(toy: dict, work: Path, steps: int, *extra: str, pipe: Path | None = None) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(pipe or toy["pipe"]), "--data_root", str(toy["data"]),
        "--vectors_path", str(toy["vectors"]), "--work_dir", str(work), "--num_cls", "6", "--mask_encoding", "grey",
        "--resolution", str(RESOLUTION), "--train_batch_size", "2", "--max_train_steps", str(steps),
        "--flip_prob", "0.5", "--checkpointing_steps", "2", "--report_to", "none", "--no_progress", *extra,
    ]  # fmt: skip


def losses(work: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (work / "loss.jsonl").read_text().splitlines()]


def refused(capsys, argv: list[str]) -> str:
    """`train.py argv` must exit 2 with one `error:` line on stderr; returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cache_holds_the_vae_posterior_of_each_pair_and_its_flip(toy):
    from diffusers import AutoencoderKL

    manifest = json.loads((toy["cache"] / MANIFEST_FILE).read_text())
    assert manifest["resolution"] == RESOLUTION and manifest["mask_encoding"] == "grey"
    assert manifest["num_cls"] == 6 and manifest["flips"] is True
    assert set(manifest["vae"]) == {"config_sha256", "weights_sha256"}
    vae = AutoencoderKL.from_pretrained(toy["pipe"], subfolder="vae").eval()
    items = read_index(toy["data"] / "index_.jsonl", toy["data"])
    dataset = PairDataset(items, toy["data"], RESOLUTION, num_cls=6)
    for position in (0, NUM - 1):
        stored = load_file(str(item_latent_path(toy["cache"], position)))
        sample = dataset[position]
        for suffix, image, label in (
            ("", sample["image"], sample["label"]),
            ("_flipped", sample["image"].flip(-1), sample["label"].flip(-1)),
        ):
            with torch.no_grad():
                parameters = vae.encode(image[None]).latent_dist.parameters[0]
                mask = encode_mask_condition(vae, label[None], 6, "grey")[0]
            assert parameters.shape == (2 * 16, 4, 4)  # mean and log-variance of 16 latent channels
            assert torch.allclose(stored[LATENT_KEY + suffix], parameters, atol=1e-5)
            assert torch.allclose(stored[MASK_KEY + suffix], mask, atol=1e-5)


def test_cache_resumes_and_reencodes_only_edited_items(toy, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(toy["cache"], cache)
    again = cache_latents(cache_parser().parse_args(cache_argv(toy, cache)))
    assert (again.encoded, again.skipped, again.failures) == (0, NUM, [])
    (cache / "3.safetensors").write_bytes(b"damaged")
    before = (cache / "5.safetensors").stat().st_mtime_ns
    repaired = cache_latents(cache_parser().parse_args(cache_argv(toy, cache)))
    assert (repaired.encoded, repaired.skipped) == (1, NUM - 1)
    # Encoded alone rather than in a batch of 3: the VAE's convolutions round differently (about 1e-6).
    redone, first = (load_file(str(folder / "3.safetensors"))[LATENT_KEY] for folder in (cache, toy["cache"]))
    assert torch.allclose(redone, first, atol=1e-5)
    assert (cache / "5.safetensors").stat().st_mtime_ns == before
    # Other settings into the same folder are refused (one line), unless --overwrite.
    with pytest.raises(ValueError, match="other settings.*resolution"):
        cache_latents(cache_parser().parse_args([*cache_argv(toy, cache), "--resolution", "64"]))


def test_cache_reports_a_bad_item_and_caches_the_rest(toy, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(toy["data"], data)
    items = read_index(data / "index_.jsonl", data)
    (data / items[2].target).write_bytes(b"\x89PNG truncated")
    argv = cache_argv(toy, tmp_path / "cache") + ["--data_root", str(data)]
    assert cache_main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and items[2].target in errors[0] and "cannot read" in errors[0]
    written = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    assert written == sorted(f"{i}.safetensors" for i in range(NUM) if i != 2)


def test_processes_split_the_items(toy, tmp_path, monkeypatch):
    """Item j goes to process j mod P (accelerate's PartialState, faked here as rank 1 of 2)."""
    import accelerate

    class SecondOfTwo:
        def __init__(self, cpu: bool) -> None:
            self.process_index, self.num_processes, self.is_main_process = 1, 2, False
            self.device = torch.device("cpu")

        def wait_for_everyone(self) -> None:
            pass

    (tmp_path / "cache").mkdir()
    shutil.copy(toy["cache"] / MANIFEST_FILE, tmp_path / "cache")  # what the main process writes first
    monkeypatch.setattr(accelerate, "PartialState", SecondOfTwo)
    report = cache_latents(cache_parser().parse_args(cache_argv(toy, tmp_path / "cache")))
    assert report.encoded == NUM // 2
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == sorted(
        f"{i}.safetensors" for i in range(1, NUM, 2)
    )


def test_cached_training_is_uncached_training_and_resumes_exactly(toy, tmp_path, monkeypatch):
    steps = 4
    uncached = tmp_path / "uncached"
    train(build_parser().parse_args(train_argv(toy, uncached, steps)))

    import diffusers

    def no_vae(*args, **kwargs):
        raise AssertionError("train.py --latents_path loaded the VAE")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", no_vae)
    cached = tmp_path / "cached"
    train(build_parser().parse_args(train_argv(toy, cached, steps, "--latents_path", str(toy["cache"]))))
    expected = losses(uncached)
    assert len(expected) == steps and len(set(expected)) == steps
    assert max(abs(a - b) for a, b in zip(losses(cached), expected, strict=True)) <= 1e-5
    # The first draw of each step's generator is the flip (crfm.training.objective): both kinds of item occurred.
    flips = torch.cat([torch.rand(2, generator=step_generator(0, 0, step)) < 0.5 for step in range(steps)])
    assert flips.any() and not flips.all()

    # Stopped after 2 steps (checkpoint-2), then resumed to 4: the uninterrupted cached run's losses and weights.
    resumed = tmp_path / "resumed"
    train(build_parser().parse_args(train_argv(toy, resumed, 2, "--latents_path", str(toy["cache"]))))
    args = train_argv(toy, resumed, steps, "--latents_path", str(toy["cache"]), "--resume_from_checkpoint", "latest")
    train(build_parser().parse_args(args))
    assert losses(resumed) == losses(cached)
    final, again = load_file(cached / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    # Resumed once more, at its budget: nothing trains, and the summary keeps the run's loss and speed.
    summary = json.loads((resumed / "summary.json").read_text())
    train(build_parser().parse_args(args))
    assert losses(resumed) == losses(cached) and json.loads((resumed / "summary.json").read_text()) == summary
    assert summary["final_loss"] == losses(cached)[-1] and summary["seconds_per_step"] > 0


def test_a_cache_of_other_settings_is_refused(toy, tmp_path, capsys):
    cache = ["--latents_path", str(toy["cache"])]
    work = tmp_path / "work"
    argv = train_argv(toy, work, 1, *cache)
    line = refused(capsys, [*argv, "--resolution", "64"])
    assert "resolution 32, not --resolution 64" in line and "cache_latents" in line
    line = refused(capsys, [*argv, "--mask_encoding", "palette"])
    assert "mask_encoding 'grey', not --mask_encoding 'palette'" in line

    # Another VAE: the same architecture with other weights, then other config values.
    other = tmp_path / "other_vae"
    shutil.copytree(toy["pipe"], other)
    weights_file = other / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import save_file

    weights = load_file(str(weights_file))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(weights_file))
    assert "another VAE" in refused(capsys, train_argv(toy, work, 1, *cache, pipe=other))
    shutil.copy(toy["pipe"] / "vae" / "diffusion_pytorch_model.safetensors", weights_file)
    config = json.loads((other / "vae" / "config.json").read_text())
    config["scaling_factor"] *= 2
    (other / "vae" / "config.json").write_text(json.dumps(config))
    assert "another VAE" in refused(capsys, train_argv(toy, work, 1, *cache, pipe=other))

    # No flipped pairs for a run that flips.
    unflipped = tmp_path / "unflipped"
    assert cache_main(cache_argv(toy, unflipped, "--flip_prob", "0")) == 0
    line = refused(capsys, train_argv(toy, work, 1, "--latents_path", str(unflipped)))
    assert "no flipped pairs, which --flip_prob 0.5 needs" in line
    # Quarter turns are drawn on pixels: neither a cached run nor a cache can have them.
    assert refused(capsys, [*argv, "--rot90"]).startswith("error: --rot90 turns pixels before encoding")
    assert cache_main(cache_argv(toy, tmp_path / "turned", "--rot90")) == 2  # not a flag of the cache at all
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--rot90" in err[0], err
    assert not (tmp_path / "turned").exists()
    assert not work.exists()  # nothing written by any refused run


def test_a_damaged_cached_file_is_one_error_line_naming_it(toy, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(toy["cache"], cache)
    damaged = item_latent_path(cache, 5)
    damaged.write_bytes(damaged.read_bytes()[:100])
    work = tmp_path / "work"
    line = refused(capsys, train_argv(toy, work, 1, "--latents_path", str(cache)))
    assert str(damaged) in line and "cannot be read" in line and "cache_latents" in line
    assert not (work / "checkpoints").exists() and not (work / "loss.jsonl").exists()
