"""The training loop runs any `Objective`: train.py picks one by its flags and calls it, with no objective's
branches of its own; the reflow family lives in training, on fewstep's pairs."""

from __future__ import annotations

import ast
import inspect

import pytest

from crfm.training import build, train
from crfm.training.build import OBJECTIVES, checkpoint_meta, objective_for
from crfm.training.objective import FlowMatchingObjective, Objective
from crfm.training.reflow import ReflowObjective
from crfm.utils.flags import UsageError

REQUIRED = ["--pretrained_model_name_or_path", "base", "--data_root", "data", "--vectors_path", "vec", "--num_cls", "6"]


def parse(*extra: str):
    return train.build_parser().parse_args([*REQUIRED, *extra])


def test_the_flags_pick_the_objective():
    assert type(objective_for(parse())) is FlowMatchingObjective
    assert type(objective_for(parse("--reflow_pairs", "pairs"))) is ReflowObjective


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda cls: cls.__name__)
def test_every_objective_provides_what_the_loop_calls(objective):
    for method in ("add_flags", "dataset", "loss"):
        assert getattr(objective, method) is not getattr(Objective, method), f"{objective.__name__}.{method}"


def test_the_loop_and_its_builder_hold_no_objective_branches():
    # Only objective_for reads the flag that picks the objective; the loop never names one.
    tree = ast.parse(inspect.getsource(train))
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert not [name for name in names if "reflow" in name.lower()], "train.py names a reflow piece"
    for node in ast.walk(ast.parse(inspect.getsource(build))):
        if isinstance(node, ast.FunctionDef) and node.name != "objective_for":
            assert "reflow_pairs" not in ast.unparse(node), f"build.{node.name} branches on --reflow_pairs"


def test_each_objective_checks_its_inputs_and_writes_its_record(tmp_path):
    with pytest.raises(UsageError, match="--latents_path serves the flow-matching objective"):
        objective_for(parse("--reflow_pairs", "pairs", "--latents_path", str(tmp_path))).check()
    with pytest.raises(UsageError, match="--rot90"):
        objective_for(parse("--latents_path", str(tmp_path), "--rot90")).check()
    with pytest.raises(UsageError, match="--translate"):
        objective_for(parse("--latents_path", str(tmp_path), "--translate", "4")).check()
    assert "reflow" not in checkpoint_meta(parse())
    record = checkpoint_meta(parse("--reflow_pairs", str(tmp_path), "--seqrf_segments", "2", "--distill"))["reflow"]
    assert record == {
        "pairs": str(tmp_path.resolve()), "init_ckpt": None, "t_schedule": "t0", "loss": "l2", "segments": 2,
    }  # fmt: skip
