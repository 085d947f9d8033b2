"""The CUDA kernels on a GPU: every op vs the fp64 reference, opcheck, torch.compile, autocast,
determinism and bad input. Skipped without a CUDA GPU and a CUDA build of gam_ext._C
(scripts/gpu_check.sh builds one and runs this file; every test marked `cuda` lives here or in
test_cuda_wgmma.py, so that the check runs them all).
"""

from __future__ import annotations

import pytest
import torch
import wgmma_cases
from test_generation import make_model as gen_model
from test_generation import step_logits as gen_step_logits
from test_generation import tokens as gen_tokens
from tolerances import TOL

import gam_ext
from gam_ext import _backend, reference
from gam_ext.modules import generate_tokens

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        not all(_backend._KERNELS["cuda"].values()),
        reason="gam_ext._C was built without the CUDA kernels",
    ),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEV = "cuda"


def close(ours, ref, dtype, scale=1.0):
    tol = dict(TOL[dtype])
    tol["atol"] *= scale
    torch.testing.assert_close(ours.double(), ref.double(), **tol)


def gen(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(DEV, dtype)


def grads(fn, inputs, grad_out):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def ref_grads(fn, inputs, grad_out):
    return grads(fn, [t.double() for t in inputs], grad_out.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(2, 1, 8, 3), (2, 131, 24, 3), (1, 67, 13, 2), (2, 300, 64, 4), (1, 33, 40, 7), (3, 5, 512, 8)],
    ids=lambda s: "B{}N{}D{}K{}".format(*s),
)
def test_conv(dtype, shape):
    b, n, d, k = shape
    x, w, bias = gen((b, n, d), dtype, 1), gen((d, 1, k), torch.float32, 2, 0.5), gen((d,), torch.float32, 3)
    dy = gen((b, n, d), dtype, 4)
    out, g = grads(gam_ext.causal_conv1d, [x, w, bias], dy)
    out_ref, g_ref = ref_grads(reference.causal_conv1d, [x, w, bias], dy)
    close(out, out_ref, dtype)
    close(g[0], g_ref[0], dtype)
    for ours, ref in zip(g[1:], g_ref[1:], strict=True):
        assert ours.dtype == torch.float32
        close(ours, ref, torch.float32, scale=max(1.0, (b * n) ** 0.5))


RETRIEVAL_SHAPES = [
    (1, 1, 1, 8), (2, 67, 33, 24), (2, 100, 512, 64), (1, 70, 70, 130), (2, 64, 512, 512),
    (1, 37, 45, 1000), (1, 9, 40, 1100), (1, 70, 301, 192), (2, 77, 200, 128), (1, 130, 515, 256),
]  # fmt: skip


