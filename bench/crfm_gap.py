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


def image_set(out: Path, work: str, index: str = "index.jsonl"):
    """(index items, `PairDataset`) of one image set of a demo folder, at the folder's resolution."""
    from crfm.data.dataset import PairDataset
    from crfm.data.index import read_index

    resolution = json.loads((out / "demo_settings.json").read_text())["resolution"]
    items = read_index(out / work / index, out / work)
    return items, PairDataset(items, out / work, resolution, num_cls=6)


def judge_scores(out: Path) -> dict[str, list[float]]:
    """Judge IoU (%) per class and the mIoU (last) of each image set of one demo folder (cached beside it)."""
    from crfm.segmentation.adapter import load_segmentor
    from crfm.segmentation.evaluate import mask_fidelity

    cache = out / "bench_crfm_gap.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    judge = load_segmentor(
        out / "seg_judge" / "config.py", out / "seg_judge" / "segmentor.pth", device="cpu", num_cls=6
    )
    scores = {}
    for name, (work, index) in SETS.items():
        result = mask_fidelity(judge, image_set(out, work, index)[1], 6, progress=False)
        scores[name] = [100 * v for v in result["IoU"]] + [100 * result["mIoU"]]
    cache.write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def view_scores(out: Path) -> dict[str, list[float]]:
    """mIoU (%) of the guide and the judge on the held-out syntheses, plain and CRFM, seen as drawn and in each of
    the 7 other dihedral views (predictions put back on the mask's pixels): an image that follows its mask scores
    alike in every view, one pushed toward a segmentor's view-bound beliefs scores less once turned."""
    import torch

    from crfm.segmentation.adapter import load_segmentor
    from crfm.segmentation.evaluate import mask_fidelity
    from crfm.segmentation.views import dihedral_views, predict_in_view

    class Viewed(torch.nn.Module):
        def __init__(self, segmentor: torch.nn.Module, view: tuple[int, bool]) -> None:
            super().__init__()
            self.segmentor, self.view = segmentor, view

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return predict_in_view(self.segmentor, images, *self.view)

    cache = out / "bench_crfm_views.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    scores = {}
    for segmentor_dir in ("seg_real", "seg_judge"):
        segmentor = load_segmentor(out / segmentor_dir / "config.py", out / segmentor_dir / "segmentor.pth", num_cls=6)
        for images in ("held-out plain", "held-out CRFM"):
            dataset = image_set(out, *SETS[images])[1]
            scores[f"{segmentor_dir} {images}"] = [
                100 * mask_fidelity(Viewed(segmentor, view), dataset, 6, progress=False)["mIoU"]
                for view in dihedral_views(8)
            ]
    cache.write_text(json.dumps(scores, indent=2) + "\n")
    return scores


# Filtered sets the downstream rows train on -> (the unfiltered set: the masks as drawn, the filtered set)
FILTERED = {
    "plain x3": ("synth_train_plain", "synth_train_plain_filtered"),
    "CRFM x3": ("synth_train", "synth_train_filtered"),
}
AUDIT = ("ignored", "kept, judge disagrees", "ignored, judge disagrees")


