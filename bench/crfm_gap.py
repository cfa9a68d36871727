"""Why does CRFM's judge gain on held-out masks not reach the downstream segmentor? (issue #26, item 4)

    python bench/crfm_gap.py outputs/bench_demo/default/seed0 outputs/bench_demo/default/seed1 ... [--table FILE]

For each finished demo folder, the judge (which never guided) scores the pairs the downstream segmentors actually
train on — the synthetic images of the *labelled* masks, plain and CRFM (×num_per_mask), and the CRFM new layouts —
beside the held-out syntheses the mask-fidelity table reports. Per class, with the downstream rows' IoU of the same
run: if CRFM's gain on the labelled masks is smaller than on held-out masks (the generator has memorised the masks it
was fine-tuned on), CRFM has little to fix in the ×3 sets; the new layouts are where it can matter.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from crfm.utils.runs import mean_std

SETS = {  # image set -> (work dir, index)
    "held-out plain": ("synth_plain", "index.jsonl"),
    "held-out CRFM": ("synth_crfm", "index.jsonl"),
    "labelled plain x3": ("synth_train_plain", "index.jsonl"),
    "labelled CRFM x3": ("synth_train", "index.jsonl"),
    "new layouts CRFM": ("synth_layouts", "index.jsonl"),
}


def judge_scores(out: Path) -> dict[str, list[float]]:
    """Judge IoU (%) per class and the mIoU (last) of each image set of one demo folder (cached beside it)."""
    from crfm.data.dataset import PairDataset
    from crfm.data.index import read_index
    from crfm.segmentation.adapter import load_segmentor
    from crfm.segmentation.evaluate import mask_fidelity

    cache = out / "bench_crfm_gap.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    settings = json.loads((out / "demo_settings.json").read_text())
    judge = load_segmentor(
        out / "seg_judge" / "config.py", out / "seg_judge" / "segmentor.pth", device="cpu", num_cls=6
    )
    scores = {}
    for name, (work, index) in SETS.items():
        items = read_index(out / work / index, out / work)
        dataset = PairDataset(items, out / work, resolution=settings["resolution"], num_cls=6)
        result = mask_fidelity(judge, dataset, 6, progress=False)
        scores[name] = [100 * v for v in result["IoU"]] + [100 * result["mIoU"]]
    cache.write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def main() -> int:
    from crfm.toy.toydata import CLASSES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished demo output folders (one per seed)")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    per_run = [judge_scores(out) for out in args.runs]
    columns = [*CLASSES, "mIoU"]

    cell = partial(mean_std, digits=1)

    lines = [
        f"Judge IoU (%) over {len(per_run)} demo run(s), mean ± std:",
        "",
        "| images | " + " | ".join(columns) + " |",
    ]
    lines.append("|---|" + "---|" * len(columns))
    for name in SETS:
        lines.append(
            f"| {name} | " + " | ".join(cell([r[name][i] for r in per_run]) for i in range(len(columns))) + " |"
        )
    for plain, crfm in (("held-out plain", "held-out CRFM"), ("labelled plain x3", "labelled CRFM x3")):
        gains = [[r[crfm][i] - r[plain][i] for r in per_run] for i in range(len(columns))]
        lines.append(f"| CRFM − plain, {crfm.split()[0]} | " + " | ".join(cell(g) for g in gains) + " |")
    downstream = [json.loads((out / "summary.json").read_text())["downstream"] for out in args.runs]
    lines += ["", "Downstream IoU (%) per class, CRFM ×3 − plain ×3 (unfiltered) and filtered − unfiltered:", ""]
    lines += ["| difference | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, (a, b) in {"CRFM − plain": ("real_synth", "real_synth_plain"),
                          "filtered − unfiltered": ("real_synth_filtered", "real_synth")}.items():  # fmt: skip
        keys = [f"IoU.{c}" for c in CLASSES] + ["mIoU"]
        lines.append(f"| {label} | " + " | ".join(cell([d[a][k] - d[b][k] for d in downstream]) for k in keys) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.table:
        args.table.write_text("`python bench/crfm_gap.py " + " ".join(map(str, args.runs)) + "`\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
