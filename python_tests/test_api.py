"""The public API: argument errors that name the argument, backend selection, autocast."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gam_ext
from gam_ext import reference

X = torch.randn(2, 5, 4)
W = torch.randn(4, 3)
M = torch.randn(6, 4)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: gam_ext.causal_conv1d(X.numpy(), W), TypeError, "x must be a torch.Tensor"),
        (lambda: gam_ext.causal_conv1d(X[0], W), ValueError, "x must have 3 dimensions"),
        (lambda: gam_ext.causal_conv1d(X.long(), W), TypeError, "x must be float"),
        (lambda: gam_ext.causal_conv1d(X, torch.randn(5, 3)), ValueError, "weight has 5 channels"),
        (lambda: gam_ext.causal_conv1d(X, torch.randn(4, 2, 3)), ValueError, "weight of shape"),
        (lambda: gam_ext.causal_conv1d(X, torch.randn(4, 0)), ValueError, "K >= 1"),
        (lambda: gam_ext.causal_conv1d(X, W, torch.randn(3)), ValueError, "bias must have shape"),
        (lambda: gam_ext.causal_conv1d(X, W, torch.randn(4, 1)), ValueError, "bias must have 1"),
        (lambda: gam_ext.memory_retrieval(X, torch.randn(6, 5)), ValueError, "memory must have shape"),
        (lambda: gam_ext.memory_retrieval(X, torch.randn(0, 4)), ValueError, "at least one slot"),
        (lambda: gam_ext.memory_retrieval(X, M.half().int()), TypeError, "memory must be float"),
        (lambda: gam_ext.memory_retrieval(X, M, scale="1"), TypeError, "scale"),
        (lambda: gam_ext.gate_fusion(X, X[:, :4], torch.randn(2, 5, 8)), ValueError, "global_ctx"),
        (lambda: gam_ext.gate_fusion(X, X, torch.randn(2, 5, 4)), ValueError, "gate_logits"),
        (lambda: gam_ext.gate_fusion(X, X, None), TypeError, "gate_logits must be"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match="weight is on"):
        gam_ext.causal_conv1d(X.cuda(), W)


def test_set_backend_switches_and_validates():
    previous = gam_ext.set_backend("reference")
    try:
        info = gam_ext.backend_info()
        assert info["backend"] == "reference"
        assert set(info["ops"]["cpu"].values()) == {"reference"}
        with pytest.raises(ValueError, match="backend must be one of"):
            gam_ext.set_backend("fast")
    finally:
        gam_ext.set_backend(previous)
    assert gam_ext.get_backend() == previous


def test_environment_forces_the_reference_path():
    code = "import gam_ext; print(gam_ext.backend_info()['ops']['cpu']['memory_retrieval'])"
    env = {**os.environ, "GAM_EXT_BACKEND": "reference", "GAM_EXT_QUIET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["GAM_EXT_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "GAM_EXT_BACKEND must be one of" in bad.stderr


def test_environment_selects_the_unfused_mixer():
    code = "import gam_ext; i = gam_ext.backend_info(); print(i['backend'], i['mixer']['cpu'])"
    env = {**os.environ, "GAM_EXT_BACKEND": " Unfused ", "GAM_EXT_QUIET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["unfused", "unfused"]


def test_backend_info_reports_the_build():
    info = gam_ext.backend_info()
    assert info["extension"] is not None, info["extension_error"]
    assert set(info["ops"]) == {"cpu", "cuda"}
    assert set(info["ops"]["cpu"]) == {
        "causal_conv1d",
        "memory_retrieval",
        "gate_fusion",
        "gam_mixer",
        "causal_conv1d_update",
        "gam_mixer_step",
    }
    assert info["mixer"]["cpu"] == "fused"  # the CPU build has the fused mixer op
    assert info["ops"]["cpu"]["gam_mixer"] == "kernel"
    assert "retrieval" not in info
    shaped = gam_ext.backend_info(retrieval=(512, 512, torch.bfloat16))
    assert set(shaped["retrieval"]) == {"cpu", "cuda"}
    assert shaped["retrieval"]["cpu"].startswith("kernel")
    assert gam_ext.backend_info(retrieval=(512, 512, torch.float64))["retrieval"]["cuda"] == "reference"


@pytest.mark.parametrize(
    "backend,mixer,fused_op",
    [
        ("auto", "fused", "kernel"),
        ("fused", "fused", "kernel"),
        ("unfused", "unfused", "unfused"),
        ("reference", "reference", "reference"),
    ],
)
def test_backend_info_reports_the_mixer_path(backend, mixer, fused_op, use_backend):
    use_backend(backend)
    info = gam_ext.backend_info()
    assert info["backend"] == backend
    assert info["mixer"]["cpu"] == mixer
    assert info["ops"]["cpu"]["gam_mixer"] == fused_op
    primitives = {info["ops"]["cpu"][op] for op in ("causal_conv1d", "memory_retrieval", "gate_fusion")}
    assert primitives == {"reference" if backend == "reference" else "kernel"}


@pytest.mark.skipif(
    not gam_ext._backend._KERNELS.get("cuda", {}).get("gam_mixer", False),
    reason="the extension has no CUDA kernels",
)
@pytest.mark.parametrize(
    "backend,cuda_mixer", [("auto", "by size"), ("fused", "fused"), ("unfused", "unfused")]
)
def test_auto_backend_picks_the_mixer_per_device(backend, cuda_mixer, use_backend):
    # The fused mixer op is built for both devices; "auto" runs it on the CPU always and on CUDA
    # up to a size (above it the three ops measured faster), "fused" and "unfused" force one path
    # everywhere.
    use_backend(backend)
    info = gam_ext.backend_info()
    limit = gam_ext._backend.AUTO_FUSED_MAX_ELEMENTS["cuda"]
    assert info["mixer"]["cuda"] == cuda_mixer
    assert info["mixer_fused_max_elements"] == {"cpu": None, "cuda": limit if backend == "auto" else None}
    ops_path = {"fused": "kernel", "by size": "by size", "unfused": "unfused"}[cuda_mixer]
    assert info["ops"]["cuda"]["gam_mixer"] == ops_path
    assert info["mixer"]["cpu"] == ("unfused" if backend == "unfused" else "fused")
    use = gam_ext._backend.use_kernel
    assert use("gam_mixer", "cuda", torch.bfloat16, limit) == (cuda_mixer != "unfused")
    assert use("gam_mixer", "cuda", torch.bfloat16, limit + 1) == (cuda_mixer == "fused")
    assert use("gam_mixer", "cuda", torch.bfloat16) == (cuda_mixer == "fused")
    assert use("gam_mixer", "cpu", torch.bfloat16, 10 * limit) == (backend != "unfused")


def test_auto_mixer_size_rule_needs_no_kernels(monkeypatch, use_backend):
    # The rule itself, on any build: with the fused op "built" for CUDA, auto takes it up to the
    # limit of h's elements and the three ops above; sizes never matter on the CPU.
    monkeypatch.setitem(
        gam_ext._backend._KERNELS, "cuda", {**gam_ext._backend._KERNELS["cuda"], "gam_mixer": True}
    )
    monkeypatch.setitem(gam_ext._backend.AUTO_FUSED_MAX_ELEMENTS, "cuda", 1000)
    use_backend("auto")
    use = gam_ext._backend.use_kernel
    assert use("gam_mixer", "cuda", torch.float16, 1000) and not use("gam_mixer", "cuda", torch.float16, 1001)
    assert not use("gam_mixer", "cuda", torch.float16) and not use("gam_mixer", "cuda", torch.float64, 10)
    assert gam_ext.backend_info()["mixer_fused_max_elements"]["cuda"] == 1000
    if gam_ext._backend._KERNELS["cpu"]["gam_mixer"]:
        assert use("gam_mixer", "cpu", torch.float32, 10**9)


@pytest.mark.parametrize("backend", ["auto", "fused", "unfused", "reference"])
def test_mixer_and_block_match_reference_in_float64(backend):
    torch.manual_seed(0)
    d = 6
    h = torch.randn(2, 7, d, dtype=torch.float64)
    params = dict(
        conv_weight=torch.randn(d, 1, 3, dtype=torch.float64),
        conv_bias=torch.randn(d, dtype=torch.float64),
        memory=torch.randn(5, d, dtype=torch.float64),
        gate_weight=torch.randn(2 * d, d, dtype=torch.float64),
        gate_bias=torch.randn(2 * d, dtype=torch.float64),
    )
    previous = gam_ext.set_backend(backend)
    try:
        torch.testing.assert_close(gam_ext.gam_mixer(h, **params), reference.gam_mixer(h, **params))
    finally:
        gam_ext.set_backend(previous)


def test_gate_fusion_promotes_mixed_dtypes():
    local = torch.randn(1, 3, 4, dtype=torch.bfloat16)
    out = gam_ext.gate_fusion(local, local.float(), torch.randn(1, 3, 8))
    assert out.dtype == torch.float32


def test_autocast_runs_activations_in_low_precision():
    h = torch.randn(2, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gam_ext.memory_retrieval(h, M)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.memory_retrieval(h, M), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_mixer_takes_fp32_parameters_with_half_activations(backend):
    torch.manual_seed(0)
    d = 8
    h = torch.randn(2, 5, d)
    params = dict(
        conv_weight=torch.randn(d, 1, 3),
        conv_bias=torch.randn(d),
        memory=torch.randn(4, d),
        gate_weight=torch.randn(2 * d, d),
        gate_bias=torch.randn(2 * d),
    )
    previous = gam_ext.set_backend(backend)
    try:
        out = gam_ext.gam_mixer(h.bfloat16(), **params)
    finally:
        gam_ext.set_backend(previous)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.gam_mixer(h, **params), rtol=5e-2, atol=1e-1)


def _mixer_args(d=4):
    gen = torch.Generator().manual_seed(3)
    return dict(
        h=torch.randn(2, 5, d, generator=gen),
        conv_weight=torch.randn(d, 1, 3, generator=gen),
        conv_bias=torch.randn(d, generator=gen),
        memory=torch.randn(6, d, generator=gen),
        gate_weight=torch.randn(2 * d, d, generator=gen),
        gate_bias=torch.randn(2 * d, generator=gen),
    )


def _block_args(d=4, hidden=16):
    gen = torch.Generator().manual_seed(4)
    mixer = _mixer_args(d)
    x = mixer.pop("h")
    return dict(
        x=x,
        ln1_weight=torch.ones(d),
        ln1_bias=torch.zeros(d),
        **mixer,
        ln2_weight=torch.ones(d),
        ln2_bias=torch.zeros(d),
        ffn_w1=torch.randn(hidden, d, generator=gen),
        ffn_b1=torch.randn(hidden, generator=gen),
        ffn_w2=torch.randn(d, hidden, generator=gen),
        ffn_b2=torch.randn(d, generator=gen),
    )


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (dict(gate_weight=torch.randint(0, 3, (8, 4))), TypeError, "gate_weight must be float"),
        (dict(gate_weight=torch.randn(4, 4)), ValueError, r"gate_weight must have shape \(8, 4\)"),
        (dict(gate_weight=torch.randn(8, 4, 1)), ValueError, "gate_weight must have 2 dimensions"),
        (dict(gate_weight=[[1.0] * 4] * 8), TypeError, "gate_weight must be a torch.Tensor"),
        (dict(gate_weight=None), TypeError, "gate_weight must be a torch.Tensor"),
        (dict(gate_bias=torch.randn(4)), ValueError, r"gate_bias must have shape \(8,\)"),
        (dict(gate_bias=torch.randn(8).long()), TypeError, "gate_bias must be float"),
        (dict(h=torch.randn(5, 4)), ValueError, "h must have 3 dimensions"),
    ],
)
def test_gam_mixer_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        gam_ext.gam_mixer(**{**_mixer_args(), **changes})


def test_gam_mixer_takes_no_gate_bias():
    args = {**_mixer_args(), "gate_bias": None}
    torch.testing.assert_close(gam_ext.gam_mixer(**args), reference.gam_mixer(**args))


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (dict(ln1_weight=torch.ones(5)), ValueError, r"ln1_weight must have shape \(4,\)"),
        (dict(ln2_bias=torch.zeros(4).int()), TypeError, "ln2_bias must be float"),
        (dict(ffn_w1=torch.randn(16, 5)), ValueError, r"ffn_w1 must have shape \(16, 4\)"),
        (dict(ffn_w1=2.0), TypeError, "ffn_w1 must be a torch.Tensor"),
        (dict(ffn_b1=torch.randn(15)), ValueError, r"ffn_b1 must have shape \(16,\)"),
        (dict(ffn_w2=torch.randn(16, 4)), ValueError, r"ffn_w2 must have shape \(4, 16\)"),
        (dict(ffn_b2=torch.randn(16)), ValueError, r"ffn_b2 must have shape \(4,\)"),
        (dict(gate_weight=torch.randint(0, 3, (8, 4))), TypeError, "gate_weight must be float"),
        (dict(eps=0.0), ValueError, "eps must be a positive float"),
        (dict(dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\)"),
        (dict(training=1), TypeError, "training must be a bool"),
    ],
)
def test_gam_block_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        gam_ext.gam_block(**{**_block_args(), **changes})


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((8.0,), TypeError, "GAMBlock: d_model must be an int, got 8.0"),
        ((0,), ValueError, "GAMBlock: d_model must be >= 1"),
        ((8, 4.0), TypeError, "num_memory_slots must be an int"),
        ((8, 4, True), TypeError, "conv_kernel_size must be an int"),
        ((8, 4, 3, 1.5), ValueError, r"dropout must be a float in \[0, 1\)"),
        ((8, 4, 3, "0.1"), ValueError, r"dropout must be a float in \[0, 1\)"),
    ],
)
def test_gam_block_module_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        gam_ext.GAMBlock(*args)


def test_gam_config_rejects_bool_and_non_number_dropout():
    with pytest.raises(ValueError, match="GAMConfig.n_layer"):
        gam_ext.GAMConfig(n_layer=True)
    with pytest.raises(ValueError, match="GAMConfig.dropout"):
        gam_ext.GAMConfig(dropout="0.1")


# Imports gam_ext with only the copies the test means on sys.path (this test environment may make
# another source tree importable): argv[1] is a folder to add ('' for none).
_IMPORT_ISOLATED = """
import os, sys
sys.path[:] = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, "gam_ext"))]
sys.path.insert(0, os.getcwd())
if sys.argv[1]:
    sys.path.append(sys.argv[1])