@pytest.mark.parametrize("path", ["fused", "simt", "gemm", "wgmma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RETRIEVAL_SHAPES, ids=lambda s: "B{}N{}S{}D{}".format(*s))
def test_retrieval(dtype, shape, path, monkeypatch):
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    check_retrieval(dtype, shape)


@pytest.mark.parametrize("path", ["fused", "gemm", "wgmma", "wgmma-seesaw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_retrieval_rising_max(dtype, path, monkeypatch):
    # Slot norms that grow along the bank push each row's max up tile after tile (scores about 50
    # apart): the online softmax's rescales, and p underflowing for most slots, on the hardware's
    # exp2 (python_tests/test_cuda_emulated.py runs the same case through the emulator).
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path.split("-")[0])
    if path == "wgmma-seesaw":
        monkeypatch.setenv("GAM_EXT_WGMMA_FORWARD", "seesaw")
    s, d = 200, 128
    h = gen((1, 70, d), dtype, 30)
    grow = torch.linspace(0.2, 3.0, s, dtype=torch.float64).unsqueeze(1) * (32 / d) ** 0.5
    m = (gen((s, d), torch.float64, 31) * grow.to(DEV)).to(dtype)
    dg = gen((1, 70, d), dtype, 32)
    out, g = grads(lambda a, c: gam_ext.memory_retrieval(a, c, 1.5), [h, m], dg)
    out_ref, g_ref = ref_grads(lambda a, c: reference.memory_retrieval(a, c, 1.5), [h, m], dg)
    close(out, out_ref, dtype, scale=4.0)
    for ours, ref in zip(g, g_ref, strict=True):
        close(ours, ref, dtype, scale=max(1.0, ref.abs().max().item() / 4))


@pytest.mark.parametrize("path", ["fused", "gemm", "wgmma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_retrieval_backward_on_peaked_rows(dtype, path, monkeypatch):
    # h and M of unit scale at D = 192 (and 256, the wgmma forward's): one slot takes nearly all
    # of each row's p, where dP - delta cancels; the fused and wgmma backwards correct their
    # swept dS to the exact delta (csrc/cuda/README.md, "Numerics of delta"). The same case runs
    # through the emulator in python_tests/test_cuda_emulated.py.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    for s, d in ((535, 192), (535, 256)):
        h = gen((2, 2, d), dtype, 84)
        m = gen((s, d), dtype, 85)
        dg = gen((2, 2, d), dtype, 86)
        out, g = grads(lambda a, c: gam_ext.memory_retrieval(a, c, 1.0), [h, m], dg)
        out_ref, g_ref = ref_grads(lambda a, c: reference.memory_retrieval(a, c, 1.0), [h, m], dg)
        close(out, out_ref, dtype)
        for ours, ref in zip(g, g_ref, strict=True):
            close(ours, ref, dtype)


@pytest.mark.parametrize("path", ["gemm", "simt"])
@pytest.mark.parametrize("s", [500, 502])
def test_retrieval_backward_on_peaked_rows_fp32(s, path, monkeypatch):
    # The same rows in fp32; both fp32 paths renormalise p (lse's fp32 rounding near |s| ~ 40
    # leaves it off by a few 1e-6, which such rows feel: 25 times eager's error before). Within
    # four times the error of eager fp32 on the device: the kernels' exp2 (ex2.approx, about 2
    # ulp, on the scale folded into a base-2 exponent) and the SIMT path's sequential dot
    # products add per-score noise that such rows make visible (the emulator, with exact exp2,
    # measures 1x / 3.3x).
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    h, m, dg = (
        gen((2, 2, 192), torch.float32, 84),
        gen((s, 192), torch.float32, 85),
        gen((2, 2, 192), torch.float32, 86),
    )
    _, g = grads(lambda a, c: gam_ext.memory_retrieval(a, c, 1.0), [h, m], dg)
    _, g_eager = grads(lambda a, c: reference.memory_retrieval(a, c, 1.0), [h, m], dg)
    _, g_ref = ref_grads(lambda a, c: reference.memory_retrieval(a, c, 1.0), [h, m], dg)
    for ours, eager, ref in zip(g, g_eager, g_ref, strict=True):
        err = (ours.double() - ref).abs().max().item()
        assert err <= 4 * (eager.double() - ref).abs().max().item() + 1e-6, err


# Shared memory of smaller GPUs (sm_80, sm_86/89/120, sm_75), to run their configurations here.
SMEM_LIMITS = [166912, 101376, 65536]


@pytest.mark.parametrize("limit", SMEM_LIMITS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 45, 200), (2, 64, 70, 512), (1, 37, 45, 1000)],
                         ids=lambda s: "B{}N{}S{}D{}".format(*s))  # fmt: skip
def test_retrieval_smaller_gpu_configurations(dtype, shape, limit, monkeypatch):
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "fused")
    monkeypatch.setenv("GAM_EXT_RETRIEVAL_SMEM_LIMIT", str(limit))
    check_retrieval(dtype, shape)


def test_retrieval_path_is_reported(monkeypatch):
    # The defaults (csrc/cuda/README.md, "Retrieval paths"): gemm for fp32, fp16 and bf16 (bf16
    # from sm_80, fused before); GAM_EXT_RETRIEVAL picks any path.
    monkeypatch.delenv("GAM_EXT_RETRIEVAL", raising=False)
    bf16_default = "gemm" if torch.cuda.get_device_capability() >= (8, 0) else "fused"
    info = gam_ext.backend_info(retrieval=(512, 512, torch.bfloat16))["retrieval"]["cuda"]
    assert info["path"] == bf16_default, info
    info = gam_ext.backend_info(retrieval=(512, 512, torch.float16))["retrieval"]["cuda"]
    assert info["path"] == "gemm" and "retrieval_softmax_fwd_vec_kernel<4>" in info["forward"], info
    info = gam_ext.backend_info(retrieval=(512, 512, torch.float32))["retrieval"]["cuda"]
    assert info["path"] == "gemm" and "retrieval_softmax_fwd_vec_kernel<4>" in info["forward"], info
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "fused")
    info = gam_ext.backend_info(retrieval=(512, 512, torch.float16))["retrieval"]["cuda"]
    assert info["path"] == "fused" and info["forward"].startswith("mma"), info


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="the wgmma kernels are sm_90a's",
)
def test_wgmma_backward_runs_where_the_wgmma_forward_does(monkeypatch):
    # On an H100 / H200 with a 9.0a build (the GPU check's) GAM_EXT_RETRIEVAL=wgmma reaches both
    # wgmma kernels at D = S = 512, on a plain 9.0 build neither: the backward's conditions (its
    # shared memory on this device, the probe) hold wherever the forward's do.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "wgmma")
    info = gam_ext.backend_info(retrieval=(512, 512, torch.bfloat16))["retrieval"]["cuda"]
    assert info["forward"].startswith("wgmma") == info["backward"].startswith("wgmma"), info


