"""The demo's knobs: `DemoSettings` (one field per knob, its help in `KNOB_HELP`), the presets, and the checks that
refuse impossible combinations or a changed knob against an existing output folder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import crfm
from crfm.models.conditioning import MASK_ENCODINGS, has_null_mask
from crfm.toy.toydata import CLASSES
from crfm.utils.constants import VIEW_COUNTS
from crfm.utils.fileio import refuse_changed_settings, write_text_atomic
from crfm.utils.flags import MIXED_PRECISION_CHOICES, UsageError

REPO = Path(__file__).resolve().parents[3]  # the checkout, for the default --out only
PACKAGE_PARENT = Path(crfm.__file__).resolve().parents[1]  # the folder the tools import crfm from
# In a checkout: <checkout>/outputs/demo wherever the demo starts; installed: outputs/demo below the current folder.
DEFAULT_OUT = REPO / "outputs" / "demo" if (REPO / "pyproject.toml").is_file() else Path("outputs", "demo")
SETTINGS_FILE = "demo_settings.json"
SEG_CONFIGS = Path(crfm.__file__).resolve().parent / "segmentation" / "configs"  # package data
BASES = ("pretrained", "scratch")
SHIPPED_RESOLUTION = 64  # the shipped base's position grid covers exactly 64 px images (8 x 8 tokens)
JUDGE_SEED_OFFSET = 500
NUM_CLS = len(CLASSES)
SYNTHESIS_BATCH = 8  # images per test.py batch, and per CRFM backward pass (`Demo.guide_flags`)
# Few-step student recipe (docs/fewstep.md), the 2-RF-from-a-CRFM-teacher row of bench/fewstep_runs.py: pairs from
# the uniform grid, AdamW at this rate, EMA of the weights used for sampling.
REFLOW_LEARNING_RATE = 1e-4
REFLOW_EMA_DECAY = 0.995
LR_SCHEDULES = ("constant", "cosine")  # diffusers.optimization schedule names the generator's fine-tuning may take


@dataclass(frozen=True)
class DemoSettings:
    """Every knob of the demo (see KNOB_HELP); the defaults' run time is measured in docs/measurements.md."""

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
    max_sequence_length: int = 24  # the shipped base's pretraining length (a test ties the two)
    generator_mosaics: bool = False
    class_balance: float = 0.0
    mask_dropout: float = 0.1
    uniform_timestep_share: float = 0.0
    mask_add: bool = True
    train_steps: int = 1800  # chosen on the validation masks within the demo's time (bench/results_generator.md)
    train_batch_size: int = 8
    learning_rate: float = 6e-3  # chosen on the validation masks (bench/results_generator.md)
    lr_schedule: str = "constant"
    ema_decay: float = 0.0
    rot90: bool = True
    translate: int = 16  # chosen on the validation masks (bench/results_generator.md)
    mixed_precision: str = "no"
    seg_config: str = "toy_segformer"
    judge_config: str = "toy_unet"
    seg_iters: int = 1000
    judge_iters: int = 1000
    seg_size: int = 64
    num_inference_steps: int = 10
    mask_guidance_scale: float = 2.0  # chosen on the validation masks (bench/results_generator.md)
    num_per_mask: int = 3
    min_per_mask: int = 1
    max_per_mask: int = 5
    tolerance_margin: float = 1.25
    filter_views: int = 8
    synth_ratio: float = 0.5
    ablations: bool = False
    upper_bound: bool = False
    few_step: int = 0
    reflow_segments: int = 2
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
    "base": "pretrained: the shipped tiny SD3.5 base (crfm/toy/tiny_sd35_base); a folder: another pretrained tiny "
    "pipeline (e.g. a candidate from scripts/pretrain_base.sh); scratch: a random one, VAE "
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
    "generator_mosaics": "fine-tune the MM-DiT on the labelled pairs and their real 2 x 2 mosaics (the real_mosaic "
    "control's pairs): more layouts to learn mask-following from, no new image",
    "class_balance": "MM-DiT fine-tuning: weight each latent cell's loss by its classes' batch share ** -this "
    "(train.py --class_balance; 0: the plain loss)",
    "mask_dropout": "MM-DiT fine-tuning: probability of the null mask (train.py --mask_dropout), so that the "
    "syntheses can use --mask_guidance_scale",
    "uniform_timestep_share": "MM-DiT fine-tuning: share of timesteps drawn uniformly instead of logit-normal "
    "(train.py --uniform_timestep_share), so that the clean end σ < 0.05 is trained too",
    "mask_add": "MM-DiT: also add each mask token to the image token at its position (train.py --mask_add)",
    "train_steps": "MM-DiT fine-tuning steps",
    "train_batch_size": "MM-DiT batch",
    "learning_rate": "MM-DiT AdamW learning rate",
    "lr_schedule": "MM-DiT learning rate schedule (train.py --lr_scheduler): constant (no warm-up), or cosine (a "
    "warm-up of a tenth of the steps, at most 50, then a cosine decay to 0)",
    "ema_decay": "MM-DiT fine-tuning: sample from an exponential moving average of the weights with this decay "
    "(train.py --use_ema --ema_decay; 0: the last weights, no average)",
    "rot90": "random quarter turns of each pair while fine-tuning (train.py --rot90); --no-rot90: flips only, as the "
    "paper",
    "translate": "random translations of each pair by up to this many px while fine-tuning, wrapping around "
    "(train.py --translate; 0: off): each pair at every position against the token grid",
    "mixed_precision": "MM-DiT fine-tuning compute dtype (train.py --mixed_precision): bf16 autocast is faster on CPUs "
    "with AVX-512 BF16 / AMX, slower where it is emulated (CPUs without them): use no there",
    "seg_config": "mmseg config of the CRFM guide and the downstream segmentors (the real-only one is the guide): a "
    "packaged one (toy_segformer, toy_unet) or a path",
    "judge_config": "mmseg config of the judge: a packaged one (toy_unet: full resolution, sees every class) or a path",
    "seg_iters": "iterations of the guide = real-only segmentor and of TSTR (mixed runs: as many real draws)",
    "judge_iters": "iterations of the judge (more scenes than the others: it must see every class)",
    "seg_size": "px the segmentors train at",
    "num_inference_steps": "Euler sampling steps",
    "mask_guidance_scale": "syntheses: guidance away from the null mask (test.py --mask_guidance_scale; 1: off, one "
    "model call per step; > 1: two, and needs --mask_dropout)",
    "num_per_mask": "synthetic images per labelled mask for downstream training (the paper: 3)",
    "min_per_mask": "hardness-resampled synthesis: images for the easiest labelled mask",
    "max_per_mask": "hardness-resampled synthesis: images for the hardest labelled mask",
    "tolerance_margin": "FreeMask filter: a synthetic pixel is ignored above this times its class's mean real loss",
    "filter_views": "FreeMask filter: dihedral views the guide's probabilities are averaged over (filter --views; "
    "CRFM fools the guide in the one view it sees, bench/results_crfm_gap.md; 1: the image as is)",
    "synth_ratio": "share of synthetic draws in the mixed downstream segmentors' batches",
    "ablations": "also the ablation rows: plain x3 filtered (CRFM against plain), CRFM new layouts alone (the "
    "generator against the real mosaics), plain and CRFM unfiltered, CRFM hardness-resampled (synthesis, filter, "
    "downstream row) and train on synthetic, test on real (TSTR); off by default for time, on in --preset full",
    "upper_bound": "also the upper-bound row: the labelled scenes and as many extra real scenes as synthetic pairs, "
    "trained beside the generator; off by default for time, on in --preset full",
    "few_step": "Euler steps of the few-step student (docs/fewstep.md; 0: no few-step stage, the default, for "
    "time; bench/results_fewstep.md measured 2, from a 20-step teacher in 4 segments)",
    "reflow_segments": "time segments of the few-step student (1: 2-rectified flow; K > 1: K-SeqRF); must divide "
    "--num_inference_steps",
    "reflow_per_mask": "CRFM-teacher reflow pairs per labelled mask, for the few-step student",
    "reflow_train_steps": "training steps of the few-step student (started from the generator)",
    "figure_rows": "held-out masks shown in samples.png",
    "parallel": "independent runs at once, one thread each: the generator beside the real-data segmentors, then the "
    "downstream segmentors (1: one after another, all threads)",
    "seed": "seed of data, models, noise (the judge's scenes use seed + 500)",
}

PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    # The default demo, its ablation rows and the upper bound (bench/demo_runs.py runs this).
    "full": dict(ablations=True, upper_bound=True),
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
        ablations=True,  # so are the ablation rows
        upper_bound=True,  # and the upper bound
        reflow_per_mask=1,
        reflow_train_steps=4,
        figure_rows=3,
    ),
}


# Knobs whose default is not what the demo did before they existed: a folder that records none of them was made so.
KNOBS_BEFORE: dict[str, object] = {
    "mask_add": False,
    "mask_dropout": 0.0,
    "mask_guidance_scale": 1.0,
    "upper_bound": True,
    "filter_views": 1,
    "translate": 0,
}


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
    if settings.mask_guidance_scale > 1 and not (settings.mask_dropout > 0 and has_null_mask(settings.mask_encoding)):
        raise UsageError("--mask_guidance_scale > 1 needs --mask_dropout > 0 and --mask_encoding onehot")
    if settings.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise UsageError(
            f"--mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {settings.mixed_precision!r}"
        )
    if not 0 <= settings.translate < settings.resolution:
        raise UsageError(
            f"--translate must lie in [0, --resolution {settings.resolution}), got {settings.translate}: "
            "give a smaller reach (0: no shifts)"
        )
    if settings.lr_schedule not in LR_SCHEDULES:
        raise UsageError(f"--lr_schedule must be one of {LR_SCHEDULES}, got {settings.lr_schedule!r}")
    if not 0 <= settings.ema_decay < 1:
        raise UsageError(f"--ema_decay must lie in [0, 1) (0: no average), got {settings.ema_decay}")
    if settings.filter_views not in VIEW_COUNTS:
        raise UsageError(f"--filter_views must be one of {VIEW_COUNTS}, got {settings.filter_views}")
    if settings.mask_encoding not in MASK_ENCODINGS:
        raise UsageError(f"--mask_encoding must be one of {MASK_ENCODINGS}, got {settings.mask_encoding!r}")
    if settings.base != "scratch":
        check_pretrained_base(settings)


