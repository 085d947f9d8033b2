"""examples/train.py on several processes (CPU, gloo): DDP and FSDP2 against one process, FSDP2
mixed precision, sharded checkpoints and exact resume, activation checkpointing, export.

The equality tests run train.py's own phases (setup, restore, parallelize, train_step) in 2
processes started by torch.multiprocessing and compare the loss of every step; the resume test
runs the script under torchrun. Everything is tiny: 2 CPU cores run the whole file in about a
minute.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402
import train_parallel  # noqa: E402
from baselines import build_model  # noqa: E402

import gam_ext  # noqa: E402

ENV = {
    **os.environ,
    "GAM_EXT_QUIET": "1",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
}
STEPS = 20
PER_PROCESS_BATCH = 4
TINY = [
    "--tokenizer",
    "byte",
    "--d-model",
    "32",
    "--n-layer",
    "2",
    "--memory-slots",
    "8",
    "--seq-len",
    "32",
    "--warmup-steps",
    "3",
    "--threads",
    "1",
    "--lr",
    "3e-3",
    "--max-steps",
    str(STEPS),
    "--eval-batches",
    "1",
    "--sample-tokens",
    "0",
]
VARIANTS = {
    "ddp": [],
    "fsdp": ["--fsdp"],
    "fsdp-checkpointing": ["--fsdp", "--activation-checkpointing"],
    "fsdp-bf16": ["--fsdp", "--dtype", "bf16"],
}


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import random

    rng = random.Random(0)
    words = ["the cat", "a dog", "sat on", "ran to", "the mat.", "a red box.", "the tree."]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_losses(argv: list[str]) -> tuple[list[float], dict]:
    """Losses of STEPS training steps of train.py's own loop (mean over the processes)."""
    ctx = train.setup_distributed("cpu")
    args = train.parse_args(argv)
    train.set_threads(args.threads)
    run, ckpt = train.setup(args, ctx)
    train.restore(run, ckpt)
    train.parallelize(run)
    seen: dict = {}
    block = run.model.blocks[0]  # FSDP's own pre-forward hook (all-gather) runs before this one

    def record(module: torch.nn.Module, args: tuple) -> None:
        seen.setdefault("compute_dtype", str(module.gate.weight.dtype))

    hook = block.register_forward_pre_hook(record)
    losses = []
    for _ in range(STEPS):
        x, y = run.data.train.batch(run.step)
        losses.append(train.all_mean([train.train_step(run, x, y)], ctx)[0])
    hook.remove()
    seen["stored"] = str(type(block.gate.weight).__name__) + ":" + str(block.gate.weight.dtype)
    return losses, seen


