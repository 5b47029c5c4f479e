"""YAML read safely: UTF-8 only, no duplicate keys, aliases bounded, error messages that never echo the input.

PyYAML's `safe_load` accepts duplicate keys (the last wins, silently) and expands aliases without limit
(a few lines can expand to gigabytes). `load_yaml` refuses both, in one line that names the place.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

from harness.errors import HarnessError, one_line

MAX_NODES = 100_000  # nodes after alias expansion: far above any real ablation file, far below a bomb
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 6, 6, 2


def short_repr(value: Any) -> str:
    """A bounded repr of a user value for an error message."""
    return _SHORT.repr(value)


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; keys written next to it override the merged ones
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # unhashable keys: SafeLoader's own error follows
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short_repr(key)} (first at line {seen[key].start_mark.line + 1})", mark
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes the document holds once every alias is expanded (shared nodes counted at each use)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    memo[id(node)] = 1  # a recursive alias counts once while its size is being computed
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_NODES + 1)
    return memo[id(node)]


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""


def load_yaml(text: str | bytes, source: str) -> Any:
    """Parse one YAML document; a `HarnessError` naming `source` for non-UTF-8 bytes, a syntax error, a
    duplicate key or aliases that expand past MAX_NODES nodes."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            byte = f"byte 0x{text[exc.start]:02x} at offset {exc.start}"
            raise HarnessError(f"{source}: not UTF-8 text ({byte})") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_NODES:
            raise HarnessError(f"{source}: YAML aliases expand to more than {MAX_NODES:,} nodes; refusing to load it")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or one_line(exc, with_type=False))
        if not problem.startswith("duplicate key"):
            problem = f"YAML syntax error: {problem}"
        raise HarnessError(f"{source}:{_where(exc)} {problem}") from None
    finally:
        loader.dispose()


def load_yaml_file(path: Path) -> Any:
    """`load_yaml` of a file's bytes; a missing or unreadable file is a one-line error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise HarnessError(f"file not found: {path}") from None
    except OSError as exc:
        raise HarnessError(f"cannot read {path}: {exc.strerror}") from None
    return load_yaml(data, str(path))
