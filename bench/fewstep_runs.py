"""Few-step synthesis on the demo's generator, over seeds: 1-RF with Euler/Heun/RK45, 2-RF, 2-RF from a CRFM
teacher, k-SeqRF, distillation — judge mIoU (mean ± std), NFE, images/s and straightness.

    python bench/demo_runs.py --seeds 0 1 2            # first: the demos (generator, guide, judge per seed)
    python bench/fewstep_runs.py --seeds 0 1 2 [--demos outputs/bench_demo/default] [--out outputs/fewstep]

Per seed S it reads the demo run `<demos>/seedS` and writes `<out>/seedS`. The teacher samples as the demo does:
its `demo_settings.json` gives the mask encoding, `--mask_add`, the mask guidance scale and the demo's step count.

1. reflow pairs of the labelled masks (`train_.jsonl`), 10 noises each, from the 1-RF teacher at the demo's mask
   guidance (20 Euler steps, uniform grid, the 3 inner boundaries of 4 segments kept): `pairs_plain`, and with CRFM
   at test.py's defaults `pairs_crfm` (the guide is the demo's `seg_real`); pair noise uses seed 1000 + S, never an
   evaluation noise;
2. students, each `train.py --reflow_pairs ... --init_ckpt <1-RF> --use_ema` (STUDENTS below); a student learns
   the guided teacher's map, so it samples with no mask guidance (one model call per step);
3. `python -m crfm.evaluate_sampling` per model on the held-out masks (judge `seg_judge`, trained on its own
   scenes, never guiding) and, for the students' few-step runs, on the validation masks — the "best few-step
   sampler" is chosen there, never on the held-out masks.

Every step is skipped when its output exists and resumes otherwise (pairs by unit, training from its last
checkpoint), so run it under nohup and re-run after an interruption. `--speed` measures images/s of each sampler
with nothing else running (the bench's own two jobs slow each other unevenly). `--report` only aggregates:
`bench/results_fewstep.md` and `bench/fewstep_fidelity_vs_nfe.png`.

    nohup python bench/fewstep_runs.py --seeds 0 1 2 > outputs/fewstep/bench.log 2>&1 &
    python bench/fewstep_runs.py --seeds 0 --speed     # afterwards, alone on the machine
    python bench/fewstep_runs.py --seeds 0 1 2 --report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

from crfm.utils.runs import Job, mean_std, run_jobs, run_logged

REPO = Path(__file__).resolve().parents[1]
DEMOS = REPO / "outputs" / "bench_demo" / "default"  # --demos / --out replace these two (main)
OUT = REPO / "outputs" / "fewstep"
PAIRS_PER_MASK = 10

PAIRS = [
    "--num_per_mask", str(PAIRS_PER_MASK), "--num_inference_steps", "20", "--sigma_grid", "uniform", "--segments", "4",
]  # fmt: skip
TRAIN = [
    "--max_train_steps", "1000", "--learning_rate", "1e-4", "--train_batch_size", "8", "--prompt_dropout", "0",
    "--use_ema", "--ema_decay", "0.995", "--checkpointing_steps", "250", "--checkpoints_total_limit", "1",
    "--resume_from_checkpoint", "latest",
]  # fmt: skip
# name -> (teacher pairs, train.py flags)
STUDENTS: dict[str, tuple[str, list[str]]] = {
    "2rf": ("plain", ["--seqrf_segments", "1"]),
    "2rf_crfm": ("crfm", ["--seqrf_segments", "1"]),
    "seqrf2": ("plain", ["--seqrf_segments", "2"]),
    "seqrf4": ("plain", ["--seqrf_segments", "4"]),
    "seqrf4_crfm": ("crfm", ["--seqrf_segments", "4"]),
    "distill4": ("plain", ["--seqrf_segments", "4", "--distill"]),
}
TEACHER_RUNS = [
    "euler:23", "euler:20", "euler:20:uniform", "euler:8:uniform", "euler:4:uniform", "euler:2:uniform",
    "euler:1:uniform", "heun:4:uniform", "heun:2:uniform", "rk45",
]  # fmt: skip
CRFM_RUNS = ["euler:20", "euler:4:uniform"]  # 1-RF + CRFM (test.py defaults): the reference and its 4-step cut
CRFM_23 = ["euler:23"]  # the same at the paper scripts' 23 steps (the issue's reference), model "1rf_crfm23"
STUDENT_RUNS = ["euler:1:uniform", "euler:2:uniform", "euler:4:uniform", "euler:8:uniform", "heun:2:uniform"]
FEW_STEP_RUNS = ["euler:1:uniform", "euler:2:uniform", "euler:4:uniform"]  # chosen among on validation
ORDER = ["2rf", "2rf_crfm", "seqrf4_crfm", "seqrf4", "distill4", "seqrf2"]  # per seed, most wanted first


def settings(demo: Path) -> dict:
    """The demo run's recorded settings (`demo_settings.json`); what a run from before a setting existed used."""
    path = demo / "demo_settings.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    return {"mask_encoding": "rgb", "mask_add": False, "mask_guidance_scale": 1.0, "num_inference_steps": 20,
            "resolution": 64} | recorded  # fmt: skip


