"""`protfold fit` with compiled blocks compiles each block class once, whatever recycle count and MSA depth each step
draws, and reports it; a second process with the same compile cache loads the compiled code instead of compiling.

The fit runs with dynamo's cheap `aot_eager` backend (the capture and recompile logic are dynamo's, whatever the
backend); the cache test compiles a small function with inductor, the backend whose output the cache keeps."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from protfold.train.compile_cache import compile_snapshot, default_cache_dir, use_compile_cache


def test_fit_compiles_each_block_class_once(run_kit, tmp_path, aot_eager_compile) -> None:
    root = tmp_path / "run"
    # 12 cluster rows and 48 extra rows: deeper than some training entries' alignments, so unpadded batches would
    # change depth between steps; recycles are drawn 0 or 1 (tiny preset) over the 4 steps
    extra = ("--model.memory", "compiled", "--data.max_msa_clusters", "12", "--data.max_extra_msa", "48",
             "--compile_cache", str(tmp_path / "cache"))
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        run_kit.fit(run_kit.fit_args(root, steps=4, extra=extra))
    run = run_kit.version_dirs(root)[-1]
    perf = json.loads((run / "perf.json").read_text())
    assert set(perf["recycles"]) == {0.0, 1.0}, perf["recycles"]  # both recycle counts were drawn
    assert aot_eager_compile.counter.frame_count == 2  # EvoformerBlock and ExtraMSABlock, once each
    assert perf["compile"]["graphs"] == 2 and perf["compile"]["seconds"] > 0, perf["compile"]
    assert perf["compile"]["cache_dir"] == str(tmp_path / "cache")
    assert "compile/graphs" in (run / "metrics.csv").read_text().splitlines()[0]


def test_cache_folder_defaults_to_the_user_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert default_cache_dir() == tmp_path / "protfold" / "compile"
    assert use_compile_cache(None) == tmp_path / "protfold" / "compile"
    assert (tmp_path / "protfold" / "compile").is_dir()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert use_compile_cache("none") is None and "TORCHINDUCTOR_CACHE_DIR" not in __import__("os").environ
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="compile_cache .*file/sub: cannot create the folder"):
        use_compile_cache(str(tmp_path / "file" / "sub"))


_COMPILE_TWICE = textwrap.dedent("""
    import json, sys, torch
    from protfold.model.memory import fp32_island, upcast
    from protfold.train.compile_cache import compile_snapshot, use_compile_cache

    use_compile_cache(sys.argv[1])

    def block(x, w):  # an fp32 island inside autocast, as in the blocks: autocast nodes in the graph
        h = x @ w
        with fp32_island(h):
            h = upcast(h).softmax(-1)
        return (h * x).sum()

    x, w = torch.randn(8, 8), torch.randn(8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.compile(block)(x, w).backward()
    print(json.dumps(compile_snapshot()))
""")


@pytest.mark.slow
def test_second_process_loads_from_the_compile_cache(tmp_path) -> None:
    """Two fresh processes compile the same function with inductor and one cache folder: the first compiles and
    saves, the second loads both graphs (forward and backward) and the AOTAutograd entry; nothing bypasses the
    cache (the autocast enter/exit nodes of an fp32 island are marked cacheable)."""
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _COMPILE_TWICE, str(tmp_path / "cache")], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["fx_graph_cache_misses"] == 2 and first["autograd_cache_misses"] == 1, first
    assert second["fx_graph_cache_hits"] == 2 and second["fx_graph_cache_misses"] == 0, second
    assert second["autograd_cache_hits"] == 1 and second["autograd_cache_bypasses"] == 0, second
    assert any((tmp_path / "cache").iterdir())
    assert second["seconds"] < first["seconds"]


def test_snapshot_counts_graphs() -> None:
    before = compile_snapshot()
    torch._dynamo.reset()
    torch.compile(lambda x: x.sin() + 1, backend="eager")(torch.randn(3))
    after = compile_snapshot()
    assert after["graphs"] - before["graphs"] == 1 and after["seconds"] > before["seconds"]


def test_uncompiled_fit_makes_no_cache_folder(run_kit, tmp_path, monkeypatch) -> None:
    """Only a run that compiles (or names --compile_cache) makes a folder outside its own run folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    run_kit.fit(run_kit.fit_args(tmp_path / "run", steps=1))
    assert run_kit.version_dirs(tmp_path / "run")
    assert not (tmp_path / "xdg").exists()
