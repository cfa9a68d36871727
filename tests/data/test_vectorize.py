"""preprocess/vectorize.py must store exactly what diffusers' `encode_prompt` computes, resume, and validate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from crfm.data.dataset import PairDataset
from crfm.data.index import DatasetError, read_index
from crfm.data.vectorize import vectorize_index
from crfm.data.vectors import EMPTY_PROMPT_FILE, load_vectors
from tests.helpers import REPO

VECTORIZE = REPO / "preprocess" / "vectorize.py"

# Prompts the encoders were not built around: long (past CLIP's 77 tokens), unicode, punctuation, duplicates.
NEW_PROMPTS = [
    "a satellite image of water",
    "an aerial photo of a harbour with ships, cranes and container stacks near the Pearl River delta " * 3,
    "Überschwemmungsgebiet — flooded fields (2021), 0.3 m GSD!",
    "a satellite image of water",
    "dense urban blocks; ring road; stadium",
]


def make_index(root: Path, prompts: list[str], name: str = "index.jsonl") -> Path:
    """A tiny dataset in the project's layout, one 8x8 pair per prompt."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "label").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, prompt in enumerate(prompts):
        Image.new("RGB", (8, 8), (i * 20, 90, 40)).save(root / "img" / f"{i}.png")
        Image.new("L", (8, 8), i % 3).save(root / "label" / f"{i}.png")
        lines.append(json.dumps({"source": f"label/{i}.png", "target": f"img/{i}.png", "prompt": prompt}))
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def diffusers_encoding(pipe, prompt: str, max_sequence_length: int):
    """diffusers' own encoding of one prompt and of the empty negative prompt: (embeds, neg, pooled, neg_pooled)."""
    with torch.no_grad():
        return pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device="cpu",
            do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=max_sequence_length,
        )  # fmt: skip


def assert_matches_diffusers(
    pipe_dir: Path, out_index: Path, vectors_dir: Path, max_sequence_length: int, **components
) -> list[dict]:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir, **components)  # the full pipeline, loaded independently
    records = [json.loads(line) for line in out_index.read_text().splitlines()]
    negative = None
    for record in records:
        embeds, negative_embeds, pooled, negative_pooled = diffusers_encoding(
            pipe, record["prompt"], max_sequence_length
        )
        stored = load_vectors(vectors_dir / f"{record['index']}.safetensors")
        assert stored["prompt_embeds"].shape == embeds[0].shape
        assert stored["prompt_embeds"].dtype == torch.float32
        assert (stored["prompt_embeds"] - embeds[0]).abs().max() <= 1e-5
        assert (stored["pooled_prompt_embeds"] - pooled[0]).abs().max() <= 1e-5
        negative = (negative_embeds[0], negative_pooled[0])
    empty = load_vectors(vectors_dir / EMPTY_PROMPT_FILE)
    assert (empty["prompt_embeds"] - negative[0]).abs().max() <= 1e-5
    assert (empty["pooled_prompt_embeds"] - negative[1]).abs().max() <= 1e-5
    return records