def common(demo: Path) -> list[str]:
    recorded = settings(demo)
    return [
        "--pretrained_model_name_or_path", str(demo / "tiny_sd35"), "--data_root", str(demo / "toydata"),
        "--vectors_path", str(demo / "vectors"), "--num_cls", "6", "--resolution", str(recorded["resolution"]),
        "--mask_encoding", recorded["mask_encoding"], "--no_progress",
    ]  # fmt: skip


def teacher_guidance(demo: Path) -> list[str]:
    """The demo's mask guidance: the 1-RF teacher samples (and makes pairs) as the demo's syntheses do."""
    return ["--mask_guidance_scale", str(settings(demo)["mask_guidance_scale"])]


def led_by_demo_sampler(demo: Path, runs: list[str]) -> list[str]:
    """`runs` led by the demo's own sampler (Euler, its step count, the diffusers grid), each run once."""
    return list(dict.fromkeys([f"euler:{settings(demo)['num_inference_steps']}", *runs]))


def teacher_runs(demo: Path) -> list[str]:
    return led_by_demo_sampler(demo, TEACHER_RUNS)


def crfm_runs(demo: Path) -> list[str]:
    return led_by_demo_sampler(demo, CRFM_RUNS)


def guide(demo: Path) -> list[str]:
    seg = demo / "seg_real"
    return ["--mmseg_config", str(seg / "config.py"), "--mmseg_ckpt", str(seg / "segmentor.pth")]


def pairs(seed: int, teacher: str) -> Path:
    demo, work = DEMOS / f"seed{seed}", OUT / f"seed{seed}" / f"pairs_{teacher}"
    wanted = PAIRS_PER_MASK * sum(1 for _ in (demo / "toydata" / "train_.jsonl").open())
    if not (work / "index.jsonl").is_file() or sum(1 for _ in (work / "index.jsonl").open()) < wanted:
        run_logged(
            [sys.executable, "-m", "crfm.reflow", *common(demo), "--lora_ckpt", str(demo / "train" / "final"),
             "--json_file", "train_.jsonl", "--work_dir", str(work), *PAIRS, "--seed", str(1000 + seed),
             "--batch_size", "48", *teacher_guidance(demo), *(guide(demo) if teacher == "crfm" else [])],
            OUT / f"seed{seed}" / "logs" / f"pairs_{teacher}.log",
        )  # fmt: skip
    return work


def student(seed: int, name: str) -> Path:
    demo, work = DEMOS / f"seed{seed}", OUT / f"seed{seed}" / name
    teacher, flags = STUDENTS[name]
    if not (work / "final" / "model.safetensors").is_file():
        run_logged(
            [sys.executable, "-m", "crfm.training.train", *common(demo), "--work_dir", str(work),
             "--reflow_pairs", str(pairs(seed, teacher)), "--init_ckpt", str(demo / "train" / "final"),
             "--report_to", "none", "--seed", str(seed), *TRAIN, *flags,
             *(["--mask_add"] if settings(demo)["mask_add"] else [])],
            OUT / f"seed{seed}" / "logs" / f"{name}.log",
        )  # fmt: skip
    return work / "final"


def evaluate(seed: int, name: str, ckpt: Path, runs: list[str], split: str, extra: list[str] = ()) -> Path:
    demo, work = DEMOS / f"seed{seed}", OUT / f"seed{seed}" / "eval" / f"{name}_{split}"
    if not (work / "results.json").is_file():
        run_logged(
            [sys.executable, "-m", "crfm.evaluate_sampling", *common(demo), "--lora_ckpt", str(ckpt),
             "--json_file", f"{split}_.jsonl", "--judge_config", str(demo / "seg_judge" / "config.py"),
             "--judge_ckpt", str(demo / "seg_judge" / "segmentor.pth"), "--runs", *runs, "--work_dir", str(work),
             "--seed", str(seed), "--device", "cpu", *extra],
            OUT / f"seed{seed}" / "logs" / f"eval_{name}_{split}.log",
        )  # fmt: skip
    return work


