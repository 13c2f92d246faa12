from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from pipeline import files, machine
from pipeline.errors import UserError


def test_pick_device() -> None:
    assert machine.pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert machine.pick_device("auto").type == expected
        with pytest.raises(UserError, match="no CUDA GPU is available"):
            machine.pick_device("cuda")


@pytest.mark.parametrize(("flags", "native"), [("fpu sse avx512f avx512_bf16 avx512vl", True),
                                                ("fpu amx_bf16 amx_tile", True),
                                                ("fpu sse avx512f avx512_bf16x avx2", False)])  # fmt: skip
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(
    flags: str, native: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    real_path = machine.Path
    monkeypatch.setattr(machine, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    machine.cpu_has_native_bf16.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert machine.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
        assert machine.resolve_precision("fp32", cpu) == "fp32" and machine.resolve_precision("bf16", cpu) == "bf16"
        assert machine.resolve_precision("auto", torch.device("mps")) == "fp32"
    finally:
        machine.cpu_has_native_bf16.cache_clear()


def test_atomic_write_leaves_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_open(target) as fh:
            fh.write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    state = {"w": torch.arange(5.0), "step": 3, "name": "x", "nested": {"a": [1, 2]}}
    files.save_checkpoint(state, tmp_path / "c.pt")
    loaded = files.load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["nested"] == {"a": [1, 2]}


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_checkpoint_is_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "c.pt"
    files.save_checkpoint({"w": torch.randn(100)}, path)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[:-10]
    elif damage == "flip":
        blob[200] ^= 0x01
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    with pytest.raises(UserError, match=r"checkpoint .* (truncated|checksum)"):
        files.load_checkpoint(path)


class Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickled_payload_is_never_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile file with a valid checksum still only loads through the weights-only unpickler."""
    import hashlib
    import io

    monkeypatch.chdir(tmp_path)
    buffer = io.BytesIO()
    torch.save({"evil": Boom()}, buffer)
    body = buffer.getvalue()
    (tmp_path / "c.pt").write_bytes(body + b"\nDCGAN-SHA256:" + hashlib.sha256(body).hexdigest().encode())
    with pytest.raises(UserError, match="holds something other than weights"):
        files.load_checkpoint(tmp_path / "c.pt")
    assert not (tmp_path / "PWNED").exists()
    assert zipfile.is_zipfile(io.BytesIO(body))  # a real torch file, not garbage


def test_fingerprint_is_stable_and_sensitive() -> None:
    assert files.fingerprint({"a": 1}, "x") == files.fingerprint({"a": 1}, "x")
    assert files.fingerprint({"a": 1}, "x") != files.fingerprint({"a": 2}, "x")


FAULTS_PER_STEP = """
import resource, sys, torch
from pipeline import machine
kept = machine.keep_freed_memory() if sys.argv[1] == "keep" else None
def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step() -> None:  # as a training step at batch 128: large tensors alive together, then freed
    tensors = [torch.empty(n << 20, dtype=torch.bfloat16) for n in (16, 8, 17, 4, 16)]
    for t in tensors:
        t.fill_(1)
per_step = []
for _ in range(14):
    before = faults()
    step()
    per_step.append(faults() - before)
print(kept, sum(per_step[-8:]) / 8)  # the first steps grow the heap to its peak
"""


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="glibc malloc on Linux")
def test_freed_memory_is_reused_without_page_faults() -> None:
    import subprocess
    import sys

    def run(mode: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True)
        kept, faults = out.stdout.split()
        return kept, float(faults)

    default, kept = run("default"), run("keep")
    assert kept[0] == "True"
    assert default[1] > 10_000  # 122 MiB in fresh 4 KiB pages: ~27,000 faults a step
    assert kept[1] < default[1] / 5  # the heap reused (it still grows now and then: fragments)