@pytest.mark.parametrize("forward", list(wgmma_cases.FORWARD_KERNELS))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize(
    "shape",
    [(2, 64, 512, 512), (1, 70, 301, 512), (2, 77, 200, 128), (1, 130, 515, 256)],
    ids=lambda s: "B{}N{}S{}D{}".format(*s),
)
def test_retrieval_every_wgmma_forward(dtype, shape, forward, monkeypatch):
    # Each wgmma forward kernel (GAM_EXT_WGMMA_FORWARD) on the hardware: whole and partial tiles,
    # odd and even tile counts, every D it takes. Where the wgmma kernels do not run (another GPU,
    # or a build without 9.0a) the gemm path's forward runs instead, as backend_info says.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "wgmma")
    monkeypatch.setenv("GAM_EXT_WGMMA_FORWARD", forward)
    _, _, s, d = shape
    info = gam_ext.backend_info(retrieval=(s, d, dtype))["retrieval"]["cuda"]
    if info["forward"].startswith("wgmma"):
        assert info["forward"].startswith(f"wgmma: {wgmma_cases.FORWARD_KERNELS[forward]}<"), info
    check_retrieval(dtype, shape)


def check_retrieval(dtype, shape):
    b, n, s, d = shape
    h, m = gen((b, n, d), dtype, 5, d**-0.25), gen((s, d), torch.float32, 6, d**-0.25)
    dg = gen((b, n, d), dtype, 7)
    out, g = grads(gam_ext.memory_retrieval, [h, m], dg)
    out_ref, g_ref = ref_grads(lambda a, c: reference.memory_retrieval(a, c.to(a.dtype)), [h, m], dg)
    close(out, out_ref, dtype)
    close(g[0], g_ref[0], dtype)
    assert g[1].dtype == torch.float32
    close(g[1], g_ref[1], dtype, scale=max(1.0, (b * n / 16) ** 0.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (2, 7, 13), (2, 129, 512), (1, 3, 1000)], ids=lambda s: "B{}N{}D{}".format(*s)
)
def test_gate(dtype, shape):
    b, n, d = shape
    args = [gen((b, n, d), dtype, 8), gen((b, n, d), dtype, 9), gen((b, n, 2 * d), dtype, 10, 2.0)]
    df = gen((b, n, d), dtype, 11)
    out, g = grads(gam_ext.gate_fusion, args, df)
    out_ref, g_ref = ref_grads(reference.gate_fusion, args, df)
    close(out, out_ref, dtype)
    for ours, ref in zip(g, g_ref, strict=True):
        close(ours, ref, dtype)


MIXER_SHAPES = [(1, 1, 8, 1, 1), (2, 67, 24, 33, 3), (1, 70, 13, 20, 8), (2, 100, 512, 512, 4)]


