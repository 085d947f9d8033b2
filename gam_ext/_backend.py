"""Which implementation runs each op: the compiled kernels or the pure-PyTorch reference.

The compiled extension ``gam_ext._C`` registers the ops ``torch.ops.gam_ext.*`` with a kernel per
device it was built for. An op runs its kernel when one is registered for the tensor's device and the
backend allows it; otherwise it runs ``gam_ext.reference``. Backends:

- ``auto`` (the default): every kernel that is built; the mixer (``gam_mixer``, and so
  ``gam_block`` and ``GAMBlock``) runs the fused op ``gam_mixer_fwd`` / ``gam_mixer_bwd`` where
  it measured faster than the three ops: on the CPU always, on CUDA up to
  ``AUTO_FUSED_MAX_ELEMENTS`` elements of h (B*N*D). On an H200 (B=16 D=S=512 bf16,
  csrc/cuda/README.md) the fused op took 1.28 / 1.02 ms fwd+bwd at N=256 / 1024 against 1.62 /
  1.54 for the three ops, whose many small launches dominate there, and 2.06 / 3.80 against
  1.74 / 2.96 at N=4096 / 8192;
- ``fused``: the same kernels, with the fused mixer op on every device that has it;
- ``unfused``: the same kernels, with the mixer as three ops (conv, retrieval, gate fusion) and a
  gate linear on every device;
- ``reference``: every op on the pure-PyTorch reference.

Set ``GAM_EXT_BACKEND`` in the environment, or call ``gam_ext.set_backend(name)``.
"""

from __future__ import annotations

import glob
import importlib
import importlib.machinery
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

BACKENDS = ("auto", "fused", "unfused", "reference")
# The forward ops behind the three public primitives and the fused mixer; each has a matching
# *_bwd op.
OPS = ("causal_conv1d", "memory_retrieval", "gate_fusion", "gam_mixer")
# The fused ops, which the "unfused" backend leaves out everywhere and "auto" above
# AUTO_FUSED_MAX_ELEMENTS elements of the activations on the devices listed there (where the
# composition of the primitive kernels measured faster at that size; no limit elsewhere).
FUSED_OPS = ("gam_mixer",)
AUTO_FUSED_MAX_ELEMENTS = {"cuda": 16384 * 512}
# The inference-only ops of the one-token step (generation): one op each, no backward.
STEP_OPS = ("causal_conv1d_update", "gam_mixer_step")
DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# The dtypes each device's kernels take; others (float64 on CUDA) run the reference.
KERNEL_DTYPES = {
    "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}


def _explain_import_error(exc: ImportError) -> str:
    """One line: why gam_ext._C did not load, and what to do about it."""
    here = os.path.dirname(os.path.abspath(__file__))
    if isinstance(exc, ModuleNotFoundError) and exc.name == "gam_ext._C":
        why = f"the compiled extension gam_ext._C is not built in {here}"
        # A source tree on sys.path (the current directory comes first) hides an installed copy.
        parent = os.path.dirname(here)
        others = [p for p in sys.path if os.path.abspath(p or os.curdir) != parent]
        spec = importlib.machinery.PathFinder.find_spec("gam_ext", others)
        installed = (
            None
            if spec is None or not spec.submodule_search_locations
            else list(spec.submodule_search_locations)[0]
        )
        if installed and glob.glob(os.path.join(installed, "_C.*")):
            todo = (
                f"it hides the built gam_ext installed at {installed}: run from another "
                "directory than the source tree, or build the tree in place with "
                "`python setup.py build_ext --inplace` (or `make build`)"
            )
        else:
            todo = (
                "build it with `pip install --no-build-isolation .` (then run from outside "
                "the source tree), or in place with `python setup.py build_ext --inplace` "
                "(or `make build`)"
            )
    else:
        message = " ".join(str(exc).split())
        why = f"the compiled extension gam_ext._C in {here} failed to load: {message}"
        todo = (
            f"rebuild it against this PyTorch ({torch.__version__}) with "
            "`pip install --no-build-isolation .` or `make build`"
        )
    return f"{why}; every op runs the pure-PyTorch reference. To fix: {todo}"


_extension: Any = None
_extension_error: str | None = None
try:
    # Importing registers the ops. (``from gam_ext import _C`` would report a missing module as
    # "a circular import"; import_module gives the real error.)
    _extension = importlib.import_module("gam_ext._C")
except ImportError as exc:  # pragma: no cover - depends on the build
    _extension_error = _explain_import_error(exc)
    if os.environ.get("GAM_EXT_QUIET") != "1":
        warnings.warn(f"gam_ext: {_extension_error}", stacklevel=2)


def _missing_cuda_kernels(cuda_compiled: bool, cuda_available: Callable[[], bool]) -> str | None:
    """What to tell a user whose GPU would run the reference: _C was built without CUDA sources.

    cuda_available (torch.cuda.is_available, which queries the driver) is asked only then."""
    if cuda_compiled or not cuda_available():
        return None
    major = (torch.version.cuda or "").split(".")[0] or "matching"
    return (
        f"gam_ext._C in {os.path.dirname(os.path.abspath(__file__))} was built without its CUDA "
        "kernels, so ops on CUDA tensors run the pure-PyTorch reference (slower, more memory). "
        f"To fix: rebuild where a CUDA {major} toolkit is installed, with "
        "`GAM_EXT_FORCE_CUDA=1 pip install --no-build-isolation .` (it stops with the reason if it "
        "cannot build them); set GAM_EXT_QUIET=1 to keep the CPU-only build quietly"
    )


if _extension is not None and os.environ.get("GAM_EXT_QUIET") != "1":
    _cuda_message = _missing_cuda_kernels(_extension.cuda_compiled(), torch.cuda.is_available)
    if _cuda_message:
        warnings.warn(f"gam_ext: {_cuda_message}", stacklevel=2)


def _has_kernel(op: str, device_type: str) -> bool:
    if _extension is None:
        return False
    names = [op] if op in STEP_OPS else [f"{op}_{direction}" for direction in ("fwd", "bwd")]
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"gam_ext::{name}", DEVICE_KEYS[device_type])
        for name in names
    )


