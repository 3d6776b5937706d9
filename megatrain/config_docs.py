"""The documentation of every config key, read from the field docstrings in megatrain/config.py (the one
source): `megatrain train --help`, docs/config.md (`python -m megatrain.config_docs --markdown`) and
tests/test_config_docs.py all come from here."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import sys
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from megatrain.config import Config

MARKDOWN_COMMAND = "python -m megatrain.config_docs --markdown > docs/config.md"


@dataclass(frozen=True)
class KeyDoc:
    """One dotted config key as `megatrain train --help` and docs/config.md show it."""

    key: str
    """Dotted, as on the command line: model.moe.top_k (data.sources.<name>.path for a mapping's items)."""
    type: str
    """int, float, bool, str, list[str] or mapping."""
    default: str
    """The default as a YAML file or --key= would spell it."""
    doc: str
    """The field's docstring on one line; empty when the field has none (a test refuses that)."""


@dataclass(frozen=True)
class SectionDoc:
    """One section of the config tree and the keys directly in it."""

    name: str
    """Dotted prefix: "" for the top level, model, model.moe, data.sources.<name>, ..."""
    doc: str
    """The section class's docstring and, for a nested section, its field's docstring (paragraphs kept)."""
    keys: list[KeyDoc]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal right after a field), by field name,
    each on one line. Python keeps no such docstring at runtime, so they are read from the source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source to read (e.g. a frozen executable): keys stay undocumented
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _class_doc(cls: type) -> str:
    doc = inspect.cleandoc(cls.__doc__ or "")
    return "" if doc.startswith(f"{cls.__name__}(") else doc  # dataclass's generated signature is no doc


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is dict:
        return "mapping"
    return str(tp) if typing.get_origin(tp) else tp.__name__  # list[str] spells itself; int does not


def _yaml_value(value: Any) -> str:
    """`value` as one line of YAML, the way a recipe or `--key=` spells it."""
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip().removesuffix("...").strip()


def config_sections(cls: type = Config, name: str = "", doc: str = "") -> list[SectionDoc]:
    """Every section of the config tree, depth first in field order, with its keys and their docs.

    Args:
        cls: the section's dataclass; Config for the whole tree.
        name: its dotted prefix ("" for the top level).
        doc: the docstring of the field that holds it, shown after the class's own.
    """
    hints, docs, defaults = typing.get_type_hints(cls), field_docs(cls), cls()
    keys, nested = [], []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{name}.{f.name}" if name else f.name
        if dataclasses.is_dataclass(tp):
            nested += config_sections(tp, key, docs.get(f.name, ""))
            continue
        keys.append(KeyDoc(key, _type_name(tp), _yaml_value(getattr(defaults, f.name)), docs.get(f.name, "")))
        if typing.get_origin(tp) is dict:  # name -> section (data.sources): document the items' keys too
            nested += config_sections(typing.get_args(tp)[1], f"{key}.<name>")
    intro = "\n\n".join(part for part in (_class_doc(cls), doc) if part)
    return [SectionDoc(name, intro, keys), *nested]


def config_keys() -> list[KeyDoc]:
    """Every dotted key of the config tree, in the order docs/config.md lists them."""
    return [key for section in config_sections() for key in section.keys]


def help_text(width: int = 100) -> str:
    """The key listing that ends `megatrain train --help`."""
    lines = ["config keys (set them in CONFIG, or override with --KEY=VALUE; the same list is in "
             "docs/config.md):"]
    for k in config_keys():
        lines.append(f"  {k.key} ({k.type}, default {k.default})")
        lines += textwrap.wrap(k.doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                               break_on_hyphens=False)  # keeps Switch-style, `megatrain-data` whole
    return "\n".join(lines) + "\n"


def markdown() -> str:
    """docs/config.md: every section and key, with type, default and doc."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = [f"<!-- Generated from the field docstrings in megatrain/config.py by `{MARKDOWN_COMMAND}`;",
           "     edit those docstrings, not this file. tests/test_config_docs.py checks it is current. -->",
           "# Config keys", "",
           "Every key of megatrain's config tree (megatrain/config.py). A value comes from the defaults below, "
           "then the YAML recipe, then `--section.key=value` on the command line, each overriding the one before; "
           "an unknown key or a value of the wrong type stops with one line naming it. "
           "`megatrain train CONFIG [--KEY=VALUE ...] --print-config` prints the resolved config with what it "
           "derives (batch plan, DeepSpeed JSON); `megatrain train --help` lists these keys too.", ""]
    for section in config_sections():
        if not section.keys:  # a level holding only sections has no table of its own
            continue
        out += [f"## `{section.name}`" if section.name else "## Top level", ""]
        if section.doc:
            out += [section.doc, ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{k.key}` | {k.type} | `{cell(k.default)}` | {cell(k.doc)} |" for k in section.keys]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatrain.config",
                                description="Print every config key with its type, default and doc.")
    p.add_argument("--markdown", action="store_true", help=f"as docs/config.md ({MARKDOWN_COMMAND})")
    args = p.parse_args(argv)
    print(markdown() if args.markdown else help_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
