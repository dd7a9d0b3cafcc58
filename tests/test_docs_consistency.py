"""The user docs against the code: every command-line flag they write exists in the parser it is written
for, and every relative link between pages points to a file (and heading) that exists.

Flags: in docs/cli.md every ``--flag`` belongs to ``self-forcing generate``, except under the heading of
``self-forcing download`` or ``self-forcing convert-lora``; elsewhere a flag is checked when it follows ``self-forcing generate``,
``self-forcing download`` or ``python -m self_forcing.training`` on the same command line (so pip's, pytest's
and the benchmark scripts' own flags are not taken for ours).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from self_forcing.cli import build_parser as cli_parser
from self_forcing.training.__main__ import build_parser as training_parser

ROOT = Path(__file__).resolve().parents[1]
# The pages these checks cover (the README and the pages it sends a user to first).
PAGES = ("README.md", "docs/cli.md", "docs/python-api.md", "docs/benchmarks.md", "docs/baselines.md",
         "docs/self_forcing_pp.md", "docs/resampling_forcing.md", "docs/security.md", "docs/training.md")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMANDS = {"generate": re.compile(r"self-forcing\s+generate\b|self_forcing\.cli\s+generate\b"),
            "download": re.compile(r"self-forcing\s+download\b|self_forcing\.cli\s+download\b"),
            "convert-lora": re.compile(r"self-forcing\s+convert-lora\b|self_forcing\.cli\s+convert-lora\b"),
            "training": re.compile(r"-m\s+self_forcing\.training(?![.\w])")}


def _options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def parser_options() -> dict[str, set[str]]:
    sub = next(a for a in cli_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {"generate": _options(sub.choices["generate"]), "download": _options(sub.choices["download"]),
            "convert-lora": _options(sub.choices["convert-lora"]), "training": _options(training_parser())}


def all_options() -> dict[str, set[str]]:
    options = parser_options()
    return {**options, "self-forcing": options["generate"] | options["download"] | options["convert-lora"]}


def code_lines(text: str) -> list[str]:
    """Inline code spans and the lines of fenced blocks (a trailing backslash joins a line to the next)."""
    out = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        out += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return out + re.findall(r"`([^`\n]+)`", prose)


def flags_after_commands(line: str) -> list[tuple[str, str]]:
    """(command, flag) for each flag after one of our commands, up to a pipe, `;`, `&` or a comment."""
    found = []
    for segment in re.split(r"\s[|;&]\s|\s#\s|&&", line):
        for name, pattern in COMMANDS.items():
            m = pattern.search(segment)
            if m:
                found += [(name, f) for f in FLAG.findall(segment[m.end():])]
    return found


def cli_md_flags(text: str) -> list[tuple[str, str]]:
    """docs/cli.md: every flag in code, the parser chosen by the section it is in."""
    found = []
    for section in re.split(r"^(?=## )", text, flags=re.M):
        name = next((c for c in ("download", "convert-lora") if re.match(rf"## .*self-forcing {c}\b", section)),
                    "generate")
        for line in code_lines(section):
            if re.search(r"\b(pip|pytest|ffmpeg|ffplay)\b", line) and not COMMANDS[name].search(line):
                continue  # another program's flags
            found += [(name, f) for f in FLAG.findall(line)]
    return found


def documented_flags() -> list[tuple[str, str, str]]:
    out = []
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        pairs = cli_md_flags(text) if page == "docs/cli.md" else \
            [p for line in code_lines(text) for p in flags_after_commands(line)]
        if page == "README.md":  # a bare `--flag ...` span in the README's prose is a `self-forcing` flag
            prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
            pairs += [("self-forcing", f) for span in re.findall(r"`(--[^`\n]*)`", prose) for f in FLAG.findall(span)]
        out += [(page, name, flag) for name, flag in pairs]
    return out


def test_every_flag_in_the_docs_exists_in_its_parser():
    options = all_options()
    flags = documented_flags()
    pages = {p for p, _, _ in flags}
    # the extraction finds what it should: both CLI pages write generate and download flags
    assert {"README.md", "docs/cli.md", "docs/training.md"} <= pages
    assert ("docs/cli.md", "download", "--models-dir") in flags
    assert ("docs/cli.md", "convert-lora", "--alpha") in flags and ("docs/cli.md", "generate", "--lora") in flags
    assert ("README.md", "generate", "--frames") in flags
    assert ("docs/training.md", "training", "--stages") in flags
    assert ("README.md", "self-forcing", "--window") in flags
    missing = sorted({f"{p}: {name} {flag}" for p, name, flag in flags if flag not in options[name]})
    assert not missing, "flags the docs write but the parsers lack:\n" + "\n".join(missing)


def test_the_flag_check_catches_a_wrong_flag():
    options = parser_options()
    pairs = flags_after_commands("self-forcing generate --frames 48 --windw 12 | ffplay -f rawvideo -i -")
    assert pairs == [("generate", "--frames"), ("generate", "--windw")]
    assert [f for _, f in pairs if f not in options["generate"]] == ["--windw"]
    text = "## `self-forcing download`: x\n\n```bash\nself-forcing download --model-dir x\n```\n"
    assert cli_md_flags(text) == [("download", "--model-dir")]
    assert "--model-dir" not in options["download"] and "--models-dir" in options["download"]
    text = "## `self-forcing convert-lora`: x\n\n```bash\nself-forcing convert-lora a.pt b.safetensors --alfa 2\n```\n"
    assert cli_md_flags(text) == [("convert-lora", "--alfa")] and "--alpha" in options["convert-lora"]


# -- links -----------------------------------------------------------------------------------------------
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{1,2}(?=\S)|(?<=\S)[`*_]{1,2}", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        s = slug(heading)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    bad = []
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no such heading)")
    return bad


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    assert not broken_links(ROOT / page), f"{page}: broken links: {broken_links(ROOT / page)}"


def test_the_link_check_catches_a_missing_file_and_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## The `x` option: y\n\n[ok](b.md#the-x-option-y) [ok2](#title)\n"
                                   "[gone](missing.md) [bad](b.md#nope) [web](https://example.com/x)\n"
                                   "```\n[in code](ignored.md)\n```\n")
    (tmp_path / "b.md").write_text("## The `x` option: y\n")
    assert broken_links(tmp_path / "a.md") == ["missing.md (no such file)", "b.md#nope (no such heading)"]
    assert slug("`self-forcing download`: the weights") == "self-forcing-download-the-weights"
    assert slug("Measured on one H200 (random weights, 2026-12-03)") == \
        "measured-on-one-h200-random-weights-2026-12-03"


# -- tests the docs cite ---------------------------------------------------------------------------------
def test_every_test_the_docs_cite_exists():
    """`test_x.py::test_name` and `::test_name` (same file as the one before) name a test that is defined."""
    defined = {}
    for path in (ROOT / "tests").glob("*.py"):
        defined[path.name] = set(re.findall(r"^\s*def (test_\w+)", path.read_text(encoding="utf-8"), flags=re.M))
    cited, missing = 0, []
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        current = None
        for file, name in re.findall(r"(?:(test_\w+\.py))?::(test_\w+)", text):
            current = file or current
            cited += 1
            if current not in defined or name not in defined[current]:
                missing.append(f"{page}: {current}::{name}")
    assert cited > 20, "the docs cite tests by name (security.md); the pattern found too few"
    assert not missing, "tests the docs cite but tests/ lacks:\n" + "\n".join(missing)
