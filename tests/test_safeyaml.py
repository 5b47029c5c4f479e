"""Hostile YAML: non-UTF-8 bytes, duplicate keys, alias bombs, huge values in messages."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.planning import expand, load_ablation
from harness.safeyaml import MAX_NODES, load_yaml

BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
) + "\n"


def test_duplicate_keys_are_an_error_at_every_depth() -> None:
    with pytest.raises(HarnessError, match=r"f.yaml: line 3, column 1: duplicate key 'a' \(first at line 1\)"):
        load_yaml("a: 1\nb: 2\na: 3\n", "f.yaml")
    with pytest.raises(HarnessError, match=r"line 3, column 3: duplicate key 'lr'"):
        load_yaml("train:\n  lr: 0.1\n  lr: 0.2\n", "f.yaml")


def test_plain_aliases_and_merge_keys_still_work() -> None:
    data = load_yaml("base: &b {x: 1, y: 2}\nother: {<<: *b, y: 3}\n", "f.yaml")
    assert data == {"base": {"x": 1, "y": 2}, "other": {"x": 1, "y": 3}}


def test_an_alias_bomb_is_refused_quickly_without_expanding() -> None:
    started = time.perf_counter()
    with pytest.raises(HarnessError, match=f"aliases expand to more than {MAX_NODES:,} nodes"):
        load_yaml(BOMB, "bomb.yaml")
    assert time.perf_counter() - started < 2


def test_non_utf8_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(HarnessError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_ablation(path)


def test_error_messages_never_print_the_expanded_input(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("name: x\nbase: {train: {epochs: &e [" + ", ".join(["1"] * 5000) + "]}}\nvariants: {v: {}}\n")
    with pytest.raises(HarnessError) as caught:
        expand(load_ablation(path))
    message = str(caught.value)
    assert "train.epochs" in message and len(message) < 300 and "\n" not in message