def filter_audit(out: Path) -> dict[str, dict[str, list[float]]]:
    """What the FreeMask filter (the guide's per-pixel loss) leaves of each ×3 set, per class of the mask and overall
    (last): the share of pixels it ignores, and the judge's disagreement with the mask on the pixels kept (the label
    noise the segmentor trains on) and on those ignored. CRFM pushes the images toward the guide's agreement, and
    the filter asks the same guide: if the judge disagrees on the CRFM set's kept pixels as often as on plain's, the
    filter no longer tells CRFM's errors apart (cached beside the folder)."""
    import torch

    from crfm.segmentation.adapter import load_segmentor

    cache = out / "bench_crfm_filter_audit.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    judge = load_segmentor(
        out / "seg_judge" / "config.py", out / "seg_judge" / "segmentor.pth", device="cpu", num_cls=6
    )
    audit = {}
    for name, (drawn, filtered) in FILTERED.items():
        (drawn_items, drawn_set), (filtered_items, filtered_set) = (image_set(out, w) for w in (drawn, filtered))
        if [item.target for item in drawn_items] != [item.target for item in filtered_items]:
            raise SystemExit(f"{out}: {filtered} does not list {drawn}'s pairs in order")
        counts = torch.zeros(4, 7, dtype=torch.float64)  # pixels, ignored, kept wrong, ignored wrong; per class + all
        for i in range(len(drawn_set)):
            first, second = drawn_set[i], filtered_set[i]
            with torch.no_grad():
                prediction = judge(first["image"][None]).argmax(dim=1)[0]
            mask, ignored = first["label"], second["label"] == 255
            valid, wrong = mask != 255, prediction != mask
            for c in [*range(6), None]:
                where = valid & (mask == c) if c is not None else valid
                column = 6 if c is None else c
                counts[:, column] += torch.stack(
                    [
                        where.sum(),
                        (where & ignored).sum(),
                        (where & ~ignored & wrong).sum(),
                        (where & ignored & wrong).sum(),
                    ]
                ).double()
        kept = counts[0] - counts[1]
        audit[name] = {
            "ignored": (100 * counts[1] / counts[0].clamp_min(1)).tolist(),
            "kept, judge disagrees": (100 * counts[2] / kept.clamp_min(1)).tolist(),
            "ignored, judge disagrees": (100 * counts[3] / counts[1].clamp_min(1)).tolist(),
        }
    cache.write_text(json.dumps(audit, indent=2) + "\n")
    return audit


DIVERSITY = ("colour spread", "edge energy")  # per class of the mask, and over all classes (last)


