"""Building and loading the C++ kernels (``csrc/``), once per CPU and source.

The kernels are compiled on first use with ``torch.utils.cpp_extension`` for the CPU they run on
(``-march=native``; ``SEQNORM_CPU_ARCH=x86-64-v3``, for example, builds for a stated baseline
instead). A build is cached under a directory named after the instruction set the compiler
targets and a hash of everything that makes the binary (sources, flags, the resolved target
options, the compiler, torch and Python versions), inside ``TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``): nodes of a cluster with different CPUs that share a home
directory, or a container image built on another machine, each build and load their own, and
never a library built for another CPU ("Illegal instruction" would kill the process). The
sources are copied into that directory first, so two checkouts of the same code share one build.

Concurrent first uses are safe: the build runs under an exclusive ``flock`` on a file in that
directory, which the operating system releases when its holder exits, killed or not; so a
killed build leaves no stale lock, and the next process rebuilds. A process waits at most
``SEQNORM_BUILD_TIMEOUT`` seconds (default 600) for another one's build, then gives up with an
error naming the lock file. Once built, a process loads the library directly, without locking.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

NAME = "seqnorm_cpp"
"""The library's name and its operators' namespace (``torch.ops.seqnorm_cpp``)."""
CSRC = Path(__file__).with_name("csrc")

_loaded: Path | None = None


class BuildError(RuntimeError):
    """The C++ kernels could not be built or loaded here."""


def flags(arch: str, options: list[str]) -> list[str]:
    """The compiler flags of a build for ``-march=arch``, whose resolved target options
    (:func:`target_options`) are ``options``."""
    # -fno-math-errno: sqrt sets no errno, so its loops vectorize (batch norm's running rstd of
    # every step: eval at shape A took 5-6% less)
    cflags = ["-O3", f"-march={arch}", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # GCC tunes some AMD virtual CPUs as Zen 1 and then vectorizes 4 floats wide, and AVX-512
        # CPUs 8 wide. 8 wide was a few percent faster than 4 on an earlier benchmark VM, where 16
        # gained nothing more; where the target has AVX-512, 16 wide took 4-7% off the LSTMs'
        # training step at shape A on a Zen 5 VM, whose AVX-512 units are full width
        # (benchmarks/README.md). oneDNN's products run 16 wide there anyway, so a CPU that
        # lowers its clock for AVX-512 does so already.
        width = 512 if "-mavx512f" in options else 256
        cflags.append(f"-mprefer-vector-width={width}")
    return cflags


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def target_options(arch: str) -> list[str]:
    """The target options the compiler turns ``-march=arch`` into on this machine: the resolved
    CPU name and every instruction-set extension it enables or disables."""
    try:
        result = subprocess.run(
            [_compiler(), f"-march={arch}", "-E", "-v", "-x", "c++", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"no C++ compiler ({_compiler()!r}: {error})") from error
    for line in result.stderr.splitlines():
        if "cc1" in line and " -E " in line:
            return sorted({w for w in line.split() if w.startswith(("-march=", "-m"))})
    raise BuildError(
        f"could not read the target options of {_compiler()!r} -march={arch}: {result.stderr[-500:]}"
    )


def build_directory() -> Path:
    """The cache directory of the build for this CPU, sources, compiler, torch and Python."""
    arch = os.environ.get("SEQNORM_CPU_ARCH", "native")
    options = target_options(arch)
    resolved = next((o.split("=", 1)[1] for o in options if o.startswith("-march=")), arch)
    digest = hashlib.sha256()
    for source in sorted(CSRC.iterdir()):
        digest.update(source.name.encode() + source.read_bytes())
    for part in (*flags(arch, options), *options, _compiler(), torch.__version__, sys.version):
        digest.update(part.encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "seqnorm" / f"{resolved}-{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def _exclusive(lock: Path, timeout: float):
    """Hold an exclusive ``flock`` on ``lock``, released by the OS if this process dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): builds are not guarded against each other
        yield
        return
    with open(lock, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildError(
                        f"waited {timeout:.0f} s for another process to build the C++ kernels "
                        f"(it holds {lock}); if no build is running, delete that file"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def loaded() -> bool:
    """Whether this process has loaded the kernels (:func:`load` did)."""
    return _loaded is not None


def load() -> Path:
    """Build the kernels if this machine has no build of them yet, and load them.

    Returns the library's path. Raises :class:`BuildError` if they cannot be built or loaded.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    directory = build_directory()
    library = directory / f"{NAME}.so"
    done = directory / "built"  # written after a whole build; a killed build leaves none
    if not done.exists():
        directory.mkdir(parents=True, exist_ok=True)
        timeout = float(os.environ.get("SEQNORM_BUILD_TIMEOUT", "600"))
        with _exclusive(directory / "build.lock", timeout):
            if not done.exists():
                _build(directory)
                done.write_text(f"{torch.__version__}\n")
    try:
        torch.ops.load_library(str(library))
    except OSError as error:
        raise BuildError(f"could not load {library}: {error}; delete {directory}") from error
    _loaded = library
    return library


def _build(directory: Path) -> None:
    from torch.utils.cpp_extension import load as jit_load

    # Our flock excludes every other seqnorm build of this directory, so a lock file of
    # torch's own left here is a killed build's: it would make torch wait forever.
    (directory / "lock").unlink(missing_ok=True)
    sources = []
    for source in CSRC.iterdir():  # copies: the build file names these, not the checkout's path
        shutil.copyfile(source, directory / source.name)
        if source.suffix == ".cpp":
            sources.append(str(directory / source.name))
    arch = os.environ.get("SEQNORM_CPU_ARCH", "native")
    try:
        jit_load(
            NAME,
            sorted(sources),
            extra_cflags=flags(arch, target_options(arch)),
            extra_ldflags=["-lgomp"],  # the libgomp.so.1 torch itself loads
            build_directory=str(directory),
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no ninja, no headers, a compile error
        raise BuildError(f"{type(error).__name__}: {error}") from error
