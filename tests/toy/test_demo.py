"""The whole demo (`python -m crfm.toy.demo --preset ci`): every stage runs, every artefact exists, the summary
table is well formed, a second run reuses everything, a lost stage is redone alone, and changed knobs are
refused."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import REPO

pytest.importorskip("mmseg")

from crfm.toy.demo import DOWNSTREAM, PRESETS, STAGES, DemoSettings  # noqa: E402
from crfm.toy.demo.rows import ROWS  # noqa: E402


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "crfm.toy.demo", "--preset", "ci", "--out", str(out), "--no_progress", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = _demo(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc


def test_every_stage_ran_and_wrote_its_artefacts(demo_run):
    out, proc = demo_run
    for number, stage in enumerate(STAGES, 1):
        assert f"=== [{number}/{len(STAGES)}] {stage.title} ===" in proc.stdout
        assert (out / "stages" / f"{stage.name}.json").is_file(), stage.name
    # Every tool runs as a module of the package (no checkout needed), each command printed before it runs.
    commands = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    modules = ["crfm.data.layouts"] * 2  # real mosaics and the new layouts' masks; the base is the shipped one, copied
    modules += ["crfm.data.vectorize"] * 2  # the scenes' and the new layouts' prompts
    # Beside the generator: guide = real-only, judge, extra real, real mosaics (all printed before it starts).
    modules += ["crfm.segmentation.downstream"] * 4 + ["crfm.training.train"]
    modules += ["crfm.sampling.synthesis"] * 3  # held-out syntheses
    # The hardness ranking, then the training pairs: CRFM x3, new layouts, plain x3, resampled CRFM
    modules += ["crfm.segmentation.hardness"] + ["crfm.sampling.synthesis"] * 4
    modules += ["crfm.segmentation.filter"] * 4  # CRFM, plain, resampled CRFM, new layouts
    modules += ["crfm.segmentation.downstream"] * 8  # the synthetic mixes (one on real mosaics too) and TSTR
    modules += ["crfm.reflow", "crfm.training.train", "crfm.sampling.synthesis"]  # the few-step stage
    assert [line.split()[3] for line in commands] == modules and all(c.startswith("$ python -m ") for c in commands)
    # Side by side: the generator started before the first real-data segmentor finished.
    lines = proc.stdout.splitlines()
    generator = lines.index(next(line for line in lines if line.startswith("$ python -m crfm.training.train ")))
    assert generator < min(i for i, line in enumerate(lines) if line.startswith("[seg_"))
    settings = DemoSettings(**PRESETS["ci"])
    n_train, n_test, n_synth = (
        settings.train_scenes,
        settings.test_scenes,
        settings.train_scenes * settings.num_per_mask,
    )
    counts = json.loads((out / "hardness.json").read_text())["counts"]
    assert len(counts) == n_train and {min(counts.values()), max(counts.values())} == {
        settings.min_per_mask, settings.max_per_mask}  # fmt: skip
    expected_lines = {
        "toydata/train.jsonl": n_train,
        "toydata/val.jsonl": settings.val_scenes,
        "toydata/test.jsonl": n_test,
        "toydata/extra.jsonl": n_synth,  # as many extra real scenes as synthetic pairs: the upper bound
        "toydata/train_extra.jsonl": n_train + n_synth,
        "toydata/train_.jsonl": n_train,
        "toydata/test_.jsonl": n_test,
        "synth_plain/index.jsonl": n_test,
        "synth_crfm_paper/index.jsonl": n_test,
        "synth_crfm/index.jsonl": n_test,
        "synth_train/index.jsonl": n_synth,
        "synth_train_plain/index.jsonl": n_synth,
        "synth_train_filtered/index.jsonl": n_synth,
        "synth_train_plain_filtered/index.jsonl": n_synth,
        "synth_train_resampled/index.jsonl": sum(counts.values()),
        "synth_train_resampled_filtered/index.jsonl": sum(counts.values()),
        "layouts/index.jsonl": n_synth,  # as many new layouts as synthetic pairs of the labelled masks
        "layouts_real/index.jsonl": n_synth,
        "synth_layouts/index.jsonl": n_synth,
        "synth_layouts_filtered/index.jsonl": n_synth,
        "mosaics_and_synth_layouts/index.jsonl": 2 * n_synth,  # real mosaics and synthetic layouts together
        "reflow_pairs/index.jsonl": n_train * settings.reflow_per_mask,
        "synth_fewstep/index.jsonl": n_test,
    }
    for name, count in expected_lines.items():
        assert len((out / name).read_text().splitlines()) == count, name
    # The three splits and the judge's scenes are disjoint: no image is in two of them.
    images = {}
    for split in ("train", "val", "test", "extra"):
        images[split] = {json.loads(line)["target"] for line in (out / "toydata" / f"{split}.jsonl").open()}
    assert sum(map(len, images.values())) == len(set().union(*images.values()))
    judge_pixels = {(out / "toydata_judge" / json.loads(line)["target"]).read_bytes()
                    for line in (out / "toydata_judge" / "index.jsonl").open()}  # fmt: skip
    assert not judge_pixels & {(out / "toydata" / t).read_bytes() for t in set().union(*images.values())}
    # The generator started from the shipped base, whose weights the demo did not change.
    from crfm.toy.pretrain import SHIPPED_BASE

    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (out / "tiny_sd35" / part).read_bytes() == (SHIPPED_BASE / part).read_bytes()
    for name in (
        "tiny_sd35/model_index.json",
        "train/final/model.safetensors",
        "train/loss_curve.png",
        "seg_real/segmentor.pth",
        "seg_judge/segmentor.pth",
        *(f"{row.work}/segmentor.pth" for row in DOWNSTREAM),
        "seg_tstr/segmentor.pth",
        "synth_train_filtered/filter_report.json",
        "synth_crfm/crfm_trace.rank0.jsonl",
        "reflow_pairs/crfm_trace.rank0.jsonl",  # the few-step student's teacher is CRFM-guided
        "student/final/model.safetensors",
        "student/final/ema.safetensors",
    ):
        assert (out / name).is_file(), name
    # The union of real mosaics and synthetic layouts points at both sets' files, nothing copied.
    union = out / "mosaics_and_synth_layouts"
    parts = {json.loads(line)["target"].split("/")[1] for line in (union / "index.jsonl").open()}
    assert parts == {"layouts_real", "synth_layouts_filtered"}
    assert all((union / json.loads(line)["source"]).is_file() for line in (union / "index.jsonl").open())
    # Plain and CRFM start from the same noise; CRFM changed the images.
    plain = sorted((out / "synth_plain" / "img").iterdir())
    crfm = sorted((out / "synth_crfm" / "img").iterdir())
    assert [p.name for p in plain] == [p.name for p in crfm]
    assert any(a.read_bytes() != b.read_bytes() for a, b in zip(plain, crfm, strict=True))


def test_summary_table_is_well_formed(demo_run):
    out, proc = demo_run
    summary = json.loads((out / "summary.json").read_text())
    for images in ("real", "vae", "plain", "crfm_paper", "crfm", "fewstep"):
        row = summary["mask_fidelity"][images]
        assert 0 <= row["judge_mIoU"] <= 100 and 0 <= row["guide_mIoU"] <= 100
    settings = DemoSettings(**PRESETS["ci"])
    down = summary["downstream"]
    assert set(down) == {*(row.key for row in DOWNSTREAM), "tstr", "trtr"}
    assert all(0 <= row["mIoU"] <= 100 for row in down.values())
    real, mixed = down["real_only"], down["real_synth_filtered"]
    assert real["synthetic_train"] == 0 and mixed["real_train"] == real["real_train"] == settings.train_scenes
    for key in ("real_synth_filtered", "real_synth_layouts", "real_mosaic"):
        assert down[key]["synthetic_train"] == settings.train_scenes * settings.num_per_mask, key
    assert down["real_mosaic_synth_layouts"]["synthetic_train"] == 2 * settings.train_scenes * settings.num_per_mask
    # Mixed runs see each real image as often as the real-only run; the extra-real run has their iterations.
    assert mixed["real_draws_per_image"] == pytest.approx(real["real_draws_per_image"], rel=0.1)
    assert down["real_extra"]["real_train"] == settings.train_scenes * (1 + settings.num_per_mask)
    assert down["real_extra"]["iters"] == mixed["iters"] > real["iters"]
    assert down["tstr"]["real_draws_per_image"] == 0 and down["trtr"] == real  # TSTR: no real image drawn
    # The union adds the synthetic layouts to the real mosaics: each of its pairs drawn as often as a real mosaic in
    # the mosaic row (so the mosaics are not drawn half as often), the labelled scenes as often as ever.
    union, mosaic = down["real_mosaic_synth_layouts"], down["real_mosaic"]
    assert union["synthetic_draws_per_image"] == pytest.approx(mosaic["synthetic_draws_per_image"], rel=0.01)
    assert union["real_draws_per_image"] == pytest.approx(real["real_draws_per_image"], rel=0.1)
    assert union["iters"] > mosaic["iters"]
    assert set(summary["stage_seconds"]) == {stage.name for stage in STAGES}
    # Each row's IoU per class (the segmentors' PerClassIoUMetric), whose mean over the classes it saw is its mIoU.
    from crfm.toy.toydata import CLASSES

    for key, row in down.items():
        per_class = [row[f"IoU.{name}"] for name in CLASSES]
        assert row["mIoU"] == pytest.approx(sum(v for v in per_class if not math.isnan(v)) / sum(
            not math.isnan(v) for v in per_class), abs=0.01), key  # fmt: skip
    markdown = (out / "summary.md").read_text()
    assert markdown in proc.stdout  # the printed table is the saved one
    tables = [line for line in markdown.splitlines() if line.startswith("|")]
    assert all(line.endswith("|") for line in tables)
    header = "| row | " + " | ".join(CLASSES) + " |"
    assert header in tables and all(f"| `{key}` |" in markdown for key in down if key != "trtr")
    rows = ("| real images through the VAE", "| plain sampling |", "| CRFM, paper settings", "| CRFM, test.py defaults",
            f"| few-step: {settings.reflow_segments}-SeqRF student")  # fmt: skip
    for row in (*rows, *(f"| {row.name} |" for row in DOWNSTREAM)):
        assert any(line.startswith(row) for line in tables), row
    # Every data row of the two result tables holds numbers where the header says so.
    for line in tables:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith(("plain", "CRFM", "real", "few-step")):
            numbers = [n for cell in cells[1:] for n in cell.split(" + ") if n]  # "48 + 144" images: two counts
            assert numbers and all(math.isfinite(float(n)) for n in numbers), line


def test_figure_has_a_row_per_mask_and_seven_columns(demo_run):
    out, _ = demo_run
    settings = DemoSettings(**PRESETS["ci"])
    assert settings.resolution < settings.scene_size  # so the real image comes at both sizes
    image = Image.open(out / "samples.png")
    gap, cell = 4, settings.scene_size
    # mask | plain | CRFM paper | CRFM default | few-step | real at the generator's px | real at the scenes' px
    assert image.width == 7 * cell + 6 * gap
    assert image.height > settings.figure_rows * cell + (settings.figure_rows - 1) * gap  # + title strip


def test_rerun_reuses_and_a_lost_stage_is_redone(demo_run, tmp_path):
    out, first = demo_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    proc = _demo(copy)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("reused") == len(STAGES) and "$ python" not in proc.stdout
    # A stage whose results are lost (or that gained rows since) is run again, and only that stage; in it only
    # what is lost: a downstream row, a real-data segmentor trained beside the (kept) generator, the real mosaics
    # (not the new layouts' masks beside them).
    lost_results = {"seg_real_synth": "downstream", "seg_real_mosaic": "models", "layouts_real": "data"}
    for lost, stage in lost_results.items():
        shutil.rmtree(copy / lost)
        proc = _demo(copy)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert proc.stdout.count("reused") == len(STAGES) - 1 and f"--- {stage}: " in proc.stdout
        commands = [line for line in proc.stdout.splitlines() if line.startswith("$ python")]
        module = "crfm.data.layouts" if stage == "data" else "crfm.segmentation.downstream"
        assert len(commands) == 1 and commands[0].startswith(f"$ python -m {module} ")
        assert Path(commands[0].split("--work_dir ")[1].split()[0]).name == lost
        if stage == "data":
            assert (copy / lost / "index.jsonl").is_file()
        else:  # the stage's other segmentors (and the generator) were kept, not retrained
            assert (copy / lost / "metrics.json").is_file() and "finished in an earlier run, kept" in proc.stdout


def test_changed_knobs_are_refused(demo_run, tmp_path):
    out, _ = demo_run
    proc = _demo(out, "--train_steps", "21")
    assert proc.returncode == 2 and "train_steps: 20 -> 21" in proc.stderr and "--fresh" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ")


def test_a_failing_stage_stops_with_a_resume_hint(demo_run, tmp_path):
    out, _ = demo_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "stages" / "downstream.json").unlink()
    shutil.rmtree(copy / "seg_real_synth")
    (copy / "synth_train" / "index.jsonl").write_text("not json\n")  # the downstream stage's input is broken
    proc = _demo(copy)
    assert proc.returncode == 1
    assert "stage 'downstream' failed" in proc.stderr and "run the same command again" in proc.stderr
    assert not (copy / "stages" / "downstream.json").exists()  # not marked done


def test_scratch_base_builds_a_random_pipeline_instead(tmp_path):
    out = tmp_path / "scratch"
    proc = _demo(out, "--base", "scratch", "--until", "pipeline")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "$ python -m crfm.toy.tiny " in proc.stdout and "--fit_vae_on" in proc.stdout
    assert (out / "tiny_sd35" / "model_index.json").is_file()
    assert not (out / "tiny_sd35" / "pretrain_report.json").exists()  # not the shipped base


def test_a_base_folder_is_copied_as_the_base_and_a_missing_one_refused(tmp_path):
    """`--base FOLDER`: another pretrained pipeline (e.g. a pretraining candidate) is what the demo starts from."""
    from crfm.toy.pretrain import SHIPPED_BASE

    candidate = tmp_path / "candidate"
    shutil.copytree(SHIPPED_BASE, candidate)
    (candidate / "README.md").write_text("# a candidate base\n")
    proc = _demo(tmp_path / "out", "--base", str(candidate), "--until", "pipeline")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (tmp_path / "out" / "tiny_sd35" / "README.md").read_text() == "# a candidate base\n"
    missing = _demo(tmp_path / "other", "--base", str(tmp_path / "nowhere"), "--until", "pipeline")
    assert missing.returncode == 2 and "no pretrained pipeline at" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1 and not (tmp_path / "other").exists()


def test_the_shipped_base_refuses_another_resolution(tmp_path):
    proc = _demo(tmp_path / "out", "--resolution", "128")
    assert proc.returncode == 2 and "--base scratch" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_parallel_one_trains_the_real_data_segmentors_before_the_generator(tmp_path):
    """`--parallel 1`: no side by side; every real-data segmentor has finished before the generator starts."""
    proc = _demo(tmp_path / "out", "--parallel", "1", "--until", "models")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    generator = next(i for i, line in enumerate(lines) if line.startswith("$ python -m crfm.training.train "))
    finished = [i for i, line in enumerate(lines) if line.startswith("[seg_")]
    assert len(finished) == 4 and max(finished) < generator
    assert (tmp_path / "out" / "train" / "final" / "model.safetensors").is_file()


def test_ablation_rows_run_only_with_the_full_preset(tmp_path):
    """The default demo trains the paper's chain and its baselines; hardness resampling and TSTR (ablations) only
    with `ablations` (`--preset full`, and the ci smoke run, which covers every stage)."""
    from crfm.toy.demo.stages import Demo

    def works(**knobs) -> set[str]:
        return {work for work, _ in Demo(tmp_path, DemoSettings(**knobs), progress=False).downstream_runs()}

    ablation_works = {
        "seg_real_synth_filtered_resampled", "seg_tstr", "seg_real_synth", "seg_real_synth_plain",
        "seg_real_synth_plain_filtered", "seg_real_synth_layouts",
    }  # fmt: skip
    default, full = works(), works(**PRESETS["full"])
    assert not default & ablation_works and ablation_works <= full and full - default == ablation_works
    # The paper's chain (filtered CRFM pairs) and synthesis on top of copy-paste; CRFM against plain, the new layouts
    # alone and the unfiltered sets are ablations.
    assert default == {"seg_real_synth_filtered", "seg_real_mosaic_synth_layouts"}
    assert PRESETS["ci"]["ablations"] and PRESETS["full"] == {"ablations": True, "upper_bound": True}
    assert Demo(tmp_path, DemoSettings(), progress=False).filtered_sets() == ("synth_train", "synth_layouts")
    full_sets = Demo(tmp_path, DemoSettings(**PRESETS["full"]), progress=False).filtered_sets()
    assert full_sets == ("synth_train", "synth_train_plain", "synth_train_resampled", "synth_layouts")


def test_upper_bound_row_trains_only_with_its_knob(tmp_path):
    """The extra-real upper bound is neither the paper's chain nor a baseline it must beat: it trains beside the
    generator only with `upper_bound` (`--preset full`, the ci smoke run); the judge, the real mosaics and the guide
    always do, the guide last."""
    from crfm.toy.demo.stages import Demo

    def real_data_works(**knobs) -> list[str]:
        return [work for work, _ in Demo(tmp_path, DemoSettings(**knobs), progress=False).real_data_runs()]

    assert real_data_works() == ["seg_judge", "seg_real_mosaic", "seg_real"]
    assert real_data_works(**PRESETS["full"]) == ["seg_judge", "seg_real_extra", "seg_real_mosaic", "seg_real"]
    assert PRESETS["ci"]["upper_bound"]
    rows = {row.key for row in Demo(tmp_path, DemoSettings(), progress=False).rows()}
    assert "real_extra" not in rows and {"real_only", "real_mosaic", "real_mosaic_synth_layouts"} <= rows


def test_generator_mosaics_train_on_the_labelled_pairs_and_their_real_mosaics(tmp_path):
    """`--generator_mosaics`: the generator's index lists the labelled pairs and the real mosaics (paths relative
    to the union, pointing at the files), and it is the one the fine-tuning reads."""
    from crfm.data.index import read_index
    from crfm.toy.demo.rows import GENERATOR_DATA
    from crfm.toy.demo.stages import Demo

    for part, names in (("toydata", ("a", "b")), ("layouts_real", ("m",))):
        records = [{"source": f"label/{n}.png", "target": f"img/{n}.png", "prompt": n} for n in names]
        for sub in ("label", "img"):
            (tmp_path / part / sub).mkdir(parents=True)
            for n in names:
                Image.new("L" if sub == "label" else "RGB", (8, 8)).save(tmp_path / part / sub / f"{n}.png")
        (tmp_path / part / "classes.json").write_text(json.dumps(["x", "y"]))
        index = "train.jsonl" if part == "toydata" else "index.jsonl"
        (tmp_path / part / index).write_text("".join(json.dumps(r) + "\n" for r in records))
    demo = Demo(tmp_path, DemoSettings(generator_mosaics=True), progress=False)
    demo.union_dataset(*GENERATOR_DATA)
    items = read_index(tmp_path / "generator_data" / "index.jsonl", tmp_path / "generator_data")
    assert [item.record["prompt"] for item in items] == ["a", "b", "m"]
    assert all((tmp_path / "generator_data" / item.target).resolve().is_file() for item in items)
    assert demo.generator_data() == (tmp_path / "generator_data", "index_.jsonl", tmp_path / "vectors_generator_data")
    assert Demo(tmp_path, DemoSettings(), progress=False).generator_data()[:2] == (tmp_path / "toydata", "train_.jsonl")


def test_the_fine_tuning_schedule_and_ema_knobs_reach_train_py(tmp_path):
    """`--lr_schedule` and `--ema_decay` become train.py's own flags (parsed by train.py's parser); the default
    (constant, no average) passes no EMA flag, so sampling reads the last weights as before the knobs existed."""
    from crfm.toy.demo.stages import Demo
    from crfm.training.train import build_parser

    def parsed(**knobs):
        flags = Demo(tmp_path, DemoSettings(**knobs), progress=False).generator_flags()
        return build_parser().parse_args([str(flag) for flag in flags])

    default, averaged = parsed(), parsed(lr_schedule="cosine", ema_decay=0.99)
    assert (default.lr_scheduler, default.use_ema) == ("constant", False)
    assert (averaged.lr_scheduler, averaged.use_ema, averaged.ema_decay) == ("cosine", True, 0.99)
    assert averaged.max_train_steps == default.max_train_steps == DemoSettings().train_steps
    for bad in (("--lr_schedule", "linear"), ("--ema_decay", "1.0")):
        proc = _demo(tmp_path / "out", *bad)
        assert proc.returncode == 2 and bad[0] in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_translate_knob_reaches_train_py(tmp_path):
    """`--translate N` becomes train.py's --translate; 0 (off) passes nothing; a whole image's reach is refused."""
    from crfm.toy.demo.stages import Demo
    from crfm.training.train import build_parser

    def parsed(**knobs):
        flags = Demo(tmp_path, DemoSettings(**knobs), progress=False).generator_flags()
        return [str(flag) for flag in flags], build_parser().parse_args([str(flag) for flag in flags])

    (off_flags, off), (_, default) = parsed(translate=0), parsed()
    assert "--translate" not in off_flags and off.translate == 0 and default.translate == DemoSettings().translate > 0
    proc = _demo(tmp_path / "out", "--translate", str(DemoSettings().resolution))
    assert proc.returncode == 2 and "--translate" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_mask_guidance_needs_mask_dropout(tmp_path):
    proc = _demo(tmp_path / "out", "--mask_dropout", "0", "--mask_guidance_scale", "2")
    assert proc.returncode == 2 and "--mask_dropout" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_folder_from_before_the_mask_conditioning_knobs_is_refused(tmp_path):
    """A folder whose settings predate mask_add / mask_dropout / mask_guidance_scale was made without them (not
    with today's defaults), so today's defaults are refused there and the old behaviour is accepted."""
    import dataclasses

    from crfm.toy.demo.settings import KNOBS_BEFORE, SETTINGS_FILE, check_settings
    from crfm.utils.errors import UsageError

    old = {k: v for k, v in dataclasses.asdict(DemoSettings()).items() if k not in KNOBS_BEFORE}
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(old))
    with pytest.raises(UsageError, match="mask_add: False -> True"):
        check_settings(tmp_path, DemoSettings())
    check_settings(tmp_path, DemoSettings(**KNOBS_BEFORE))


def test_the_lane_beside_takes_the_waiting_runs_when_it_ends_first(tmp_path):
    """Two runs that each wait for the other's marker finish only if they run at once: with one segmentor lane, the
    thread of the (instant) job beside must take the second, or the first times out and the stage fails."""
    from crfm.toy.demo.runner import StageRunner

    def waits_for(mine: str, other: str) -> tuple[Path, str, list[object]]:
        code = (
            f"import pathlib, time; d = pathlib.Path({str(tmp_path)!r}); (d / {mine!r}).touch(); t = time.time()\n"
            f"while not (d / {other!r}).exists():\n    assert time.time() - t < 60, 'ran alone'; time.sleep(0.05)"
        )
        return tmp_path / f"{mine}.log", "timeit", ["-n", "1", "-r", "1", code]

    StageRunner(tmp_path, parallel=2, progress=False).run_together(
        [waits_for("a", "b"), waits_for("b", "a")], lanes=1, beside=lambda: None
    )
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()


def test_commands_side_by_side_take_one_thread_each_and_a_lone_command_every_lane(tmp_path):
    """Independent commands run one thread each (two processes use two cores better than two threads of one);
    a command alone gets the threads of every lane, and a lane beside another job (the generator) only its own."""
    from crfm.toy.demo.runner import StageRunner

    def records_threads(name: str) -> tuple[Path, str, list[object]]:
        path = str(tmp_path / name)
        code = f"import os, pathlib; pathlib.Path({path!r}).write_text(os.environ['OMP_NUM_THREADS'])"
        return tmp_path / f"{name}.log", "timeit", ["-n", "1", "-r", "1", code]

    runner = StageRunner(tmp_path, parallel=2, progress=False)
    runner.run_together([records_threads("a"), records_threads("b"), records_threads("c")])
    runner.run_together([records_threads("alone")])
    runner.run_together([records_threads("beside")], lanes=1, beside=lambda: None)
    threads = {name: (tmp_path / name).read_text() for name in ("a", "b", "c", "alone", "beside")}
    assert threads == {"a": "1", "b": "1", "c": "1", "alone": "2", "beside": "1"}


@pytest.mark.parametrize("synth_ratio", [0.25, 0.5, 0.8])
def test_a_union_row_draws_each_part_as_often_as_a_one_set_row_draws_its_set(synth_ratio):
    one_set, union = ROWS["real_mosaic"], ROWS["real_mosaic_synth_layouts"]
    assert one_set.synthetic_share(synth_ratio) == pytest.approx(synth_ratio)
    assert union.parts == 2
    share = union.synthetic_share(synth_ratio)
    # Per labelled draw: a one-set row draws its set r / (1 - r) times; the union each half of its draws as often.
    per_part = share / (1 - share) / union.parts
    assert per_part == pytest.approx(synth_ratio / (1 - synth_ratio))
