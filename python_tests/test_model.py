"""GAMModel against an independent replica of the paper's model, and checkpoint loading."""

from __future__ import annotations

import argparse

import pytest
import torch
from paper_model import PaperModel

import gam_ext
from gam_ext import GAMConfig, GAMModel

SMALL = dict(vocab=97, block_size=24, d_model=40, n_layer=3, slots=7, kernel_size=4)


def make_paper_model(seed: int = 0, **overrides) -> PaperModel:
    torch.manual_seed(seed)
    config = {**SMALL, **overrides}
    model = PaperModel(
        config["vocab"],
        config["block_size"],
        config["d_model"],
        config["n_layer"],
        config["slots"],
        config["kernel_size"],
    )
    # Non-trivial LayerNorm and bias values, so that a swapped parameter would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("backend", ["auto", "unfused", "reference"])
def test_from_official_reproduces_paper_logits(backend):
    paper = make_paper_model()
    idx = torch.randint(0, SMALL["vocab"], (3, SMALL["block_size"]))
    previous = gam_ext.set_backend(backend)
    try:
        if backend == "auto" and gam_ext.backend_info()["extension"] is not None:
            assert gam_ext.backend_info()["mixer"]["cpu"] == "fused"
        ours = GAMModel.from_official(paper.state_dict()).eval()
        with torch.no_grad():
            expected = paper(idx)
            logits, loss = ours(idx)
    finally:
        gam_ext.set_backend(previous)
    assert loss is None
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_from_official_infers_config():
    paper = make_paper_model()
    model = GAMModel.from_official(paper.state_dict(), dropout=0.0)
    assert model.config == GAMConfig(
        vocab_size=97,
        block_size=24,
        d_model=40,
        n_layer=3,
        dropout=0.0,
        num_memory_slots=7,
        conv_kernel_size=4,
    )
    assert model.head.weight.data_ptr() == model.token_embedding.weight.data_ptr()


def test_from_official_reads_files_and_wrapped_checkpoints(tmp_path):
    paper = make_paper_model(seed=1)
    idx = torch.randint(0, SMALL["vocab"], (2, 10))
    with torch.no_grad():
        expected = paper(idx)
    prefixed = {"_orig_mod." + k: v for k, v in paper.state_dict().items()}
    torch.save({"model": prefixed, "step": 5}, tmp_path / "ckpt.pt")
    model = GAMModel.from_official(tmp_path / "ckpt.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=1e-4)


def test_from_official_is_strict():
    state = make_paper_model().state_dict()
    broken = dict(state)
    del broken["blocks.1.gate.bias"]
    with pytest.raises(RuntimeError, match="gate.bias"):
        GAMModel.from_official(broken)
    extra = {**state, "blocks.0.unexpected": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="unexpected"):
        GAMModel.from_official(extra)
    with pytest.raises(KeyError, match="token_embedding"):
        GAMModel.from_official({"foo": torch.zeros(1)})
    with pytest.raises(FileNotFoundError):
        GAMModel.from_official("/nonexistent/ckpt.pt")


def test_state_dict_round_trips_into_paper_model():
    ours = GAMModel(
        GAMConfig(vocab_size=50, block_size=12, d_model=16, n_layer=2, num_memory_slots=5, conv_kernel_size=3)
    ).eval()
    paper = PaperModel(50, 12, 16, 2, 5, 3).eval()
    paper.load_state_dict(ours.state_dict(), strict=True)
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], paper(idx), rtol=0, atol=1e-4)


def test_default_config_matches_paper_parameter_count():
    model = GAMModel(GAMConfig())
    assert model.num_parameters() == 22_599_680
    names = dict(model.blocks[0].named_children())
    assert list(names) == ["ln1", "causal_conv", "gate", "ffn", "ln2"]
    assert tuple(model.blocks[0].causal_conv.weight.shape) == (512, 1, 3)
    assert tuple(model.blocks[0].memory_bank.shape) == (512, 512)


