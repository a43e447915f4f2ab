"""`protfold prepare` as users run it: exit codes, summary, no tracebacks; the subcommand table."""

from __future__ import annotations

from pathlib import Path

import pytest

from protfold import cli


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory: pytest.TempPathFactory, prepare_kit):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("cli_bad")
    inputs, msas = prepare_kit.make_bad_input_tree(root)
    return root, inputs, msas


def test_bad_inputs_exit_zero_when_something_was_prepared(bad_tree, prepare_kit) -> None:  # noqa: ANN001
    root, inputs, msas = bad_tree
    proc = prepare_kit.run_protfold("prepare", inputs, "--out", root / "cache", "--msa_dir", msas, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "40 entries ok" in proc.stdout and "5 skipped" in proc.stdout and "2 MSA file(s) rejected" in proc.stdout
    for name in prepare_kit.bad_structures:
        lines = [line for line in proc.stderr.splitlines() if name in line]
        assert len(lines) == 1 and "skipped" in lines[0], (name, proc.stderr)


def test_strict_fails_on_any_skip(bad_tree, prepare_kit) -> None:  # noqa: ANN001
    root, inputs, msas = bad_tree
    proc = prepare_kit.run_protfold("prepare", inputs, "--out", root / "cache", "--msa_dir", msas, "--strict")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "--strict" in proc.stderr


def test_strict_fails_on_msa_rejection_alone(tmp_path: Path, prepare_kit) -> None:  # noqa: ANN001
    (tmp_path / "in").mkdir()
    (tmp_path / "msas" / "1a8o_A").mkdir(parents=True)
    (tmp_path / "in" / "1a8o.cif").write_bytes((prepare_kit.samples_dir / "mmcif" / "1a8o.cif").read_bytes())
    (tmp_path / "msas" / "1a8o_A" / "x.a3m").write_text(">q\nMKV\n")
    args = ["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--msa_dir", str(tmp_path / "msas")]
    assert cli.main([*args, "--workers", "1", "--no_progress"]) == 0
    assert cli.main([*args, "--workers", "1", "--no_progress", "--strict"]) == 1


def test_nothing_prepared_exits_non_zero(tmp_path: Path, prepare_kit, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.cif").write_bytes(b"")
    (tmp_path / "in" / "junk.pdb").write_bytes(bytes(range(256)))
    code = cli.main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "1"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "0 entries ok" in out and "2 skipped" in out
    assert "nothing could be prepared" in err and "Traceback" not in err


def test_missing_input_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_summary_names_report(prepared_samples) -> None:  # noqa: ANN001
    assert str(prepared_samples.cache_dir / "report.tsv") in prepared_samples.stdout


@pytest.mark.parametrize("name", ["fit", "validate", "test", "predict", "bench"])
def test_planned_subcommands_say_not_available(name: str, capsys: pytest.CaptureFixture) -> None:
    if cli.SUBCOMMANDS[name].__qualname__.startswith("_not_available"):
        assert cli.main([name]) != 0
        assert "not available yet" in capsys.readouterr().err


def test_unknown_subcommand_and_help(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "unknown subcommand" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("prepare", "fit", "predict", "bench"))
    with pytest.raises(SystemExit) as info:
        cli.main(["prepare", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--msa_dir" in out and "--no_progress" in out
    assert "--msa-dir" not in out  # the old spelling still parses (below) but is not offered


def test_prepare_keeps_hyphenated_aliases(tmp_path: Path, prepare_kit) -> None:  # noqa: ANN001
    """`--msa-dir` / `--no-progress` (earlier spellings) give what `--msa_dir` / `--no_progress` give."""
    (tmp_path / "in").mkdir()
    (tmp_path / "msas" / "1a8o_A").mkdir(parents=True)
    (tmp_path / "in" / "1a8o.cif").write_bytes((prepare_kit.samples_dir / "mmcif" / "1a8o.cif").read_bytes())
    (tmp_path / "msas" / "1a8o_A" / "x.a3m").write_text(">q\nMKV\n")
    base = ["prepare", str(tmp_path / "in"), "--workers", "1", "--strict"]
    assert cli.main([*base, "--out", str(tmp_path / "a"), "--msa_dir", str(tmp_path / "msas"), "--no_progress"]) == 1
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--msa-dir", str(tmp_path / "msas"), "--no-progress"]) == 1


def test_memory_presets_load_and_bad_ones_name_the_file(tmp_path) -> None:
    """One loader for the memory presets (used by `protfold bench` and `protfold predict --memory`)."""
    import pytest

    from protfold.config import MemoryConfig, load_memory_preset

    assert load_memory_preset("none") == MemoryConfig()
    assert load_memory_preset("recompute").blocks_per_checkpoint == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  memory:\n    checkpoint_storage: bf16\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_memory_preset(str(bad))
    with pytest.raises(ValueError, match="presets: .*low"):
        load_memory_preset("no_such_mode")
