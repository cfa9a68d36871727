"""The documentation stays in step with the code: every command-line flag is in docs/flags.md, README stays short,
keeps its two commands (the test command being the one CI runs) and links to docs/, and no link points nowhere."""

from __future__ import annotations

import re

import pytest

from tests.helpers import REPO, load_script

README_PATH = REPO / "README.md"
README = README_PATH.read_text(encoding="utf-8")
FLAGS_DOC = REPO / "docs" / "flags.md"
README_MAX_BYTES = 15_000  # as `wc -c README.md` counts
TWO_COMMANDS = ("bash demo.sh", "bash scripts/test.sh")
NOT_YET_INSTALLABLE = {"mmcv", "mmseg", "mmengine"}  # mmcv is compiled at set-up; a fresh machine may lack it


def _flags_table():
    return load_script("scripts/flags_table.py")


FLAGS_TABLE = _flags_table()


def _parser(command):
    try:
        return FLAGS_TABLE.build_parser(command)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in NOT_YET_INSTALLABLE:
            pytest.skip(f"{command.module} needs {exc.name}, not installed")
        raise


@pytest.mark.parametrize("command", FLAGS_TABLE.COMMANDS, ids=lambda command: command.name)
def test_every_flag_is_in_the_flag_reference(command):
    parser = _parser(command)
    document = FLAGS_DOC.read_text(encoding="utf-8")
    assert f"### `{command.name}`" in document, f"docs/flags.md has no heading for {command.name}"
    section = FLAGS_TABLE.section_text(document, command.name)
    for flags, _, _ in FLAGS_TABLE.flag_rows(parser):
        assert f"| {flags} |" in section, (
            f"{command.name}: {flags} missing from docs/flags.md (python scripts/flags_table.py --write)"
        )
    known = {option for action in parser._actions for option in action.option_strings}
    listed = set(re.findall(r"^\| [^|]*", section, flags=re.MULTILINE))
    stale = {flag for cell in listed for flag in re.findall(r"`(--[\w-]+)`", cell)} - known
    assert not stale, f"{command.name}: docs/flags.md lists flags the parser no longer has: {sorted(stale)}"


def test_readme_is_short_and_links_to_the_docs():
    size = len(README_PATH.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: move detail into docs/"
    assert "](docs/flags.md" in README, "README must link to the flag reference docs/flags.md"
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{doc.name}" in README, f"README does not link to docs/{doc.name}"


def test_readme_test_command_is_what_ci_runs():
    commands = re.findall(r"^bash (\S+)\s+#", README, flags=re.MULTILINE)
    assert commands[:2] == ["demo.sh", "scripts/test.sh"]
    for command in TWO_COMMANDS:
        assert re.search(rf"^{re.escape(command)}\s+#", README, flags=re.MULTILINE), f"README lost `{command}`"
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_slug(match) for match in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize(
    "path",
    [README_PATH, *sorted((REPO / "docs").glob("*.md"))],
    ids=lambda path: str(path.relative_to(REPO)),
)
def test_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # external
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: link to missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{path.name}: no heading for #{anchor} in {linked.name}"


DOCS = [README_PATH, *sorted((REPO / "docs").glob("*.md"))]
REPO_DIRS = ("crfm", "scripts", "bench", "configs", "preprocess", "assets", "demo", "tests")
# Old module names, mentioned only to say where they went (troubleshooting of code written for the flat layout).
RENAMED = {"crfm.segmentor", "crfm.model", "crfm.text", "crfm.downstream"}
RENAMED |= {  # issue #18: few-step code in crfm.fewstep, the latent cache under training
    "crfm.sampling.reflow_pairs", "crfm.training.reflow", "crfm.sampling.straightness",
    "crfm.sampling.evaluate_sampling", "crfm.data.cache_latents",
}  # fmt: skip


def _module_exists(dotted: str) -> bool:
    """`crfm.a.b` or `crfm.a.b.attribute`: a module file or package on disk (nothing is imported)."""
    parts = dotted.split(".")
    for cut in (len(parts), len(parts) - 1):
        base = REPO.joinpath(*parts[:cut])
        if cut >= 1 and (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
            return True
    return False


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_module_and_file_paths_exist(path):
    """Every `crfm.x.y` module and repository path the docs name exists (catches docs left behind by a move)."""
    text = path.read_text(encoding="utf-8")
    for dotted in sorted(set(re.findall(r"\bcrfm(?:\.[A-Za-z_]\w*)+", text))):
        if dotted in RENAMED and path.name == "troubleshooting.md":
            continue
        assert _module_exists(dotted), f"{path.name}: `{dotted}` is no module of crfm"
    for relative in sorted(set(re.findall(rf"(?<![\w./-])(?:{'|'.join(REPO_DIRS)})/[\w./-]*\.\w+", text))):
        assert (REPO / relative).exists(), f"{path.name}: {relative} does not exist"
    if path == README_PATH:  # the architecture map names files relative to crfm/
        for relative in re.findall(
            r"`((?:data|models|training|sampling|fewstep|segmentation|toy|utils)/[\w/]+\.py)`", text
        ):
            assert (REPO / "crfm" / relative).is_file(), f"README's map: crfm/{relative} does not exist"
