"""Generation with the recurrent state: GAMModel.allocate_state / prefill / step / generate.

The step must give the full forward's logits while the context fits (every dtype, within the
design's tolerances), and generate_tokens' crop semantics past block_size; greedy generation must
give generate_tokens' tokens for prompts shorter and longer than block_size. The state must not
grow, and bad input must fail clearly.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import TOL

import gam_ext
from gam_ext import GAMConfig, GAMModel, GAMState
from gam_ext.generation import StepGraph, window_length
from gam_ext.modules import generate_tokens

VOCAB = 61


def make_model(seed=0, dtype=torch.float32, **overrides) -> GAMModel:
    config = dict(
        vocab_size=VOCAB,
        block_size=20,
        d_model=48,
        n_layer=3,
        num_memory_slots=24,
        conv_kernel_size=3,
        dropout=0.0,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = GAMModel(GAMConfig(**config))
    # Non-trivial LayerNorm and bias values, so that a swapped parameter would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def tokens(shape, seed=1, vocab=VOCAB):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def step_logits(model, idx, n_prompt):
    """Logits for positions n_prompt-1 .. N-1: a prefill of idx[:, :n_prompt], then steps."""
    state = model.allocate_state(idx.shape[0])
    out = [model.prefill(idx[:, :n_prompt], state)]
    for t in range(n_prompt, idx.shape[1]):
        out.append(model.step(idx[:, t], state))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_step_logits_match_the_full_forward(dtype):
    model = make_model(dtype=dtype)
    idx = tokens((2, 20))  # up to block_size
    with torch.no_grad():
        full = model(idx)[0]
        previous = gam_ext.set_backend("reference")
        try:
            ref64 = make_model(dtype=torch.float64)(idx)[0]
        finally:
            gam_ext.set_backend(previous)
    for n_prompt in (1, 2, 9):  # prompts shorter than K-1, equal, longer
        ours = step_logits(model, idx, n_prompt)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, full[:, n_prompt - 1 :], **TOL[dtype])
        # Against the float64 model: the dtype's tolerance, or at most twice the full forward's
        # own error in that dtype (the error budget of docs/design.md).
        expected = ref64[:, n_prompt - 1 :]
        diff = (ours.double() - expected).abs()
        ok = diff <= TOL[dtype]["atol"] + TOL[dtype]["rtol"] * expected.abs()
        ok |= diff <= 2 * (full[:, n_prompt - 1 :].double() - expected).abs() + 1e-5
        assert bool(ok.all()), f"{int((~ok).sum())} logits off, max|diff| {diff.max():.3g}"


@pytest.mark.parametrize("n_prompt,n_new", [(3, 30), (25, 12)], ids=["short", "long"])
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # window 7 < block_size 20
        dict(conv_kernel_size=4, n_layer=2),  # window 7, K = 4
        dict(block_size=5),  # block_size < window: the whole crop
        dict(conv_kernel_size=1),  # no conv state, window 1
    ],
    ids=["K3", "K4", "tiny_block", "K1"],
)
def test_greedy_generate_matches_generate_tokens(n_prompt, n_new, overrides):
    # Prompts shorter and longer than block_size; generation runs far past it.
    model = make_model(**overrides)
    idx = tokens((3, n_prompt), seed=2)
    ours = model.generate(idx, n_new, greedy=True)
    expected = generate_tokens(model, idx, n_new, model.config.block_size, greedy=True)
    assert torch.equal(ours, expected)


def test_step_past_block_size_matches_the_crop():
    # Past block_size the logits are those of the last block_size tokens at positions 0..bs-1.
    model = make_model()
    idx = tokens((2, 50), seed=3)
    ours = step_logits(model, idx, 4)
    with torch.no_grad():
        for t in range(3, 50):
            crop = idx[:, max(0, t + 1 - 20) : t + 1]
            torch.testing.assert_close(ours[:, t - 3], model(crop)[0][:, -1], **TOL[torch.float32])


def test_sampling_matches_generate_tokens_with_one_generator():
    model = make_model()
    idx = tokens((2, 4), seed=4)
    for kwargs in (dict(temperature=0.8, top_k=10), dict(temperature=1.3), dict(top_p=0.9)):
        ours = model.generate(idx, 30, generator=torch.Generator().manual_seed(5), **kwargs)
        expected = generate_tokens(model, idx, 30, 20, generator=torch.Generator().manual_seed(5), **kwargs)
        assert torch.equal(ours, expected), kwargs


def test_top_p_and_eos():
    model = make_model()
    idx = tokens((3, 4), seed=6)
    greedy = model.generate(idx, 10, greedy=True)
    nucleus = model.generate(idx, 10, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(nucleus, greedy)  # a tiny nucleus keeps only the likeliest token
    # eos: a sequence that produced it continues with it; all done -> stop early.
    eos = int(greedy[0, 6])
    out = model.generate(idx, 10, greedy=True, eos_token_id=eos)
    for row, ref in zip(out, greedy, strict=True):
        new, ref_new = row[4:].tolist(), ref[4:].tolist()
        if eos in ref_new:
            first = ref_new.index(eos)
            assert new[: first + 1] == ref_new[: first + 1]
            assert all(t == eos for t in new[first:])
        else:
            assert new == ref_new[: len(new)]
    # One sequence: it stops right after its first eos.
    first = greedy[0, 4:].tolist().index(eos)
    single = model.generate(idx[:1], 10, greedy=True, eos_token_id=eos)
    assert torch.equal(single, greedy[:1, : 4 + first + 1])
    assert model.generate(idx, 0).data_ptr() == idx.data_ptr()


def test_state_is_constant_size_and_reusable():
    model = make_model()
    state = model.allocate_state(2)
    expected_bytes = 3 * 2 * 2 * 48 * 4 + 2 * 4 + 2 * window_length(model) * 8
    assert state.nbytes == expected_bytes
    tensors = [t.data_ptr() for t in (*state.conv, state.positions, state.tokens)]
    model.prefill(tokens((2, 5)), state)
    for t in range(40):
        model.step(tokens((2,), seed=t), state)
    assert state.nbytes == expected_bytes and state.seqlen == 45
    assert [t.data_ptr() for t in (*state.conv, state.positions, state.tokens)] == tensors
    assert state.positions.tolist() == [45, 45]
    # A used state serves a new prompt: prefill overwrites all of it.
    idx = tokens((2, 6), seed=7)
    fresh = model.allocate_state(2)
    a, b = model.prefill(idx, state), model.prefill(idx, fresh)
    assert torch.equal(a, b)
    assert torch.equal(model.step(idx[:, 0], state), model.step(idx[:, 0], fresh))
    clone = state.clone()
    model.step(idx[:, 1], state)
    assert clone.seqlen == state.seqlen - 1
    clone.copy_(state)
    assert clone.seqlen == state.seqlen and torch.equal(clone.conv[0], state.conv[0])


def test_block_step_is_the_last_row_of_forward():
    model = make_model()
    block = model.blocks[0]
    x = torch.randn(2, 6, 48)
    with torch.no_grad():
        full = block(x)
        state = torch.zeros(2, 2, 48)
        rows = [block.step(x[:, t], state) for t in range(6)]
    torch.testing.assert_close(torch.stack(rows, 1), full, **TOL[torch.float32])


def test_inference_mode_autocast_training_mode_and_reference_backend():
    model = make_model()
    idx = tokens((2, 6), seed=8)
    expected = model.generate(idx, 8, greedy=True)
    with torch.inference_mode():  # all of it inside inference mode
        state = model.allocate_state(2)
        logits = model.prefill(idx, state)
        logits = model.step(logits.argmax(-1), state)
    outside = model.allocate_state(2)  # allocated outside, stepped inside
    with torch.inference_mode():
        model.prefill(idx, outside)
        torch.testing.assert_close(model.step(expected[:, 6], outside), logits, **TOL[torch.float32])
    model.train()  # generate runs without dropout and restores the mode
    assert torch.equal(model.generate(idx, 8, greedy=True), expected) and model.training
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.allocate_state(2)
        assert state.dtype == torch.bfloat16
        ours = model.prefill(idx, state)
        full = model(idx)[0][:, -1]
        torch.testing.assert_close(ours.float(), full.float(), **TOL[torch.bfloat16])
    previous = gam_ext.set_backend("reference")
    try:
        assert torch.equal(model.generate(idx, 8, greedy=True), expected)
    finally:
        gam_ext.set_backend(previous)


def test_bad_input_is_a_clear_error():
    model = make_model()
    idx = tokens((2, 4))
    state = model.allocate_state(2)
    model.prefill(idx, state)
    block, block_state = model.blocks[0], torch.zeros(2, 2, 48)
    cases = [
        (lambda: model.step(idx[:, 0], model.allocate_state(3)), ValueError, "holds 3 sequences"),
        (
            lambda: model.step(idx[:, 0], model.allocate_state(2, dtype=torch.float64)),
            ValueError,
            "state has dtype torch.float64 but the model computes in torch.float32",
        ),
        (
            lambda: model.step(idx[:, 0], model.allocate_state(2, device="meta")),
            ValueError,
            "state is on meta but the model is on cpu",
        ),
        (lambda: model.step(idx[:, 0], "state"), TypeError, "state must be a GAMState"),
        (
            lambda: model.step(torch.tensor([0, VOCAB]), state),
            ValueError,
            rf"token id {VOCAB}, outside the vocabulary \[0, {VOCAB}\)",
        ),
        (lambda: model.step(torch.tensor([-1, 0]), state), ValueError, "token id -1"),
        (lambda: model.step(idx[:, :2], state), ValueError, "one token per sequence"),
        (lambda: model.step(idx[:, 0].float(), state), TypeError, "integer token ids"),
        (lambda: model.prefill(torch.full((2, 3), VOCAB + 5), state), ValueError, f"token id {VOCAB + 5}"),
        (lambda: model.prefill(idx[:, :0], state), ValueError, "at least one token"),
        (lambda: model.prefill(idx[0], state), ValueError, r"expected \(B, N\)"),
        (lambda: model.prefill(idx, make_model(d_model=16).allocate_state(2)), ValueError, "another shape"),
        (lambda: model.generate(idx, -1), ValueError, "max_new_tokens must be >= 0"),
        (lambda: model.generate(idx, 2.0), TypeError, "max_new_tokens must be an int"),
        (lambda: model.generate(idx, 2, temperature=-1.0), ValueError, "temperature"),
        (lambda: model.generate(idx, 2, top_k=0), ValueError, "top_k"),
        (lambda: model.generate(idx, 2, top_p=0.0), ValueError, "top_p"),
        (lambda: model.generate(idx, 2, top_p=1.5), ValueError, "top_p"),
        (lambda: model.generate(idx, 2, eos_token_id=VOCAB), ValueError, "eos_token_id"),
        (lambda: model.generate(idx + VOCAB, 2), ValueError, "outside the vocabulary"),
        (
            lambda: model.generate(idx, 2, cuda_graph=True),
            ValueError,
            "cuda_graph=True needs a model on a CUDA",
        ),
        (lambda: model.generate(idx, 2, cuda_graph=1), TypeError, "cuda_graph must be a bool"),
        (lambda: StepGraph(model, state), ValueError, "StepGraph needs a model on a CUDA device"),
        (lambda: block.step(torch.randn(2, 47), block_state), ValueError, r"x must have shape \(B, 48\)"),
        (lambda: block.step(torch.randn(2, 1, 48), block_state), ValueError, "x must have 2 dimensions"),
        (
            lambda: block.step(torch.randn(3, 48), block_state),
            ValueError,
            r"conv_state must have shape \(B, W, D\)",
        ),
        (
            lambda: block.step(torch.randn(2, 48), block_state.double()),
            TypeError,
            "conv_state must have the dtype",
        ),
        (lambda: block.step(torch.randn(2, 48), block_state[:, :1]), ValueError, "at least K-1 = 2 rows"),
        (lambda: model.allocate_state(0), ValueError, "batch_size must be a positive int"),
        (lambda: model.allocate_state(2, dtype=torch.int32), TypeError, "floating-point"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    assert isinstance(state, GAMState)