@pytest.mark.parametrize("path", ["fused", "simt", "gemm", "wgmma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MIXER_SHAPES, ids=lambda s: "B{}N{}D{}S{}K{}".format(*s))
def test_fused_mixer(dtype, shape, path, monkeypatch, use_backend):
    # gam_ext.gam_mixer on the fused op, fp32 parameters with activations of each dtype; the
    # reference gets the bank and the gate linear rounded to the activation dtype, as the op does.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    use_backend("fused")  # "auto" runs the three ops on CUDA above a size, where they measured faster
    assert gam_ext.backend_info()["mixer"]["cuda"] == "fused"
    b, n, d, s, k = shape
    mag = min(0.5, d**-0.25)
    inputs = [
        gen((b, n, d), dtype, 50, mag),
        gen((d, 1, k), torch.float32, 51, 0.5),
        gen((d,), torch.float32, 52, 0.1),
        gen((s, d), torch.float32, 53, mag),
        gen((2 * d, d), torch.float32, 54, d**-0.5),
        gen((2 * d,), torch.float32, 55, 0.1),
    ]
    df = gen((b, n, d), dtype, 56)
    out, g = grads(gam_ext.gam_mixer, inputs, df)

    def rounded_reference(h, cw, cb, m, gw, gb):
        act = h.dtype
        return reference.gam_mixer(h, cw, cb, m.to(dtype).to(act), gw.to(dtype).to(act), gb.to(dtype).to(act))

    out_ref, g_ref = ref_grads(rounded_reference, inputs, df)
    close(out, out_ref, dtype)
    close(g[0], g_ref[0], dtype)
    rows = max(1.0, (b * n) ** 0.5)
    for ours, ref, scale in zip(
        g[1:], g_ref[1:], (rows, rows, max(1.0, (b * n / 16) ** 0.5), rows, rows), strict=True
    ):
        assert ours.dtype == torch.float32
        close(ours, ref, dtype, scale=scale)


def test_non_contiguous_and_empty():
    x = gen((2, 16, 40), torch.float16, 12).transpose(1, 2).contiguous().transpose(1, 2)
    w = gen((40, 3), torch.float32, 13)
    close(gam_ext.causal_conv1d(x, w), reference.causal_conv1d(x.double(), w.double()), torch.float16)
    m = gen((20, 40), torch.float16, 14)
    close(gam_ext.memory_retrieval(x, m), reference.memory_retrieval(x.double(), m.double()), torch.float16)
    e = torch.zeros(0, 4, 40, device=DEV, requires_grad=True)
    gam_ext.memory_retrieval(e, m.float().requires_grad_()).sum().backward()
    gam_ext.causal_conv1d(e, w).sum().backward()


def _samples():
    x = gen((2, 9, 16), torch.float32, 20)
    return [
        (
            torch.ops.gam_ext.causal_conv1d_fwd,
            (x, gen((16, 3), torch.float32, 21), gen((16,), torch.float32, 22)),
        ),
        (torch.ops.gam_ext.causal_conv1d_fwd, (x.half(), gen((16, 4), torch.float32, 21), None)),
        (torch.ops.gam_ext.memory_retrieval_fwd, (x, gen((7, 16), torch.float32, 23), 0.5)),
        (torch.ops.gam_ext.memory_retrieval_fwd, (x.bfloat16(), gen((40, 16), torch.bfloat16, 23), 1.0)),
        (torch.ops.gam_ext.gate_fusion_fwd, (x, x * 2, gen((2, 9, 32), torch.float32, 24))),
        (
            torch.ops.gam_ext.gam_mixer_fwd,
            (
                x.bfloat16(),
                gen((16, 3), torch.float32, 25),
                gen((16,), torch.float32, 26),
                gen((7, 16), torch.float32, 27),
                gen((32, 16), torch.float32, 28),
                gen((32,), torch.float32, 29),
                0.5,
            ),
        ),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    op, args = _samples()[case]
    args = tuple(
        a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )
    torch.library.opcheck(op, args)


def test_compile_gam_block_fullgraph():
    torch.manual_seed(0)
    block = gam_ext.GAMBlock(64, num_memory_slots=48, conv_kernel_size=3, dropout=0.0).to(DEV)
    x = torch.randn(2, 37, 64, device=DEV, requires_grad=True)
    eager = block(x)
    eager.sum().backward()
    g_eager = x.grad.clone()
    x.grad = None
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    close(out, eager, torch.float32)
    close(x.grad, g_eager, torch.float32)


def test_autocast_block():
    torch.manual_seed(0)
    block = gam_ext.GAMBlock(64, num_memory_slots=40, dropout=0.0).to(DEV)
    x = torch.randn(2, 50, 64, device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = block(x)
    out.float().sum().backward()
    gam_ext.set_backend("reference")
    try:
        ref = block.double()(x.double())
    finally:
        gam_ext.set_backend("auto")
    torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=1e-1)
    assert block.memory_bank.grad is not None and block.causal_conv.weight.grad is not None


@pytest.mark.parametrize("backend", ["unfused", "fused"])
@pytest.mark.parametrize("path", ["gemm", "fused", "wgmma"])
def test_training_step_captures_in_a_cuda_graph(path, backend, monkeypatch, use_backend):
    # A GAMBlock's whole forward and backward captured in one CUDA graph and replayed on new
    # inputs, as torch.compile's mode="reduce-overhead" and hand-written graph training loops do:
    # the ops make no host synchronisation and allocate only through PyTorch's allocator, and each
    # replay gives what eager gives on the same input.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    use_backend(backend)
    torch.manual_seed(0)
    block = gam_ext.GAMBlock(128, num_memory_slots=200, conv_kernel_size=3, dropout=0.0)
    block = block.to(DEV, torch.bfloat16)
    params = list(block.parameters())
    static_x = torch.randn(2, 77, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)

    def loss_of(x):
        out = block(x)
        return out, out.float().square().mean()

    # Warm-up on a side stream (cuBLAS handles, the wgmma probe, the allocator's pools).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            loss_of(static_x)[1].backward()
    torch.cuda.current_stream().wait_stream(side)
    for t in [*params, static_x]:
        t.grad = None  # the captured backward writes fresh gradients, not sums
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_loss = loss_of(static_x)
        static_loss.backward()
    for seed in (1, 2):
        static_x.data.copy_(gen((2, 77, 128), torch.bfloat16, seed))
        graph.replay()
        x = static_x.detach().clone().requires_grad_()
        out, loss = loss_of(x)
        expected = [out, *torch.autograd.grad(loss, [*params, x])]
        replayed = [static_out, *(t.grad for t in [*params, static_x])]
        for ours, ref in zip(replayed, expected, strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_retrieval_empty_and_d0(path, monkeypatch):
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    m = gen((5, 8), torch.bfloat16, 15)
    e = torch.zeros(0, 4, 8, device=DEV, dtype=torch.bfloat16)
    out, lse = torch.ops.gam_ext.memory_retrieval_fwd(e, m, 1.0)
    assert out.shape == e.shape and lse.shape == (0, 4)
    h0 = torch.zeros(2, 3, 0, device=DEV, dtype=torch.bfloat16)
    out, lse = torch.ops.gam_ext.memory_retrieval_fwd(h0, m[:, :0], 1.0)
    torch.testing.assert_close(lse, torch.full((2, 3), float(torch.log(torch.tensor(5.0))), device=DEV))


def test_deterministic_backward():
    x = gen((4, 700, 96), torch.bfloat16, 30)
    w = gen((96, 3), torch.float32, 31)
    m = gen((100, 96), torch.float32, 32)
    runs = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in (x, w, m)]
        out = gam_ext.memory_retrieval(leaves[0], leaves[2]) + gam_ext.causal_conv1d(leaves[0], leaves[1])
        out.float().square().sum().backward()
        runs.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_bad_input():
    x = gen((1, 4, 8), torch.float32, 40)
    with pytest.raises(RuntimeError, match="weight has 4 channels"):
        torch.ops.gam_ext.causal_conv1d_fwd(x, torch.zeros(4, 3, device=DEV), None)
    with pytest.raises(RuntimeError, match="memory must have shape"):
        torch.ops.gam_ext.memory_retrieval_fwd(x, torch.zeros(3, 7, device=DEV), 1.0)
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.gam_ext.memory_retrieval_fwd(x, torch.zeros(3, 8), 1.0)
    with pytest.raises(RuntimeError, match="gate_logits must have shape"):
        torch.ops.gam_ext.gate_fusion_fwd(x, x, x)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        torch.ops.gam_ext.gate_fusion_fwd(x.double(), x.double(), torch.zeros(1, 4, 16, device=DEV).double())
    with pytest.raises(ValueError, match="is on"):
        gam_ext.memory_retrieval(x, torch.zeros(3, 8))


# --------------------------------------------------------------------------------------------
# The one-token step kernels (csrc/cuda/gam_step.cu); the model-level step and its CUDA-graph
# capture are in test_generation.py
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("circular", [False, True], ids=["shift", "circular"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(1, 8, 1, 3), (3, 13, 33, 4), (2, 264, 97, 5), (4, 512, 512, 3)],
    ids=lambda s: "B{}D{}S{}K{}".format(*s),
)
def test_step_ops(dtype, shape, circular):
    b, d, s, k = shape
    h, state = gen((b, d), dtype, 50), gen((b, k, d), dtype, 51)
    w, bias = gen((d, k), torch.float32, 52, 0.5), gen((d,), torch.float32, 53)
    m = gen((s, d), torch.float32, 54, d**-0.25)
    gw, gb = gen((2 * d, d), torch.float32, 55, d**-0.5), gen((2 * d,), torch.float32, 56)
    pos = torch.tensor([0, 1, 37, 5][:b], device=DEV, dtype=torch.int32) if circular else None
    ours_state, ref_state = state.clone(), state.double()
    f = gam_ext.gam_mixer_step(h, ours_state, w, bias, m, gw, gb, 0.8, cache_seqlens=pos)
    f_ref = reference.gam_mixer_step(
        h.double(),
        ref_state,
        w.double(),
        bias.double(),
        m.to(dtype).double(),
        gw.to(dtype).double(),
        gb.to(dtype).double(),
        0.8,
        cache_seqlens=pos,
    )
    close(f, f_ref, dtype)
    assert torch.equal(ours_state, ref_state.to(dtype))
    x = gen((b, 3, d), dtype, 57)
    ours_state, ref_state = state.clone(), state.double()
    y = gam_ext.causal_conv1d_update(x, ours_state, w, bias, pos)
    close(y, reference.causal_conv1d_update(x.double(), ref_state, w.double(), bias.double(), pos), dtype)
    assert torch.equal(ours_state, ref_state.to(dtype))


def test_step_ops_opcheck_and_determinism():
    h, state = gen((2, 16), torch.float32, 60), gen((2, 2, 16), torch.float32, 61)
    w, m, z = (
        gen((16, 3), torch.float32, 62),
        gen((40, 16), torch.float32, 63),
        gen((2, 32), torch.float32, 64),
    )
    pos = torch.tensor([0, 4], device=DEV, dtype=torch.int32)
    torch.library.opcheck(torch.ops.gam_ext.gam_mixer_step, (h, state, w, None, m, z, pos, 1.0))
    torch.library.opcheck(torch.ops.gam_ext.causal_conv1d_update, (h.unsqueeze(1), state, w, None, None))
    runs = []
    for _ in range(2):
        st = state.clone()
        runs.append((torch.ops.gam_ext.gam_mixer_step(h, st, w, None, m, z, pos, 1.0), st))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# --------------------------------------------------------------------------------------------
# Generation: the model's step on the CUDA kernels, and replayed from a CUDA graph
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_model_step_matches_forward_and_greedy_matches_generate_tokens(dtype):
    model = gen_model(dtype=dtype).cuda()
    idx = gen_tokens((2, 20)).cuda()
    with torch.no_grad():
        full = model(idx)[0][:, 2:].cpu().double()
        previous = gam_ext.set_backend("reference")
        try:
            ref64 = gen_model(dtype=torch.float64)(idx.cpu())[0][:, 2:]
        finally:
            gam_ext.set_backend(previous)
    ours = gen_step_logits(model, idx, 3).cpu().double()
    # Within the dtype's tolerance of the full forward in that dtype, or of the float64 model
    # within twice the full forward's own error (the full path's tensor cores round P to dtype).
    tol = TOL[dtype]
    ok = (ours - full).abs() <= tol["atol"] + tol["rtol"] * full.abs()
    ok |= (ours - ref64).abs() <= tol["atol"] + tol["rtol"] * ref64.abs()
    ok |= (ours - ref64).abs() <= 2 * (full - ref64).abs() + 1e-5
    assert bool(ok.all()), f"{int((~ok).sum())} logits off"
    if dtype == torch.float32:
        for n_prompt in (3, 25):
            prompt = gen_tokens((2, n_prompt), seed=9).cuda()
            assert torch.equal(
                model.generate(prompt, 30, greedy=True), generate_tokens(model, prompt, 30, 20, greedy=True)
            )


def test_model_step_captures_in_a_cuda_graph():
    model = gen_model().cuda()
    state = model.allocate_state(2)
    model.prefill(gen_tokens((2, 4)).cuda(), state)
    eager = state.clone()
    static_tokens = gen_tokens((2,), seed=10).cuda()
    # Warm up on a side stream (cuBLAS handles, allocator), on a throw-away copy of the state.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model.step(static_tokens, state.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = model.step(static_tokens, state)
    state.seqlen -= 1  # capture ran no kernels; the host counter is advanced by hand below
    for t in range(8):
        static_tokens.copy_(gen_tokens((2,), seed=20 + t).cuda())
        graph.replay()
        state.seqlen += 1
        expected = model.step(static_tokens, eager)
        torch.testing.assert_close(static_logits, expected, **TOL[torch.float32])
        assert torch.equal(state.positions, eager.positions)
        for a, b in zip(state.conv, eager.conv, strict=True):
            torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_generate_with_cuda_graph_gives_the_eager_tokens():
    # Prompts below and above block_size (20): past it the graph hands over to the eager window
    # step. Greedy, so the tokens follow from the logits; fp32, so no near-ties between the two.
    model = gen_model().cuda()
    for n_prompt, new in ((3, 30), (25, 6)):
        prompt = gen_tokens((2, n_prompt), seed=9).cuda()
        eager = model.generate(prompt, new, greedy=True)
        graphed = model.generate(prompt, new, greedy=True, cuda_graph=True)
        assert torch.equal(graphed, eager)
    # Sampling draws from the same generator stream either way.
    prompt = gen_tokens((3, 5), seed=11).cuda()
    draws = [
        model.generate(
            prompt, 12, top_k=10, cuda_graph=graph, generator=torch.Generator("cuda").manual_seed(3)
        )
        for graph in (False, True)
    ]
    assert torch.equal(draws[0], draws[1])


def test_graphed_step_under_autocast_matches_eager():
    # An fp32 model under bf16 autocast: the capture runs without autocast's cast cache, so the
    # graph casts the weights itself on every replay rather than reading casts freed since.
    from gam_ext.generation import StepGraph, _step

    model = gen_model().cuda()
    prompt = gen_tokens((2, 4)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        state = model.allocate_state(2)
        model.prefill(prompt, state)
        eager = state.clone()
        graphed = StepGraph(model, state)
    torch.cuda.empty_cache()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for t in range(6):
            token = gen_tokens((2,), seed=30 + t).cuda()
            torch.testing.assert_close(graphed(token), _step(model, token, eager), **TOL[torch.bfloat16])
            for a, b in zip(state.conv, eager.conv, strict=True):
                torch.testing.assert_close(a, b, **TOL[torch.bfloat16])
    assert state.seqlen == eager.seqlen == 10


def test_step_graph_serves_its_state_across_prefills_and_past_block_size():
    from gam_ext.generation import StepGraph, _step

    model = gen_model().cuda()
    state = model.allocate_state(2)
    model.prefill(gen_tokens((2, 25)).cuda(), state)  # built past block_size (20): warm-up at 0
    graph = StepGraph(model, state)
    # A second prompt into the same state (prefill writes it in place); 7 + 18 tokens cross
    # block_size (20), where the graph hands over to the eager window step.
    for n_prompt, steps in ((4, 6), (7, 18)):
        model.prefill(gen_tokens((2, n_prompt), seed=n_prompt).cuda(), state)
        eager = state.clone()
        for t in range(steps):
            token = gen_tokens((2, 1), seed=40 + t).cuda()  # (B, 1) is taken too
            torch.testing.assert_close(
                graph(token), _step(model, token.reshape(-1), eager), **TOL[torch.float32]
            )
            assert state.seqlen == eager.seqlen and torch.equal(state.positions, eager.positions)
    with pytest.raises(ValueError, match=r"tokens must be 2 integer token ids, \(B,\) or \(B, 1\), on cuda"):
        graph(torch.zeros(3, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="got shape \\(2,\\), torch.int64 on cpu"):
        graph(torch.zeros(2, dtype=torch.long))
