"""Shared fixtures for the whole test suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# One torch thread in every test and every process a test starts: on a shared 2-core machine two intra-op
# threads that compete with other processes make a step many times slower, not faster. `protfold fit` leaves
# torch's threads alone when OMP_NUM_THREADS is set.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Without CUDA, protfold's Triton kernels run on the CPU through Triton's interpreter (tests/model/
# test_attention_triton.py). Triton chooses the interpreter for every kernel, its own library's included, when it
# is imported, so the variable is set here, before any test can import it.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _compile_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """`protfold fit` keeps its compile cache under $XDG_CACHE_HOME: a temporary folder for the suite (and the
    processes it starts), so tests neither read a cache left by earlier runs nor write into the user's."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class AotEager:
    """What `aot_eager_compile` saw: the options each torch.compile call passed (inductor's, which aot_eager takes
    none of) and dynamo's counter of the graphs it captured."""

    options: list
    counter: object


@pytest.fixture
def aot_eager_compile(monkeypatch) -> Iterator[AotEager]:
    """protfold's compiled blocks through dynamo's cheap `aot_eager` backend, from fresh caches: the capture,
    autograd, checkpoint and RNG replay are dynamo's whatever the backend, and inductor's CPU code generation would
    cost minutes on CI's two cores (the inductor kernels are compared on the GPU, tests/gpu)."""
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    from protfold.model.memory import reset_compiled

    plain_compile, seen = torch.compile, AotEager([], CompileCounterWithBackend("aot_eager"))

    def compile_aot_eager(fn, **kw):
        seen.options.append(kw.pop("options", None))
        return plain_compile(fn, backend=seen.counter, **kw)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    reset_compiled()
    yield seen
    reset_compiled()


REPO = Path(__file__).resolve().parents[1]
_SCRATCH = {".git", "__pycache__", ".pytest_cache", ".whl", ".gl", ".ruff_cache"}


def _checkout_files() -> dict[str, int]:
    """Every file of the checkout (ignored ones too, scratch folders aside) with its modification time."""
    return {str(p.relative_to(REPO)): p.stat().st_mtime_ns for p in REPO.rglob("*")
            if p.is_file() and not _SCRATCH & set(p.relative_to(REPO).parts) and ".egg-info" not in str(p)}


@pytest.fixture(scope="session", autouse=True)
def _checkout_stays_untouched():
    """The suite writes only to temporary folders: a test that writes into the checkout (a cache, a run, a
    prediction) errors at the end of the session, naming the files."""
    before = _checkout_files()
    yield
    after = _checkout_files()
    changed = sorted(k for k in after if before.get(k) != after[k]) + sorted(set(before) - set(after))
    assert not changed, f"the test suite wrote into the checkout: {changed[:10]}"


# ------------------------------------------------------------------ prepared sample cache (data/prepare)

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "samples"


@dataclass(frozen=True)
class PreparedSamples:
    """The shipped samples run once through `protfold prepare` (the console command, in a subprocess)."""

    cache_dir: Path
    elapsed_s: float
    returncode: int
    stdout: str
    stderr: str


def run_protfold(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `protfold` command (the installed console script, else `python -m protfold.cli`)."""
    exe = shutil.which("protfold")
    cmd = [exe] if exe else [sys.executable, "-m", "protfold.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def prepared_samples(tmp_path_factory: pytest.TempPathFactory) -> PreparedSamples:
    """`protfold prepare data/samples --out CACHE --msa_dir data/samples/msas`, once per session."""
    cache_dir = tmp_path_factory.mktemp("prepared_samples")
    start = time.perf_counter()
    proc = run_protfold("prepare", SAMPLES_DIR, "--out", cache_dir, "--msa_dir", SAMPLES_DIR / "msas")
    elapsed = time.perf_counter() - start
    return PreparedSamples(cache_dir, elapsed, proc.returncode, proc.stdout, proc.stderr)


# Bad inputs added to a copy of the samples: file (relative to the input or MSA root) -> what is wrong.
BAD_STRUCTURES = {
    "bad/empty.cif": "empty file",
    "bad/truncated.cif": "mmCIF cut in the middle of the atom table",
    "bad/garbage.pdb.gz": "binary garbage",
    "bad/dnaonly.pdb": "DNA-only structure",
    "bad/noatoms.cif": "mmCIF without atom records",
}
BAD_MSAS = {
    "1aki_A/other_query.a3m": "query of another protein",
    "1psm_A/zz_malformed.a3m": "record without sequence",
}


def make_bad_input_tree(root: Path) -> tuple[Path, Path]:
    """Copy the samples to root/input and root/msas and add BAD_STRUCTURES and BAD_MSAS; returns both roots."""
    inputs, msas = root / "input", root / "msas"
    shutil.copytree(SAMPLES_DIR / "mmcif", inputs / "mmcif")
    shutil.copytree(SAMPLES_DIR / "pdb", inputs / "pdb")
    shutil.copytree(SAMPLES_DIR / "msas", msas)
    (inputs / "bad").mkdir()
    (inputs / "bad/empty.cif").write_bytes(b"")
    text = (SAMPLES_DIR / "mmcif/1aki.cif").read_text()
    start = text.index("_atom_site.")
    atom_rows = text.index("\nATOM", start)
    cut = atom_rows + (len(text) - atom_rows) // 2
    (inputs / "bad/truncated.cif").write_text(text[:cut])  # mid-row, mid-table
    (inputs / "bad/garbage.pdb.gz").write_bytes(bytes(range(256)) * 40)
    dna = [
        "HEADER    DNA                                     01-JAN-00   9DNA              ",
        "SEQRES   1 B    3   DA  DC  DG",
    ]
    for i, (res, x) in enumerate((("DA", 0.0), ("DC", 6.0), ("DG", 12.0)), start=1):
        for j, atom in enumerate(("P", "C1'", "N1")):
            serial = 3 * (i - 1) + j + 1
            dna.append(
                f"ATOM  {serial:5d}  {atom:<3s} {res:>3s} B{i:4d}    {x + j:8.3f}{1.0:8.3f}{2.0:8.3f}  1.00 20.00           {atom[0]}"
            )
    (inputs / "bad/dnaonly.pdb").write_text("\n".join(dna + ["END", ""]))
    (inputs / "bad/noatoms.cif").write_text(text[: text.index("loop_\n_atom_site.")] + "#\n")
    (msas / "1aki_A").mkdir()
    (msas / "1aki_A/other_query.a3m").write_text(">query\nMKTAYIAKQRQISFVKSHFSRQ\n>hit\nMKTAYIAKQRQISFVKSHFSRQ\n")
    (msas / "1psm_A/zz_malformed.a3m").write_text(">query\n>hit without a sequence line\n")
    return inputs, msas


@dataclass(frozen=True)
class PrepareKit:
    """Helpers of the prepare tests, as a fixture (test modules cannot import a conftest reliably)."""

    samples_dir: Path = SAMPLES_DIR
    bad_structures: dict = None  # type: ignore[assignment]
    bad_msas: dict = None  # type: ignore[assignment]

    @staticmethod
    def make_bad_input_tree(root: Path) -> tuple[Path, Path]:
        return make_bad_input_tree(root)

    @staticmethod
    def run_protfold(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
        return run_protfold(*args, timeout=timeout)


@pytest.fixture(scope="session")
def prepare_kit() -> PrepareKit:
    return PrepareKit(bad_structures=dict(BAD_STRUCTURES), bad_msas=dict(BAD_MSAS))
