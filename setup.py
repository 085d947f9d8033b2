"""Build of gam_ext and its compiled extension gam_ext._C (op registry, CPU kernels, CUDA kernels).

Environment knobs:
  GAM_EXT_SKIP_CUDA=1    build without the CUDA sources even where a toolkit is found
  GAM_EXT_FORCE_CUDA=1   build the CUDA sources; fail if that is impossible (no CUDA torch, no
                         toolkit, or one of another major CUDA version than torch's)
  TORCH_CUDA_ARCH_LIST   architectures to compile for (default: the visible GPU's, or a list
                         from 7.5 to 12.0 plus PTX when no GPU is visible)
  MAX_JOBS               parallel compile jobs (ninja)
  CUDA_HOME              the CUDA toolkit; found from nvcc when unset
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"

# pyproject.toml's `license` is an SPDX expression (PEP 639), which setuptools reads from 77 on; an
# older one (Python 3.11's venv ships 65) rejects it with a schema dump. Under --no-build-isolation
# the environment's setuptools builds, whatever [build-system] requires, so say what to do here.
MIN_SETUPTOOLS = (77, 0)


def version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '65.5.0' or '80.0rc1'."""
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in version.split(".")[:2])


if version_tuple(setuptools.__version__) < MIN_SETUPTOOLS:
    sys.exit(
        f"gam_ext needs setuptools >= {'.'.join(map(str, MIN_SETUPTOOLS))} to build, and this "
        f"environment has {setuptools.__version__} (a build without isolation uses the "
        "environment's own). Upgrade it, then build again: "
        "`pip install -U 'setuptools>=77' wheel && pip install --no-build-isolation .`"
    )

try:
    import torch
except ImportError:
    sys.exit(
        "gam_ext builds against the PyTorch of the environment it is installed into, and none was "
        "found. Install PyTorch first (`pip install torch`), then build gam_ext without build "
        "isolation: `pip install --no-build-isolation .`"
    )


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_toolkit(folder: str | None) -> bool:
    """A CUDA toolkit root holds bin/nvcc, its headers and libcudart side by side.

    (/usr/local, with a wrapper nvcc in /usr/local/bin and some lib/, is not one.)
    """
    if not folder:
        return False
    root = Path(folder)
    has_cudart = any(glob.glob(str(root / lib / "libcudart.so*")) for lib in ("lib64", "lib"))
    return (
        (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file() and has_cudart
    )


def find_cuda_home() -> str | None:
    """CUDA_HOME if set; else the toolkit behind the nvcc on PATH, even when that nvcc is a wrapper.

    torch guesses the folder above the nvcc on PATH, which is wrong when nvcc is a wrapper script
    living outside the toolkit: ask nvcc itself where its toolkit is (its dry-run prints TOP=...).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates: list[str] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        try:
            dry_run = subprocess.run(
                [nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60
            )
            for line in (dry_run.stdout + dry_run.stderr).splitlines():
                if "TOP=" in line:
                    candidates.append(os.path.realpath(line.split("TOP=", 1)[1].strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((c for c in candidates if is_toolkit(c)), None)


def read_sources() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {"common": [], "cpu": [], "cuda": []}
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            group, path = line.split()
            groups[group].append(path)
    return groups


def toolkit_version(cuda_home: str) -> str | None:
    """The toolkit's CUDA version ("13.0") from its nvcc, or None if nvcc does not say."""
    try:
        out = subprocess.run(
            [str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def want_cuda(cuda_home: str | None) -> bool:
    if env_flag("GAM_EXT_SKIP_CUDA"):
        return False
    why_not = None
    if torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        why_not = "no CUDA toolkit was found (set CUDA_HOME, or put its nvcc on PATH)"
    else:
        # torch.utils.cpp_extension refuses a toolkit of another major version than torch's.
        toolkit, torch_major = toolkit_version(cuda_home), torch.version.cuda.split(".")[0]
        if toolkit and toolkit.split(".")[0] != torch_major:
            why_not = (
                f"the toolkit at {cuda_home} is CUDA {toolkit} and torch {torch.__version__} was "
                f"built with CUDA {torch.version.cuda}: install a CUDA {torch_major} toolkit and "
                "point CUDA_HOME at it"
            )
    if why_not is None:
        return True
    if env_flag("GAM_EXT_FORCE_CUDA"):
        sys.exit(f"GAM_EXT_FORCE_CUDA=1 but the CUDA sources cannot be built: {why_not}")
    if torch.version.cuda is not None:  # a CUDA torch: say why its kernels are left out
        print(f"gam_ext: the CUDA kernels are left out of this build: {why_not}", file=sys.stderr)
    return False


def extra_cuda_include_dirs(cuda_home: str) -> list[str]:
    """ATen's CUDA headers include cusparse.h; pip's nvidia wheels hold it where the toolkit lacks it."""
    if (Path(cuda_home) / "include" / "cusparse.h").is_file():
        return []
    # The toolkit's own include folder first: the wheels' cuda_runtime.h lacks the crt/ headers.
    site_packages = Path(torch.__file__).parent.parent
    wheel_dirs = glob.glob(str(site_packages / "nvidia" / "*" / "include"))
    found = [str(Path(cuda_home) / "include")]
    found += [d for d in wheel_dirs if Path(d, "cusparse.h").is_file()]
    return found


def shared_cxx_runtime() -> list[str]:
    """Link _C against the libstdc++ that torch runs with, named by path.

    A toolchain whose own library folder holds only libstdc++.a (the GPU machines' image does)
    links a private copy of the C++ runtime into _C; every exception that then crosses into torch
    (each TORCH_CHECK error) crashes the process or loses its message. The shared library named
    before the driver's own -lstdc++ resolves every runtime symbol, so nothing is taken from an
    archive.
    """
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as maps:  # torch is imported: its libstdc++ is mapped
            loaded = {line.split()[-1] for line in maps if "libstdc++.so" in line}
    except OSError:
        return []
    return sorted(loaded)[:1]


def build_extensions() -> tuple[list, dict]:
    cuda_home = find_cuda_home()
    with_cuda = want_cuda(cuda_home)
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = read_sources()
    csrc = str(ROOT / "csrc")
    # C++20 as torch >= 2.14 needs, on every torch. -fno-wrapv undoes the -fwrapv of Python's own
    # CFLAGS, which the extension inherits: with wrapping signed ints GCC cannot bound the trip
    # counts of the int64 loops and left reductions such as row_dot (cpu_common.h) scalar.
    cxx_flags = ["-O3", "-fno-wrapv", "-fopenmp", "-std=c++20"]
    link_flags = ["-fopenmp"] + shared_cxx_runtime()
    kwargs = dict(
        name="gam_ext._C",
        include_dirs=[csrc],
        extra_link_args=link_flags,
    )
    if with_cuda:
        kwargs["sources"] = sources["common"] + sources["cpu"] + sources["cuda"]
        kwargs["include_dirs"] += extra_cuda_include_dirs(cuda_home)
        kwargs["extra_compile_args"] = {
            "cxx": cxx_flags + ["-DGAM_EXT_WITH_CUDA"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DGAM_EXT_WITH_CUDA"],
        }
        extension = CUDAExtension(**kwargs)
    else:
        kwargs["sources"] = sources["common"] + sources["cpu"]
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        extension = CppExtension(**kwargs)
    print(
        f"gam_ext: building {'with' if with_cuda else 'without'} CUDA sources "
        f"(CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})"
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = build_extensions()

setup(
    packages=find_packages(include=["gam_ext", "gam_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
