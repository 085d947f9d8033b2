"""Emulated CUDA build: the project's CUDA kernel sources compiled by the host C++ compiler.

A test tool, not part of the gam_ext package (it lives with the emulator sources in csrc/emu and
is not installed). The CUDA kernel files (csrc/cuda/*.cu) include only ``compat.cuh``; compiled by g++
with ``-DGAM_EMULATE`` they run on CPU memory through the SIMT emulation layer in csrc/emu/
(fibers for threads, real barriers, warp shuffles and votes, shared memory, ldmatrix / mma.sync /
cp.async in the PTX ISA's per-lane fragment layouts). No nvcc and
no GPU are needed. By default the module is built with AddressSanitizer, so out-of-bounds
global and shared memory accesses abort with a report.

Binding kernels (the project's own bindings are csrc/cuda/dispatch.cpp, whose -DGAM_EMULATE branch
defines the pybind module; docs/architecture.md describes the whole path)::

    # my_bindings.cpp: includes <torch/extension.h> and your torch-free launcher headers,
    # checks CPU tensors, calls the launchers with a nullptr stream, and exposes them with
    # PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def(...); }.

    import emulation  # python_tests/conftest.py puts csrc/emu on sys.path
    mod = emulation.load_emulated_module(["my_bindings.cpp"],
                                         name="gam_emulated_kernels")
    mod.my_launcher(x_cpu, ...)

``load_emulated_module`` compiles every csrc/cuda/*.cu (through generated wrapper .cpp files
that ``#include`` them), the emulator, and the extra sources you pass (paths relative to the
repository root or absolute) into one CPU torch extension under build/emulated/. Include
``<torch/extension.h>`` before any kernel header in binding files: compat.cuh defines CUDA names
(threadIdx, min/max, cuda* macros) in the global namespace.

AddressSanitizer needs its runtime loaded first in the process, so emulated tests run in a
separate pytest process, started by ``python_tests/run_emulated.sh`` (``pytest -m emulated``
with ``LD_PRELOAD`` and ``ASAN_OPTIONS`` set). In a process without it, ``load_emulated_module``
raises :class:`EmulationUnavailable`; tests should call :func:`unavailable_reason` first and
skip. ``GAM_EMU_ASAN=0`` builds without ASan (runs anywhere, catches no bounds errors).
``python csrc/emu/emulation.py shell-env`` prints that environment as shell exports (what
run_emulated.sh evaluates), so the ASan options and the preload list live only here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import types
from collections.abc import Sequence
from pathlib import Path

EMU = Path(__file__).resolve().parent
CSRC = EMU.parent
REPO_ROOT = CSRC.parent
BUILD_ROOT = REPO_ROOT / "build" / "emulated"

# The emulator: its fibers, its SIMT engine and its CUDA runtime stubs.
EMULATOR_SOURCES = (EMU / "fiber.cpp", EMU / "engine.cpp", EMU / "runtime.cpp")
SELFTEST_KERNELS = EMU / "selftest_kernels.cu"
SELFTEST_BINDINGS = EMU / "selftest_bindings.cpp"

# Options under which torch + pytest run cleanly with the ASan runtime preloaded into an
# uninstrumented Python: no leak check (the interpreter "leaks" by design), no ODR check
# (several emulated modules carry the same emulator globals), and no allocator-mismatch check
# (uninstrumented libraries mix allocators).
ASAN_OPTIONS = (
    "detect_leaks=0:detect_odr_violation=0:alloc_dealloc_mismatch=0:"
    "new_delete_type_mismatch=0:protect_shadow_gap=0:halt_on_error=1:abort_on_error=0"
)


class EmulationUnavailable(RuntimeError):
    """The emulated build cannot be loaded into this process (the message says why)."""


def asan_requested() -> bool:
    """Whether emulated modules are built with AddressSanitizer (env GAM_EMU_ASAN, default 1)."""
    return os.environ.get("GAM_EMU_ASAN", "1").strip().lower() not in ("0", "false", "no", "off")


def asan_runtime_loaded() -> bool:
    """True when the ASan runtime is already in this process (e.g. via LD_PRELOAD)."""
    try:
        return hasattr(ctypes.CDLL(None), "__asan_init")
    except OSError:
        return False


def _compiler_file(name: str) -> str | None:
    cxx = os.environ.get("CXX", "g++")
    try:
        out = subprocess.run(
            [cxx, f"-print-file-name={name}"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out if os.path.isabs(out) and os.path.exists(out) else None


def asan_preload() -> str | None:
    """LD_PRELOAD value for a Python that loads ASan-built modules, or None without libasan.

    libstdc++ is preloaded too: ASan intercepts __cxa_throw only if libstdc++ is loaded when
    the runtime starts, and the Python executable does not link it (without it the first C++
    exception aborts with "CHECK failed ... real___cxa_throw").
    """
    asan = _compiler_file("libasan.so")
    if asan is None:
        return None
    stdcxx = _compiler_file("libstdc++.so")
    return f"{asan} {stdcxx}" if stdcxx else asan


def asan_subprocess_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child Python that loads ASan-built emulated modules."""
    env = dict(os.environ if base is None else base)
    preload = asan_preload()
    if preload and preload.split()[0] not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = (preload + " " + env.get("LD_PRELOAD", "")).strip()
    env.setdefault("ASAN_OPTIONS", ASAN_OPTIONS)
    return env


