"""Token shards: examples/prepare_data.py writes them, train.py --shards reads them by memory map."""

from __future__ import annotations

import json
import mmap
import os
import random
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import prepare_data  # noqa: E402
import token_shards  # noqa: E402
import train  # noqa: E402

ENV = {
    **os.environ,
    "GAM_EXT_QUIET": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
}
TINY = [
    "--d-model",
    "32",
    "--n-layer",
    "1",
    "--memory-slots",
    "8",
    "--seq-len",
    "24",
    "--batch-size",
    "4",
    "--warmup-steps",
    "2",
    "--threads",
    "1",
    "--sample-tokens",
    "0",
]


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


SYLLABLES = ["ka", "to", "ri", "mo", "sen", "dal", "pu", "ve", "lin", "gor", "e", "as", "qu", "zi"]
WORDS = ["".join(random.Random(i).choices(SYLLABLES, k=1 + i % 3)) for i in range(300)]


def _sentences(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of text files: paragraphs, a file of lines, a subfolder and a hidden file."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("texts")
    (root / "b").mkdir()
    (root / "a.txt").write_text("\n\n".join(_sentences(rng, 12) for _ in range(120)) + "\n")
    (root / "b" / "c.txt").write_text("\n\n".join(_sentences(rng, 9) for _ in range(120)) + "\n")
    (root / "b" / "lines.txt").write_text("".join(_sentences(rng, 6) + "\n" for _ in range(200)))
    (root / ".hidden.txt").write_text("never read\n")
    return root


def _prepare(out: Path, source: Path, *extra: str) -> dict:
    assert prepare_data.main(["--input", str(source), "--out", str(out), *extra]) == 0
    return json.loads((out / "index.json").read_text())


def test_prepare_data_on_a_folder_writes_shards_and_an_index(text_folder: Path, tmp_path: Path) -> None:
    index = _prepare(
        tmp_path / "bpe", text_folder, "--vocab-size", "120", "--val-every", "10", "--shard-tokens", "3000"
    )
    assert index["format"] == "gam_ext token shards" and index["dtype"] == "uint16"
    assert index["vocab_size"] == 120 and index["tokenizer"]["type"] == "bpe"
    assert index["source"] == f"local: 3 file(s) under {text_folder}"
    train_split, val_split = index["splits"]["train"], index["splits"]["val"]
    assert train_split["documents"] + val_split["documents"] == 120 + 120 + 200  # no hidden file
    assert val_split["documents"] == 44  # every tenth document
    assert len(train_split["shards"]) > 1
    assert all(s["tokens"] == 3000 for s in train_split["shards"][:-1])
    for split in (train_split, val_split):
        sizes = [(tmp_path / "bpe" / s["file"]).stat().st_size for s in split["shards"]]
        assert sum(sizes) == 2 * split["tokens"]
    shards = token_shards.TokenShards(tmp_path / "bpe")
    tokens = np.concatenate(shards.splits["train"].arrays)
    assert isinstance(shards.splits["train"].arrays[0].base.obj, mmap.mmap)  # memory-mapped
    assert int(tokens.max()) < 120
    eos = index["tokenizer"]["eos_id"]
    first = tokens[: int(np.argmax(tokens == eos))].tolist()
    first_doc = (text_folder / "a.txt").read_text().split("\n\n")[0]
    # (the BPE decoder puts a space before punctuation: the Whitespace pre-tokenizer splits it off)
    assert shards.load_tokenizer().decode(first).replace(" .", ".") == first_doc

    byte = _prepare(tmp_path / "byte", text_folder, "--tokenizer", "byte", "--val-every", "10")
    assert byte["vocab_size"] == 256 and byte["tokenizer"]["type"] == "byte"
    data = np.fromfile(tmp_path / "byte" / "train-00000.bin", dtype="<u2")
    assert bytes(data[:40].astype(np.uint8)).decode() == first_doc[:40]


def test_prepare_data_errors(text_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _prepare(tmp_path / "out", text_folder, "--tokenizer", "byte")
    assert (
        prepare_data.main(
            ["--input", str(text_folder), "--out", str(tmp_path / "out"), "--tokenizer", "byte"]
        )
        == 2
    )
    assert "already holds token shards (index.json); pass --overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latin1.txt").write_bytes("café au lait\n\nencore\n".encode("latin-1"))
    assert prepare_data.main(["--input", str(bad), "--out", str(tmp_path / "o2"), "--tokenizer", "byte"]) == 2
    assert "latin1.txt is not UTF-8 text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_data.main(["--out", str(tmp_path / "o3")])
    assert "give one source" in capsys.readouterr().err


def test_prepare_data_streams_hugging_face_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name: str, config: str | None = None, split: str = "train", streaming: bool = False):
        calls.append((name, config, split, streaming))
        if streaming and name == "no-stream":
            raise ValueError("streaming is not supported")
        rng = random.Random(split)
        return iter([{"text": _sentences(rng, 10)} for _ in range(60)] + [{"text": "  "}])

    fake = types.SimpleNamespace(load_dataset=load_dataset, disable_progress_bars=lambda: None)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    index = _prepare_hf(
        tmp_path / "hf", "--hf-dataset", "corpus", "--hf-config", "c1", "--val-split", "validation"
    )
    assert calls == [("corpus", "c1", "train", True), ("corpus", "c1", "validation", True)]
    assert index["splits"]["train"]["documents"] == 60  # blank records skipped
    assert index["splits"]["val"]["documents"] == 60
    assert index["source"] == "Hugging Face dataset corpus (c1), split train"
    calls.clear()
    _prepare_hf(tmp_path / "hf2", "--hf-dataset", "no-stream")
    assert calls == [("no-stream", None, "train", True), ("no-stream", None, "train", False)]


