"""The resource report (benchmarks/kernel_resources.py) where nvcc exists: no retrieval kernel
spills on sm_80 / sm_90 / sm_100; on sm_90 every retrieval kernel uses at most 168 registers, the
fp16 and bf16 launches at the report shape (B*N = 65536, S = D = 512) run tensor-core kernels
whose SASS holds HMMA and LDSM (when a cuobjdump is found), and none of them falls back to SIMT.

The compile takes a minute or two on a cold cache (build/kernel_resources/, keyed by the sources).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "kernel_resources", ROOT / "benchmarks" / "kernel_resources.py"
)
kernel_resources = importlib.util.module_from_spec(_spec)
sys.modules["kernel_resources"] = kernel_resources  # dataclasses look their module up
_spec.loader.exec_module(kernel_resources)

pytestmark = pytest.mark.skipif(kernel_resources.find_nvcc() is None, reason="nvcc not found")


@pytest.fixture(scope="module")
def report() -> dict:
    return kernel_resources.collect([80, 90, 100], (16 * 4096, 512, 512))


def retrieval(kernels: list[dict]) -> list[dict]:
    return [k for k in kernels if "retrieval" in k["name"]]


def test_no_retrieval_kernel_spills(report: dict) -> None:
    found = retrieval(report["kernels"])
    assert {k["arch"] for k in found} == {80, 90, 100}
    spilling = [(k["arch"], k["name"], k["spill_stores"], k["spill_loads"]) for k in found
                if k["spill_stores"] or k["spill_loads"]]  # fmt: skip
    assert not spilling, spilling


def test_sm90_retrieval_kernels_fit_168_registers(report: dict) -> None:
    heavy = [(k["name"], k["registers"]) for k in retrieval(report["kernels"])
             if k["arch"] == 90 and k["registers"] > 168]  # fmt: skip
    assert not heavy, heavy


def test_sm90_half_launches_are_tensor_core_kernels(report: dict) -> None:
    launches = report["launches"]
    assert isinstance(launches, list), launches
    half = [x for x in launches if x["arch"] == 90 and x["dtype"] in ("float16", "bfloat16")]
    assert {x["op"] for x in half} == {"fwd", "bwd"}
    for x in half:
        assert "simt" not in x["kernel"], x
        assert x["registers"] is not None and x["registers"] <= 168, x
        assert x["ctas_per_sm"] and x["ctas_per_sm"] >= 1, x
    products = [x for x in half if "mma" in x["kernel"]]
    assert {x["op"] for x in products} == {"fwd", "bwd"}, [x["kernel"] for x in half]
    if report["cuobjdump"]:
        for x in products:
            assert x["sass"]["hmma"] > 0 and x["sass"]["ldsm"] > 0, x


def test_markdown_report(report: dict) -> None:
    text = kernel_resources.markdown(report)
    assert "| sm_90 | fwd | bfloat16 |" in text
    assert "retrieval_fwd_mma_kernel" in text