SPEED_RUNS = ["euler:23", "euler:20", "euler:8:uniform", "euler:4:uniform", "euler:2:uniform", "euler:1:uniform",
              "heun:2:uniform"]  # fmt: skip


def speed(seed: int) -> None:
    """images/s of each sampler alone on the machine (one thread, as the bench's rows): the bench runs two jobs at
    once, so its own images/s vary with what the other job does. A student has the teacher's architecture, so its
    images/s at K steps is the teacher's at K steps."""
    demo, teacher = check_demo(seed), DEMOS / f"seed{seed}" / "train" / "final"
    for name, runs, extra in (
        ("plain", led_by_demo_sampler(demo, SPEED_RUNS), teacher_guidance(demo)),
        ("crfm", led_by_demo_sampler(demo, ["euler:23", "euler:20", "euler:4:uniform"]),
         [*guide(demo), *teacher_guidance(demo)]),
    ):  # fmt: skip
        work = OUT / "speed" / name
        if not (work / "results.json").is_file():
            run_logged(
                [sys.executable, "-m", "crfm.evaluate_sampling", *common(demo), "--lora_ckpt", str(teacher),
                 "--json_file", "test_.jsonl", "--judge_config", str(demo / "seg_judge" / "config.py"),
                 "--judge_ckpt", str(demo / "seg_judge" / "segmentor.pth"), "--runs", *runs, "--work_dir", str(work),
                 "--seed", str(seed), "--device", "cpu", "--straightness_segments", *extra],
                OUT / "speed" / f"{name}.log",
            )  # fmt: skip


def alone_speed(model: str, run: str) -> float | None:
    """images/s of `run` measured alone (`--speed`); a student's is its teacher's at the same sampler."""
    path = OUT / "speed" / ("crfm" if model.startswith("1rf_crfm") else "plain") / "results.json"
    runs = {r["run"]: r["images_per_second"] for r in json.loads(path.read_text())["runs"]} if path.is_file() else {}
    return runs.get(run)


def speed_table() -> list[str]:
    lines = []
    for name in ("plain", "crfm"):
        path = OUT / "speed" / name / "results.json"
        if path.is_file():
            for run in json.loads(path.read_text())["runs"]:
                label = f"1-RF{' + CRFM' if name == 'crfm' else ''}, {run['run']}"
                lines.append(f"| {label} | {run['nfe']:.0f} | {run['images_per_second']:.2f} |")
    if not lines:
        return []
    return [
        "",
        "images/s alone on the machine (`--speed`: one thread, batch 16, VAE decode included; a student's "
        "images/s at K steps is its teacher's):",
        "",
        "| sampler | NFE | images/s |",
        "|---|---|---|",
        *lines,
    ]


def check_demo(seed: int) -> Path:
    demo = DEMOS / f"seed{seed}"
    if not (demo / "train" / "final").is_dir():
        raise SystemExit(f"{demo} has no generator: run python bench/demo_runs.py --seeds {seed} first")
    return demo


def tasks(seeds: list[int], students: list[str]) -> list[Job]:
    """(name, names it waits for, work), most wanted first: each seed's references and 2-RF students before the
    k-SeqRF and distilled ones, so that an interrupted bench still has the headline rows over all seeds."""
    found = []
    for seed in seeds:
        demo = check_demo(seed)
        teacher = demo / "train" / "final"
        guided = teacher_guidance(demo)
        reference = [*guide(demo), *guided, "--straightness_segments"]
        found += [
            (f"{seed}/1rf", [], partial(evaluate, seed, "1rf", teacher, teacher_runs(demo), "test", guided)),
            (f"{seed}/pairs_plain", [], partial(pairs, seed, "plain")),
            (f"{seed}/pairs_crfm", [], partial(pairs, seed, "crfm")),
            (f"{seed}/1rf_crfm", [], partial(evaluate, seed, "1rf_crfm", teacher, crfm_runs(demo), "test", reference)),
        ]
        for name in (name for name in ORDER if name in students):
            found.append((f"{seed}/{name}", [f"{seed}/pairs_{STUDENTS[name][0]}"], partial(trained, seed, name)))
        reference_23 = [*guide(demo), *guided, "--straightness_segments"]
        found.append((f"{seed}/1rf_crfm23", [], partial(evaluate, seed, "1rf_crfm23", teacher, CRFM_23, "test",
                                                        reference_23)))  # fmt: skip
    return [Job(*task) for task in found]