def _prepare_hf(out: Path, *argv: str) -> dict:
    assert prepare_data.main([*argv, "--out", str(out), "--tokenizer", "byte", "--val-every", "5"]) == 0
    return json.loads((out / "index.json").read_text())


def _write_shards(folder: Path, train_tokens: int, val_tokens: int = 50_000) -> None:
    """Random byte-vocabulary shards, written in pieces (the test process stays small too)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    writers = {s: token_shards.SplitWriter(folder, s, np.dtype(np.uint16), 1 << 40) for s in ("train", "val")}
    for split, total in (("train", train_tokens), ("val", val_tokens)):
        for start in range(0, total, 1 << 22):
            writers[split].write(rng.integers(0, 256, min(1 << 22, total - start)), documents=1)
        writers[split].close()
    token_shards.write_index(
        folder,
        {
            "dtype": "uint16",
            "vocab_size": 256,
            "tokenizer": {"type": "byte"},
            "source": "test",
            "splits": {s: w.summary() for s, w in writers.items()},
        },
    )


# Runs train.py's shard loader the way a training run does, and reports the peak resident memory
# before and after reading 400 batches (Linux: VmHWM).
MEMORY_PROBE = """
import argparse, json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
import train_data
from train_parallel import Dist

def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

torch.zeros(16, 128, dtype=torch.long)[:, 1:].to("cpu")  # warm up torch's allocator
before = peak_kb()
args = argparse.Namespace(dataset="shards", shards=sys.argv[2], seq_len=128, batch_size=16,
                          seed=0, train_file=None)
data = train_data.prepare_data(args, Dist())
arrays = data.train.sampler.split.arrays
seen = 0
for step in range(400):
    x, y = data.train.batch(step)
    seen += x.numel()
