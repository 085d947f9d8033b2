"""The build: CUDA sources compiled where a toolkit and a CUDA torch exist, clear failure without torch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gam_ext

ROOT = Path(__file__).resolve().parent.parent


def cuda_build_expected() -> bool:
    skip = os.environ.get("GAM_EXT_SKIP_CUDA", "").lower() in ("1", "true", "yes", "on")
    return not skip and torch.version.cuda is not None and shutil.which("nvcc") is not None


@pytest.mark.skipif(not cuda_build_expected(), reason="no nvcc or no CUDA-enabled torch here")
def test_cuda_sources_were_compiled():
    info = gam_ext.backend_info()
    assert info["cuda_compiled"], (
        "nvcc and a CUDA torch are present but gam_ext._C was built without its CUDA sources"
    )


@pytest.mark.skipif(not cuda_build_expected(), reason="no nvcc or no CUDA-enabled torch here")
def test_setup_finds_a_real_toolkit():
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    out = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"building with CUDA sources \(CUDA_HOME=(\S+),", out)
    assert match, out
    home = Path(match.group(1))
    assert (home / "bin" / "nvcc").is_file()
    assert (home / "lib64").is_dir() or (home / "lib").is_dir()


@pytest.mark.skipif(not cuda_build_expected(), reason="no nvcc or no CUDA-enabled torch here")
@pytest.mark.parametrize("force", [False, True])
def test_setup_with_a_toolkit_of_another_major_version(force):
    # torch.utils.cpp_extension refuses to build then: setup.py builds the CPU kernels and says
    # why, or stops with the reason under GAM_EXT_FORCE_CUDA=1.
    code = (
        "import runpy, sys, torch; torch.version.cuda = '99.0'; sys.argv = ['setup.py', '--name']; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    env = {**os.environ, "GAM_EXT_FORCE_CUDA": "1" if force else "0"}
    env.pop("GAM_EXT_SKIP_CUDA", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    reason = re.search(
        r"is CUDA \d+\.\d+ and torch \S+ was built with CUDA 99\.0: install a CUDA 99 toolkit", out.stderr
    )
    assert reason, out.stderr
    if force:
        assert (
            out.returncode != 0 and "GAM_EXT_FORCE_CUDA=1 but the CUDA sources cannot be built" in out.stderr
        )
    else:
        assert out.returncode == 0, out.stderr
        assert "the CUDA kernels are left out of this build" in out.stderr
        assert "building without CUDA sources" in out.stdout


def test_setup_without_torch_says_what_to_do():
    code = "import runpy, sys; sys.modules['torch'] = None; runpy.run_path('setup.py')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "pip install --no-build-isolation ." in out.stderr


def test_setup_with_old_setuptools_says_what_to_do():
    # Python 3.11's venv ships setuptools 65, which cannot read pyproject.toml's SPDX license.
    code = "import runpy, setuptools; setuptools.__version__ = '65.5.0'; runpy.run_path('setup.py')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "has 65.5.0" in out.stderr
    assert "pip install -U 'setuptools>=77'" in out.stderr


def compiled_module() -> Path:
    try:
        from gam_ext import _C
    except ImportError:
        pytest.skip("gam_ext._C is not built")
    return Path(_C.__file__)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="needs Linux and binutils' nm"
)
def test_module_shares_torchs_cxx_runtime():
    # A compiler driver that adds -static-libstdc++ puts a private C++ runtime into _C; then every
    # TORCH_CHECK error that crosses into torch crashes the process or loses its message.
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(compiled_module())], capture_output=True, text=True, check=True
    ).stdout
    assert not re.search(r"\s__cxa_throw\b", symbols), "gam_ext._C carries its own libstdc++"


def test_kernel_errors_reach_python_whole():
    compiled_module()
    x = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match="weight has 4 channels but x has D=8"):
        torch.ops.gam_ext.causal_conv1d_fwd(x, torch.zeros(4, 3), None)


def test_the_package_does_not_ship_the_emulator():
    # The SIMT emulator and its driver (csrc/emu/emulation.py) are test tools: setup.py packages
    # gam_ext only, and nothing of the emulator lives there.
    from setuptools import find_packages

    packages = find_packages(str(ROOT), include=["gam_ext", "gam_ext.*"])
    assert packages == ["gam_ext"]
    modules = [p.name for p in (ROOT / "gam_ext").rglob("*.py")]
    assert not [m for m in modules if "emu" in m], modules
