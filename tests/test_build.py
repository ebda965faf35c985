"""Building the C++ kernel: once per instruction set, safe when processes start together, never
a wait without end, and a clear failure (tests that need the kernel fail, they do not skip)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import seqnorm
from seqnorm.ops import backend as backends
from seqnorm.ops import cpp

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from seqnorm.ops import cpp
    with cpp._exclusive(Path(sys.argv[1]), timeout=5):
        print("held", flush=True)
        time.sleep(60)
    """
)


def test_the_kernel_builds_here():
    """The C++ kernel must build on the CI machine: no skip hides a broken kernel."""
    library = cpp.load()
    assert library.exists() and library.parent == cpp.build_directory()
    assert seqnorm.ops.choose("cpp", torch.zeros(1, 1, 1), [], False) == "cpp"


def test_build_directory_is_keyed_on_the_instruction_set(monkeypatch):
    """Two CPUs whose compiler enables different extensions get different builds (a library
    built for AVX-512 is never loaded on an AVX2 machine), named after the resolved CPU."""
    avx512 = ["-march=znver4", "-mavx2", "-mavx512f"]
    avx2 = ["-march=znver2", "-mavx2", "-mno-avx512f"]
    monkeypatch.setattr(cpp, "target_options", lambda arch: avx512)
    first = cpp.build_directory()
    monkeypatch.setattr(cpp, "target_options", lambda arch: avx2)
    second = cpp.build_directory()
    assert first != second
    assert first.name.startswith("znver4-") and second.name.startswith("znver2-")
    monkeypatch.setattr(cpp, "target_options", lambda arch: ["-mavx2", "-mno-avx512f"])
    monkeypatch.setenv("SEQNORM_CPU_ARCH", "x86-64-v3")
    assert cpp.build_directory().name.startswith("x86-64-v3-")


def test_loops_vectorize_as_wide_as_the_target_allows(monkeypatch):
    """16 floats wide where the compiler targets AVX-512, else 8 (GCC would pick 4 for some AMD
    virtual CPUs); the width is one of the flags the build directory is keyed on."""
    monkeypatch.setattr(cpp.platform, "machine", lambda: "x86_64")
    avx512 = cpp.flags("native", ["-march=znver3", "-mavx2", "-mavx512f"])
    avx2 = cpp.flags("native", ["-march=znver3", "-mavx2", "-mno-avx512f"])
    assert "-mprefer-vector-width=512" in avx512 and "-mprefer-vector-width=256" in avx2
    assert len(avx512) == len(avx2) == 6


def test_target_options_come_from_the_compiler():
    options = cpp.target_options("native")
    assert any(o.startswith("-march=") for o in options) and len(options) > 1


@pytest.mark.slow
def test_a_held_build_lock_times_out_with_an_error_naming_it(tmp_path):
    lock = tmp_path / "build.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with (
            pytest.raises(
                cpp.BuildError, match=rf"waited 1 s for another process.*{lock}.*delete that file"
            ),
            cpp._exclusive(lock, timeout=1),
        ):
            pass
        assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_killed_build_leaves_no_stale_lock(tmp_path):
    """The lock is an flock: the OS releases it when its holder dies, even by SIGKILL (a build
    interrupted by Ctrl-C or the OOM killer), so the next process does not wait."""
    lock = tmp_path / "build.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lock.exists()
    start = time.monotonic()
    with cpp._exclusive(lock, timeout=5):
        pass
    assert time.monotonic() - start < 1


def test_a_stale_lock_of_torch_is_removed_before_building(tmp_path, monkeypatch):
    """torch.utils.cpp_extension waits forever on a lock file a killed build left behind; under
    seqnorm's own lock none can be live, so it is removed first."""
    import torch.utils.cpp_extension

    (tmp_path / "lock").write_text("")
    seen = {}

    def fake_build(name, sources, **kwargs):
        seen["lock"] = (tmp_path / "lock").exists()
        seen["sources"] = sources

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_build)
    cpp._build(tmp_path)
    assert seen["lock"] is False
    # the build compiles copies inside its own directory, not the checkout's files
    assert all(Path(s).parent == tmp_path for s in seen["sources"])


def test_a_failed_build_falls_back_with_a_warning_or_fails_when_asked_for(monkeypatch):
    def broken():
        raise cpp.BuildError("no compiler here")

    monkeypatch.setattr(cpp, "load", broken)
    monkeypatch.setattr(backends, "_unavailable", {})
    monkeypatch.setattr(backends, "_warned", set())
    lstm = seqnorm.LSTM(4, 8)
    with pytest.warns(
        RuntimeWarning,
        match=r"Python loop because the cpp kernels are unavailable \(no compiler here\)",
    ):
        out, _ = lstm(torch.randn(3, 2, 4))
    assert out.shape == (3, 2, 8)
    lstm.backend = "cpp"
    with pytest.raises(
        RuntimeError,
        match=r"backend='cpp' cannot run here: the cpp kernels are unavailable \(no compiler here\)",
    ):
        lstm(torch.randn(3, 2, 4))


@pytest.mark.slow
def test_processes_starting_together_build_once(tmp_path):
    """Two processes with an empty extension cache start at once: one builds, the other waits
    for it and loads the same library; both compute."""
    script = "import torch, seqnorm; m = seqnorm.LSTM(3, 4); m.backend = 'cpp'; print(m(torch.randn(2, 1, 3))[0].shape)"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        assert "torch.Size([2, 1, 4])" in out
    (build,) = (tmp_path / "seqnorm").iterdir()
    assert (build / "built").exists() and (build / "seqnorm_cpp.so").exists()