def test_loss_and_backward_match_paper_model():
    paper = make_paper_model(seed=2)
    ours = GAMModel.from_official(paper.state_dict()).eval()
    idx = torch.randint(0, SMALL["vocab"], (2, 16))
    targets = torch.randint(0, SMALL["vocab"], (2, 16))
    _, loss = ours(idx, targets)
    expected = torch.nn.functional.cross_entropy(paper(idx).reshape(-1, SMALL["vocab"]), targets.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    loss.backward()
    expected.backward()
    ours_grads = dict(ours.named_parameters())
    for name, p in paper.named_parameters():
        key = "token_embedding.weight" if name == "head.weight" else name
        torch.testing.assert_close(
            ours_grads[key].grad, p.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_forward_rejects_bad_input():
    model = GAMModel(GAMConfig(vocab_size=20, block_size=8, d_model=8, n_layer=1, num_memory_slots=4))
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="d_model"):
        GAMConfig(d_model=0)


def test_generate_extends_the_prompt():
    model = GAMModel(GAMConfig(vocab_size=30, block_size=8, d_model=16, n_layer=1, num_memory_slots=4)).eval()
    prompt = torch.zeros(2, 3, dtype=torch.long)
    out = model.generate(prompt, 12, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 15)
    assert torch.equal(out[:, :3], prompt)
    assert int(out.max()) < 30 and int(out.min()) >= 0


@pytest.mark.parametrize(
    "prefix", ["module._orig_mod.", "_orig_mod.module.", "module.module.", "_orig_mod._orig_mod.module."]
)
def test_from_official_strips_any_mix_of_wrapper_prefixes(prefix, tmp_path):
    paper = make_paper_model(seed=3)
    idx = torch.randint(0, SMALL["vocab"], (2, 10))
    with torch.no_grad():
        expected = paper(idx)
    prefixed = {prefix + k: v for k, v in paper.state_dict().items()}
    torch.save({"model": prefixed}, tmp_path / "ckpt.pt")
    for source in (prefixed, tmp_path / "ckpt.pt"):
        model = GAMModel.from_official(source).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=1e-4)


def test_from_official_says_when_a_file_is_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("every tenth paragraph\n")
    with pytest.raises(ValueError, match="notes.txt' is not a PyTorch checkpoint"):
        GAMModel.from_official(text)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        GAMModel.from_official(empty)
    truncated = tmp_path / "truncated.pt"
    torch.save(make_paper_model().state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read .*truncated.pt. as a checkpoint"):
        GAMModel.from_official(truncated)
    other = tmp_path / "other.pt"
    torch.save({"model": make_paper_model().state_dict(), "args": argparse.Namespace(lr=1.0)}, other)
    with pytest.raises(ValueError, match="it holds other objects .*Namespace.*weights_only=False"):
        GAMModel.from_official(other)


def test_block_is_gam_block_and_each_norm_has_its_own_eps():
    torch.manual_seed(4)
    block = gam_ext.GAMBlock(16, num_memory_slots=6, conv_kernel_size=3, dropout=0.0).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 9, 16)

    def functional(eps: float) -> torch.Tensor:
        return gam_ext.gam_block(
            x,
            block.ln1.weight,
            block.ln1.bias,
            block.causal_conv.weight,
            block.causal_conv.bias,
            block.memory_bank,
            block.gate.weight,
            block.gate.bias,
            block.ln2.weight,
            block.ln2.bias,
            block.ffn[0].weight,
            block.ffn[0].bias,
            block.ffn[2].weight,
            block.ffn[2].bias,
            eps=eps,
        )

    with torch.no_grad():
        torch.testing.assert_close(block(x), functional(block.ln1.eps), rtol=0, atol=0)
        block.ln2.eps = 0.5  # a norm's own eps counts: ln2 no longer matches gam_block's shared eps
        h = x + block.mix(block.ln1(x))
        expected = h + block.ffn(
            torch.nn.functional.layer_norm(h, (16,), block.ln2.weight, block.ln2.bias, 0.5)
        )
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
        assert not torch.allclose(block(x), functional(block.ln1.eps))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        block(torch.randn(9, 16))


def test_gam_model_is_a_language_model():
    model = GAMModel(GAMConfig(vocab_size=30, block_size=8, d_model=16, n_layer=2, num_memory_slots=4))
    assert isinstance(model, gam_ext.modules.LanguageModel)
    assert model.block_size == 8 and len(model.blocks) == 2
    # The paper's parameter order (and so its state_dict keys) is kept.
    names = [name.split(".")[0] for name in model.state_dict()]
    assert list(dict.fromkeys(names)) == ["token_embedding", "pos_embedding", "blocks", "ln_f", "head"]
