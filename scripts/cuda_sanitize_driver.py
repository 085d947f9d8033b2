"""Small case of every CUDA kernel, for compute-sanitizer (memcheck, racecheck, synccheck).

    compute-sanitizer --tool memcheck  python scripts/cuda_sanitize_driver.py
    compute-sanitizer --tool racecheck python scripts/cuda_sanitize_driver.py --shared-memory-only

Covers the conv fast paths (K = 2, 3, 4) and the generic path, vectorised and scalar layouts,
the retrieval paths (GAM_EXT_RETRIEVAL=fused / simt / gemm / wgmma with each of its forward
kernels, the gemm path's softmax kernels element-wise and register-resident; the fused
tensor-core kernels also at the shared memory of smaller GPUs, GAM_EXT_RETRIEVAL_SMEM_LIMIT)
forward and backward with several dM row splits, the gate kernels, the fused mixer's epilogue
and prologue kernels, and the one-token step kernels (causal_conv1d_update in both state
layouts, gam_mixer_step across several slot splits), in fp32 / fp16 / bf16.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from cuda_smoke import broken_paths

import gam_ext

DEV = "cuda"
# Kernel paths that scripts/gpu_check.sh's smoke stage found hanging or failing on this GPU
# (scripts/cuda_smoke.py's names): the cases that would run them are left out.
BROKEN = broken_paths()


def step(dtype: torch.dtype, d: int, k: int, n: int, s: int = 70) -> None:
    x = torch.randn(2, n, d, device=DEV, dtype=dtype, requires_grad=True)
    w = torch.randn(d, k, device=DEV, requires_grad=True)
    b = torch.randn(d, device=DEV, requires_grad=True)
    m = torch.randn(s, d, device=DEV) * torch.linspace(0.2, 3, s, device=DEV)[:, None]
    m.requires_grad_()
    z = torch.randn(2, n, 2 * d, device=DEV, dtype=dtype, requires_grad=True)
    loc = gam_ext.causal_conv1d(x, w, b)
    glob = gam_ext.memory_retrieval(x, m, 1.3)
    out = gam_ext.gate_fusion(loc, glob, z)
    out.float().square().sum().backward()


def fused_mixer(dtype: torch.dtype, d: int, k: int, n: int) -> None:
    if "mixer" in BROKEN:
        return
    h = torch.randn(2, n, d, device=DEV, dtype=dtype, requires_grad=True)
    params = [
        torch.randn(d, 1, k, device=DEV),
        torch.randn(d, device=DEV),
        torch.randn(70, d, device=DEV),
        torch.randn(2 * d, d, device=DEV) * d**-0.5,
        torch.randn(2 * d, device=DEV),
    ]
    for p in params:
        p.requires_grad_()
    previous = gam_ext.set_backend("fused")  # "auto" runs the three ops on CUDA above a size
    try:
        gam_ext.gam_mixer(h, *params, 0.9).float().square().sum().backward()
    finally:
        gam_ext.set_backend(previous)


def decode_step(dtype: torch.dtype, d: int, k: int, s: int) -> None:
    h = torch.randn(3, d, device=DEV, dtype=dtype)
    state = torch.randn(3, k, d, device=DEV, dtype=dtype)  # W = K > K-1
    w, b = torch.randn(d, k, device=DEV), torch.randn(d, device=DEV)
    m, gw = torch.randn(s, d, device=DEV), torch.randn(2 * d, d, device=DEV)
    pos = torch.tensor([0, 1, 9], device=DEV, dtype=torch.int32)
    with torch.no_grad():
        for cache_seqlens in (None, pos):
            gam_ext.causal_conv1d_update(h.unsqueeze(1).repeat(1, 5, 1), state, w, b, cache_seqlens)
            gam_ext.gam_mixer_step(h, state, w, b, m, gw, None, 0.9, cache_seqlens=cache_seqlens)


def gemm_softmax_cases() -> None:
    if "gemm" in BROKEN:
        return
    os.environ["GAM_EXT_RETRIEVAL"] = "gemm"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for s in (72, 516):  # S % 4 == 0: the softmax kernels' register-resident variants
            step(dtype, d=64, k=3, n=37, s=s)


def path_cases(path: str) -> None:
    if path in BROKEN:
        return
    os.environ["GAM_EXT_RETRIEVAL"] = path
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        step(dtype, d=64, k=3, n=150)  # vectorised, fast K, several time blocks and splits
        step(dtype, d=13, k=5, n=37)  # scalar paths, generic K
        step(dtype, d=40, k=2, n=3)  # N < K - 1 halo
        fused_mixer(dtype, d=64, k=3, n=150)  # the fused mixer's epilogue and prologue
        fused_mixer(dtype, d=13, k=5, n=3)  # scalar paths, K > N


def wgmma_cases() -> None:
    # The sm_90a retrieval kernels: the forward (D = 128, 256, 512) and the backward's score
    # kernel (D % 64 == 0 up to 512); on other GPUs or builds the gemm path's kernels run.
    os.environ["GAM_EXT_RETRIEVAL"] = "wgmma"
    forwards = [f for f in ("pipelined", "lockstep", "seesaw") if f"wgmma-{f}" not in BROKEN]
    if forwards and "wgmma-backward" not in BROKEN:
        # Forward and backward, on the default forward kernel (or the first that works).
        os.environ["GAM_EXT_WGMMA_FORWARD"] = forwards.pop(0)
        for dtype in (torch.float16, torch.bfloat16):
            step(dtype, d=512, k=3, n=70, s=130)  # 3 row blocks, a 2-slot tail tile
            step(dtype, d=192, k=3, n=40, s=301)  # backward only: 3 panels, odd S, 3 slot tiles
            step(dtype, d=128, k=3, n=40, s=70)  # the forward's D = 128 variant
            fused_mixer(dtype, d=512, k=3, n=40)
    # The other forward kernels (GAM_EXT_WGMMA_FORWARD), forward only: an odd tile count at
    # D = 512 and two whole pairs of 64-slot tiles at D = 128.
    for forward in forwards:
        os.environ["GAM_EXT_WGMMA_FORWARD"] = forward
        for dtype in (torch.float16, torch.bfloat16):
            for d, n, s in ((512, 70, 130), (128, 40, 200)):
                h = torch.randn(2, n, d, device=DEV, dtype=dtype)
                gam_ext.memory_retrieval(h, torch.randn(s, d, device=DEV, dtype=dtype) * d**-0.5)
    os.environ.pop("GAM_EXT_WGMMA_FORWARD", None)


def tensor_core_tile_cases() -> None:
    if "fused" in BROKEN:
        return
    os.environ["GAM_EXT_RETRIEVAL"] = "fused"
    for limit in ("232448", "166912", "101376", "65536"):  # sm_90, sm_80, sm_86, sm_75 tiles
        os.environ["GAM_EXT_RETRIEVAL_SMEM_LIMIT"] = limit
        for dtype in (torch.float16, torch.bfloat16):
            step(dtype, d=520, k=3, n=70)  # 8 column chunks of the fused kernels
            step(dtype, d=256, k=4, n=37)
    del os.environ["GAM_EXT_RETRIEVAL_SMEM_LIMIT"]


def decode_cases() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        decode_step(dtype, d=200, k=3, s=70)  # two channel blocks, three slot splits
        decode_step(dtype, d=13, k=1, s=5)  # no state rows


# (name, cases, uses shared memory). The gemm path's kernels (cuBLAS aside: the softmax kernels,
# one warp per row in registers), the gate kernels and the mixer's epilogue and prologue use no
# shared memory, so racecheck has nothing to check in them: --shared-memory-only (what
# gpu_check.sh gives racecheck, the slowest tool) leaves out the groups that only add those.
GROUPS = [
    ("wgmma kernels (sm_90a)", wgmma_cases, True),
    ("fused path (tensor-core retrieval, conv, gates, fused mixer)", lambda: path_cases("fused"), True),
    ("tensor-core tiles of smaller GPUs", tensor_core_tile_cases, True),
    ("simt path", lambda: path_cases("simt"), True),
    ("one-token step", decode_cases, True),
    ("gemm path", lambda: path_cases("gemm"), False),
    ("gemm path softmax variants", gemm_softmax_cases, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared-memory-only",
        action="store_true",
        help="only the groups whose kernels use shared memory (for racecheck)",
    )
    args = parser.parse_args()
    assert gam_ext.backend_info()["ops"]["cuda"]["memory_retrieval"] == "kernel", gam_ext.backend_info()
    torch.manual_seed(0)
    if BROKEN:
        print(f"cuda_sanitize_driver: left out (GAM_CHECK_BROKEN): {' '.join(sorted(BROKEN))}", flush=True)
    start = time.monotonic()
    for name, cases, shared in GROUPS:
        if args.shared_memory_only and not shared:
            continue
        cases()
        torch.cuda.synchronize()
        # A line per group, so that a run cut off by a time limit shows how far it got.
        print(f"cuda_sanitize_driver: {name} done ({time.monotonic() - start:.0f} s)", flush=True)
    print("cuda_sanitize_driver: ok")


if __name__ == "__main__":
    main()