def test_real_samples_match_encode_prompt(tiny_sd35_dir, rs_samples, tmp_path):
    out_index, vectors = tmp_path / "index_.jsonl", tmp_path / "vectors"
    report = vectorize_index(
        tiny_sd35_dir, rs_samples / "index.jsonl", out_index, vectors, batch_size=7, progress=False
    )
    assert report.items == 24 and report.encoded_items == 24
    assert report.encoded_prompts == len({json.loads(x)["prompt"] for x in open(rs_samples / "index.jsonl")}) + 1
    records = assert_matches_diffusers(tiny_sd35_dir, out_index, vectors, 256)
    assert [r["index"] for r in records] == list(range(24))
    # The output index keeps every input key, in order.
    source = [json.loads(x) for x in (rs_samples / "index.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "index"} for r in records] == source
    assert load_vectors(vectors / "0.safetensors")["prompt_embeds"].shape[0] == 77 + 256


def test_other_sd3_dir_and_sequence_length_via_cli(tiny_sd3_dir, tmp_path):
    make_index(tmp_path / "data", NEW_PROMPTS)
    rc = subprocess.run(
        [
            sys.executable,
            str(VECTORIZE),
            "--pretrained_model_name_or_path",
            str(tiny_sd3_dir),
            "--data_root",
            str(tmp_path / "data"),
            "--work_dir",
            str(tmp_path / "vec"),
            "--dataset",
            "toy",
            "--max_sequence_length",
            "77",
            "--mixed_precision",
            "no",
            "--device",
            "cpu",
            "--batch_size",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert rc.returncode == 0, rc.stderr
    assert "5 items" in rc.stdout
    assert_matches_diffusers(tiny_sd3_dir, tmp_path / "data" / "index_.jsonl", tmp_path / "vec" / "toy", 77)


def test_pipeline_without_t5(tiny_sd3_dir, tmp_path):
    """SD3 can be used without T5 (zeros in its place); vectorize must follow diffusers there too."""
    from diffusers import StableDiffusion3Pipeline

    no_t5 = tmp_path / "no_t5"
    StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None).save_pretrained(no_t5)
    index = make_index(tmp_path / "data", NEW_PROMPTS[:2])
    vectorize_index(no_t5, index, tmp_path / "out.jsonl", tmp_path / "vec", max_sequence_length=32, progress=False)
    records = assert_matches_diffusers(
        no_t5, tmp_path / "out.jsonl", tmp_path / "vec", 32, text_encoder_3=None, tokenizer_3=None
    )
    stored = load_vectors(tmp_path / "vec" / f"{records[0]['index']}.safetensors")["prompt_embeds"]
    assert torch.count_nonzero(stored[77:]) == 0


def test_resume_skips_done_items_and_repairs_damage(tiny_sd35_dir, tmp_path):
    index = make_index(tmp_path / "data", NEW_PROMPTS)
    vec, out = tmp_path / "vec", tmp_path / "out.jsonl"
    first = vectorize_index(tiny_sd35_dir, index, out, vec, progress=False)
    assert first.encoded_items == 5
    reference = {p.name: load_vectors(p) for p in vec.glob("*.safetensors")}
    stamps = {p.name: p.stat().st_mtime_ns for p in vec.glob("*.safetensors")}

    again = vectorize_index(tiny_sd35_dir, index, out, vec, progress=False)
    assert again.encoded_items == 0 and again.encoded_prompts == 0
    assert {p.name: p.stat().st_mtime_ns for p in vec.glob("*.safetensors")} == stamps

    # Damage as a crash or a user would: a missing file, a truncated file, a stale temporary.
    (vec / "1.safetensors").unlink()
    data = (vec / "3.safetensors").read_bytes()
    (vec / "3.safetensors").write_bytes(data[: len(data) // 2])
    (vec / ".4.tmp-999.safetensors").write_bytes(b"partial")
    repaired = vectorize_index(tiny_sd35_dir, index, out, vec, progress=False)
    assert repaired.encoded_items == 2
    assert not list(vec.glob(".*tmp*"))
    for name, tensors in reference.items():
        now = load_vectors(vec / name)
        # Re-encoded in a smaller batch: equal up to batched-matmul rounding.
        assert all(torch.allclose(now[k], tensors[k], rtol=0, atol=1e-6) for k in tensors), name
    assert (vec / "0.safetensors").stat().st_mtime_ns == stamps["0.safetensors"]


def test_edited_prompt_is_re_encoded(tiny_sd35_dir, tmp_path):
    index = make_index(tmp_path / "data", NEW_PROMPTS)
    vec, out = tmp_path / "vec", tmp_path / "out.jsonl"
    vectorize_index(tiny_sd35_dir, index, out, vec, progress=False)
    lines = index.read_text().splitlines()
    edited = json.loads(lines[2]) | {"prompt": "a satellite image of a glacier"}
    lines[2] = json.dumps(edited)
    index.write_text("\n".join(lines) + "\n")
    report = vectorize_index(tiny_sd35_dir, index, out, vec, progress=False)
    assert report.encoded_items == 1
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd35_dir, transformer=None, vae=None)
    embeds, _, pooled, _ = diffusers_encoding(pipe, "a satellite image of a glacier", 256)
    assert (load_vectors(vec / "2.safetensors")["prompt_embeds"] - embeds[0]).abs().max() <= 1e-5


def test_changed_settings_are_refused_unless_overwrite(tiny_sd35_dir, tmp_path):
    index = make_index(tmp_path / "data", NEW_PROMPTS[:2])
    vec, out = tmp_path / "vec", tmp_path / "out.jsonl"
    vectorize_index(tiny_sd35_dir, index, out, vec, max_sequence_length=64, progress=False)
    with pytest.raises(DatasetError, match="max_sequence_length"):
        vectorize_index(tiny_sd35_dir, index, out, vec, max_sequence_length=32, progress=False)
    report = vectorize_index(tiny_sd35_dir, index, out, vec, max_sequence_length=32, overwrite=True, progress=False)
    assert report.encoded_items == 2
    assert load_vectors(vec / "0.safetensors")["prompt_embeds"].shape[0] == 77 + 32


def test_crash_mid_run_leaves_only_complete_files(tiny_sd35_dir, tmp_path, monkeypatch):
    import crfm.data.vectors

    index = make_index(tmp_path / "data", NEW_PROMPTS)
    vec, out = tmp_path / "vec", tmp_path / "out.jsonl"
    real_save, calls = crfm.data.vectors.save_file, {"n": 0}

    def dying_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            Path(filename).write_bytes(b"half a file")  # the process dies while writing
            raise KeyboardInterrupt
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(crfm.data.vectors, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        vectorize_index(tiny_sd35_dir, index, out, vec, batch_size=1, progress=False)
    monkeypatch.setattr(crfm.data.vectors, "save_file", real_save)
    assert not out.exists()  # the output index is written only once every vector exists
    written = [p for p in vec.iterdir() if p.suffix == ".safetensors"]
    assert len(written) == 2 and not [p for p in written if p.name.startswith(".")]
    for p in written:
        load_vectors(p)  # complete and readable
    report = vectorize_index(tiny_sd35_dir, index, out, vec, progress=False)
    assert report.encoded_items + report.skipped_items == 5 and report.skipped_items >= 1
    assert len(out.read_text().splitlines()) == 5


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("{not json", "invalid JSON"),
        ('{"source": "label/0.png", "target": "img/0.png"}', "missing key(s) 'prompt'"),
        ('{"source": "label/404.png", "target": "img/0.png", "prompt": "x"}', "label/404.png"),
        ('["source", "target"]', "expected a JSON object"),
    ],
)
def test_bad_line_stops_before_writing(tiny_sd35_dir, tmp_path, bad_line, expected):
    index = make_index(tmp_path / "data", NEW_PROMPTS[:3])
    lines = index.read_text().splitlines()
    index.write_text("\n".join([*lines[:2], bad_line, lines[2]]) + "\n")
    rc = subprocess.run(
        [
            sys.executable,
            str(VECTORIZE),
            "--pretrained_model_name_or_path",
            str(tiny_sd35_dir),
            "--data_root",
            str(tmp_path / "data"),
            "--work_dir",
            str(tmp_path / "vec"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
    )
    assert rc.returncode == 2
    assert "index.jsonl:3" in rc.stderr and expected in rc.stderr
    assert not (tmp_path / "vec").exists() and not (tmp_path / "data" / "index_.jsonl").exists()


def test_dataset_reads_vectors_by_index(tiny_sd35_dir, tmp_path):
    index = make_index(tmp_path / "data", NEW_PROMPTS[:2])
    vec, out = tmp_path / "vec", tmp_path / "data" / "index_.jsonl"
    vectorize_index(tiny_sd35_dir, index, out, vec, dtype=torch.bfloat16, progress=False)
    dataset = PairDataset(read_index(out), tmp_path / "data", vectors_dir=vec)
    sample = dataset[1]
    assert sample["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(sample["prompt_embeds"], load_vectors(vec / "1.safetensors")["prompt_embeds"])
    (vec / "1.safetensors").unlink()
    with pytest.raises(DatasetError, match="vectorize"):
        dataset[1]
    with pytest.raises(DatasetError, match="no 'index' field"):
        PairDataset(read_index(index), tmp_path / "data", vectors_dir=vec)[0]