def diversity(out: Path) -> dict[str, dict[str, list[float]]]:
    """How varied and how sharp the pairs a downstream segmentor trains on are, against the labelled real images:
    per class of the mask, the spread (std over images, mean over RGB) of the class's mean colour, and its edge energy
    (mean absolute difference of neighbouring pixels inside the class, both in [0, 1] units); for the ×3 sets also
    the RMS difference between the images of one mask (0: three copies) and to the real image of that mask. A set
    whose images of one mask look alike, or are smoother than the real ones, teaches a segmentor less than its judge
    score says (cached beside the folder)."""
    import torch

    cache = out / "bench_crfm_diversity.json"
    if cache.is_file():
        return json.loads(cache.read_text())

    def load(work: str, index: str) -> tuple[list, list[torch.Tensor], list[torch.Tensor]]:
        items, dataset = image_set(out, work, index)
        samples = [dataset[i] for i in range(len(dataset))]
        return items, [(x["image"] + 1) / 2 for x in samples], [x["label"] for x in samples]

    def per_class(images: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, list[float]]:
        colours: list[list[torch.Tensor]] = [[] for _ in range(6)]
        edges = torch.zeros(2, 7, dtype=torch.float64)  # summed |neighbour difference|, pixel pairs; per class + all
        for image, label in zip(images, labels, strict=True):
            for c in range(6):
                where = label == c
                if where.sum() >= 16:
                    colours[c].append(image[:, where].mean(dim=1))
            for dim in (1, 2):  # neighbours down and right, both pixels of the pair inside one class
                size = label.shape[dim - 1] - 1
                first, second = label.narrow(dim - 1, 0, size), label.narrow(dim - 1, 1, size)
                step = (image.narrow(dim, 0, size) - image.narrow(dim, 1, size)).abs().mean(dim=0)
                for c in range(6):
                    same = (first == c) & (second == c)
                    for column in (c, 6):
                        edges[0, column] += step[same].sum()
                        edges[1, column] += same.sum()
        spread = [torch.stack(cs).std(dim=0).mean().item() if len(cs) > 1 else float("nan") for cs in colours]
        # over the classes present in more than one image
        spread.append(torch.tensor(spread, dtype=torch.float64).nanmean().item())
        return {"colour spread": spread, "edge energy": (edges[0] / edges[1].clamp_min(1)).tolist()}

    real_items, real_images, real_labels = load("toydata", "train.jsonl")
    real_by_mask = {Path(item.source).name: image for item, image in zip(real_items, real_images, strict=True)}
    result = {"real labelled": per_class(real_images, real_labels)}
    for name, (drawn, _) in FILTERED.items():
        items, images, labels = load(drawn, "index.jsonl")
        groups: dict[str, list[torch.Tensor]] = {}
        for item, image in zip(items, images, strict=True):
            groups.setdefault(Path(item.record["source_mask"]).name, []).append(image)
        within = [
            (a - b).pow(2).mean().sqrt().item()
            for group in groups.values()
            for i, a in enumerate(group)
            for b in group[i + 1 :]
        ]
        to_real = [(image - real_by_mask[mask]).pow(2).mean().sqrt().item()
                   for mask, group in groups.items() for image in group]  # fmt: skip
        result[name] = {
            **per_class(images, labels),
            "RMS within a mask": [sum(within) / len(within)],
            "RMS to the real image": [sum(to_real) / len(to_real)],
        }
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return result


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
    lines += [
        "",
        "Downstream IoU (%) per class, CRFM ×3 − plain ×3 (unfiltered, filtered) and filtered − unfiltered:",
        "",
    ]
    lines += ["| difference | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, (a, b) in {"CRFM − plain": ("real_synth", "real_synth_plain"),
                          "CRFM − plain, filtered": ("real_synth_filtered", "real_synth_plain_filtered"),
                          "filtered − unfiltered": ("real_synth_filtered", "real_synth")}.items():  # fmt: skip
        if any(a not in d or b not in d for d in downstream):  # unfiltered rows: `--preset full` only
            continue
        keys = [f"IoU.{c}" for c in CLASSES] + ["mIoU"]
        lines.append(f"| {label} | " + " | ".join(cell([d[a][k] - d[b][k] for d in downstream]) for k in keys) + " |")
    viewed = [view_scores(out) for out in args.runs]
    lines += ["", "The held-out syntheses as drawn and turned or mirrored (`view_scores`), mIoU (%), mean ± std:", ""]
    lines += ["| segmentor | images | as drawn | the 7 other views (mean) | drop |", "|---|---|---|---|---|"]
    for key in viewed[0]:
        drawn, others = [v[key][0] for v in viewed], [sum(v[key][1:]) / 7 for v in viewed]
        who = "guide (drives CRFM, filters)" if key.startswith("seg_real") else "judge (never guides)"
        drop = cell([d - o for d, o in zip(drawn, others, strict=True)])
        lines.append(f"| {who} | {key.split(' ', 1)[1]} | {cell(drawn)} | {cell(others)} | {drop} |")
    audits = [filter_audit(out) for out in args.runs]
    lines += ["", "The filter's audit (`filter_audit`): % of each class's pixels of the ×3 sets, mean ± std:", ""]
    lines += ["| set | share | " + " | ".join([*CLASSES, "all"]) + " |", "|---|---|" + "---|" * (len(CLASSES) + 1)]
    for name in FILTERED:
        for share in AUDIT:
            cells = [cell([a[name][share][i] for a in audits]) for i in range(len(CLASSES) + 1)]
            lines.append(f"| {name} | {share} | " + " | ".join(cells) + " |")
    varied = [diversity(out) for out in args.runs]
    lines += ["", "Diversity and sharpness (`diversity`), [0, 1] pixel units, mean ± std:", ""]
    lines += ["| set | measure | " + " | ".join([*CLASSES, "all"]) + " |", "|---|---|" + "---|" * (len(CLASSES) + 1)]
    cell3 = partial(mean_std, digits=3)
    for name in varied[0]:
        for measure in DIVERSITY:
            cells = [cell3([v[name][measure][i] for v in varied]) for i in range(len(CLASSES) + 1)]
            lines.append(f"| {name} | {measure} | " + " | ".join(cells) + " |")
    for name in FILTERED:
        within = cell3([v[name]["RMS within a mask"][0] for v in varied])
        to_real = cell3([v[name]["RMS to the real image"][0] for v in varied])
        lines.append(f"\n{name}: RMS between the images of one mask {within}, to the mask's real image {to_real}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.table:
        args.table.write_text("`python bench/crfm_gap.py " + " ".join(map(str, args.runs)) + "`\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