import mmap
print(json.dumps({"before_kb": before, "after_kb": peak_kb(), "tokens_read": seen,
                  "memmap": all(isinstance(a.base.obj, mmap.mmap) for a in arrays),
                  "shard_bytes": int(sum(a.nbytes for a in arrays))}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_training_reads_a_large_shard_by_memory_map(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    _write_shards(folder, train_tokens=50_000_000)  # a 100 MB shard
    assert (folder / "train-00000.bin").stat().st_size == 100_000_000
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(EXAMPLES), str(folder)],
        capture_output=True,
        text=True,
        timeout=180,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["memmap"] and probe["shard_bytes"] == 100_000_000
    assert probe["tokens_read"] == 400 * 16 * 128
    grown_mb = (probe["after_kb"] - probe["before_kb"]) / 1024
    print(f"peak memory grew by {grown_mb:.1f} MB over 400 batches of a 100 MB shard")
    assert grown_mb < 20, f"the loader's peak memory grew by {grown_mb:.1f} MB"


def test_windows_depend_on_the_step_only_and_split_over_processes(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    _write_shards(folder, train_tokens=20_000, val_tokens=2_000)
    split = token_shards.TokenShards(folder).splits["train"]
    sampler = token_shards.WindowSampler(split, seq_len=16, seed=3)
    x, y = sampler.batch(7, batch_size=6)
    again, _ = token_shards.WindowSampler(split, seq_len=16, seed=3).batch(7, batch_size=6)
    assert torch.equal(x, again) and torch.equal(x[:, 1:], y[:, :-1])
    halves = [sampler.batch(7, batch_size=3, rank=r, world=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), x)  # 2 processes read what one process reads
    assert not torch.equal(sampler.batch(8, batch_size=6)[0], x)


def test_shards_train_and_resume_at_the_same_position(
    text_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shards = tmp_path / "shards"
    _prepare(shards, text_folder, "--vocab-size", "100", "--val-every", "10")
    common = [
        "--shards",
        str(shards),
        *TINY,
        "--max-steps",
        "8",
        "--eval-interval",
        "2",
        "--eval-batches",
        "2",
    ]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert train.main([*common, "--out-dir", str(full)]) == 0
    out = capsys.readouterr().out
    assert f"data:   shards {shards}:" in out and "memory-mapped uint16 shard(s)" in out
    assert "vocab 100," in out
    assert train.main([*common, "--out-dir", str(parts), "--stop-at-step", "5"]) == 0
    # The moved copy of the shards resumes; settings come from the checkpoint.
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in shards.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    assert train.main(["--shards", str(moved), "--resume", "--out-dir", str(parts), "--threads", "1"]) == 0
    assert "resuming from step 5" in capsys.readouterr().out
    expected = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (parts / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in got] == [2, 4, 6, 8]
    for a, b in zip(expected, got, strict=True):
        assert (a["train_loss"], a["val_loss"]) == (b["train_loss"], b["val_loss"])
    ckpt = torch.load(parts / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["data_order"]["step"] == 8 and ckpt["data_order"]["windows_drawn"] == 32

    other = tmp_path / "other"
    _prepare(other, text_folder, "--vocab-size", "100", "--val-every", "7")
    assert train.main(["--shards", str(other), "--resume", "--out-dir", str(parts)]) == 2
    assert "are not those the checkpoint was trained on" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shards", "/nonexistent/shards"], "--shards: no such folder"),
        (["--shards", ".", "--train-file", __file__], "--shards and --train-file exclude"),
        (["--shards", ".", "--dataset", "recall"], "--shards and --dataset recall exclude"),
        (["--shards", ".", "--vocab-size", "100"], "--shards and --vocab-size exclude"),
    ],
)
def test_shard_flags_give_clear_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        train.main(argv)
    assert message in capsys.readouterr().err


def test_broken_shard_folders_give_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train.main(["--shards", str(tmp_path), *TINY, "--out-dir", str(tmp_path / "r")]) == 2
    assert "has no index.json (write one with examples/prepare_data.py" in capsys.readouterr().err
    folder = tmp_path / "s"
    _write_shards(folder, train_tokens=5_000, val_tokens=1_000)
    with open(folder / "train-00000.bin", "ab") as f:
        f.write(b"xx")
    assert train.main(["--shards", str(folder), *TINY, "--out-dir", str(tmp_path / "r")]) == 2
    assert "train-00000.bin has 10002 bytes, index.json says 10000" in capsys.readouterr().err