def cuda_include_dir() -> Path:
    """The CUDA toolkit's include folder (only headers are used: cuda_fp16.h, vector types).

    CUDA_HOME / CUDA_PATH when set, else /usr/local/cuda, else the folder above the real nvcc
    (the nvcc on PATH may be a wrapper script living outside the toolkit), else the headers
    that the pip CUDA wheels install next to torch.
    """
    candidates: list[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            candidates.append(Path(site) / sub)
    for cand in candidates:
        if (cand / "cuda_fp16.h").is_file() and (cand / "vector_types.h").is_file():
            return cand
    raise EmulationUnavailable(
        "CUDA headers (cuda_fp16.h) not found: set CUDA_HOME to the CUDA toolkit folder"
    )


def unavailable_reason(asan: bool | None = None) -> str | None:
    """Why emulated modules cannot be loaded in this process, or None if they can."""
    use_asan = asan_requested() if asan is None else asan
    if use_asan and not asan_runtime_loaded():
        return (
            "emulated CUDA tests need the AddressSanitizer runtime preloaded: run "
            "`bash python_tests/run_emulated.sh` (or set GAM_EMU_ASAN=0 to build without ASan)"
        )
    try:
        cuda_include_dir()
    except EmulationUnavailable as exc:
        return str(exc)
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no host C++ compiler (g++) for the emulated build"
    return None


def _resolve(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return (p if p.is_absolute() else REPO_ROOT / p).resolve()


def _write_if_changed(path: Path, text: str) -> None:
    # Unchanged wrapper files keep their timestamps, so ninja does not rebuild them.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _kernel_wrappers(kernel_sources: Sequence[Path], wrapper_dir: Path) -> list[Path]:
    wrapper_dir.mkdir(parents=True, exist_ok=True)
    wrappers = []
    for src in kernel_sources:
        try:
            rel = src.relative_to(REPO_ROOT).as_posix()
        except ValueError:
            rel = src.as_posix().lstrip("/")
        stem = rel.replace("/", "__").replace(".", "_")
        wrapper = wrapper_dir / f"{stem}.cpp"
        _write_if_changed(
            wrapper,
            "// Generated by csrc/emu/emulation.py: compiles a CUDA kernel source as C++\n"
            "// against the SIMT emulation layer (-DGAM_EMULATE).\n"
            f'#include "{src.as_posix()}"\n',
        )
        wrappers.append(wrapper)
    return wrappers


def _undefined_cuda_symbols(so_path: Path) -> list[str]:
    nm = shutil.which("nm")
    if nm is None or not so_path.exists():
        return []
    out = subprocess.run([nm, "-D", "--undefined-only", str(so_path)], capture_output=True, text=True).stdout
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith("cuda") or (n.startswith("cu") and n[2:3].isupper()))


def load_emulated_module(
    extra_sources: Sequence[str | os.PathLike[str]] = (),
    name: str = "gam_emulated",
    *,
    kernel_sources: Sequence[str | os.PathLike[str]] | None = None,
    asan: bool | None = None,
    extra_cflags: Sequence[str] = (),
    verbose: bool = False,
) -> types.ModuleType:
    """JIT-build (ninja, cached under build/emulated/) and import an emulated kernel module.

    extra_sources: binding .cpp files (pybind11 on CPU tensors) and any other C++ sources.
    name: the module name; each distinct set of sources needs its own name.
    kernel_sources: CUDA sources to compile as C++; default every csrc/cuda/*.cu.
    asan: build with AddressSanitizer; default from GAM_EMU_ASAN (on). Needs the ASan runtime
        preloaded (python_tests/run_emulated.sh), else EmulationUnavailable is raised.
    """
    use_asan = asan_requested() if asan is None else asan
    reason = unavailable_reason(use_asan)
    if reason is not None:
        raise EmulationUnavailable(reason)

    # torch guesses CUDA_HOME from the nvcc on PATH (a wrapper here) and warns; point it at the
    # toolkit whose headers we use. Nothing CUDA is linked (with_cuda=False).
    os.environ.setdefault("CUDA_HOME", str(cuda_include_dir().parent))
    from torch.utils import cpp_extension  # heavy import, only when building

    if kernel_sources is None:
        kernels = sorted((CSRC / "cuda").glob("*.cu"))
    else:
        kernels = [_resolve(k) for k in kernel_sources]
    extras = [_resolve(s) for s in extra_sources]
    for src in (*kernels, *extras):
        if not src.is_file():
            raise FileNotFoundError(f"emulated build: no source file {src}")

    module_name = f"{name}_asan" if use_asan else name
    build_dir = BUILD_ROOT / module_name
    build_dir.mkdir(parents=True, exist_ok=True)
    # Wrapper names depend on the kernel list so two lists never share a build folder's wrappers.
    tag = hashlib.sha1("\n".join(map(str, kernels)).encode()).hexdigest()[:8]
    wrappers = _kernel_wrappers(kernels, build_dir / f"wrappers_{tag}")

    cflags = ["-DGAM_EMULATE", "-O1", "-g", "-fno-omit-frame-pointer"]
    cflags.append("-fvisibility=hidden")  # each emulated module keeps its own emulator
    cflags.append("-Wno-unknown-pragmas")  # `#pragma unroll` is for nvcc
    ldflags: list[str] = []
    if use_asan:
        cflags.append("-fsanitize=address")
        ldflags.append("-fsanitize=address")
    cflags.extend(extra_cflags)

    sources = [str(s) for s in (*EMULATOR_SOURCES, *wrappers, *extras)]
    try:
        module = cpp_extension.load(
            name=module_name,
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_include_paths=[str(CSRC), str(cuda_include_dir())],
            build_directory=str(build_dir),
            with_cuda=False,
            verbose=verbose,
        )
    except ImportError as exc:
        missing = _undefined_cuda_symbols(build_dir / f"{module_name}.so")
        if missing:
            raise EmulationUnavailable(
                "emulated module calls CUDA runtime functions the emulator does not provide: "
                + ", ".join(missing)
            ) from exc
        raise
    missing = _undefined_cuda_symbols(Path(module.__file__ or ""))
    if missing:
        # With libcudart already loaded by torch these would bind to the real runtime.
        raise EmulationUnavailable(
            "emulated module calls CUDA runtime functions the emulator does not provide: "
            + ", ".join(missing)
        )
    return module


def load_selftest_module(*, asan: bool | None = None, verbose: bool = False) -> types.ModuleType:
    """The emulator's own self-test kernels (csrc/emu/selftest_kernels.cu) with their bindings."""
    return load_emulated_module(
        [SELFTEST_BINDINGS],
        name="gam_emu_selftest",
        kernel_sources=[SELFTEST_KERNELS],
        asan=asan,
        verbose=verbose,
    )


def shell_env() -> str:
    """Shell exports of the ASan environment for a child pytest (what run_emulated.sh evaluates).

    Empty with GAM_EMU_ASAN=0; raises EmulationUnavailable when the compiler has no libasan.
    """
    if not asan_requested():
        return ""
    if asan_preload() is None:
        cxx = os.environ.get("CXX", "g++")
        raise EmulationUnavailable(f"{cxx} has no libasan.so; install it or set GAM_EMU_ASAN=0")
    env = asan_subprocess_env()
    return "".join(f"export {name}={shlex.quote(env[name])}\n" for name in ("ASAN_OPTIONS", "LD_PRELOAD"))


if __name__ == "__main__":
    if sys.argv[1:] != ["shell-env"]:
        sys.exit("usage: python csrc/emu/emulation.py shell-env")
    try:
        sys.stdout.write(shell_env())
    except EmulationUnavailable as exc:
        sys.exit(f"emulation.py: {exc}")
