"""examples/generate.py: streams text from a train.py run or a paper checkpoint; clear errors."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gam_ext

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
GENERATE = EXAMPLES / "generate.py"
sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402

ENV = {
    **os.environ,
    "GAM_EXT_QUIET": "1",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
}


def run_generate(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(GENERATE), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GAM trained for a few steps by examples/train.py on a small English-like text."""
    rng = random.Random(0)
    words = ["the cat", "a dog", "sat on", "looked at", "the mat.", "a red box."]
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(200))
    root = tmp_path_factory.mktemp("generate")
    (root / "tiny.txt").write_text(text + "\n")
    threads = torch.get_num_threads()
    try:
        rc = train.main(
            [
                "--train-file",
                str(root / "tiny.txt"),
                "--vocab-size",
                "80",
                "--d-model",
                "32",
                "--n-layer",
                "2",
                "--memory-slots",
                "16",
                "--seq-len",
                "24",
                "--batch-size",
                "8",
                "--max-steps",
                "4",
                "--warmup-steps",
                "1",
                "--sample-tokens",
                "4",
                "--threads",
                "1",
                "--out-dir",
                str(root / "run"),
                "--data-dir",
                str(root / "data"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return root / "run"


def expected_text(model: gam_ext.GAMModel, tokenizer, prompt: str, n: int) -> str:
    """What generate.py prints for a greedy run: the prompt, a space, the new text, with each
    end-of-document token a paragraph break."""
    ids = tokenizer.encode(prompt).ids
    out = model.generate(torch.tensor([ids]), n, greedy=True)[0, len(ids) :].tolist()
    eos = tokenizer.token_to_id("[EOS]")
    pieces, current = [], []
    for t in out:
        if t == eos:
            pieces.append(tokenizer.decode(current))
            current = []
        else:
            current.append(t)
    pieces.append(tokenizer.decode(current))
    return prompt + " " + "\n\n".join(pieces) + "\n"


def test_generates_from_a_train_run_as_model_generate_does(run_dir: Path) -> None:
    from tokenizers import Tokenizer

    assert (run_dir / "tokenizer.json").is_file()  # train.py keeps the run's tokenizer
    result = run_generate(["--checkpoint", str(run_dir), "--greedy", "--max-new-tokens", "15", "the cat"])
    assert result.returncode == 0, result.stderr
    model = gam_ext.GAMModel.from_official(run_dir / "ckpt.pt", dropout=0.0).eval()
    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    assert result.stdout == expected_text(model, tokenizer, "the cat", 15)
    assert "15 tokens generated in" in result.stderr and "tokens/s" in result.stderr
    # The prompt from stdin, sampled, the tokenizer rebuilt from the run's settings.
    alone = run_dir.parent / "alone"
    alone.mkdir()
    shutil.copy(run_dir / "ckpt.pt", alone / "ckpt.pt")
    sampled = run_generate(
        ["--checkpoint", str(alone / "ckpt.pt"), "--max-new-tokens", "8", "--top-p", "0.9", "--seed", "3"],
        stdin="a dog\n",
    )
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("a dog ") and "8 tokens generated" in sampled.stderr


def test_paper_checkpoint_with_a_byte_tokenizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = gam_ext.GAMModel(
        gam_ext.GAMConfig(
            vocab_size=256, block_size=16, d_model=16, n_layer=2, num_memory_slots=8, dropout=0.0
        )
    )
    torch.save(model.state_dict(), tmp_path / "paper.pt")
    result = run_generate(
        [
            "--checkpoint",
            str(tmp_path / "paper.pt"),
            "--tokenizer",
            "byte",
            "--greedy",
            "--max-new-tokens",
            "30",
            "ab",
        ]
    )
    assert result.returncode == 0, result.stderr
    new = model.eval().generate(torch.tensor([[97, 98]]), 30, greedy=True)[0, 2:].tolist()
    assert result.stdout == "ab" + bytes(new).decode("utf-8", "replace") + "\n"
    missing = run_generate(["--checkpoint", str(tmp_path / "paper.pt"), "ab"])
    assert missing.returncode == 2 and "pass --tokenizer" in missing.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
        (["--top-p", "1.5", "x"], "--top-p must be in (0, 1]"),
        (["--max-new-tokens", "-1", "x"], "--max-new-tokens must be >= 0"),
        (["--device", "cpu", "--cuda-graph", "x"], "--cuda-graph needs a GPU"),
        (["--checkpoint", "{tmp}", "x"], "holds a transformer model"),
    ],
)
def test_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    torch.save({"model": {}, "args": {"model": "transformer"}}, tmp_path / "ckpt.pt")
    result = run_generate([a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