def trained(seed: int, name: str) -> None:
    ckpt = student(seed, name)
    evaluate(seed, name, ckpt, STUDENT_RUNS, "test")
    evaluate(seed, name, ckpt, FEW_STEP_RUNS, "val", ["--straightness_segments"])


# ------------------------------------------------------------------------------------------------------ report
def load(seeds: list[int], name: str, split: str) -> list[dict]:
    found = []
    for seed in seeds:
        path = OUT / f"seed{seed}" / "eval" / f"{name}_{split}" / "results.json"
        if path.is_file():
            found.append(json.loads(path.read_text()))
    return found


def rows_of(reports: list[dict]) -> dict[str, list[dict]]:
    """run label -> the run's record in each seed's report."""
    by_run: dict[str, list[dict]] = {}
    for report in reports:
        for run in report["runs"]:
            by_run.setdefault(run["run"], []).append(run)
    return by_run


def report(seeds: list[int]) -> str:
    from crfm.utils.viz import plot_fidelity_vs_nfe

    models = ["1rf", "1rf_crfm23", "1rf_crfm", *STUDENTS]
    lines = [
        f"Seeds {seeds}; judge mIoU (%) on the 32 held-out masks (mean ± std over seeds), NFE per image, images/s "
        "(one CPU thread, batch 16, VAE decode included), detail (high-frequency energy / the real images'; blur "
        "lowers it, mask fidelity does not see it), straightness S_1 / S_4 (× 10⁻³) of the model's 40-step Euler path.",
        "",
        "| model | sampler | NFE | judge mIoU | images/s | detail | S_1 | S_4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    series: dict[str, list[dict]] = {}
    for name in models:
        reports = load(seeds, name, "test")
        if not reports:
            continue
        straight = {k: [r["straightness"][i]["value"] for r in reports if len(r["straightness"]) > i] for i, k in
                    enumerate(("S_1", "S_2", "S_4"))}  # fmt: skip
        straight = {k: [1000 * v for v in values] for k, values in straight.items()}  # in 1e-3
        points = []
        for run, records in rows_of(reports).items():
            miou = [100 * r["mIoU"] for r in records]
            speed = [r["images_per_second"] for r in records]
            detail = statistics.mean(r.get("detail_ratio", float("nan")) for r in records)
            lines.append(
                f"| {name} | {run} | {records[0]['nfe']:.1f} | {mean_std(miou)} | {statistics.mean(speed):.1f} | "
                f"{detail:.2f} | {mean_std(straight['S_1'])} | {mean_std(straight['S_4'])} |"
            )
            std = statistics.stdev(miou) / 100 if len(miou) > 1 else 0.0
            points.append({"nfe": records[0]["nfe"], "mIoU": statistics.mean(miou) / 100, "mIoU_std": std})
        series[name] = points
    lines += ["", "Validation (16 masks; where the best few-step sampler is chosen):", "",
              "| model | sampler | judge mIoU (val) |", "|---|---|---|"]  # fmt: skip
    best = None
    for name in STUDENTS:
        for run, records in rows_of(load(seeds, name, "val")).items():
            value = statistics.mean(100 * r["mIoU"] for r in records)
            lines.append(f"| {name} | {run} | {mean_std([100 * r['mIoU'] for r in records])} |")
            if records[0]["nfe"] <= 4 and (best is None or value > best[0]):
                best = (value, name, run)
    if best:
        lines += ["", f"Best on validation at ≤ 4 NFE: **{best[1]}, {best[2]}** ({best[0]:.2f})."]
        lines += targets(seeds, best[1], best[2])
    plot_fidelity_vs_nfe(series, REPO / "bench" / "fewstep_fidelity_vs_nfe.png", title="judge mIoU vs NFE (held-out)")
    return "\n".join(lines) + "\n"


def paired(seeds: list[int], a: tuple[str, str], b: tuple[str, str], key: str = "mIoU") -> list[float]:
    """Per seed (where both exist): run a[1] of model a[0] minus (mIoU, in points) or over (images/s) b's."""
    values = []
    for seed in seeds:
        found = []
        for name, run in (a, b):
            reports = load([seed], name, "test")
            found += [r[key] for r in reports[0]["runs"] if r["run"] == run] if reports else []
        if len(found) == 2:
            values.append(100 * (found[0] - found[1]) if key == "mIoU" else found[0] / found[1])
    return values


def pair_storage(seeds: list[int]) -> str:
    """Bytes on disk per stored latent and per pair, against one latent's bytes."""
    import safetensors

    for seed in seeds:
        work = OUT / f"seed{seed}" / "pairs_plain"
        shards = sorted((work / "pairs").glob("*.safetensors"))
        if not shards:
            continue
        with safetensors.safe_open(shards[0], "pt") as handle:
            latent = handle.get_tensor("latents")[0]
            per_trajectory = len(list(handle.keys()))
        units = sum(1 for _ in (work / "index.jsonl").open())
        tensor_bytes = sum(f.stat().st_size for f in shards)
        index_bytes = (work / "index.jsonl").stat().st_size
        latent_bytes = latent.numel() * latent.element_size()
        return (
            f"Pair storage (seed {seed}, {units} trajectories of {per_trajectory} stored latents, i.e. "
            f"{per_trajectory} segment pairs): {tensor_bytes / units / per_trajectory:.0f} B of safetensors per "
            f"segment pair for a {latent_bytes} B latent ({tuple(latent.shape)}, float32; shard headers included), "
            f"plus {index_bytes / units:.0f} B of index line per trajectory; the noise is not stored."
        )
    return ""


def targets(seeds: list[int], best_model: str, best_run: str) -> list[str]:
    """The issue's three targets, as paired differences over seeds on the held-out masks."""
    reference = ("1rf_crfm23", "euler, 23 steps on the diffusers grid")
    reference_20 = ("1rf_crfm", "euler, 20 steps on the diffusers grid")
    plain = ("1rf", "euler, 23 steps on the diffusers grid")
    steps = settings(DEMOS / f"seed{seeds[0]}")["num_inference_steps"]  # the demo's own sampler
    demo_crfm = ("1rf_crfm", f"euler, {steps} steps on the diffusers grid")
    demo_plain = ("1rf", f"euler, {steps} steps on the diffusers grid")
    best = (best_model, best_run)
    lines = ["", "Targets (held-out, paired over seeds: the same masks and evaluation noise per seed):", "",
             "| comparison | Δ judge mIoU (points) | images/s ratio |", "|---|---|---|"]  # fmt: skip
    comparisons = [(best, reference), (best, reference_20), (best, plain), (best, demo_crfm), (best, demo_plain)]
    for model in ("2rf_crfm", "seqrf4_crfm"):
        comparisons += [((model, f"euler, {k} steps on the uniform grid"), other) for k in (1, 2, 4)
                        for other in (plain, reference, demo_plain, demo_crfm)]  # fmt: skip
    for a, b in dict.fromkeys(comparisons):  # each once, in order
        delta, speed = paired(seeds, a, b), paired(seeds, a, b, "images_per_second")
        if delta:
            alone = [alone_speed(*a), alone_speed(*b)]
            ratio = f"{statistics.mean(speed):.1f}× in the bench"
            ratio = f"{alone[0] / alone[1]:.1f}× alone ({ratio})" if all(alone) else ratio
            label = f"{a[0]} {a[1]} − {b[0]} {b[1]}"
            lines.append(f"| {label} | {mean_std(delta)} (n={len(delta)}) | {ratio} |")
    lines += speed_table()
    storage = pair_storage(seeds)
    return lines + (["", storage] if storage else [])


def main() -> int:
    global DEMOS, OUT  # every step reads them; one bench per process
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--report", action="store_true", help="only aggregate what is there")
    parser.add_argument("--speed", action="store_true", help="only the images/s runs (run with nothing else running)")
    parser.add_argument("--demos", type=Path, default=DEMOS, help="folder of the demo runs seedS (the teachers)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of this bench's pairs, students and scores")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results_fewstep.md", help="table written")
    parser.add_argument("--students", nargs="+", choices=ORDER, default=ORDER, help="train only these (default all)")
    args = parser.parse_args()
    DEMOS, OUT = args.demos.resolve(), args.out.resolve()
    if args.speed:
        speed(args.seeds[0])
        return 0
    if not args.report:
        run_jobs(tasks(args.seeds, args.students), workers=2)  # two workers of one thread each on the 2-core machine
    table = report(args.seeds)
    command = " ".join(["python bench/fewstep_runs.py", *sys.argv[1:]])
    args.results.write_text(f"# Few-step synthesis (bench/fewstep_runs.py)\n\n`{command}`\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
