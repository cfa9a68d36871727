"""The whole TODSynth pipeline on the embedded default, offline, on a CPU: README's first command.

    python -m crfm.toy.demo [--out outputs/demo] [--preset default|ci] [--fresh] [--KNOB VALUE ...]

Stages (each prints the command it runs, so every step can be repeated by hand at real scale), in the paper's
low-label regime: a generator pretrained on a large unlabelled corpus is fine-tuned with masks on a few scenes.
 1. toy remote-sensing scenes: a held-out split (only for the tables), a validation split (for choices, in
    `bench/`), a small labelled split, as many further real scenes as synthetic ones (the `real_extra` upper
    bound), separate scenes for the judge (another seed), and 2 x 2 mosaics cut from the labelled pairs
    (`crfm.data.layouts --with_images`, the `real_mosaic` control);
 2. the base: a copy of the shipped pretrained tiny SD3.5 (`crfm/toy/tiny_sd35_base`), or `--base scratch`;
 3. prompt vectors (`crfm.data.vectorize`, i.e. `preprocess/vectorize.py`);
 4. the models, side by side, one core each: the mask-conditioned MM-DiT fine-tuned on the labelled split
    (`crfm.training.train`, i.e. `train.py`), stage (a); beside it, one after another, the segmentors that need no
    synthetic data (`crfm.segmentation.downstream`, i.e. `scripts/train_segmentor.py`; mmseg): the frozen CRFM
    guide, which is also the real-only downstream segmentor and filters and ranks (`--seg_config`), on the
    labelled split only; the judge (`--judge_config`, a full-resolution U-Net) on its own scenes, which scores mask
    fidelity and never guides; and the downstream rows of real data alone (extra real scenes, real mosaics);
 5. synthesis of the held-out masks from the same noise (`crfm.sampling.synthesis`, i.e. `test.py`), stage (b):
    plain, CRFM at the paper's settings, and CRFM at test.py's defaults;
 6. mask fidelity of the real held-out images, of the same images through the VAE (the ceiling), and of the
    three syntheses;
 7. synthesis of the *labelled* masks (held-out masks would leak held-out labels into training): plain and CRFM
    x`num_per_mask`, and CRFM with more images for harder masks (`crfm.segmentation.hardness`);
 8. FreeMask-style filtering of the CRFM pairs (`crfm.segmentation.filter`): noisy synthetic pixels -> ignore;
 9. new layouts: 2 x 2 mosaics of the labelled masks (`crfm.data.layouts`), CRFM-synthesized and filtered;
10. downstream, stage (c): segmentors on real + synthetic (plain, CRFM, filtered, filtered and resampled, new
    layouts) and on the synthetic pairs alone, all scored on the held-out real scenes like the real-data rows of
    stage 4; mixed runs see each real image as often as the real-only run (`--match_real_exposure`);
11. few-step (docs/fewstep.md): reflow pairs of the labelled masks from the CRFM-guided generator
    (`crfm.reflow`), a k-SeqRF (or 2-RF) student trained on them (`train.py --reflow_pairs`), and the held-out masks
    drawn by the student in `--few_step` Euler steps with no segmentor, scored like the other syntheses;
12. report: `summary.json`, `summary.md`, `samples.png` (mask | plain | CRFM paper | CRFM default | few-step |
    real).

Every tool runs as `python -m <module>` of the installed (or checked-out) package, so no checkout is needed.
A re-run reuses every finished stage; an interrupted stage resumes (training from its last checkpoint,
synthesis from its last written image, segmentors from mmengine's checkpoint; a segmentor that wrote its
metrics is kept). `--fresh` starts over.
Changing a knob against an existing --out is refused (use --fresh or another --out), so results never mix
settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import crfm
from crfm.models.conditioning import MASK_ENCODINGS
from crfm.toy.toydata import CLASSES
from crfm.utils.fileio import refuse_changed_settings, write_text_atomic
from crfm.utils.flags import UsageError, add_run_flags, entry_point

REPO = Path(__file__).resolve().parents[2]  # the checkout, for the default --out only
PACKAGE_PARENT = Path(crfm.__file__).resolve().parents[1]  # the folder the tools import crfm from
# In a checkout: <checkout>/outputs/demo wherever the demo starts; installed: outputs/demo below the current folder.
DEFAULT_OUT = REPO / "outputs" / "demo" if (REPO / "pyproject.toml").is_file() else Path("outputs", "demo")
SETTINGS_FILE = "demo_settings.json"
# Held-out syntheses: image set -> (work dir, CRFM setting for `Demo.synthesize`). With "real", the rows of the
# mask-fidelity table; in this order also the figure's middle columns.
SYNTHESES = {
    "plain": ("synth_plain", None),
    "crfm_paper": ("synth_crfm_paper", "paper"),
    "crfm": ("synth_crfm", "default"),
}
# "vae": the real held-out images passed through the VAE, the ceiling of what any generator can score.
IMAGE_SETS = ("real", "vae", *SYNTHESES)


@dataclass(frozen=True)
class DemoSettings:
    """Every knob of the demo (see KNOB_HELP). Defaults: about 14.5 minutes on a 2-core CPU after set-up, nothing
    else running (docs/measurements.md#the-demo-run)."""

    train_scenes: int = 16
    val_scenes: int = 16
    test_scenes: int = 32
    judge_scenes: int = 320
    scene_size: int = 128
    resolution: int = 64
    base: str = "pretrained"
    mask_encoding: str = "onehot"
    variant: str = "sd3.5"
    vae_channels: str = "16,32,32"
    latent_channels: int = 4
    layers: int = 6
    heads: int = 4
    head_dim: int = 32
    vae_steps: int = 400
    max_sequence_length: int = 32
    train_steps: int = 1200
    train_batch_size: int = 8
    learning_rate: float = 1e-3
    rot90: bool = True
    seg_config: str = "toy_segformer"
    judge_config: str = "toy_unet"
    seg_iters: int = 1000
    judge_iters: int = 1000
    seg_size: int = 64
    num_inference_steps: int = 20
    num_per_mask: int = 3
    min_per_mask: int = 1
    max_per_mask: int = 5
    tolerance_margin: float = 1.25
    synth_ratio: float = 0.5
    few_step: int = 0
    reflow_segments: int = 4
    reflow_per_mask: int = 2
    reflow_train_steps: int = 400
    figure_rows: int = 6
    parallel: int = 2
    seed: int = 0

    def config_path(self, name: str) -> str:
        """An mmseg config knob's file: a packaged config's name (crfm/segmentation/configs), or a path."""
        packaged = SEG_CONFIGS / f"{name}.py"
        return str(packaged if packaged.is_file() else Path(name))

    @property
    def extra_scenes(self) -> int:
        """Further real scenes for the `real_extra` upper bound: as many as synthetic pairs per run."""
        return self.train_scenes * self.num_per_mask


KNOB_HELP = {
    "train_scenes": "labelled toy scenes: fine-tune the generator, train the guide and the downstream segmentors",
    "val_scenes": "validation scenes, for choosing settings (bench/); never trained on",
    "test_scenes": "held-out scenes: masks for fidelity, real images for downstream scoring; never used for choices",
    "judge_scenes": "separate toy scenes (another seed) the judge segmentor trains on",
    "scene_size": "px of the toy scenes",
    "resolution": "px the generator trains and samples at (the pretrained base: 64)",
    "base": "pretrained: the shipped tiny SD3.5 base (crfm/toy/tiny_sd35_base); scratch: a random one, VAE "
    "fitted to the labelled scenes",
    "mask_encoding": "how the mask enters the mask branch: onehot, palette or grey (the paper's)",
    "variant": "--base scratch: tiny pipeline sd3.5 (qk-norm, dual attention) or sd3",
    "vae_channels": "--base scratch: VAE block widths; n blocks = 2^(n-1) x downsampling",
    "latent_channels": "--base scratch: VAE latent channels (SD3: 16)",
    "layers": "--base scratch: MM-DiT blocks",
    "heads": "--base scratch: attention heads",
    "head_dim": "--base scratch: width per head (model width = heads x head_dim)",
    "vae_steps": "--base scratch: steps fitting the tiny VAE to the labelled images",
    "max_sequence_length": "T5 tokens per prompt (the toy prompts are short)",
    "train_steps": "MM-DiT fine-tuning steps",
    "train_batch_size": "MM-DiT batch",
    "learning_rate": "MM-DiT AdamW learning rate",
    "rot90": "random quarter turns of each pair while fine-tuning (train.py --rot90); --no-rot90: flips only, as the "
    "paper",
    "seg_config": "mmseg config of the CRFM guide and the downstream segmentors (the real-only one is the guide): a "
    "packaged one (toy_segformer, toy_unet) or a path",
    "judge_config": "mmseg config of the judge: a packaged one (toy_unet: full resolution, sees every class) or a path",
    "seg_iters": "iterations of the guide = real-only segmentor and of TSTR (mixed runs: as many real draws)",
    "judge_iters": "iterations of the judge (more scenes than the others: it must see every class)",
    "seg_size": "px the segmentors train at",
    "num_inference_steps": "Euler sampling steps",
    "num_per_mask": "synthetic images per labelled mask for downstream training (the paper: 3)",
    "min_per_mask": "hardness-resampled synthesis: images for the easiest labelled mask",
    "max_per_mask": "hardness-resampled synthesis: images for the hardest labelled mask",
    "tolerance_margin": "FreeMask filter: a synthetic pixel is ignored above this times its class's mean real loss",
    "synth_ratio": "share of synthetic draws in the mixed downstream segmentors' batches",
    "few_step": "Euler steps of the few-step student (docs/fewstep.md; 0, the default since #17 for time: no "
    "few-step stage; 2: the student of bench/results_fewstep.md)",
    "reflow_segments": "time segments of the few-step student (1: 2-rectified flow; K > 1: K-SeqRF)",
    "reflow_per_mask": "CRFM-teacher reflow pairs per labelled mask, for the few-step student",
    "reflow_train_steps": "training steps of the few-step student (started from the generator)",
    "figure_rows": "held-out masks shown in samples.png",
    "parallel": "independent runs at once, one thread each: the generator beside the real-data segmentors, then the "
    "downstream segmentors (1: one after another, all threads)",
    "seed": "seed of data, models, noise (the judge's scenes use seed + 500)",
}

JUDGE_SEED_OFFSET = 500
NUM_CLS = len(CLASSES)
# summary.json's downstream rows -> the segmentor's work dir, and the row names of summary.md.
DOWNSTREAM_ROWS = {
    "real_only": "seg_real",
    "real_synth_plain": "seg_real_synth_plain",
    "real_synth": "seg_real_synth",
    "real_synth_filtered": "seg_real_synth_filtered",
    "real_synth_filtered_resampled": "seg_real_synth_filtered_resampled",
    "real_synth_layouts": "seg_real_synth_layouts",
    "real_mosaic": "seg_real_mosaic",
    "real_extra": "seg_real_extra",
}
DOWNSTREAM_NAMES = {
    "real_only": "real only (the labelled scenes)",
    "real_synth_plain": "real + plain synthetic",
    "real_synth": "real + CRFM synthetic",
    "real_synth_filtered": "real + CRFM synthetic, filtered",
    "real_synth_filtered_resampled": "real + CRFM synthetic, hardness-resampled and filtered",
    "real_synth_layouts": "real + CRFM synthetic of new layouts (mosaics of the labelled masks), filtered",
    "real_mosaic": "real + the same mosaics cut from the real pairs (no generator: the control)",
    "real_extra": "real + as many extra real scenes (upper bound)",
}
# Mixed downstream runs: work dir -> the synthetic set added to the labelled scenes.
DOWNSTREAM_MIXES = {
    "seg_real_synth_plain": "synth_train_plain",
    "seg_real_synth": "synth_train",
    "seg_real_synth_filtered": "synth_train_filtered",
    "seg_real_synth_filtered_resampled": "synth_train_resampled_filtered",
    "seg_real_synth_layouts": "synth_layouts_filtered",
}
# The control: the labelled pairs cut into the same mosaics as the new layouts (work dir, mosaics' folder).
REAL_MOSAIC = ("seg_real_mosaic", "layouts_real")
SEG_CONFIGS = Path(__file__).resolve().parents[1] / "segmentation" / "configs"  # package data
BASES = ("pretrained", "scratch")
SHIPPED_RESOLUTION = 64  # the shipped base's position grid covers exactly 64 px images (8 x 8 tokens)
FIGURE_TITLES = ("mask", "plain", "CRFM paper", "CRFM default", "real")
FEW_STEP = ("fewstep", "synth_fewstep")  # (image set, work dir) of the few-step student's held-out synthesis
# Few-step student recipe (docs/fewstep.md), the 2-RF-from-a-CRFM-teacher row of bench/fewstep_runs.py: pairs from
# the uniform grid, AdamW at this rate, EMA of the weights used for sampling.
REFLOW_LEARNING_RATE = 1e-4
REFLOW_EMA_DECAY = 0.995


def scene_splits(total: int, test: int, val: int) -> dict[str, range]:
    """Scene positions of the held-out, validation and labelled splits, in scene order (scene i depends only on the
    seed and i): held-out first, so every labelled-set size (the demo's, `bench/label_curve.py`'s) is scored on the
    same held-out scenes, and the first N labelled scenes are the same whatever comes after them."""
    if total < test + val:
        raise UsageError(f"{total} scenes cannot hold {test} held-out and {val} validation scenes")
    return {"test": range(test), "val": range(test, test + val), "train": range(test + val, total)}


def judge_val_scenes(judge_scenes: int) -> int:
    """How many of the judge's scenes it is validated on (the first tenth); it trains on the rest."""
    return max(1, judge_scenes // 10)


class VAEReconstructions:
    """A `PairDataset` whose images went through the VAE (encode, posterior mode, decode): the VAE's ceiling."""

    def __init__(self, dataset, vae_dir: Path) -> None:
        from diffusers import AutoencoderKL

        self.dataset = dataset
        self.vae = AutoencoderKL.from_pretrained(vae_dir).eval()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> dict:
        import torch

        sample = dict(self.dataset[position])
        with torch.no_grad():
            latents = self.vae.encode(sample["image"][None]).latent_dist.mode()
            sample["image"] = self.vae.decode(latents).sample[0].clamp(-1, 1)
        return sample


PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    # A few minutes on 2 cores: every stage and artefact, at sizes too small to learn anything.
    "ci": dict(
        train_scenes=12,
        val_scenes=2,
        test_scenes=4,
        judge_scenes=12,
        vae_steps=20,
        train_steps=20,
        train_batch_size=4,
        seg_iters=10,
        judge_iters=10,
        num_inference_steps=4,
        num_per_mask=1,
        max_per_mask=2,
        few_step=2,  # the stage is off by default; the smoke run covers it
        reflow_per_mask=1,
        reflow_train_steps=4,
        figure_rows=3,
    ),
}


class Demo:
    def __init__(self, out: Path, settings: DemoSettings, progress: bool) -> None:
        self.out = out
        self.s = settings
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])),
        }

    # ---------------------------------------------------------------------------------------------- helpers
    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def command(self, module: str, *cmd: object) -> list[str]:
        """`python -m module cmd...`, printed as a user in this folder would type it (paths below it relative)."""
        args = [str(c) for c in cmd]
        inside = str(Path.cwd()) + os.sep
        shown = " ".join(a.removeprefix(inside) for a in args)
        print(f"$ python -m {module} {shown}", flush=True)
        return [sys.executable, "-m", module, *args]

    def run(self, module: str, *cmd: object, one_thread: bool = False) -> None:
        """One command in this process's folder, its output shown; on one thread while others run beside it."""
        env = {**self.env, "OMP_NUM_THREADS": "1"} if one_thread else self.env
        subprocess.run(self.command(module, *cmd), check=True, env=env)

    def run_together(
        self, jobs: list[tuple[Path, str, list[object]]], lanes: int | None = None,
        beside: Callable[[], object] | None = None,
    ) -> None:  # fmt: skip
        """Independent commands (log file, module, args), `lanes` (default `parallel`) at a time on one thread each:
        the small models of the demo use two cores better as two processes than as two threads of one. Each
        command's output goes to its log file; its last line is shown, and a failure shows the log's end and stops
        the stage. `beside` runs in this thread meanwhile (after every command was printed)."""
        from concurrent.futures import ThreadPoolExecutor

        lanes = self.s.parallel if lanes is None else lanes
        env = {**self.env, "OMP_NUM_THREADS": "1"} if self.s.parallel > 1 else self.env
        commands = [(log, self.command(module, *args)) for log, module, args in jobs]

        def one(job: tuple[Path, list[str]]) -> None:
            log, argv = job
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as handle:
                done = subprocess.run(argv, env=env, stdout=handle, stderr=subprocess.STDOUT)
            lines = log.read_text(errors="replace").splitlines()
            if done.returncode:
                print("\n".join(lines[-20:]), file=sys.stderr, flush=True)
                raise subprocess.CalledProcessError(done.returncode, argv)
            print(f"[{log.name}] {lines[-1] if lines else ''}", flush=True)

        with ThreadPoolExecutor(max(1, lanes)) as pool:
            running = [pool.submit(one, command) for command in commands]
            if beside is not None:
                beside()
            for job in running:
                job.result()  # re-raises the first failure

    def quiet(self) -> list[str]:
        return [] if self.progress else ["--no_progress"]

    def stage(
        self, number: int, name: str, title: str, action: Callable[[], object],
        results: Callable[[], list[Path]] | None = None,
    ) -> None:  # fmt: skip
        """Run `action` unless an earlier run finished it and left every one of its `results` (a stage that gained
        results since, e.g. a downstream row added by an update, or lost some is redone; finished parts are kept or
        resume at their end)."""
        marker = self.path("stages", f"{name}.json")
        print(f"\n=== [{number}/{len(STAGES)}] {title} ===", flush=True)
        if marker.is_file() and all(path.is_file() for path in (results() if results else [])):
            self.timings[name] = json.loads(marker.read_text())["seconds"]
            print(f"done in an earlier run ({self.timings[name]:.0f} s), reused")
            return
        start = time.perf_counter()
        action()
        self.timings[name] = round(time.perf_counter() - start, 1)
        write_text_atomic(marker, json.dumps({"seconds": self.timings[name]}) + "\n")
        print(f"--- {name}: {self.timings[name]:.0f} s")

    def split(self, index: Path, suffix: str = "") -> None:
        """index -> test / val / train / extra files (`scene_splits`), and train + extra for the upper bound."""
        lines = index.read_text(encoding="utf-8").splitlines(keepends=True)
        splits = scene_splits(len(lines), self.s.test_scenes, self.s.val_scenes)
        labelled = splits.pop("train")
        splits["train"] = labelled[: self.s.train_scenes]
        splits["extra"] = labelled[self.s.train_scenes : self.s.train_scenes + self.s.extra_scenes]
        splits["train_extra"] = labelled[: self.s.train_scenes + self.s.extra_scenes]
        for name, positions in splits.items():
            write_text_atomic(index.with_name(f"{name}{suffix}.jsonl"), "".join(lines[i] for i in positions))

    # ----------------------------------------------------------------------------------------------- stages
    def data(self) -> None:
        from crfm.toy.toydata import write_dataset

        root = self.path("toydata")
        total = self.s.test_scenes + self.s.val_scenes + self.s.train_scenes + self.s.extra_scenes
        write_dataset(root, total, self.s.scene_size, seed=self.s.seed, workers=2, progress=self.progress)
        self.split(root / "index.jsonl")
        # The judge is an instrument: its own scenes (another seed), never the held-out ones, never synthetic.
        judge_root = self.path("toydata_judge")
        judge_seed = self.s.seed + JUDGE_SEED_OFFSET
        index = write_dataset(judge_root, self.s.judge_scenes, self.s.scene_size, seed=judge_seed, workers=2,
                              progress=self.progress)  # fmt: skip
        lines = index.read_text(encoding="utf-8").splitlines(keepends=True)
        cut = judge_val_scenes(len(lines))
        write_text_atomic(judge_root / "train.jsonl", "".join(lines[cut:]))
        write_text_atomic(judge_root / "val.jsonl", "".join(lines[:cut]))
        self.mosaics(REAL_MOSAIC[1], "--with_images")  # the control: real data only, trained beside the generator
        print(
            f"{self.s.test_scenes} held-out + {self.s.val_scenes} validation + {self.s.train_scenes} labelled + "
            f"{self.s.extra_scenes} extra real scenes in {root}; {self.s.judge_scenes} judge scenes (seed "
            f"{judge_seed}) in {judge_root}"
        )

    def pipeline(self) -> None:
        final, tmp = self.path("tiny_sd35"), self.path("tiny_sd35.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if self.s.base == "pretrained":
            from crfm.toy.tiny import SHIPPED_BASE

            # As a user starts from a downloaded SD3.5: the shipped base, pretrained on other scenes, copied.
            print(f"base: {SHIPPED_BASE} (see its README.md model card)")
            shutil.copytree(SHIPPED_BASE, tmp)
        else:
            latent_side = self.s.resolution // 2 ** (len(self.s.vae_channels.split(",")) - 1)
            # A position grid of exactly the tokens per side spaces positions one unit apart (see TinyConfig).
            self.run(
                "crfm.toy.tiny", tmp, "--variant", self.s.variant, "--vae_channels", self.s.vae_channels,
                "--latent_channels", self.s.latent_channels, "--sample_size", latent_side,
                "--pos_embed_max_size", latent_side // 2, "--layers", self.s.layers, "--heads", self.s.heads,
                "--head_dim", self.s.head_dim, "--seed", self.s.seed,
                "--fit_vae_on", self.path("toydata", "train.jsonl"), "--vae_steps", self.s.vae_steps,
                "--vae_size", self.s.resolution, *self.quiet(),
            )  # fmt: skip
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # complete or absent

    def vectorize(self, root: str, vectors: str) -> None:
        """`index.jsonl` of `root` -> prompt vectors in `vectors` and the index `index_.jsonl` that points at them."""
        self.run(
            "crfm.data.vectorize", "--pretrained_model_name_or_path", self.path("tiny_sd35"),
            "--data_root", self.path(root), "--json_file", "index.jsonl", "--out_json_file", "index_.jsonl",
            "--work_dir", self.path(vectors), "--max_sequence_length", self.s.max_sequence_length,
            "--mixed_precision", "no", "--device", "cpu", *self.quiet(),
        )  # fmt: skip

    def vectors(self) -> None:
        self.vectorize("toydata", "vectors")
        self.split(self.path("toydata", "index_.jsonl"), suffix="_")

    def generator(self, one_thread: bool = False) -> None:
        if self.path("train", "summary.json").is_file():  # written last: finished (train.py would only reload it)
            print("generator: finished in an earlier run, kept", flush=True)
            return
        self.run(
            "crfm.training.train", "--pretrained_model_name_or_path", self.path("tiny_sd35"),
            "--data_root", self.path("toydata"), "--json_file", "train_.jsonl", "--vectors_path", self.path("vectors"),
            "--work_dir", self.path("train"), "--mask_encoding", self.s.mask_encoding,
            "--num_cls", NUM_CLS, "--resolution", self.s.resolution, "--train_batch_size", self.s.train_batch_size,
            "--max_train_steps", self.s.train_steps, "--learning_rate", self.s.learning_rate,
            "--lr_warmup_steps", min(50, self.s.train_steps // 10), "--checkpointing_steps",
            max(1, self.s.train_steps // 4), "--checkpoints_total_limit", 1, "--resume_from_checkpoint", "latest",
            "--seed", self.s.seed, *(["--rot90"] if self.s.rot90 else []), *self.quiet(),
            one_thread=one_thread,
        )  # fmt: skip

    def train_segmentors(
        self, runs: Iterable[tuple[str, list[object]]], lanes: int | None = None,
        beside: Callable[[], object] | None = None,
    ) -> None:  # fmt: skip
        """(work dir, flags) segmentor runs side by side (`run_together`, also its `lanes` and `beside`), each logging
        to logs/<work dir>.log. A run whose metrics.json exists finished in an earlier run and is kept."""
        jobs = []
        for work, args in runs:
            if self.path(work, "metrics.json").is_file():
                print(f"{work}: finished in an earlier run, kept", flush=True)
            else:
                jobs.append((self.path("logs", f"{work}.log"), "crfm.segmentation.downstream", args))
        self.run_together(jobs, lanes, beside)

    def segmentor_args(
        self, work: str, seed: int, *extra: object, root: str = "toydata", train: str = "train.jsonl",
        val: str = "test.jsonl", config: str | None = None, iters: int | None = None,
    ) -> list[object]:  # fmt: skip
        """Flags of an mmseg segmentor (`config`; None: the tool's default, the toy SegFormer) trained on the CPU
        like every other stage of the demo and scored on `val`."""
        return [
            *(["--mmseg_config", config] if config else []),
            "--data_root", self.path(root), "--json_file", train, "--val_file", val, "--work_dir", self.path(work),
            "--num_cls", NUM_CLS, "--max_iters", iters or self.s.seg_iters, "--img_size", self.s.seg_size,
            "--seed", seed, "--device", "cpu", *extra,
        ]  # fmt: skip

    def real_data_runs(self) -> list[tuple[str, list[object]]]:
        """(work dir, flags) of the segmentors that need no synthetic data: on the labelled scenes, the segmentor
        (`seg_config`) that guides CRFM and is the real-only downstream row, filters synthetic pixels and ranks masks
        by hardness, as a user's one segmentor would; on its own scenes, the judge (`judge_config`), scored on its
        own validation scenes; and the downstream rows of real data alone: extra real scenes, real mosaics."""
        config = self.s.config_path(self.s.seg_config)
        return [
            ("seg_real", self.segmentor_args("seg_real", self.s.seed, config=config)),
            ("seg_judge", self.segmentor_args(
                "seg_judge", self.s.seed + 1, root="toydata_judge", val="val.jsonl",
                config=self.s.config_path(self.s.judge_config), iters=self.s.judge_iters,
            )),
            ("seg_real_extra", self.segmentor_args(
                "seg_real_extra", self.s.seed, train="train_extra.jsonl", config=config, iters=self.mixed_iters()
            )),
            self.mixed_run(*REAL_MOSAIC),
        ]  # fmt: skip

    def models(self) -> None:
        """The generator on one core and, beside it, the real-data segmentors one after another on the other(s):
        neither needs the other, and one process per core beats two threads per process for these small models
        (`--parallel 1`: one after another, all threads each)."""
        if self.s.parallel < 2:
            self.train_segmentors(self.real_data_runs())
            self.generator()
        else:
            generator = partial(self.generator, one_thread=True)
            self.train_segmentors(self.real_data_runs(), lanes=self.s.parallel - 1, beside=generator)

    def models_results(self) -> list[Path]:
        return [self.path("train", "summary.json"), *(self.path(w, "metrics.json") for w, _ in self.real_data_runs())]

    def filter_flags(self) -> list[object]:
        seg = self.path("seg_real")
        return [
            "--data_root", self.path("toydata"), "--mmseg_config", seg / "config.py", "--mmseg_ckpt",
            seg / "segmentor.pth", "--num_cls", NUM_CLS, "--resolution", self.s.resolution, "--device", "cpu",
            *self.quiet(),
        ]  # fmt: skip

    def synth_train(self) -> None:
        """The labelled masks x`num_per_mask`, plain and CRFM, then CRFM with hardness-ranked counts per mask."""
        for work, setting in (("synth_train_plain", None), ("synth_train", "default")):
            self.synthesize("train_.jsonl", work, setting, self.s.num_per_mask)
        self.run(
            "crfm.segmentation.hardness", *self.filter_flags(), "--json_file", "train.jsonl",
            "--out", self.path("hardness.json"), "--min_per_mask", self.s.min_per_mask,
            "--max_per_mask", self.s.max_per_mask,
        )  # fmt: skip
        self.synthesize(
            "train_.jsonl", "synth_train_resampled", "default", num_per_mask_file=self.path("hardness.json")
        )

    def filter_synthetic(self, synth: str) -> None:
        """FreeMask: synthetic pixels the real-only segmentor finds implausible for their class -> ignore."""
        self.run(
            "crfm.segmentation.filter", *self.filter_flags(), "--json_file", "train.jsonl",
            "--synth_root", self.path(synth), "--work_dir", self.path(f"{synth}_filtered"),
            "--tolerance_margin", self.s.tolerance_margin,
        )  # fmt: skip

    def filter(self) -> None:
        for synth in ("synth_train", "synth_train_resampled"):
            self.filter_synthetic(synth)

    def mosaics(self, work: str, *images: str) -> None:
        """2 x 2 mosaics of the labelled masks, as many as synthetic pairs per run (with `--with_images`, cut from the
        real pairs too); the same seed, so the synthetic layouts and the real-image control share their masks."""
        self.run(
            "crfm.data.layouts", "--data_root", self.path("toydata"), "--json_file", "train.jsonl",
            "--work_dir", self.path(work), "--num_layouts", self.s.extra_scenes, "--seed", self.s.seed,
            *images, *self.quiet(),
        )  # fmt: skip

    def layouts(self) -> None:
        """Layouts no labelled scene has, CRFM-synthesized and filtered like the labelled masks' pairs; the same
        mosaics cut from the real pairs (the data stage) are the control that tells new layouts from new images."""
        self.mosaics("layouts")
        self.vectorize("layouts", "vectors_layouts")
        self.synthesize("index_.jsonl", "synth_layouts", "default", root="layouts", vectors="vectors_layouts")
        self.filter_synthetic("synth_layouts")

    def mixed_iters(self) -> int:
        """Iterations of a run with `synth_ratio` synthetic draws that sees each real image as often as the
        real-only run (what `--match_real_exposure` computes): also the real_extra run's, for equal compute."""
        from crfm.segmentation.downstream import exposure_matched_iters

        return exposure_matched_iters(self.s.seg_iters, 1 - self.s.synth_ratio)

    def downstream(self) -> None:
        self.train_segmentors(self.downstream_runs())

    def downstream_results(self) -> list[Path]:
        return [self.path(work, "metrics.json") for work, _ in self.downstream_runs()]

    def mixed_run(self, work: str, synth: str) -> tuple[str, list[object]]:
        """(work dir, flags) of a downstream segmentor on the labelled scenes + the pairs in `synth`, `synth_ratio`
        of the draws, each real image drawn as often as in the real-only run."""
        return (work, self.segmentor_args(
            work, self.s.seed, "--synth_root", self.path(synth), "--synth_ratio", self.s.synth_ratio,
            "--match_real_exposure", config=self.s.config_path(self.s.seg_config),
        ))  # fmt: skip

    def downstream_runs(self) -> list[tuple[str, list[object]]]:
        """(work dir, flags) of the downstream segmentors that need synthetic pairs: the mixes and TSTR (the
        real-data rows are trained beside the generator, `real_data_runs`)."""
        runs = [self.mixed_run(work, synth) for work, synth in DOWNSTREAM_MIXES.items()]
        # Train on synthetic, test on real: the CRFM pairs of the labelled masks alone, the real-only run's recipe.
        runs.append(("seg_tstr", self.segmentor_args(
            "seg_tstr", self.s.seed, "--synth_root", self.path("synth_train"), "--synth_ratio", 1,
            config=self.s.config_path(self.s.seg_config),
        )))  # fmt: skip
        return runs

    def guide_flags(self, crfm: str | None) -> list[object]:
        """The guide's flags for CRFM off (None), at the paper's settings ("paper") or test.py's defaults."""
        if crfm is None:
            return []
        guide = self.path("seg_real")
        rectify: list[object] = ["--mmseg_config", guide / "config.py", "--mmseg_ckpt", guide / "segmentor.pth"]
        if crfm == "paper":  # the paper's scripts' setting; "default" is test.py's own
            from crfm.sampling.rectify import CRFMConfig

            rectify += CRFMConfig.paper().flags()
        return rectify

    def sampling_flags(
        self, json_file: str, work: str, generator: Path, root: str = "toydata", vectors: str = "vectors"
    ) -> list[object]:
        """What synthesis (`test.py`) and reflow pairs share."""
        return [
            "--pretrained_model_name_or_path", self.path("tiny_sd35"), "--data_root", self.path(root),
            "--json_file", json_file, "--vectors_path", self.path(vectors), "--lora_ckpt", generator,
            "--work_dir", self.path(work), "--num_cls", NUM_CLS, "--resolution", self.s.resolution, "--batch_size", 8,
            "--seed", self.s.seed, *self.quiet(),
        ]  # fmt: skip

    def synthesize(
        self, json_file: str, work: str, crfm: str | None, num_per_mask: int = 1, num_per_mask_file: Path | None = None,
        root: str = "toydata", vectors: str = "vectors",
    ) -> None:  # fmt: skip
        """Synthesis (`test.py`) by the generator, CRFM as in `guide_flags`; counts per mask from a file if given."""
        counts = ["--num_per_mask_file", num_per_mask_file] if num_per_mask_file else ["--num_per_mask", num_per_mask]
        generator = self.path("train", "final")
        self.run(
            "crfm.sampling.synthesis", *self.sampling_flags(json_file, work, generator, root, vectors), *counts,
            "--num_inference_steps", self.s.num_inference_steps, *self.guide_flags(crfm),
        )  # fmt: skip

    def few_step(self) -> None:
        """CRFM-teacher reflow pairs of the labelled masks -> a 2-RF or k-SeqRF student -> the held-out masks in
        `few_step` Euler steps with no segmentor (docs/fewstep.md), scored like the other syntheses."""
        if self.s.few_step == 0:
            print("off (--few_step 0)")
            return
        self.run(
            "crfm.reflow", *self.sampling_flags("train_.jsonl", "reflow_pairs", self.path("train", "final")),
            "--num_per_mask", self.s.reflow_per_mask, "--num_inference_steps", self.s.num_inference_steps,
            "--sigma_grid", "uniform", "--segments", self.s.reflow_segments, *self.guide_flags("default"),
        )  # fmt: skip
        steps = self.s.reflow_train_steps
        self.run(
            "crfm.training.train", "--pretrained_model_name_or_path", self.path("tiny_sd35"),
            "--data_root", self.path("toydata"), "--vectors_path", self.path("vectors"),
            "--work_dir", self.path("student"), "--reflow_pairs", self.path("reflow_pairs"),
            "--init_ckpt", self.path("train", "final"), "--mask_encoding", self.s.mask_encoding, "--num_cls", NUM_CLS,
            "--resolution", self.s.resolution, "--train_batch_size", self.s.train_batch_size,
            "--max_train_steps", steps, "--learning_rate", REFLOW_LEARNING_RATE, "--prompt_dropout", 0,
            "--seqrf_segments", self.s.reflow_segments, "--use_ema", "--ema_decay", REFLOW_EMA_DECAY,
            "--checkpointing_steps", max(1, steps // 4),
            "--checkpoints_total_limit", 1, "--resume_from_checkpoint", "latest", "--seed", self.s.seed,
            *self.quiet(),
        )  # fmt: skip
        images, work = FEW_STEP
        self.run(
            "crfm.sampling.synthesis", *self.sampling_flags("test_.jsonl", work, self.path("student", "final")),
            "--num_inference_steps", self.s.few_step, "--sigma_grid", "uniform",
        )  # fmt: skip
        self.score({images: self.synthesized(work)})

    def synthesized(self, work: str):
        from crfm.data.dataset import PairDataset
        from crfm.data.index import read_index

        index = self.path(work, "index.jsonl")
        return PairDataset(read_index(index, index.parent), index.parent, self.s.resolution, num_cls=NUM_CLS)

    def fidelity(self) -> None:
        from crfm.data.dataset import PairDataset
        from crfm.data.index import read_index

        root = self.path("toydata")
        # Real images are scored at the generator's resolution too, so all rows are comparable.
        real = PairDataset(read_index(root / "test.jsonl", root), root, resolution=self.s.resolution, num_cls=NUM_CLS)
        sets: dict[str, object] = {"real": real, "vae": VAEReconstructions(real, self.path("tiny_sd35", "vae"))}
        self.score(sets | {images: self.synthesized(work) for images, (work, _) in SYNTHESES.items()})

    def score(self, sets: dict[str, object]) -> None:
        """`python -m crfm.segmentation.evaluate` for each image set and segmentor, in-process (one load per judge)."""
        from crfm.segmentation.adapter import load_segmentor
        from crfm.segmentation.evaluate import mask_fidelity

        for judge in ("seg_judge", "seg_real"):
            seg = self.path(judge)
            segmentor = load_segmentor(seg / "config.py", seg / "segmentor.pth", device="cpu", num_cls=NUM_CLS)
            for images, dataset in sets.items():
                result = mask_fidelity(segmentor, dataset, NUM_CLS, progress=self.progress)
                print(f"{images:>10} images, {judge}: mIoU {100 * result['mIoU']:.2f}")
                write_text_atomic(self.path("fidelity", f"{images}_{judge}.json"), json.dumps(result, indent=2) + "\n")

    # ----------------------------------------------------------------------------------------------- report
    def report(self) -> dict:
        from crfm.toy.toydata import CLASSES

        def fid(images: str, judge: str) -> dict:
            return json.loads(self.path("fidelity", f"{images}_{judge}.json").read_text())

        def seg(work: str) -> dict:
            return json.loads(self.path(work, "metrics.json").read_text())

        train_summary = json.loads(self.path("train", "summary.json").read_text())
        fidelity = {}
        for images in (*IMAGE_SETS, FEW_STEP[0]) if self.s.few_step else IMAGE_SETS:
            judge, guide = fid(images, "seg_judge"), fid(images, "seg_real")
            fidelity[images] = {
                "judge_mIoU": 100 * judge["mIoU"],
                "guide_mIoU": 100 * guide["mIoU"],
                "judge_IoU": dict(zip(CLASSES, judge["IoU"], strict=True)),
            }
        summary = {
            "settings": dataclasses.asdict(self.s),
            "generator": train_summary,
            "mask_fidelity": fidelity,
            "downstream": {
                **{key: seg(work) for key, work in DOWNSTREAM_ROWS.items()},
                # Train on synthetic / on real, test on real: the same masks, the real-only run's recipe.
                "tstr": seg("seg_tstr"),
                "trtr": seg("seg_real"),
            },
            "filter": {
                synth: json.loads(self.path(f"{synth}_filtered", "filter_report.json").read_text())
                for synth in ("synth_train", "synth_train_resampled", "synth_layouts")
            },
            "stage_seconds": dict(self.timings),
            "total_seconds": round(sum(self.timings.values()), 1),
        }
        write_text_atomic(self.path("summary.json"), json.dumps(summary, indent=2) + "\n")
        markdown = summary_markdown(summary)
        write_text_atomic(self.path("summary.md"), markdown)
        self.figure()
        return summary | {"markdown": markdown}

    def figure(self) -> None:
        from PIL import Image

        from crfm.data.dataset import load_label
        from crfm.data.index import read_index
        from crfm.toy.toydata import PALETTE
        from crfm.utils.viz import colourise_mask, image_grid

        root = self.path("toydata")
        real = {item.source: item.target for item in read_index(root / "test.jsonl", root)}

        def by_mask(work: str) -> dict[str, Path]:
            items = read_index(self.path(work, "index.jsonl"))
            return {i.record["source_mask"]: self.path(work, i.target) for i in items if i.record["variant"] == 0}

        works = [work for work, _ in SYNTHESES.values()] + ([FEW_STEP[1]] if self.s.few_step else [])
        synthesized = [by_mask(work) for work in works]
        size = self.s.scene_size
        rows = []
        for source in list(real)[: self.s.figure_rows]:
            mask = colourise_mask(load_label(root / source), PALETTE)
            samples = [Image.open(images[source]).convert("RGB") for images in synthesized]
            rows.append([Image.fromarray(mask), *samples, Image.open(root / real[source]).convert("RGB")])
        image_grid(rows, figure_titles(self.s), cell=size, resample=Image.Resampling.NEAREST).save(
            self.path("samples.png")
        )


def figure_titles(settings: DemoSettings) -> list[str]:
    titles = list(FIGURE_TITLES)
    if settings.few_step:
        titles.insert(-1, f"{settings.few_step}-step student")
    return titles


ROW_NAMES = {
    "real": "real held-out images (reference)",
    "vae": "real images through the VAE (the ceiling)",
    "plain": "plain sampling",
    "crfm_paper": "CRFM, paper settings (4 steps, eta_max 0.1, clamp 1)",
    "crfm": "CRFM, test.py defaults ({rectified_step} steps x {num_rectified}, eta_max {max_step_size:g}, "
    "L2-normalised {l2_norm}, clamp {velocity_clamp:g})",
    FEW_STEP[0]: "few-step: {student} student of the CRFM teacher, {few_step} Euler step(s), no segmentor",
}


def per_class_table(down: dict) -> list[str]:
    """Markdown lines: IoU (%) per class of every downstream row (what the mean hides: which classes a data source
    helps); none for rows trained before the segmentors reported classes."""
    classes = [key.removeprefix("IoU.") for key in down["real_only"] if key.startswith("IoU.")]
    if not classes or any(f"IoU.{name}" not in row for row in down.values() for name in classes):
        return []

    def cell(value: float) -> str:
        return "–" if math.isnan(value) else f"{value:.1f}"

    lines = ["IoU (%) per class on the held-out scenes:", "", "| row | " + " | ".join(classes) + " |"]
    lines.append("|---|" + "---|" * len(classes))
    for key, row in down.items():
        if key == "trtr":  # the real-only run again
            continue
        lines.append(f"| `{key}` | " + " | ".join(cell(row[f"IoU.{name}"]) for name in classes) + " |")
    return [*lines, ""]


def summary_markdown(summary: dict) -> str:
    s = summary["settings"]
    fid, down = summary["mask_fidelity"], summary["downstream"]
    held_out = s["test_scenes"]
    judge_train = s["judge_scenes"] - judge_val_scenes(s["judge_scenes"])
    lines = [
        "# crfm demo summary",
        "",
        f"Base: {s['base']}; mask encoding: {s['mask_encoding']}; generator fine-tuned on {s['train_scenes']} "
        "labelled scenes.",
        "",
        f"Mask fidelity on {held_out} held-out masks: mIoU (%) of a segmentor's prediction on the images against "
        f"the masks they were drawn from. The judge was trained on {judge_train} separate toy scenes (another seed) "
        "and never guided sampling; the guide is the real-only segmentor below.",
        "",
        "| images | judge mIoU | guide mIoU |",
        "|---|---|---|",
    ]
    from crfm.sampling.rectify import CRFMConfig

    for key, name in ROW_NAMES.items():
        if key not in fid:  # the few-step row, with --few_step 0
            continue
        student = "2-RF" if s["reflow_segments"] == 1 else f"{s['reflow_segments']}-SeqRF"
        name = name.format(**dataclasses.asdict(CRFMConfig()), few_step=s["few_step"], student=student)
        lines.append(f"| {name} | {fid[key]['judge_mIoU']:.2f} | {fid[key]['guide_mIoU']:.2f} |")
    real = down["real_only"]
    lines += [
        "",
        f"Downstream ({Path(s['seg_config']).stem}): mIoU (%) on the {held_out} held-out real scenes. Mixed runs "
        f"draw {100 * s['synth_ratio']:.0f}% synthetic samples and run longer, so each real image is seen as often as "
        "in the real-only run; the extra-real run has the mixed runs' iterations.",
        "",
        "| training data | images | iterations | mIoU | aAcc | − real only |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in DOWNSTREAM_NAMES.items():
        row = down[key]
        images = f"{row['real_train']} + {row['synthetic_train']}" if row["synthetic_train"] else f"{row['real_train']}"
        delta = "" if key == "real_only" else f"{row['mIoU'] - real['mIoU']:+.2f}"
        iters = row.get("iters", s["seg_iters"])
        lines.append(f"| {name} | {images} | {iters} | {row['mIoU']:.2f} | {row['aAcc']:.2f} | {delta} |")
    tstr, trtr = down["tstr"]["mIoU"], down["trtr"]["mIoU"]
    filtered = summary["filter"]["synth_train"]
    lines += [
        "",
        f"Train on synthetic, test on real (TSTR, {down['tstr']['synthetic_train']} CRFM pairs of the labelled masks): "
        f"{tstr:.2f} mIoU; train on the real pairs of the same masks (TRTR): {trtr:.2f}; ratio {tstr / trtr:.2f}. "
        f"The filter ignored {100 * filtered['overall_filtered_fraction']:.1f}% of the CRFM pixels "
        f"(tolerance margin {s['tolerance_margin']:g}).",
        "",
        *per_class_table(down),
        f"Generator: {summary['generator']['steps']} steps, final training loss "
        f"{summary['generator']['final_loss']:.4f}, {summary['generator']['seconds_per_step']:.3f} s/step.",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {name} | {sec:.0f} |" for name, sec in summary["stage_seconds"].items()),
        f"| **total** | **{summary['total_seconds']:.0f}** |",
        "",
    ]
    return "\n".join(lines)


STAGES: list[tuple[str, str]] = [
    ("data", "toy remote-sensing scenes: held-out / validation / labelled / extra splits, and the judge's own scenes"),
    ("pipeline", "the base: the shipped pretrained tiny SD3.5 (or a scratch one, --base scratch)"),
    ("vectors", "prompt vectors (SD3 encode_prompt)"),
    (
        "models",
        "train the mask-conditioned MM-DiT (paper stage a); beside it the segmentors (mmseg) of real data: the CRFM "
        "guide = real-only downstream segmentor, the judge (full-resolution U-Net, its own scenes), real + extra real, "
        "real + real mosaics",
    ),
    ("synthesis", "synthesize the held-out masks: plain, CRFM paper settings, CRFM defaults; same seeds (stage b)"),
    ("fidelity", "mask fidelity: real vs VAE ceiling vs plain vs CRFM"),
    ("synth_train", "synthesize the labelled masks: plain and CRFM x num_per_mask, CRFM resampled by hardness"),
    ("filter", "FreeMask filtering of the CRFM pairs: noisy synthetic pixels -> ignore"),
    ("layouts", "new layouts: mosaics of the labelled masks, CRFM-synthesized and filtered"),
    ("downstream", "downstream segmentors: real + each synthetic set, synthetic only (stage c)"),
    ("few_step", "few-step: CRFM-teacher reflow pairs, a k-SeqRF student, held-out masks in a few steps, no segmentor"),
]


def check_knobs(settings: DemoSettings) -> None:
    """Refuse impossible knob combinations before anything is written."""
    if settings.few_step and settings.num_inference_steps % settings.reflow_segments:
        raise UsageError("--reflow_segments must divide --num_inference_steps (segment ends lie on the teacher's grid)")
    if min(settings.train_scenes, settings.val_scenes, settings.test_scenes) < 1 or settings.judge_scenes < 2:
        raise UsageError("need at least 1 training, validation and held-out scene and 2 judge scenes")
    if not 1 <= settings.min_per_mask <= settings.max_per_mask or settings.num_per_mask < 1:
        raise UsageError("need 1 <= --min_per_mask <= --max_per_mask and --num_per_mask >= 1")
    if not 0 < settings.synth_ratio < 1 or settings.tolerance_margin <= 0:
        raise UsageError("need 0 < --synth_ratio < 1 and --tolerance_margin > 0")
    for knob in ("seg_config", "judge_config"):
        if not Path(settings.config_path(getattr(settings, knob))).is_file():
            raise UsageError(f"--{knob} {getattr(settings, knob)}: no such packaged config or file")
    if settings.base not in BASES:
        raise UsageError(f"--base must be one of {BASES}, got {settings.base!r}")
    if settings.mask_encoding not in MASK_ENCODINGS:
        raise UsageError(f"--mask_encoding must be one of {MASK_ENCODINGS}, got {settings.mask_encoding!r}")
    if settings.base == "pretrained":
        from crfm.toy.tiny import SHIPPED_BASE

        if not (SHIPPED_BASE / "model_index.json").is_file():
            raise UsageError(f"the shipped base {SHIPPED_BASE} is missing; reinstall crfm or use --base scratch")
        if settings.resolution != SHIPPED_RESOLUTION:
            raise UsageError(
                f"the shipped base draws {SHIPPED_RESOLUTION} px images; use --resolution {SHIPPED_RESOLUTION} "
                "or --base scratch"
            )


def check_settings(out: Path, settings: DemoSettings) -> None:
    """Refuse to mix results of different settings in one output folder (a knob added since the folder was made
    counts as its default there)."""
    current = dataclasses.asdict(settings)
    defaults = dataclasses.asdict(DemoSettings())
    if not refuse_changed_settings(
        out / SETTINGS_FILE, current, "demo results", "add --fresh or choose another --out", defaults
    ):
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / SETTINGS_FILE, json.dumps(current, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crfm.toy.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="ci: a few-minute smoke run")
    parser.add_argument("--fresh", action="store_true", help="delete --out first and redo every stage")
    parser.add_argument("--until", choices=[name for name, _ in STAGES], help="stop after this stage (no report)")
    knobs = parser.add_argument_group("knobs (override the preset)")
    for field in dataclasses.fields(DemoSettings):
        help_text = f"{KNOB_HELP[field.name]} (default {field.default})"
        if isinstance(field.default, bool):  # --name / --no-name; None: not given, the preset decides
            knobs.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            knobs.add_argument(f"--{field.name}", type=type(field.default), default=None, help=help_text)
    add_run_flags(parser, seed_help=None)  # --no_progress; the seed is a knob
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Every stage not done yet, then the report; 0, or 1 when a stage's command failed."""
    values = {**PRESETS[args.preset]}
    values.update(
        {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSettings) if getattr(args, f.name) is not None}
    )
    settings = DemoSettings(**values)
    check_knobs(settings)
    out = args.out.resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    check_settings(out, settings)

    demo = Demo(out, settings, progress=not args.no_progress)
    start = time.perf_counter()
    actions = {
        "data": demo.data,
        "pipeline": demo.pipeline,
        "vectors": demo.vectors,
        "models": demo.models,
        "synthesis": lambda: [demo.synthesize("test_.jsonl", work, crfm) for work, crfm in SYNTHESES.values()],
        "fidelity": demo.fidelity,
        "synth_train": demo.synth_train,
        "filter": demo.filter,
        "layouts": demo.layouts,
        "downstream": demo.downstream,
        "few_step": demo.few_step,
    }
    results = {  # what a reused stage must still have (a folder made before a stage wrote it redoes that stage)
        "data": lambda: [demo.path(REAL_MOSAIC[1], "index.jsonl")],
        "models": demo.models_results,
        "downstream": demo.downstream_results,
    }
    for number, (name, title) in enumerate(STAGES, 1):
        try:
            demo.stage(number, name, title, actions[name], results.get(name))
        except subprocess.CalledProcessError as exc:
            print(
                f"\nerror: stage '{name}' failed (exit {exc.returncode}) in the command above. Fix the cause and run "
                "the same command again: finished stages are reused and this one resumes.",
                file=sys.stderr,
            )
            return 1
        if name == args.until:
            return 0
    print(f"\n=== report -> {out} ===")
    summary = demo.report()
    print(summary["markdown"])
    print(f"figure  : {out / 'samples.png'} ({' | '.join(figure_titles(settings))})")
    print(f"tables  : {out / 'summary.md'}, {out / 'summary.json'}")
    print(f"this run: {time.perf_counter() - start:.0f} s")
    return 0


main = entry_point(build_parser, run_demo)


if __name__ == "__main__":
    raise SystemExit(main())
