"""Print every entry script's flags as Markdown tables (the README's flag reference is made with this).

python scripts/flags_table.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _vectorize_parser() -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location("vectorize", REPO / "preprocess" / "vectorize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Command -> its argparse parser, for every command the README documents."""
    from crfm import demo, downstream, evaluate, make_index, synthesis, training

    return {
        "python -m crfm.demo (demo.sh)": demo.build_parser(),
        "python -m crfm.make_index": make_index.build_parser(),
        "preprocess/vectorize.py": _vectorize_parser(),
        "train.py (train.sh)": training.build_parser(),
        "test.py (test.sh, crfm_test.sh)": synthesis.build_parser(),
        "scripts/train_segmentor.py (downstream.sh)": downstream.build_parser(),
        "python -m crfm.evaluate": evaluate.build_parser(),
    }


def flag_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str]]:
    rows = []
    for action in parser._actions:  # argparse has no public accessor for its actions
        if not action.option_strings or action.dest == "help":
            continue
        flags = ", ".join(f"`{o}`" for o in action.option_strings)
        if action.required:
            default = "(required)"
        elif isinstance(action, argparse._StoreTrueAction):
            default = "off"
        else:
            value = action.default
            if isinstance(value, str) and value.startswith(str(REPO)):
                value = value[len(str(REPO)) + 1 :]
            default = "" if value in (None, "") else f"`{value}`"
        text = (action.help or "").replace("|", "\\|").replace("%(default)s", str(action.default))
        if action.choices and "choices" not in text:
            text = f"{text} ({', '.join(map(str, action.choices))})".strip()
        rows.append((flags, default, text))
    return rows


def main() -> int:
    for command, parser in parsers().items():
        print(f"**`{command}`**\n\n| flag | default | meaning |\n|---|---|---|")
        for flags, default, text in flag_rows(parser):
            print(f"| {flags} | {default} | {text} |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
