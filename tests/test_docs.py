"""The documentation cannot drift from the code: README.md and docs/*.md against the Makefile,
the scripts' argparse parsers, the files they link to and .ci/run. Fast: no model is built.

Which script a `--flag` belongs to: the script named last before it on the same page, as
`train.py` (anywhere, prose included) or as a command in code (`make train`, `torchrun`, …).
A flag that follows another tool (`bench/bench.py --quick`, `torchrun --nproc_per_node 2`, a
`make` target whose recipe runs none of the five scripts) is not checked; a flag that follows
no tool at all is an error, so every flag is attributed on purpose.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("train", "evaluate", "sweep", "report", "flops", "chat")
OTHER = "another tool"  # the subject of flags that are not checked
# commands in code whose flags are their own, not one of the five scripts'
OTHER_COMMANDS = ("torchrun", "tensorboard", "pytest", "pip", "git", "ruff", "chromium")

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]+`")
MAKE = re.compile(r'\bmake((?:\s+[A-Z_]+=\S*)*)\s+([a-z][\w-]*)((?:\s+[A-Z_]+=(?:"[^"]*"|\S*))*)')
SCRIPT_PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.(?:py|sh))\b")
COMMAND = re.compile(r"(?<![\w./-])(" + "|".join(OTHER_COMMANDS) + r")\b(?![/.-])")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def code_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every fenced block and inline code span: where `make X` is a command."""
    fenced = [m.span() for m in FENCE.finditer(text)]
    inline = [m.span() for m in INLINE_CODE.finditer(text)
              if not any(a <= m.start() < b for a, b in fenced)]
    return fenced + inline


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def makefile_targets() -> dict[str, str]:
    """Each Makefile target → the one of the five scripts its recipe runs, else OTHER."""
    recipes: dict[str, str] = {}
    current: list[str] = []
    for line in (ROOT / "Makefile").read_text().splitlines():
        rule = re.match(r"([A-Za-z][\w-]*(?:[ \t]+[A-Za-z][\w-]*)*)[ \t]*:(?!=)", line)
        if rule:
            current = rule.group(1).split()
            recipes.update(dict.fromkeys(current, ""))
        elif line.startswith("\t"):
            recipes.update({t: recipes[t] + line for t in current})
        elif line.strip() and not line.startswith("#"):
            current = []
    pattern = r"\b(" + "|".join(SCRIPTS) + r")\.py\b"
    runs = {t: set(re.findall(pattern, recipe)) for t, recipe in recipes.items()}
    return {t: run.pop() if len(run) == 1 else OTHER for t, run in runs.items()}


def mentions(text: str, targets: dict[str, str]) -> list[tuple[int, str, str]]:
    """(offset, kind, value) in page order: kind 'tool' (value: a script or OTHER), 'make'
    (value: the target) or 'flag' (value: the flag)."""
    found = []
    for start, end in code_spans(text):
        code = text[start:end]
        for m in MAKE.finditer(code):
            found.append((start + m.start(), "make", m.group(2)))
            found.append((start + m.start(), "tool", targets.get(m.group(2), OTHER)))
        for m in COMMAND.finditer(code):
            found.append((start + m.start(), "tool", OTHER))
    for m in SCRIPT_PATH.finditer(text):
        path = m.group(1)
        if path.split("/")[0] in ("tests", "qwen_min", "lora"):
            continue  # modules and tests, not command-line tools
        found.append((m.start(), "tool", path[:-3] if path[:-3] in SCRIPTS else OTHER))
    found += [(m.start(), "flag", m.group()) for m in FLAG.finditer(text)]
    return sorted(found)