# Computed once at import so that torch.compile reads a plain dict, not a C++ query.
_KERNELS: dict[str, dict[str, bool]] = {
    device: {op: _has_kernel(op, device) for op in OPS + STEP_OPS} for device in DEVICE_KEYS
}


def _backend_from_env() -> str:
    name = os.environ.get("GAM_EXT_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"GAM_EXT_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _backend_from_env()


def set_backend(name: str) -> str:
    """Select ``"auto"`` (kernels where built, else reference; the fused mixer where it is the
    faster), ``"fused"`` / ``"unfused"`` (the same with the fused mixer op on every device / on
    none) or ``"reference"``; returns the old one."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    return previous


def get_backend() -> str:
    return _backend


def within_auto_fused_limit(device_type: str, elements: int | None) -> bool:
    """True when the backend ``auto`` runs the fused ops on ``device_type`` at ``elements``
    elements of the activations (any size where the device has no limit; none unknown where it
    has one)."""
    limit = AUTO_FUSED_MAX_ELEMENTS.get(device_type)
    return limit is None or (elements is not None and elements <= limit)


def use_kernel(
    op: str, device_type: str, dtype: torch.dtype | None = None, elements: int | None = None
) -> bool:
    """True when ``op`` on ``device_type`` tensors (of ``dtype``; ``elements`` in its activations)
    runs the compiled kernel. A fused op under ``auto`` on a device with a size limit runs only
    when ``elements`` is given and within it."""
    if _backend == "reference" or not _KERNELS.get(device_type, {}).get(op, False):
        return False
    if op in FUSED_OPS and _backend != "fused":
        if _backend == "unfused" or not within_auto_fused_limit(device_type, elements):
            return False
    return dtype is None or dtype in KERNEL_DTYPES[device_type]


def cpu_bf16_products(dtype: torch.dtype) -> bool:
    """True when the CPU kernels run the products of ``dtype`` inputs on the CPU's bf16 matrix
    units (bfloat16, a torch with a bf16 micro-kernel for this CPU, GAM_EXT_CPU_BF16_GEMM not
    forcing fp32 tiles)."""
    return dtype == torch.bfloat16 and _extension is not None and _extension.cpu_bf16_gemm() == "bf16"


def _retrieval_path(slots: int, dim: int, dtype: torch.dtype) -> dict[str, Any]:
    """Which implementation of memory_retrieval each device runs for S slots, width D and dtype."""
    path: dict[str, Any] = {}
    for device in DEVICE_KEYS:
        if not use_kernel("memory_retrieval", device, dtype):
            path[device] = "reference"
        elif device == "cpu":
            tiles = (
                "bf16 GEMM tiles on the CPU's bf16 matrix units (oneDNN micro-kernel)"
                if cpu_bf16_products(dtype)
                else "fp32 GEMM tiles"
            )
            path[device] = f"kernel: {tiles} and an online softmax (csrc/cpu)"
        elif not torch.cuda.is_available():
            path[device] = "kernel (no CUDA device to size it for)"
        else:
            name, fwd, bwd = _extension.cuda_retrieval_path(slots, dim, str(dtype).split(".")[1])
            path[device] = {"path": name, "forward": fwd, "backward": bwd}
    return path


def _fused_by_size(op: str, device_type: str) -> bool:
    """True when the fused ``op`` runs on ``device_type`` up to a size only (``auto``)."""
    return (
        op in FUSED_OPS
        and _backend == "auto"
        and device_type in AUTO_FUSED_MAX_ELEMENTS
        and _KERNELS.get(device_type, {}).get(op, False)
    )


def _op_path(op: str, device_type: str) -> str:
    if use_kernel(op, device_type):
        return "kernel"
    if _fused_by_size(op, device_type):
        return "by size"
    built = _KERNELS.get(device_type, {}).get(op, False)
    return "unfused" if built and _backend != "reference" and op in FUSED_OPS else "reference"


def backend_info(retrieval: tuple[int, int, torch.dtype] | None = None) -> dict[str, Any]:
    """What runs where: for each device and op, ``"kernel"`` or ``"reference"``, and why.

    A fused op whose kernel is built but left out (the ``"unfused"`` backend) reads
    ``"unfused"``: its composition of other ops runs instead; under ``"auto"`` on a device where
    it runs up to a size only (CUDA), ``"by size"``.

    ``"mixer"`` says, per device, whether gam_mixer runs ``"fused"`` (one op), ``"unfused"``
    (three kernels and a gate linear), ``"by size"`` (the fused op up to
    ``"mixer_fused_max_elements"`` elements of h, B*N*D, the three kernels above) or
    ``"reference"``.

    ``"cpu_bf16_gemm"`` says how the CPU kernels run the products of bfloat16 inputs: ``"bf16"``
    (the CPU's bf16 matrix units, through torch's oneDNN micro-kernel) or ``"fp32"`` (fp32 tiles);
    ``None`` without the extension.

    ``"cpu_isa"`` says which build of the CPU kernels' vectorised loops runs: ``"avx512"``,
    ``"avx2"`` or ``"baseline"`` (x86-64 without either; every non-x86 CPU), the best the CPU has
    unless ``GAM_EXT_CPU_ISA`` caps it; ``None`` without the extension.

    ``retrieval=(slots, dim, dtype)`` adds ``"retrieval"``: for each device, which implementation
    of memory_retrieval runs at that shape; on CUDA the path (``GAM_EXT_RETRIEVAL``, else the
    default for the dtype) and the forward and backward kernels with their tiles, as the
    launchers pick them for the current device (the gemm path's cuBLAS products and softmax
    kernels, the fused tensor-core kernels, the fp32 SIMT kernels and why, or the sm_90a wgmma
    forward and backward score kernel).
    """
    mixer = {
        device: "fused"
        if use_kernel("gam_mixer", device)
        else "by size"
        if _fused_by_size("gam_mixer", device)
        else "unfused"
        if use_kernel("memory_retrieval", device)
        else "reference"
        for device in DEVICE_KEYS
    }
    info = {
        "backend": _backend,
        "extension": None if _extension is None else _extension.__file__,
        "extension_error": _extension_error,
        "cuda_compiled": bool(_extension is not None and _extension.cuda_compiled()),
        "cuda_available": torch.cuda.is_available(),
        "ops": {device: {op: _op_path(op, device) for op in OPS + STEP_OPS} for device in DEVICE_KEYS},
        # How gam_mixer (and gam_block, GAMBlock) runs on each device: the fused op, the three
        # primitive kernels and a gate linear, or the reference (for the dtypes the device's
        # kernels take: float64 on CUDA always runs the reference).
        "mixer": mixer,
        # Where "mixer" is "by size": the most elements of h (B*N*D) the fused op runs at.
        "mixer_fused_max_elements": {
            device: AUTO_FUSED_MAX_ELEMENTS[device] if mixer[device] == "by size" else None
            for device in DEVICE_KEYS
        },
        # How the CPU retrieval and mixer kernels run the products of bfloat16 inputs: "bf16" on
        # the CPU's bf16 matrix units (AMX) through torch's oneDNN micro-kernel where torch has one
        # for the CPU, else "fp32" tiles (GAM_EXT_CPU_BF16_GEMM=fp32 forces them).
        "cpu_bf16_gemm": None if _extension is None else _extension.cpu_bf16_gemm(),
        # Which build of the CPU kernels' vectorised loops runs (GAM_EXT_CPU_ISA caps it).
        "cpu_isa": None if _extension is None else _extension.cpu_isa(),
    }
    if retrieval is not None:
        slots, dim, dtype = retrieval
        info["retrieval"] = _retrieval_path(int(slots), int(dim), dtype)
    return info
