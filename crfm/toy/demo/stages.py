"""The demo's stages: what each one runs (`Demo`, one method per stage) and the stage table (`STAGES`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from crfm.toy.demo.rows import (
    FEW_STEP,
    GENERATOR_DATA,
    GENERATOR_VECTORS,
    LAYOUT_VECTORS,
    LAYOUTS,
    MOSAICS_AND_SYNTH,
    REAL_DATA_SETS,
    REAL_MOSAICS,
    ROWS,
    SYNTH_LAYOUTS,
    SYNTHESES,
    TSTR,
    DownstreamRow,
    downstream_rows,
)
from crfm.toy.demo.runner import Job, StageRunner
from crfm.toy.demo.settings import (
    JUDGE_SEED_OFFSET,
    NUM_CLS,
    REFLOW_EMA_DECAY,
    REFLOW_LEARNING_RATE,
    SYNTHESIS_BATCH,
    DemoSettings,
    judge_val_scenes,
    pretrained_base,
    scene_splits,
)
from crfm.utils.fileio import write_jsonl_atomic, write_text_atomic


class VAEReconstructions:
    """A `PairDataset` whose images went through the VAE (encode, posterior mode, decode): the VAE's ceiling."""

    def __init__(self, dataset, vae_dir: Path) -> None:
        from diffusers import AutoencoderKL

        self.dataset = dataset
        self.vae = AutoencoderKL.from_pretrained(vae_dir).eval()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> dict:
        from crfm.models.conditioning import vae_round_trip

        sample = dict(self.dataset[position])
        sample["image"] = vae_round_trip(self.vae, sample["image"][None])[0]
        return sample