def attributed_flags(text: str, targets: dict[str, str]) -> list[tuple[int, str | None, str]]:
    """(line, script or OTHER or None, flag) for every flag: the tool named last before it."""
    subject, out = None, []
    for offset, kind, value in mentions(text, targets):
        if kind == "tool":
            subject = value
        elif kind == "flag":
            out.append((line_of(text, offset), subject, value))
    return out


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def script_flags(name: str) -> set[str]:
    """The long options of a script's argparse parser. Its parse_args() (flops.py: main())
    builds the parser and parses; parsing is intercepted, so nothing after it runs."""
    module = importlib.import_module(name)
    build = getattr(module, "parse_args", None) or module.main

    def intercept(parser, *args, **kwargs):
        raise _Parsed(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", intercept):
        try:
            build([])
        except _Parsed as parsed:
            parser = parsed.parser
        else:
            raise AssertionError(f"{name}.py: {build.__name__}() returned without parsing")
    return {s for a in parser._actions for s in a.option_strings
            if s.startswith("--") and s != "--help"}


@pytest.fixture(scope="module")
def targets() -> dict[str, str]:
    return makefile_targets()


@pytest.fixture(scope="module")
def script_args() -> dict[str, set[str]]:
    return {s: script_flags(s) for s in SCRIPTS}


@pytest.fixture(scope="module")
def flags_by_page(targets) -> dict[str, list[tuple[int, str | None, str]]]:
    return {str(p.relative_to(ROOT)): attributed_flags(p.read_text(), targets) for p in PAGES}


def test_attribution_rule(targets):
    text = ("**train.py** flags: `--steps`, then `make eval ARGS=\"--limit 3\"`.\n"
            "```\ntorchrun --nproc_per_node 2 train.py --rank 4\n```\n"
            "`bench/bench.py --quick`; `--resume` of `make train`… `make demo --jobs`")
    assert [(s, f) for _, s, f in attributed_flags(text, targets)] == [
        ("train", "--steps"), ("evaluate", "--limit"), (OTHER, "--nproc_per_node"),
        ("train", "--rank"), (OTHER, "--quick"), (OTHER, "--resume"), (OTHER, "--jobs")]
    assert attributed_flags("a `--flag` before any tool", targets) == [(1, None, "--flag")]


def test_makefile_targets_map_to_their_scripts(targets):
    assert {t: s for t, s in targets.items() if s != OTHER} == {
        "train": "train", "eval": "evaluate", "baselines": "evaluate", "sweep": "sweep",
        "report": "report", "flops": "flops", "chat": "chat"}


def test_every_make_target_named_exists(targets):
    missing = [f"{p.relative_to(ROOT)}:{line_of(p.read_text(), i)}: make {t}"
               for p in PAGES for i, kind, t in mentions(p.read_text(), targets)
               if kind == "make" and t not in targets]
    assert missing == [], "named in the docs, not a Makefile target:\n" + "\n".join(missing)


def test_every_make_variable_named_is_used_by_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    unused = [f"{p.relative_to(ROOT)}: make {m.group(2)} {name}="
              for p in PAGES for start, end in code_spans(p.read_text())
              for m in MAKE.finditer(p.read_text()[start:end])
              for name in re.findall(r"([A-Z_]+)=", m.group(1) + m.group(3))
              if f"$({name})" not in makefile]
    assert unused == [], "\n".join(unused)


def test_every_flag_named_is_an_argument_of_its_script(flags_by_page, script_args):
    wrong = [f"{page}:{line}: {flag} follows no script name" if script is None
             else f"{page}:{line}: {flag} is not an argument of {script}.py"
             for page, flags in flags_by_page.items() for line, script, flag in flags
             if script is None or (script != OTHER and flag not in script_args[script])]
    assert wrong == [], "\n".join(wrong)


def test_every_argument_is_documented(flags_by_page, script_args):
    documented = {(script, flag) for flags in flags_by_page.values() for _, script, flag in flags}
    undocumented = {s: sorted(f for f in args if (s, f) not in documented)
                    for s, args in script_args.items()}
    undocumented = {s: f for s, f in undocumented.items() if f}
    assert undocumented == {}, (f"in no page of README.md or docs/: {undocumented} (a flag "
                                "belongs to the script named last before it on its page)")


def test_relative_links_resolve():
    broken = [f"{p.relative_to(ROOT)}: {target}" for p in PAGES
              for target in LINK.findall(FENCE.sub("", p.read_text()))
              if not re.match(r"[a-z]+:|#", target)
              and not (p.parent / target.split("#")[0]).exists()]
    assert broken == [], "\n".join(broken)


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    linked = {(ROOT / t.split("#")[0]).resolve() for t in LINK.findall(readme)}
    assert len(readme.splitlines()) <= 180
    assert [str(p.relative_to(ROOT)) for p in PAGES[1:] if p.resolve() not in linked] == []


def test_ci_runs_what_the_readme_says(targets):
    """The README's paragraph on CI names the make commands .ci/run runs, in that order."""
    readme = (ROOT / "README.md").read_text()
    paragraph = next(p for p in readme.split("\n\n") if ".ci/run" in p)
    said = list(dict.fromkeys(t for _, kind, t in mentions(paragraph, targets) if kind == "make"))
    run = [m.group(2) for line in (ROOT / ".ci/run").read_text().splitlines()
           if (m := MAKE.match(line))]
    assert said and said == run, f"README.md says CI runs {said}; .ci/run runs {run}"