def pretrained_base(settings: DemoSettings) -> Path | None:
    """The pretrained pipeline folder the demo copies: the shipped base, a folder given as --base, or None
    (--base scratch)."""
    from crfm.toy.pretrain import SHIPPED_BASE

    return {"scratch": None, "pretrained": SHIPPED_BASE}.get(settings.base, Path(settings.base))


def check_pretrained_base(settings: DemoSettings) -> None:
    """A pretrained base must be a whole pipeline folder that draws --resolution px images."""
    from crfm.utils.base_folder import check_base_folder, check_resolution

    folder = pretrained_base(settings)
    if not (folder / "model_index.json").is_file():
        hint = "reinstall crfm or use --base scratch" if settings.base == "pretrained" else f"--base: one of {BASES}"
        raise UsageError(f"no pretrained pipeline at {folder} ({hint}, or a pipeline folder)")
    check_base_folder(folder, ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler"))
    if settings.resolution != SHIPPED_RESOLUTION and settings.base == "pretrained":
        raise UsageError(
            f"the shipped base draws {SHIPPED_RESOLUTION} px images; use --resolution {SHIPPED_RESOLUTION} "
            "or --base scratch"
        )
    check_resolution(folder, settings.resolution)


def recorded_knobs(record: dict[str, object]) -> dict[str, object]:
    """Every knob of a folder's recorded settings; one added since the folder was made counts as what the demo did
    before it existed (`KNOBS_BEFORE`, else its default)."""
    return {**dataclasses.asdict(DemoSettings()), **KNOBS_BEFORE, **record}


def check_settings(out: Path, settings: DemoSettings) -> None:
    """Refuse to mix results of different settings in one output folder (`recorded_knobs` reads the folder's)."""
    current = dataclasses.asdict(settings)
    if not refuse_changed_settings(
        out / SETTINGS_FILE, current, "demo results", "add --fresh or choose another --out", recorded_knobs({})
    ):
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / SETTINGS_FILE, json.dumps(current, indent=2) + "\n")
