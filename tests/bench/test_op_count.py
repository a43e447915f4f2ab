"""scripts/op_count.py: ops of one af2 training step counted on the meta device (they predict launch-bound step
times, docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "op_count.py"


def load():
    spec = importlib.util.spec_from_file_location("op_count", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_grow_with_blocks_and_with_smaller_chunks() -> None:
    op_count = load()
    shape = dict(crop=48, rows=6, extra=10, recycles=0, extra_blocks=1)
    one, _ = op_count.count(memory_name="recompute", sets={}, blocks=1, **shape)
    two, by_name = op_count.count(memory_name="recompute", sets={}, blocks=2, **shape)
    assert 0 < one < two and "mm.default" in by_name and "view.default" not in by_name
    # pair_chunk splits the pair ops into row chunks: more launches for the same function
    chunked, _ = op_count.count(memory_name="recompute", sets={"pair_chunk": 8}, blocks=1, **shape)
    assert chunked > one


def test_bad_arguments_are_clear_errors(capsys) -> None:
    op_count = load()
    for argv, words in ((["--memory", "no_such_mode"], "unknown memory mode"),
                        (["--set", "no_such_field=1"], "unknown MemoryConfig field"),
                        (["--set", "pair_chunk"], "FIELD=VALUE")):
        with pytest.raises(SystemExit) as exc:
            op_count.main(["--crop", "16", "--blocks", "1", "--extra-blocks", "1", *argv])
        assert exc.value.code == 2 and words in capsys.readouterr().err