class Demo(StageRunner):
    """The demo's stages on `settings`, under the output folder `out`."""

    def __init__(self, out: Path, settings: DemoSettings, progress: bool) -> None:
        super().__init__(out, settings.parallel, progress)
        self.s = settings

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
        self.mosaics(REAL_MOSAICS, "--with_images")  # the control: real data only, trained beside the generator
        self.mosaics(LAYOUTS)  # the same masks, for the generator to draw (new layouts)
        print(
            f"{self.s.test_scenes} held-out + {self.s.val_scenes} validation + {self.s.train_scenes} labelled + "
            f"{self.s.extra_scenes} extra real scenes in {root}; {self.s.judge_scenes} judge scenes (seed "
            f"{judge_seed}) in {judge_root}"
        )

    def pipeline(self) -> None:
        final, tmp = self.path("tiny_sd35"), self.path("tiny_sd35.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pretrained = pretrained_base(self.s)
        if pretrained is not None:
            # As a user starts from a downloaded SD3.5: a pretrained base (on other scenes), copied.
            print(f"base: {pretrained} (see its README.md model card)")
            shutil.copytree(pretrained, tmp)
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

    def vectorize_job(self, root: str, vectors: str) -> Job:
        """`index.jsonl` of `root` -> prompt vectors in `vectors` and the index `index_.jsonl` that points at them."""
        return self.job(vectors, "crfm.data.vectorize", [
            "--pretrained_model_name_or_path", self.path("tiny_sd35"), "--data_root", self.path(root),
            "--json_file", "index.jsonl", "--out_json_file", "index_.jsonl", "--work_dir", self.path(vectors),
            "--max_sequence_length", self.s.max_sequence_length, "--mixed_precision", "no", "--device", "cpu",
            *self.quiet(),
        ])  # fmt: skip

    def vectors(self) -> None:
        """The labelled scenes' prompt vectors and the new layouts' (both cheap, each mostly imports: side by side)."""
        self.run_together([self.vectorize_job("toydata", "vectors"), self.vectorize_job(LAYOUTS, LAYOUT_VECTORS)])
        self.split(self.path("toydata", "index_.jsonl"), suffix="_")
        self.generator_vectors()

    def generator_vectors(self) -> None:
        """With `generator_mosaics`: the generator's dataset (labelled pairs + real mosaics) and its prompt vectors."""
        if self.s.generator_mosaics:
            self.union_dataset(*GENERATOR_DATA)
            self.run_together([self.vectorize_job(GENERATOR_DATA[0], GENERATOR_VECTORS)])

    def generator_data(self) -> tuple[Path, str, Path]:
        """(data root, index file, vectors) the generator is fine-tuned on: the labelled pairs, and with
        `generator_mosaics` their real mosaics too."""
        if self.s.generator_mosaics:
            return self.path(GENERATOR_DATA[0]), "index_.jsonl", self.path(GENERATOR_VECTORS)
        return self.path("toydata"), "train_.jsonl", self.path("vectors")

    def generator(self, one_thread: bool = False) -> None:
        if self.path("train", "summary.json").is_file():  # written last: finished (train.py would only reload it)
            print("generator: finished in an earlier run, kept", flush=True)
            return
        self.run("crfm.training.train", *self.generator_flags(), one_thread=one_thread)

    def generator_flags(self) -> list[object]:
        """train.py's flags of the generator's fine-tuning (also timed by bench/demo_step.py)."""
        root, index, vectors = self.generator_data()
        return [
            "--pretrained_model_name_or_path", self.path("tiny_sd35"),
            "--data_root", root, "--json_file", index, "--vectors_path", vectors, "--work_dir", self.path("train"),
            "--mask_encoding", self.s.mask_encoding, "--class_balance", self.s.class_balance,
            "--mask_dropout", self.s.mask_dropout, "--num_cls", NUM_CLS, "--resolution", self.s.resolution,
            "--train_batch_size", self.s.train_batch_size,
            "--max_train_steps", self.s.train_steps, "--learning_rate", self.s.learning_rate,
            "--lr_scheduler", self.s.lr_schedule, *self.ema_flags(), "--lr_warmup_steps", self.warmup_steps(),
            "--checkpointing_steps",
            max(1, self.s.train_steps // 4), "--checkpoints_total_limit", 1, "--resume_from_checkpoint", "latest",
            "--seed", self.s.seed, *(["--rot90"] if self.s.rot90 else []),
            *(["--translate", self.s.translate] if self.s.translate else []), *self.mask_add_flag(),
            *(["--uniform_timestep_share", self.s.uniform_timestep_share] if self.s.uniform_timestep_share else []),
            "--mixed_precision", self.s.mixed_precision, *self.quiet(),
        ]  # fmt: skip

    def warmup_steps(self) -> int:
        """The generator's linear warm-up: none for the constant schedule (diffusers' takes none, and the demo's
        generator has always trained without one), the first tenth of the steps (at most 50) before a decay."""
        return 0 if self.s.lr_schedule == "constant" else min(50, self.s.train_steps // 10)

    def ema_flags(self) -> list[object]:
        """train.py's EMA flags of the generator's fine-tuning: none at --ema_decay 0 (the last weights are sampled)."""
        return ["--use_ema", "--ema_decay", self.s.ema_decay] if self.s.ema_decay > 0 else []

    def mask_add_flag(self) -> list[str]:
        """The generator's architecture flag, for its fine-tuning and the few-step student started from it."""
        return ["--mask_add"] if self.s.mask_add else []

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
                jobs.append(self.job(work, "crfm.segmentation.downstream", args))
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
        """(work dir, flags) of the segmentors that need no synthetic data, in the order they train: on its own
        scenes, the judge (`judge_config`), scored on its own validation scenes; the downstream rows of real data
        alone, extra real scenes and real mosaics; and on the labelled scenes, the segmentor (`seg_config`) that
        guides CRFM and is the real-only downstream row, filters synthetic pixels and ranks masks by hardness, as a
        user's one segmentor would. The guide, the shortest run (16 scenes, 1000 iterations), is last: it is what the
        generator's core takes when the generator ends first, so the longer runs are not left for the end."""
        config = self.s.config_path(self.s.seg_config)
        extra = ROWS["real_extra"]
        return [
            ("seg_judge", self.segmentor_args(
                "seg_judge", self.s.seed + 1, root="toydata_judge", val="val.jsonl",
                config=self.s.config_path(self.s.judge_config), iters=self.s.judge_iters,
            )),
            *([(extra.work, self.segmentor_args(
                extra.work, self.s.seed, train="train_extra.jsonl", config=config, iters=self.mixed_iters()
            ))] if extra in self.rows() else []),
            self.mixed_run(ROWS["real_mosaic"]),
            ("seg_real", self.segmentor_args("seg_real", self.s.seed, config=config)),
        ]  # fmt: skip

    def models(self) -> None:
        """The generator on one core and, beside it, the real-data segmentors one after another on the other(s),
        the generator's core taking those still waiting when it ends first: neither needs the other, and one process
        per core beats two threads per process for these small models (`--parallel 1`: one after another, all
        threads each)."""
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

    def rows(self) -> tuple[DownstreamRow, ...]:
        """The downstream rows this run trains (`ablations` and `upper_bound`: all of them)."""
        return downstream_rows(self.s)

    def training_syntheses(self) -> dict[str, Job]:
        """The synthetic sets for training (work dir -> synthesis): the labelled masks x`num_per_mask` and the new
        layouts' masks once each, with CRFM; with `ablations` also the labelled masks plain, and with CRFM in
        hardness-ranked counts (`hardness.json`, made first by `synth_train`)."""
        labelled = {"synth_train": self.synthesis_job("train_.jsonl", "synth_train", "default", self.s.num_per_mask)}
        if self.s.ablations:
            hardness = self.path("hardness.json")
            labelled["synth_train_plain"] = self.synthesis_job(
                "train_.jsonl", "synth_train_plain", None, self.s.num_per_mask
            )
            labelled["synth_train_resampled"] = self.synthesis_job(
                "train_.jsonl", "synth_train_resampled", "default", num_per_mask_file=hardness
            )
        layouts = self.synthesis_job("index_.jsonl", SYNTH_LAYOUTS, "default", root=LAYOUTS, vectors=LAYOUT_VECTORS)
        return {**labelled, SYNTH_LAYOUTS: layouts}

    def synth_train(self) -> None:
        """Every training synthesis side by side (with `ablations`, after the masks' hardness ranking)."""
        if self.s.ablations:
            self.run(
                "crfm.segmentation.hardness", *self.filter_flags(), "--json_file", "train.jsonl",
                "--out", self.path("hardness.json"), "--min_per_mask", self.s.min_per_mask,
                "--max_per_mask", self.s.max_per_mask,
            )  # fmt: skip
        self.run_together(list(self.training_syntheses().values()))

    def synth_train_results(self) -> list[Path]:
        return [self.path(work, "index.jsonl") for work in self.filtered_sets()]

    def filter_job(self, synth: str) -> Job:
        """FreeMask: synthetic pixels the real-only segmentor finds implausible for their class (its probabilities
        averaged over `filter_views` dihedral views) -> ignore."""
        return self.job(f"{synth}_filtered", "crfm.segmentation.filter", [
            *self.filter_flags(), "--json_file", "train.jsonl", "--synth_root", self.path(synth),
            "--work_dir", self.path(f"{synth}_filtered"), "--tolerance_margin", self.s.tolerance_margin,
            "--views", self.s.filter_views,
        ])  # fmt: skip

    def filtered_sets(self) -> tuple[str, ...]:
        """The synthetic sets this run makes and filters: of the labelled masks, and of the new layouts."""
        return tuple(self.training_syntheses())

    def filter(self) -> None:
        """Every synthetic set filtered, side by side; then the real mosaics + filtered new layouts as one dataset."""
        self.run_together([self.filter_job(synth) for synth in self.filtered_sets()])
        self.union_dataset(*MOSAICS_AND_SYNTH)

    def filter_results(self) -> list[Path]:
        filtered = [self.path(f"{synth}_filtered", "index.jsonl") for synth in self.filtered_sets()]
        return [*filtered, self.path(MOSAICS_AND_SYNTH[0], "index.jsonl")]

    def mosaics(self, work: str, *images: str, seed: int | None = None) -> None:
        """2 x 2 mosaics of the labelled masks, as many as synthetic pairs per run (with `--with_images`, cut from the
        real pairs too); the run's seed, so the synthetic layouts and the real-image control share their masks
        (another `seed`: other mosaics, bench/union_recipes.py). A set whose index exists (written last) is complete
        and kept."""
        if self.path(work, "index.jsonl").is_file():
            print(f"{work}: made in an earlier run, kept", flush=True)
            return
        self.run(
            "crfm.data.layouts", "--data_root", self.path("toydata"), "--json_file", "train.jsonl",
            "--work_dir", self.path(work), "--num_layouts", self.s.extra_scenes,
            "--seed", self.s.seed if seed is None else seed, *images, *self.quiet(),
        )  # fmt: skip

    def union_dataset(self, work: str, indexes: Iterable[str]) -> None:
        """One dataset listing the pairs of several index files (relative to the demo folder; paths relative to the
        union, nothing copied), so a run draws from their union as from one dataset."""
        from crfm.data.index import CLASSES_FILE, read_index

        records = []
        for index in indexes:
            part = Path(index).parent
            for item in read_index(self.path(index)):
                records.append(
                    {**item.record, "source": f"../{part}/{item.source}", "target": f"../{part}/{item.target}"}
                )
            classes = self.path(str(part), CLASSES_FILE)
        self.path(work).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(classes, self.path(work, CLASSES_FILE))
        write_jsonl_atomic(self.path(work, "index.jsonl"), records)
        print(f"{work}: {len(records)} pairs of {', '.join(indexes)}")

    def mixed_iters(self) -> int:
        """Iterations of a run with `synth_ratio` synthetic draws that sees each real image as often as the
        real-only run (what `--match_real_exposure` computes): also the real_extra run's, for equal compute."""
        from crfm.segmentation.downstream import exposure_matched_iters

        return exposure_matched_iters(self.s.seg_iters, 1 - self.s.synth_ratio)

    def downstream(self) -> None:
        self.train_segmentors(self.downstream_runs())

    def downstream_results(self) -> list[Path]:
        return [self.path(work, "metrics.json") for work, _ in self.downstream_runs()]

    def mixed_run(self, row: DownstreamRow, val: str = "test.jsonl") -> tuple[str, list[object]]:
        """(work dir, flags) of a downstream segmentor on the labelled scenes + the row's synthetic set,
        `synth_ratio` of the draws (a union of sets: each set as often as that), each real image drawn as often as
        in the real-only run; scored on `val` (the held-out scenes; bench/ chooses on the validation ones)."""
        return (row.work, self.segmentor_args(
            row.work, self.s.seed, "--synth_root", self.path(row.synthetic),
            "--synth_ratio", row.synthetic_share(self.s.synth_ratio),
            "--match_real_exposure", config=self.s.config_path(self.s.seg_config), val=val,
        ))  # fmt: skip

    def downstream_runs(self) -> list[tuple[str, list[object]]]:
        """(work dir, flags) of the downstream segmentors that need synthetic pairs: the mixes and TSTR (the
        real-data rows are trained beside the generator, `real_data_runs`)."""
        runs = [self.mixed_run(row) for row in self.rows() if row.synthetic not in REAL_DATA_SETS]
        if self.s.ablations:  # train on synthetic, test on real: the CRFM pairs alone, the real-only run's recipe
            runs.append((TSTR, self.segmentor_args(
                TSTR, self.s.seed, "--synth_root", self.path("synth_train"), "--synth_ratio", 1,
                config=self.s.config_path(self.s.seg_config),
            )))  # fmt: skip
        return runs

    def guide_flags(self, crfm: str | None) -> list[object]:
        """The guide's flags for CRFM off (None), at the paper's settings ("paper") or test.py's defaults."""
        if crfm is None:
            return []
        guide = self.path("seg_real")
        # The whole batch in one CRFM backward pass (test.py's default of one image bounds GPU memory at 1024 px): at
        # 64 px on this CPU it halves CRFM's cost, and the images equal those of one image per pass to 3/255.
        rectify: list[object] = [
            "--mmseg_config", guide / "config.py", "--mmseg_ckpt", guide / "segmentor.pth",
            "--crfm_chunk_size", SYNTHESIS_BATCH,
        ]  # fmt: skip
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
            "--work_dir", self.path(work), "--num_cls", NUM_CLS, "--resolution", self.s.resolution,
            "--batch_size", SYNTHESIS_BATCH, "--seed", self.s.seed, *self.quiet(),
        ]  # fmt: skip

    def held_out_syntheses(self) -> None:
        """The held-out masks plain and with CRFM, side by side (the longest, CRFM at test.py's defaults, first)."""
        works = sorted(SYNTHESES.values(), key=lambda synthesis: synthesis[1] != "default")
        self.run_together([self.synthesis_job("test_.jsonl", work, crfm) for work, crfm in works])

    def synthesis_job(
        self, json_file: str, work: str, crfm: str | None, num_per_mask: int = 1, num_per_mask_file: Path | None = None,
        root: str = "toydata", vectors: str = "vectors",
    ) -> Job:  # fmt: skip
        """Synthesis (`test.py`) by the generator, CRFM as in `guide_flags`; counts per mask from a file if given."""
        counts = ["--num_per_mask_file", num_per_mask_file] if num_per_mask_file else ["--num_per_mask", num_per_mask]
        generator = self.path("train", "final")
        return self.job(work, "crfm.sampling.synthesis", [
            *self.sampling_flags(json_file, work, generator, root, vectors), *counts,
            "--num_inference_steps", self.s.num_inference_steps, "--mask_guidance_scale", self.s.mask_guidance_scale,
            *self.guide_flags(crfm),
        ])  # fmt: skip

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
            *self.mask_add_flag(), *self.quiet(),
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


@dataclass(frozen=True)
class Stage:
    name: str
    title: str  # printed when the stage starts
    action: Callable[[Demo], object]
    # What a reused stage must still have (a folder made before a stage wrote it, or that lost it, redoes the stage).
    results: Callable[[Demo], list[Path]] | None = None


STAGES = (
    Stage(
        "data",
        "toy remote-sensing scenes: held-out / validation / labelled / extra splits, and the judge's own scenes",
        Demo.data,
        lambda demo: [demo.path(REAL_MOSAICS, "index.jsonl"), demo.path(LAYOUTS, "index.jsonl")],
    ),
    Stage(
        "pipeline", "the base: the shipped pretrained tiny SD3.5 (or --base FOLDER, or a scratch one)", Demo.pipeline
    ),
    Stage(
        "vectors",
        "prompt vectors (SD3 encode_prompt) of the scenes and the new layouts",
        Demo.vectors,
        lambda demo: [demo.path("toydata", "index_.jsonl"), demo.path(LAYOUTS, "index_.jsonl")],
    ),
    Stage(
        "models",
        "train the mask-conditioned MM-DiT (paper stage a); beside it the segmentors (mmseg) of real data: the CRFM "
        "guide = real-only downstream segmentor, the judge (full-resolution U-Net, its own scenes), real + real "
        "mosaics (and real + extra real with --upper_bound)",
        Demo.models,
        Demo.models_results,
    ),
    Stage(
        "synthesis",
        "synthesize the held-out masks: plain, CRFM paper settings, CRFM defaults; same seeds (stage b)",
        Demo.held_out_syntheses,
    ),
    Stage("fidelity", "mask fidelity: real vs VAE ceiling vs plain vs CRFM", Demo.fidelity),
    Stage(
        "synth_train",
        "synthesize the training pairs with CRFM: the labelled masks x num_per_mask and the new layouts (mosaics of "
        "the labelled masks); with --ablations also plain, and resampled by hardness",
        Demo.synth_train,
        Demo.synth_train_results,
    ),
    Stage(
        "filter",
        "FreeMask filtering of the synthetic pairs: noisy synthetic pixels -> ignore; real mosaics + new layouts",
        Demo.filter,
        Demo.filter_results,
    ),
    Stage(
        "downstream",
        "downstream segmentors: real + each synthetic set, synthetic only (stage c)",
        Demo.downstream,
        Demo.downstream_results,
    ),
    Stage(
        "few_step",
        "few-step: CRFM-teacher reflow pairs, a k-SeqRF student, held-out masks in a few steps, no segmentor",
        Demo.few_step,
    ),
)