import gam_ext
print(gam_ext.backend_info()["ops"]["cpu"]["gate_fusion"])
"""


# An installed gam_ext beside torch (site-packages) cannot be hidden from the isolated import
# without hiding torch: the tests that use it run where gam_ext is a source tree (make's layout).
needs_source_tree_layout = pytest.mark.skipif(
    (Path(gam_ext.__file__).parent.parent / "torch").is_dir(),
    reason="gam_ext is installed beside torch, which the isolated import would hide with it",
)


def _copy_sources(folder):
    (folder / "gam_ext").mkdir(parents=True)
    for f in (Path(gam_ext.__file__).parent).glob("*.py"):
        (folder / "gam_ext" / f.name).write_bytes(f.read_bytes())
    return folder / "gam_ext"


def _import_in(cwd, extra=""):
    env = {k: v for k, v in os.environ.items() if k not in ("GAM_EXT_QUIET", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, "-c", _IMPORT_ISOLATED, str(extra)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _warning_line(stderr):
    lines = [line for line in stderr.splitlines() if "gam_ext._C" in line]
    assert len(lines) == 1, stderr
    return lines[0]


@needs_source_tree_layout
def test_unbuilt_extension_warning_gives_the_real_reason(tmp_path):
    package = _copy_sources(tmp_path / "tree")
    out = _import_in(tmp_path / "tree")
    assert out.returncode == 0 and out.stdout.strip() == "reference", out.stderr
    line = _warning_line(out.stderr)
    assert f"gam_ext._C is not built in {package}" in line
    assert "pip install --no-build-isolation ." in line and "build_ext --inplace" in line
    assert "circular import" not in out.stderr


@needs_source_tree_layout
def test_broken_extension_warning_gives_the_import_error(tmp_path):
    package = _copy_sources(tmp_path / "tree")
    (package / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_text("not a library")
    out = _import_in(tmp_path / "tree")
    assert out.returncode == 0 and out.stdout.strip() == "reference", out.stderr
    line = _warning_line(out.stderr)
    assert f"gam_ext._C in {package} failed to load: " in line
    assert "rebuild it against this PyTorch" in line


@needs_source_tree_layout
@pytest.mark.skipif(gam_ext.backend_info()["extension"] is None, reason="needs a built extension")
def test_source_tree_hiding_an_installed_build_says_so(tmp_path):
    _copy_sources(tmp_path / "tree")
    site = tmp_path / "site"
    (site / "gam_ext").mkdir(parents=True)
    for f in Path(gam_ext.__file__).parent.iterdir():
        if f.suffix in (".py", ".so"):
            (site / "gam_ext" / f.name).symlink_to(f)
    out = _import_in(tmp_path / "tree", site)
    line = _warning_line(out.stderr)
    assert f"it hides the built gam_ext installed at {site / 'gam_ext'}" in line
    assert "run from another directory" in line


@pytest.mark.skipif(not gam_ext._backend._KERNELS["cpu"]["gam_mixer"], reason="no CPU kernels built")
def test_gam_mixer_applies_the_size_rule(monkeypatch, use_backend):
    # gam_mixer passes h's element count to the rule: with a CPU limit set for the test, a small h
    # runs the fused op and a larger one the three ops (seen in the output's autograd node).
    d = 8
    small, large = torch.randn(1, 4, d, requires_grad=True), torch.randn(1, 5, d, requires_grad=True)
    params = (
        torch.randn(d, 1, 3),
        torch.randn(d),
        torch.randn(6, d),
        torch.randn(2 * d, d),
        torch.randn(2 * d),
    )
    monkeypatch.setitem(gam_ext._backend.AUTO_FUSED_MAX_ELEMENTS, "cpu", small.numel())
    use_backend("auto")
    assert "gam_mixer" in type(gam_ext.gam_mixer(small, *params).grad_fn).__name__
    assert "gate_fusion" in type(gam_ext.gam_mixer(large, *params).grad_fn).__name__
    assert gam_ext.backend_info()["mixer"]["cpu"] == "by size"


class _CastsOfShape(TorchDispatchMode):
    """Records the dtype conversions (aten._to_copy) of tensors of one shape."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape = shape
        self.casts: list[tuple[torch.dtype, torch.dtype | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].shape == self.shape:
            self.casts.append((args[0].dtype, kwargs.get("dtype")))
        return func(*args, **kwargs)


def test_unfused_mixer_casts_h_once_under_autocast(use_backend):
    # The three ops of the unfused mixer share one cast of h, as the fused op does: one fp32 ->
    # bf16 copy forward, and backward one bf16 -> fp32 copy of the summed gradient (not three
    # copies of each op's gradient, summed in fp32).
    args = _mixer_args(d=8)
    h = args.pop("h").requires_grad_()
    use_backend("unfused")
    with _CastsOfShape(h.shape) as forward, torch.autocast("cpu", dtype=torch.bfloat16):
        out = gam_ext.gam_mixer(h, **args)
    with _CastsOfShape(h.shape) as backward:
        out.backward(torch.ones_like(out))
    assert out.dtype == torch.bfloat16
    # (The gate linear on a CPU without bf16 matrix units runs in fp32: its copies of h go the
    # other way and are not counted.)
    assert forward.casts.count((torch.float32, torch.bfloat16)) == 1, forward.casts
    assert backward.casts.count((torch.bfloat16, torch.float32)) == 1, backward.casts
    torch.testing.assert_close(h.grad, _reference_mixer_grad(h.detach(), args), rtol=2e-2, atol=5e-2)


def _reference_mixer_grad(h: torch.Tensor, params: dict) -> torch.Tensor:
    h = h.double().requires_grad_()
    out = reference.gam_mixer(h, **{k: v.double() for k, v in params.items()})
    out.backward(torch.ones_like(out))
    return h.grad.float()


def test_a_build_without_cuda_kernels_on_a_gpu_machine_says_so():
    from gam_ext import _backend

    def no_query() -> bool:
        raise AssertionError("a build with CUDA kernels need not ask the driver")

    assert _backend._missing_cuda_kernels(cuda_compiled=True, cuda_available=no_query) is None
    assert _backend._missing_cuda_kernels(cuda_compiled=False, cuda_available=lambda: False) is None
    message = _backend._missing_cuda_kernels(cuda_compiled=False, cuda_available=lambda: True)
    assert "ops on CUDA tensors run the pure-PyTorch reference" in message
    assert "GAM_EXT_FORCE_CUDA=1 pip install --no-build-isolation ." in message
