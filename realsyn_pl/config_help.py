"""What a command's config keys mean, for `--help` and for shape errors: the comments written beside (or directly
above) each field in the schema dataclasses are their documentation, so they are read from the source rather than
kept twice.

`describe(schema)` lists every key as `key=default` (the override syntax) with its comment under it; a list of
config objects (eval's `datasets`, fit's `data.train`) also lists its element's keys and an example element.
`with_shape_hint(msg, err)` adds the matching sentence for an OmegaConf error about such an element.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
from typing import Any, Iterator, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

# Tool directives, not documentation.
_DIRECTIVES = ("type:", "noqa", "pragma", "fmt:", "pylint:")


def _own_comments(cls: type) -> dict[str, tuple[str, ...]]:
    """Comments of the fields `cls` itself defines: the full-line comments directly above a field (no blank line in
    between), then those beside it (on any of its lines)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped (a frozen app, a class made at run time): keys and defaults only
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        text = tok.string.lstrip("#").strip()
        if tok.type == tokenize.COMMENT and not text.startswith(_DIRECTIVES):
            comments[tok.start[0]] = text

    def full_line(n: int) -> bool:
        return lines[n - 1].lstrip().startswith("#")

    tree = ast.parse(source)
    classdef = next(node for node in tree.body if isinstance(node, ast.ClassDef))
    out: dict[str, tuple[str, ...]] = {}
    for node in classdef.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while n in comments and full_line(n):
            above.insert(0, comments[n])
            n -= 1
        beside = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)
                  if n in comments and not full_line(n)]
        if above or beside:
            out[node.target.id] = tuple(above + beside)
    return out


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, tuple[str, ...]]:
    """Field name -> its comment lines, over `cls` and the dataclasses it inherits from (cached: parsed once)."""
    out: dict[str, tuple[str, ...]] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_comments(klass))
    return out


def element_keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def element_example(cls: type) -> str:
    """One element as YAML flow: the schema's own `EXAMPLE` if it has one, else its required keys (or first key)."""
    example = getattr(cls, "EXAMPLE", None)
    if example:
        return str(example)
    defaults = OmegaConf.structured(cls)
    required = [f.name for f in dataclasses.fields(cls) if OmegaConf.is_missing(defaults, f.name)]
    return "{" + ", ".join(f"{name}: ..." for name in (required or [dataclasses.fields(cls)[0].name])) + "}"


def _flow(value: Any) -> str:
    """A value as it is written in an override (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def _element_type(node: Any) -> Optional[type]:
    elem = node._metadata.element_type if isinstance(node, ListConfig) else None
    return elem if isinstance(elem, type) and dataclasses.is_dataclass(elem) else None


def _lines(node: DictConfig, cls: type, prefix: str) -> Iterator[str]:
    notes = field_comments(cls)
    for f in dataclasses.fields(cls):
        key, child = prefix + f.name, node._get_node(f.name)
        note = [f"      {line}" for line in notes.get(f.name, ())]
        sub = OmegaConf.get_type(child) if isinstance(child, DictConfig) and not child._is_none() else None
        if sub is not None and dataclasses.is_dataclass(sub):
            if note:
                yield f"  {key}.*"
                yield from note
            yield from _lines(child, sub, key + ".")
            continue
        if OmegaConf.is_missing(node, f.name):
            value = "???  (required)"
        else:
            value = _flow(OmegaConf.to_container(child) if isinstance(child, (DictConfig, ListConfig))
                          else child._value())
        yield f"  {key}={value}"
        yield from note
        elem = _element_type(child)
        if elem is not None:
            yield f"      A list of mappings with the keys {key}[].* below (a list is set whole), e.g."
            yield f"      {key}=[{element_example(elem)}]"
            yield from _lines(OmegaConf.structured(elem), elem, key + "[].")


def describe(schema: type) -> str:
    """Every key of `schema` as `key=default`, each followed by the comment beside it in the source."""
    return "\n".join(_lines(OmegaConf.structured(schema), schema, ""))


def _schema_of(err: Any) -> Optional[type]:
    """The list-element schema an OmegaConf error is about, if any: a wrong element (ref_type List[X]), a bad key or
    value inside an element (object_type X), or a non-list given for the whole list (object_type's field List[X])."""
    candidates = []
    ref = getattr(err, "ref_type", None)
    candidates += [a for a in getattr(ref, "__args__", ()) if isinstance(a, type)]
    obj = getattr(err, "object_type", None)
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        candidates.append(obj)
        key = getattr(err, "key", None)
        field = {f.name: f for f in dataclasses.fields(obj)}.get(key) if isinstance(key, str) else None
        if field is not None:
            try:
                elem = OmegaConf.structured(obj)._get_node(key)
                found = _element_type(elem)
            except Exception:  # noqa: BLE001 - a hint must never replace the error it explains
                found = None
            if found is not None:
                candidates.insert(0, found)
    for cls in candidates:
        if dataclasses.is_dataclass(cls) and getattr(cls, "ELEMENT_OF", None):
            return cls
    return None


def with_shape_hint(msg: str, err: Any) -> str:
    """`msg`, plus 'A datasets element takes the keys ...; e.g. {...}' when `err` is about an element of a
    documented list (a schema with ELEMENT_OF set)."""
    cls = _schema_of(err)
    if cls is None:
        return msg
    return (f"{msg}{'' if msg.endswith(('.', '?')) else '.'} A {cls.ELEMENT_OF} element takes the keys "
            f"{element_keys(cls)}; e.g. {element_example(cls)}")


def list_example(node: Any) -> str:
    """One element of the list `node` as YAML flow, for 'a list is set whole, e.g. key=[...]'."""
    elem = _element_type(node)
    return element_example(elem) if elem is not None else "..."
