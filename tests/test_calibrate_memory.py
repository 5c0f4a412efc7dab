"""calibrate.memory: during calibration large tensors get their own mapping, returned to the
operating system when freed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from netshrink.calibrate.memory import _libc

# Run in a fresh interpreter: in a long-lived one the heap may already hold a free chunk large
# enough to serve the tensor, which glibc reuses before it considers a new mapping.
SCENARIO = textwrap.dedent(
    """
    import ctypes
    import torch
    from netshrink.calibrate.memory import _libc, large_tensors_unmapped

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    lib = _libc()
    lib.mallinfo2.restype = Mallinfo2

    def mapped():
        return int(lib.mallinfo2().hblkhd)

    big = torch.ones(4 << 20)  # a freed 16 MiB mapping: the dynamic threshold rises to 16 MiB
    del big
    before = mapped()
    outside = torch.ones(2 << 20)  # 8 MiB: from the heap
    print(mapped() - before)
    with large_tensors_unmapped():
        before = mapped()
        inside = torch.ones(2 << 20)  # 8 MiB: its own mapping
        print(mapped() - before)
        del inside
        print(mapped() - before)  # unmapped: out of the resident set
    """
)


@pytest.mark.skipif(_libc() is None, reason="glibc's mallopt/malloc_trim only")
def test_inside_large_tensors_are_mapped_and_unmapped_when_freed() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCENARIO], capture_output=True, text=True, check=True, timeout=120
    )
    outside, inside, freed = (int(line) for line in run.stdout.split())
    assert outside < 1 << 20
    assert inside >= 8 << 20
    assert freed < 1 << 20


class _Recorder:
    """A stand-in C library that records its ``mallopt`` calls and answers ``taken`` (glibc: 1
    when it took the value, 0 when it left the threshold as it was)."""

    def __init__(self, taken: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.taken = taken

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.taken

    def malloc_trim(self, _pad: int) -> int:
        return 1


def test_nested_use_leaves_the_threshold_to_the_outermost(monkeypatch) -> None:
    from netshrink.calibrate import memory

    lib = _Recorder()
    monkeypatch.setattr(memory, "_libc", lambda: lib)
    monkeypatch.setattr(memory, "_in_force", [])
    monkeypatch.setattr(memory, "_start_environment", dict)
    with memory.large_tensors_unmapped(1 << 20):
        with memory.large_tensors_unmapped(1 << 20):
            assert lib.calls == [(memory.M_MMAP_THRESHOLD, 1 << 20)]
        assert lib.calls == [(memory.M_MMAP_THRESHOLD, 1 << 20)]  # the inner exit left it
    assert lib.calls[-1] == (memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD_MAX)
    assert len(lib.calls) == 2


# The environment fixes glibc's threshold at 4 MiB: an 8 MiB tensor is its own mapping before
# and after the calibration block (the former exit left 32 MiB, and it came from the heap).
RESTORED = textwrap.dedent(
    """
    import torch
    from netshrink.calibrate.memory import large_tensors_unmapped

    def own_mapping():
        before = mapped()
        x = torch.ones(2 << 20)  # 8 MiB
        grew = mapped() - before
        del x
        return grew >= 8 << 20

    print(own_mapping())
    with large_tensors_unmapped():
        print(own_mapping())
    print(own_mapping())
    """
)


@pytest.mark.skipif(_libc() is None, reason="glibc's mallopt/malloc_trim only")
def test_exit_restores_the_threshold_the_environment_fixed() -> None:
    mapped = SCENARIO.split("big = ")[0]  # the mallinfo2 reader
    code = mapped + RESTORED
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
        env=env,
    )  # fmt: skip
    assert run.stdout.split() == ["True", "True", "True"]


def test_the_threshold_in_force_is_restored_on_exit(monkeypatch) -> None:
    from netshrink.calibrate import memory

    lib = _Recorder()
    monkeypatch.setattr(memory, "_libc", lambda: lib)
    monkeypatch.setattr(memory, "_in_force", [])
    tunables = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=0x200000:glibc.x=1"}
    monkeypatch.setattr(memory, "_start_environment", lambda: tunables)
    with memory.large_tensors_unmapped(1 << 20):
        pass
    assert lib.calls == [(memory.M_MMAP_THRESHOLD, 1 << 20), (memory.M_MMAP_THRESHOLD, 2 << 20)]
    monkeypatch.setattr(memory, "_start_environment", dict)
    with memory.large_tensors_unmapped(1 << 20):  # the value the first exit left
        pass
    assert lib.calls[-1] == (memory.M_MMAP_THRESHOLD, 2 << 20)


def test_a_threshold_mallopt_refused_is_not_recorded_as_in_force(monkeypatch) -> None:
    from netshrink.calibrate import memory

    monkeypatch.setattr(memory, "_libc", lambda: _Recorder(taken=0))
    monkeypatch.setattr(memory, "_in_force", [])
    monkeypatch.setattr(memory, "_start_environment", dict)
    with memory.large_tensors_unmapped(1 << 20):
        pass
    assert memory._in_force == []


def test_the_threshold_is_read_from_the_environment_the_process_started_with() -> None:
    code = (
        "import os\n"
        "from netshrink.calibrate.memory import environment_threshold\n"
        "os.environ['MALLOC_MMAP_THRESHOLD_'] = '4096'  # too late: glibc has started\n"
        "print(environment_threshold())\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    env.pop("GLIBC_TUNABLES", None)
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
        env=env,
    )  # fmt: skip
    assert run.stdout.split() == [str(4 << 20)]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"MALLOC_MMAP_THRESHOLD_": "4194304"}, 4 << 20),
        (
            {"MALLOC_MMAP_THRESHOLD_": "1", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"},
            4096,
        ),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4096"}, None),
        ({"MALLOC_MMAP_THRESHOLD_": "lots"}, None),
        ({"MALLOC_MMAP_THRESHOLD_": str(1 << 30)}, 32 << 20),
    ],
)
def test_environment_threshold(environ: dict[str, str], expected: int | None) -> None:
    from netshrink.calibrate.memory import environment_threshold

    assert environment_threshold(environ) == expected
