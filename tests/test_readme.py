"""The README's Arguments tables against the code: every default it states is the default the code has."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import memwatch
from memwatch import MemorizationMonitor, defaults
from memwatch.index import IndexOptions

README = (Path(__file__).parent.parent / "README.md").read_text()
ARGUMENTS = README[README.index("### Arguments") : README.index("### When something goes wrong")]


def _literal(text: str) -> object:
    """A README value (``"auto"``, ``(0.1,)``, ``None``, ``4096``) as Python, or the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _rows(table_head: str) -> list[list[str]]:
    """The cells of the rows of the table whose header starts with ``table_head``."""
    start = ARGUMENTS.index(table_head)
    rows = []
    for line in ARGUMENTS[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


#: defaults the README describes in words rather than states as a value
DESCRIBED = {("LossGapOptions", "sigmas")}


def test_the_monitors_own_arguments_have_the_defaults_the_readme_states():
    signature = inspect.signature(MemorizationMonitor).parameters
    rows = _rows("| argument | default | meaning |")
    assert len(rows) >= 6
    for names, default, _ in rows:
        for name, value in zip(re.findall(r"`(\w+)`", names), default.split(" / ")):
            assert _literal(value.strip("`")) == signature[name].default, name


@pytest.mark.parametrize("row", range(len(_rows("| group (`ClassName`) |"))))
def test_each_option_group_has_the_defaults_the_readme_states(row):
    group, fields, _ = _rows("| group (`ClassName`) |")[row]
    cls = getattr(memwatch, re.search(r"\(`(\w+)`\)", group).group(1))
    have = {f.name: f.default for f in dataclasses.fields(cls)}
    stated = re.findall(r"`(\w+)` \(([^()]*(?:\([^()]*\))?[^()]*)\)", fields)
    assert stated, group
    for name, value in stated:
        value = value.strip("`")
        if name == "index" or (cls.__name__, name) in DESCRIBED:  # a nested group's fields are stated after it
            continue
        if name in have:
            assert _literal(value) == have[name], f"{cls.__name__}.{name}: README {value!r}, code {have[name]!r}"
        else:  # the copy index's own fields, stated inside the copies row
            assert _literal(value) == getattr(IndexOptions(), name), f"IndexOptions.{name}"


def test_the_samples_held_are_stated_as_the_code_holds_them():
    """One number of held samples per store: the reservoir's `data.capacity`, the index's memory budget."""
    privacy = README[README.index("## Privacy") : README.index("## Limits")]
    assert f"`data.capacity` ({defaults.CALIBRATION_CAPACITY})" in privacy
    assert f"`copies.index.memory_mb` ({IndexOptions().memory_mb:g} MiB)" in privacy
    assert re.search(rf"`copies.index.memory_mb` =\s+{IndexOptions().memory_mb:g} MiB", README)
    assert defaults.REFERENCE_DATA == "batches" and '(`reference_data="batches"`, the default' in README
    # the index of the batches is bounded by its memory budget, never by the reservoir's capacity
    assert not re.search(r'"batches"[^.|]*up to `data\.capacity`', README)
