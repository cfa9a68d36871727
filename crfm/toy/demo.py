"""The whole TODSynth pipeline on the embedded default, offline, on a CPU: README's first command.

    python -m crfm.demo [--out outputs/demo] [--preset default|ci] [--fresh] [--KNOB VALUE ...]

Stages (each prints the command it runs, so every step can be repeated by hand at real scale), in the paper's
low-label regime: a generator pretrained on a large unlabelled corpus is fine-tuned with masks on a few scenes.
 1. toy remote-sensing scenes: a small labelled split, a validation split (for choices, in `bench/`), a held-out
    split (only for the tables), and separate scenes for the judge (another seed);
 2. the base: a copy of the shipped pretrained tiny SD3.5 (`crfm/toy/tiny_sd35_base`), or `--base scratch`;
 3. prompt vectors (`crfm.data.vectorize`, i.e. `preprocess/vectorize.py`);
 4. the mask-conditioned MM-DiT fine-tuned on the labelled split (`crfm.training.train`, i.e. `train.py`), stage (a);
 5. the frozen guide segmentor, trained on the labelled split only (`crfm.segmentation.downstream`, i.e.
    `scripts/train_segmentor.py`; mmseg); it is also the real-only downstream segmentor;
 6. an independent judge segmentor trained on its own scenes; it scores mask fidelity and never guides;
 7. synthesis of the held-out masks from the same noise (`crfm.sampling.synthesis`, i.e. `test.py`), stage (b):
    plain, CRFM at the paper's settings, and CRFM at test.py's defaults;
 8. mask fidelity of the real held-out images, of the same images through the VAE (the ceiling), and of the
    three syntheses;
 9. synthesis of the *labelled* masks (held-out masks would leak held-out labels into training);
10. downstream, stage (c): a segmentor trained on real + synthetic data vs the real-only one, both scored on the
    held-out real scenes;
11. few-step (docs/fewstep.md): reflow pairs of the labelled masks from the CRFM-guided generator
    (`crfm.reflow`), a k-SeqRF (or 2-RF) student trained on them (`train.py --reflow_pairs`), and the held-out masks
    drawn by the student in `--few_step` Euler steps with no segmentor, scored like the other syntheses;
12. report: `summary.json`, `summary.md`, `samples.png` (mask | plain | CRFM paper | CRFM default | few-step |
    real).

Every tool runs as `python -m <module>` of the installed (or checked-out) package, so no checkout is needed.
A re-run reuses every finished stage; an interrupted stage resumes (training from its last checkpoint,
synthesis from its last written image, segmentors from mmengine's checkpoint). `--fresh` starts over.
Changing a knob against an existing --out is refused (use --fresh or another --out), so results never mix
settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import crfm
from crfm.models.conditioning import MASK_ENCODINGS
from crfm.utils.fileio import write_text_atomic
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
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DemoSettings:
    """Every knob of the demo (see KNOB_HELP). Defaults fit a 2-core CPU in about 12 minutes after set-up."""

    train_scenes: int = 48
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
    train_steps: int = 1500
    train_batch_size: int = 8
    learning_rate: float = 5e-4
    seg_iters: int = 400
    seg_size: int = 64
    num_inference_steps: int = 20
    num_per_mask: int = 2
    synth_ratio: float = 0.5
    few_step: int = 2
    reflow_segments: int = 4
    reflow_per_mask: int = 2
    reflow_train_steps: int = 400
    figure_rows: int = 6
    seed: int = 0


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
    "seg_iters": "iterations of each segmentor (guide, judge, downstream)",
    "seg_size": "px the segmentors train at",
    "num_inference_steps": "Euler sampling steps",
    "num_per_mask": "synthetic images per training mask for downstream training",
    "synth_ratio": "share of synthetic draws in the downstream segmentor's batches",
    "few_step": "Euler steps of the few-step student (docs/fewstep.md; 0: no few-step stage)",
    "reflow_segments": "time segments of the few-step student (1: 2-rectified flow; K > 1: K-SeqRF)",
    "reflow_per_mask": "CRFM-teacher reflow pairs per labelled mask, for the few-step student",
    "reflow_train_steps": "training steps of the few-step student (started from the generator)",
    "figure_rows": "held-out masks shown in samples.png",
    "seed": "seed of data, models, noise (the judge's scenes use seed + 500)",
}

JUDGE_SEED_OFFSET = 500
BASES = ("pretrained", "scratch")
SHIPPED_RESOLUTION = 64  # the shipped base's position grid covers exactly 64 px images (8 x 8 tokens)
FIGURE_TITLES = ("mask", "plain", "CRFM paper", "CRFM default", "real")
FEW_STEP = ("fewstep", "synth_fewstep")  # (image set, work dir) of the few-step student's held-out synthesis
# Few-step student recipe (docs/fewstep.md), the 2-RF-from-a-CRFM-teacher row of bench/fewstep_runs.py: pairs from
# the uniform grid, AdamW at this rate, EMA of the weights used for sampling.
REFLOW_LEARNING_RATE = 1e-4
REFLOW_EMA_DECAY = 0.995


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
        num_inference_steps=4,
        num_per_mask=1,
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

    def run(self, module: str, *cmd: object) -> None:
        """`python -m module cmd...` in this process's folder; printed first, paths below it shown relative."""
        args = [str(c) for c in cmd]
        inside = str(Path.cwd()) + os.sep  # as a user in this folder would type them
        shown = " ".join(a.removeprefix(inside) for a in args)
        print(f"$ python -m {module} {shown}", flush=True)
        subprocess.run([sys.executable, "-m", module, *args], check=True, env=self.env)

    def quiet(self) -> list[str]:
        return [] if self.progress else ["--no_progress"]

    def stage(self, number: int, name: str, title: str, action: Callable[[], object]) -> None:
        marker = self.path("stages", f"{name}.json")
        print(f"\n=== [{number}/{len(STAGES)}] {title} ===", flush=True)
        if marker.is_file():
            self.timings[name] = json.loads(marker.read_text())["seconds"]
            print(f"done in an earlier run ({self.timings[name]:.0f} s), reused")
            return
        start = time.perf_counter()
        action()
        self.timings[name] = round(time.perf_counter() - start, 1)
        write_text_atomic(marker, json.dumps({"seconds": self.timings[name]}) + "\n")
        print(f"--- {name}: {self.timings[name]:.0f} s")

    def split(self, index: Path, suffix: str = "") -> None:
        """index -> train / val / test files of the knobs' sizes, in scene order (scene i depends only on seed, i)."""
        lines = index.read_text(encoding="utf-8").splitlines(keepends=True)
        sizes = (self.s.train_scenes, self.s.val_scenes, self.s.test_scenes)
        begin = 0
        for name, size in zip(SPLITS, sizes, strict=True):
            write_text_atomic(index.with_name(f"{name}{suffix}.jsonl"), "".join(lines[begin : begin + size]))
            begin += size

    # ----------------------------------------------------------------------------------------------- stages
    def data(self) -> None:
        from crfm.toy.toydata import write_dataset

        root = self.path("toydata")
        total = self.s.train_scenes + self.s.val_scenes + self.s.test_scenes
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
        print(
            f"{self.s.train_scenes} labelled + {self.s.val_scenes} validation + {self.s.test_scenes} held-out scenes "
            f"in {root}; {self.s.judge_scenes} judge scenes (seed {judge_seed}) in {judge_root}"
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

    def vectors(self) -> None:
        root = self.path("toydata")
        self.run(
            "crfm.data.vectorize", "--pretrained_model_name_or_path", self.path("tiny_sd35"),
            "--data_root", root, "--json_file", "index.jsonl", "--out_json_file", "index_.jsonl",
            "--work_dir", self.path("vectors"), "--max_sequence_length", self.s.max_sequence_length,
            "--mixed_precision", "no", "--device", "cpu", *self.quiet(),
        )  # fmt: skip
        self.split(root / "index_.jsonl", suffix="_")

    def generator(self) -> None:
        self.run(
            "crfm.training.train", "--pretrained_model_name_or_path", self.path("tiny_sd35"),
            "--data_root", self.path("toydata"), "--json_file", "train_.jsonl", "--vectors_path", self.path("vectors"),
            "--work_dir", self.path("train"), "--mask_encoding", self.s.mask_encoding,
            "--num_cls", 6, "--resolution", self.s.resolution, "--train_batch_size", self.s.train_batch_size,
            "--max_train_steps", self.s.train_steps, "--learning_rate", self.s.learning_rate,
            "--lr_warmup_steps", min(50, self.s.train_steps // 10), "--checkpointing_steps",
            max(1, self.s.train_steps // 4), "--checkpoints_total_limit", 1, "--resume_from_checkpoint", "latest",
            "--seed", self.s.seed, *self.quiet(),
        )  # fmt: skip

    def segmentor(self, work: str, seed: int, *extra: object, root: str = "toydata", val: str = "test.jsonl") -> None:
        """The toy SegFormer (the tool's default config), on the CPU like every other stage of the demo."""
        self.run(
            "crfm.segmentation.downstream", "--data_root", self.path(root), "--json_file", "train.jsonl",
            "--val_file", val, "--work_dir", self.path(work), "--num_cls", 6,
            "--max_iters", self.s.seg_iters, "--img_size", self.s.seg_size, "--seed", seed, "--device", "cpu", *extra,
        )  # fmt: skip

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

    def sampling_flags(self, json_file: str, work: str, generator: Path) -> list[object]:
        """What synthesis (`test.py`) and reflow pairs share."""
        return [
            "--pretrained_model_name_or_path", self.path("tiny_sd35"), "--data_root", self.path("toydata"),
            "--json_file", json_file, "--vectors_path", self.path("vectors"), "--lora_ckpt", generator,
            "--work_dir", self.path(work), "--num_cls", 6, "--resolution", self.s.resolution, "--batch_size", 8,
            "--seed", self.s.seed, *self.quiet(),
        ]  # fmt: skip

    def synthesize(self, json_file: str, work: str, crfm: str | None, num_per_mask: int = 1) -> None:
        """Synthesis (`test.py`) by the generator, CRFM as in `guide_flags`."""
        self.run(
            "crfm.sampling.synthesis", *self.sampling_flags(json_file, work, self.path("train", "final")),
            "--num_per_mask", num_per_mask, "--num_inference_steps", self.s.num_inference_steps,
            *self.guide_flags(crfm),
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
            "--init_ckpt", self.path("train", "final"), "--mask_encoding", self.s.mask_encoding, "--num_cls", 6,
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
        return PairDataset(read_index(index, index.parent), index.parent, self.s.resolution, num_cls=6)

    def fidelity(self) -> None:
        from crfm.data.dataset import PairDataset
        from crfm.data.index import read_index

        root = self.path("toydata")
        # Real images are scored at the generator's resolution too, so all rows are comparable.
        real = PairDataset(read_index(root / "test.jsonl", root), root, resolution=self.s.resolution, num_cls=6)
        sets: dict[str, object] = {"real": real, "vae": VAEReconstructions(real, self.path("tiny_sd35", "vae"))}
        self.score(sets | {images: self.synthesized(work) for images, (work, _) in SYNTHESES.items()})

    def score(self, sets: dict[str, object]) -> None:
        """`python -m crfm.evaluate` for each image set and segmentor, in-process (one model load per judge)."""
        from crfm.segmentation.adapter import load_segmentor
        from crfm.segmentation.evaluate import mask_fidelity

        for judge in ("seg_judge", "seg_real"):
            seg = self.path(judge)
            segmentor = load_segmentor(seg / "config.py", seg / "segmentor.pth", device="cpu", num_cls=6)
            for images, dataset in sets.items():
                result = mask_fidelity(segmentor, dataset, 6, progress=self.progress)
                print(f"{images:>10} images, {judge}: mIoU {100 * result['mIoU']:.2f}")
                write_text_atomic(self.path("fidelity", f"{images}_{judge}.json"), json.dumps(result, indent=2) + "\n")

    def downstream(self) -> None:
        self.segmentor(
            "seg_real_synth", self.s.seed, "--synth_root", self.path("synth_train"), "--synth_ratio", self.s.synth_ratio
        )

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
            "downstream": {"real_only": seg("seg_real"), "real_plus_synthetic": seg("seg_real_synth")},
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
    real, mixed = down["real_only"], down["real_plus_synthetic"]
    lines += [
        "",
        f"Downstream: segmentors trained for {s['seg_iters']} iterations, mIoU (%) on the {held_out} held-out "
        "real scenes.",
        "",
        "| training data | mIoU | aAcc |",
        "|---|---|---|",
        f"| real only ({real['real_train']} scenes) | {real['mIoU']:.2f} | {real['aAcc']:.2f} |",
        f"| real + CRFM synthetic ({mixed['real_train']} + {mixed['synthetic_train']}, "
        f"{100 * s['synth_ratio']:.0f}% synthetic draws) | {mixed['mIoU']:.2f} | {mixed['aAcc']:.2f} |",
        "",
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
    ("data", "toy remote-sensing scenes: labelled / validation / held-out splits, and the judge's own scenes"),
    ("pipeline", "the base: the shipped pretrained tiny SD3.5 (or a scratch one, --base scratch)"),
    ("vectors", "prompt vectors (SD3 encode_prompt)"),
    ("generator", "train the mask-conditioned MM-DiT (paper stage a)"),
    ("guide", "guide segmentor on the real training split (mmseg)"),
    ("judge", "judge segmentor on its own scenes (same recipe, another seed)"),
    ("synthesis", "synthesize the held-out masks: plain, CRFM paper settings, CRFM defaults; same seeds (stage b)"),
    ("fidelity", "mask fidelity: real vs VAE ceiling vs plain vs CRFM"),
    ("synth_train", "synthesize the labelled masks with CRFM defaults, for downstream training"),
    ("downstream", "downstream segmentor on real + synthetic (paper stage c)"),
    ("few_step", "few-step: CRFM-teacher reflow pairs, a k-SeqRF student, held-out masks in a few steps, no segmentor"),
]


def check_knobs(settings: DemoSettings) -> None:
    """Refuse impossible knob combinations before anything is written."""
    if settings.few_step and settings.num_inference_steps % settings.reflow_segments:
        raise UsageError("--reflow_segments must divide --num_inference_steps (segment ends lie on the teacher's grid)")
    if min(settings.train_scenes, settings.val_scenes, settings.test_scenes) < 1 or settings.judge_scenes < 2:
        raise UsageError("need at least 1 training, validation and held-out scene and 2 judge scenes")
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
    """Refuse to mix results of different settings in one output folder."""
    path = out / SETTINGS_FILE
    current = dataclasses.asdict(settings)
    if path.is_file():
        # A knob added since the folder was made counts as its default there.
        previous = {**dataclasses.asdict(DemoSettings()), **json.loads(path.read_text())}
        changed = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
        if changed:
            diff = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            raise UsageError(f"{out} was made with other settings ({diff}); add --fresh or choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(current, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crfm.demo",
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
        "generator": demo.generator,
        "guide": lambda: demo.segmentor("seg_real", settings.seed),
        "judge": lambda: demo.segmentor("seg_judge", settings.seed + 1, root="toydata_judge", val="val.jsonl"),
        "synthesis": lambda: [demo.synthesize("test_.jsonl", work, crfm) for work, crfm in SYNTHESES.values()],
        "fidelity": demo.fidelity,
        "synth_train": lambda: demo.synthesize("train_.jsonl", "synth_train", "default", settings.num_per_mask),
        "downstream": demo.downstream,
        "few_step": demo.few_step,
    }
    for number, (name, title) in enumerate(STAGES, 1):
        try:
            demo.stage(number, name, title, actions[name])
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