def _worker(rank: int, world: int, port: int, corpus: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        GAM_EXT_QUIET="1",
    )
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    results = {}
    for name, flags in VARIANTS.items():
        losses, seen = step_losses(
            [
                "--train-file",
                corpus,
                *TINY,
                "--dropout",
                "0",
                "--batch-size",
                str(PER_PROCESS_BATCH),
                "--out-dir",
                f"{out}/{name}",
                *flags,
            ]
        )
        results[name] = {"losses": losses, **seen}
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def run_two_processes(corpus: Path, out: Path, timeout: float = 300) -> dict:
    context = mp.start_processes(
        _worker, args=(2, free_port(), str(corpus), str(out)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the 2-process run took longer than {timeout} s")
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process(corpus: Path, tmp_path: Path) -> None:
    results = run_two_processes(corpus, tmp_path)
    single = {}
    for name, flags in [("fp32", []), ("bf16", ["--dtype", "bf16"])]:
        single[name], _ = step_losses(
            [
                "--train-file",
                str(corpus),
                *TINY,
                "--dropout",
                "0",
                "--batch-size",
                str(2 * PER_PROCESS_BATCH),
                "--out-dir",
                str(tmp_path / f"single-{name}"),
                *flags,
            ]
        )
    # The same 20 batches (each process reads half of the single process's), the same updates.
    for name in ("ddp", "fsdp", "fsdp-checkpointing"):
        losses = results[name]["losses"]
        worst = max(abs(a - b) for a, b in zip(losses, single["fp32"], strict=True))
        assert worst < 1e-5, f"{name}: losses differ from one process by up to {worst:.2e}"
    assert single["fp32"][-1] < single["fp32"][0] - 0.5  # and it learns
    # FSDP keeps fp32 shards (DTensor) and computes in fp32, or in bf16 with --dtype bf16 (its
    # gradients reduced in fp32): close to the one-process bf16 autocast run, not equal.
    assert results["fsdp"]["stored"] == "DTensor:torch.float32"
    assert results["fsdp"]["compute_dtype"] == "torch.float32"
    assert results["fsdp-bf16"]["stored"] == "DTensor:torch.float32"
    assert results["fsdp-bf16"]["compute_dtype"] == "torch.bfloat16"
    mixed = results["fsdp-bf16"]["losses"]
    assert max(abs(a - b) for a, b in zip(mixed, single["bf16"], strict=True)) < 0.05
    assert max(abs(a - b) for a, b in zip(mixed, single["fp32"], strict=True)) < 0.05
    assert mixed != single["fp32"]


def torchrun(args: list[str], port: int, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(EXAMPLES / "train.py"),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp_resume_is_exact_and_exports_the_whole_model(corpus: Path, tmp_path: Path) -> None:
    common = [
        "--train-file",
        str(corpus),
        *TINY,
        "--batch-size",
        str(PER_PROCESS_BATCH),
        "--max-steps",
        "8",
        "--eval-interval",
        "2",
        "--fsdp",
    ]  # dropout 0.1: RNG matters
    full, parts = tmp_path / "full", tmp_path / "parts"
    result = torchrun([*common, "--out-dir", str(full), "--save-pretrained"], free_port())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory: FSDP2 over 2 process(es) (cpu)" in result.stdout
    result = torchrun([*common, "--out-dir", str(parts), "--stop-at-step", "5"], free_port())
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (parts / "ckpt-shards").iterdir()) == ["step-00000005"]
    assert len(list((parts / "ckpt-shards" / "step-00000005").glob("*.distcp"))) == 2
    result = torchrun(["--resume", "--out-dir", str(parts), "--threads", "1"], free_port())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step 5" in result.stdout
    expected, got = read_metrics(full), read_metrics(parts)
    assert [m["step"] for m in got] == [2, 4, 6, 8]
    for a, b in zip(expected, got, strict=True):
        assert (a["train_loss"], a["val_loss"]) == (b["train_loss"], b["val_loss"])

    # The exported model is the trained one: the same tensors as the final sharded checkpoint.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = torch.load(full / "ckpt.pt", map_location="cpu", weights_only=False)
    assert "model" not in ckpt and ckpt["sharded"] == "ckpt-shards/step-00000008"
    dcp_to_torch_save(full / ckpt["sharded"], tmp_path / "final.pt")
    final = torch.load(tmp_path / "final.pt", map_location="cpu", weights_only=False)["model"]
    exported = gam_ext.GAMModel.from_pretrained(full / "pretrained")
    state = exported.state_dict()
    assert state.keys() == final.keys()
    for key, value in final.items():
        assert torch.equal(state[key], value), key


# A two-layer GAM on the associative-recall task, small enough for a few FSDP steps on one CPU.
FSDP_RECALL = (
    "--dataset recall --recall-pairs 2 --recall-keys 4 --recall-values 4 --recall-train 64 "
    "--recall-val 16 --d-model 8 --n-layer 2 --memory-slots 4 --batch-size 16 --max-steps 4 "
    "--eval-interval 2 --threads 1 --dropout 0"
).split()


def test_fsdp_in_one_process_matches_the_plain_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recall = FSDP_RECALL
    assert train.main([*recall, "--out-dir", str(tmp_path / "plain")]) == 0
    assert train.main([*recall, "--out-dir", str(tmp_path / "fsdp"), "--fsdp"]) == 0
    assert "memory: FSDP2 over 1 process(es) (cpu)" in capsys.readouterr().out
    assert not dist.is_initialized()  # the one-process group is torn down again
    plain, fsdp = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "fsdp")
    for a, b in zip(plain, fsdp, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-6
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-6
    assert (tmp_path / "fsdp" / "ckpt-shards" / "step-00000004").is_dir()


@pytest.mark.parametrize("name", ["gam", "transformer", "mamba"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    model, _ = build_model(name, 50, 24, d_model=16, n_layer=2, dropout=0.1, num_memory_slots=6, n_head=2)
    checkpointed = copy.deepcopy(model)
    train_parallel.checkpoint_blocks(checkpointed)
    x, y = torch.randint(0, 50, (3, 24)), torch.randint(0, 50, (3, 24))
    results = []
    for m in (model, checkpointed):
        torch.manual_seed(1)  # the same dropout masks; the recomputation replays them
        _, loss = m(x, y)
        results.append((loss, torch.autograd.grad(loss, list(m.parameters()))))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss, loss_ckpt)
    for (pname, _), g, gc in zip(model.named_parameters(), grads, grads_ckpt, strict=True):
        torch.testing.assert_close(gc, g, rtol=1e-6, atol=1e-7, msg=lambda m, n=pname: f"{n}: {m}")
    assert checkpointed.state_dict().keys() == model.state_dict().keys()
    kept = [
        train_parallel.saved_activation_bytes(m, x, y, torch.autocast("cpu", enabled=False))
        for m in (model, checkpointed)
    ]
    assert kept[1] < 0.5 * kept[0]


@pytest.mark.slow
def test_activation_checkpointing_composes_with_torch_compile() -> None:
    torch.manual_seed(0)
    config = gam_ext.GAMConfig(
        vocab_size=37, block_size=16, d_model=16, n_layer=2, dropout=0.0, num_memory_slots=9
    )
    model = gam_ext.GAMModel(config)
    checkpointed = copy.deepcopy(model)
    train_parallel.checkpoint_blocks(checkpointed)
    x, y = torch.randint(0, 37, (2, 16)), torch.randint(0, 37, (2, 16))
    _, loss = model(x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(checkpointed, fullgraph=True)
    _, loss_c = compiled(x, y)
    grads_c = torch.autograd.grad(loss_c, list(checkpointed.parameters()))
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-5)
    for g, gc in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(gc, g, rtol=1e-4, atol=1e-4)


def test_train_exports_with_save_pretrained(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("safetensors")
    argv = [
        "--dataset",
        "recall",
        "--recall-pairs",
        "2",
        "--recall-keys",
        "4",
        "--recall-values",
        "4",
        "--recall-train",
        "64",
        "--recall-val",
        "16",
        "--d-model",
        "8",
        "--n-layer",
        "1",
        "--memory-slots",
        "4",
        "--batch-size",
        "16",
        "--max-steps",
        "2",
        "--eval-interval",
        "2",
        "--threads",
        "1",
        "--activation-checkpointing",
        "--out-dir",
        str(tmp_path),
        "--save-pretrained",
    ]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "memory: one process; activation checkpointing: a step keeps" in out
    assert f"exported:       {tmp_path / 'pretrained'}/ config.json model.safetensors" in out
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    trained = gam_ext.GAMModel.from_official(ckpt["model"]).eval()
    exported = gam_ext.GAMModel.from_pretrained(tmp_path / "pretrained").eval()
    idx = torch.randint(0, 8, (2, 7))
    with torch.no_grad():
        assert torch.equal(exported(idx)[0], trained(idx)[0])
    with pytest.raises(SystemExit):
        train.main(["--model", "transformer", "--save-pretrained"])
    assert "--save-pretrained exports a GAM model" in capsys.readouterr().err


@pytest.mark.slow
def test_fsdp_activation_checkpointing_and_compile_compose(tmp_path: Path) -> None:
    recall = [*FSDP_RECALL, "--sample-tokens", "0"]
    assert train.main([*recall, "--out-dir", str(tmp_path / "eager")]) == 0
    torch._dynamo.reset()
    assert (
        train.main(
            [*recall, "--out-dir", str(tmp_path / "all"), "--fsdp", "--compile", "--activation-checkpointing"]
        )
        == 0
    )
    for a, b in zip(read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "all"), strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-5
