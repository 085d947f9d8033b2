"""Train a GAM language model (or the paper's Transformer / Mamba baselines) and evaluate it.

    python examples/train.py                                  # CPU-sized GAM on the offline corpus
    python examples/train.py --model transformer --max-steps 200
    python examples/train.py --preset paper --dataset wikitext2 --device cuda   # Table 1 recipe
    python examples/train.py --compare --models gam,transformer,mamba           # a Table 1 for you
    python examples/train.py --dataset recall                 # synthetic associative recall
    torchrun --nproc_per_node 8 examples/train.py --preset paper --dataset tinystories

Writes to --out-dir (default runs/<model>-<dataset> in the current directory): metrics.jsonl (one
line per evaluation), ckpt.pt (continue exactly with --resume), loss.png, ppl.png, sample.txt,
summary.json and, with the BPE tokenizer, tokenizer.json (examples/generate.py reads it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
# gam_ext as installed (pip install, or the source tree made importable by `make`); only when no
# gam_ext is installed, the source tree this script lives in (built in place by `make build`).
if importlib.util.find_spec("gam_ext") is None:
    sys.path.insert(1, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
from baselines import build_model  # noqa: E402
from lm_data import IGNORE_INDEX, DataError  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from train_args import (  # noqa: E402
    UserError,
    build_parser,  # noqa: F401  (part of this script's interface)
    check_packages,
    dataset_name,
    default_out_dir,
    parse_args,
)
from train_checkpoint import (  # noqa: E402
    load_sharded_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_sharded_checkpoint,
)
from train_data import Data, prepare_data  # noqa: E402
from train_parallel import (  # noqa: E402
    Dist,
    all_mean,
    all_sum,
    checkpoint_blocks,
    full_state_dict,
    saved_activation_bytes,
    setup_distributed,
    shard_model,
)
from train_report import (  # noqa: E402
    compare_table,
    gam_ext_backend,
    plot_metrics,
    summary_text,
    write_sample,
)

# ------------------------------------------------------------------------------------------------
# Schedule and evaluation
# ------------------------------------------------------------------------------------------------


def lr_lambda(warmup_steps: int, total_steps: int) -> Any:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Data,
    args: argparse.Namespace,
    ctx: Dist,
    autocast: Any,
    max_batches: int = 0,
    lockstep: bool = False,
) -> dict[str, float]:
    """Mean over validation batches of the batch-mean cross-entropy (as the paper), and for the
    recall task the accuracy on the answers. Batches are shared out over the processes; with
    ``lockstep`` (FSDP, whose forward gathers parameters from every process) each process runs
    as many forwards as the busiest, the extra ones on batch 0 and not counted."""
    model.eval()
    n_batches = math.ceil(len(data.val_x) / args.batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    loss_sum, correct, answers = 0.0, 0.0, 0.0
    rounds = math.ceil(n_batches / ctx.world) if lockstep else 0
    batches = range(ctx.rank, max(n_batches, rounds * ctx.world), ctx.world)
    for i in batches:
        j = i if i < n_batches else 0
        x = data.val_x[j * args.batch_size : (j + 1) * args.batch_size].to(ctx.device)
        y = data.val_y[j * args.batch_size : (j + 1) * args.batch_size].to(ctx.device)
        with autocast:
            logits, loss = model(x, y)
        if i >= n_batches:
            continue
        loss_sum += loss.item()
        mask = y != IGNORE_INDEX
        correct += (logits.argmax(-1)[mask] == y[mask]).sum().item()
        answers += mask.sum().item()
    loss_sum, correct, answers = all_sum([loss_sum, correct, answers], ctx)
    model.train()
    val_loss = loss_sum / n_batches
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 700.0)),
        "val_acc": correct / max(answers, 1.0),
    }


# ------------------------------------------------------------------------------------------------
# Training: setup, restore, step, evaluate, finish
# ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run: what setup builds, and the counters the loop moves on."""

    args: argparse.Namespace
    ctx: Dist
    out_dir: Path
    data: Data
    model: nn.Module  # the bare model: its state_dict is the checkpoint's, it writes the sample
    info: str
    n_params: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    total_steps: int
    eval_interval: int
    use_amp: bool
    amp_dtype: torch.dtype
    autocast: Any
    parallel: str  # how the processes share the work, for the header
    memory_note: str  # what activation checkpointing saves, for the header ("" without it)
    eval_model: nn.Module | None = None  # the model evaluation runs: compiled with --compile
    run_model: nn.Module | None = None  # the model a training step runs: DDP around eval_model
    step: int = 0
    loss_sum: float = 0.0  # training loss since the last evaluation
    loss_count: int = 0
    elapsed_before: float = 0.0  # training time of the runs this one resumes
    train_time: float = 0.0
    window_time: float = 0.0  # since the last evaluation
    window_tokens: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def log(self, *args: Any, **kwargs: Any) -> None:
        if self.ctx.main:
            print(*args, **kwargs)

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * self.args.seq_len * self.ctx.world

    @property
    def stop_at(self) -> int:
        return min(self.total_steps, self.args.stop_at_step or self.total_steps)

    @property
    def sharded(self) -> bool:
        return bool(self.args.fsdp)


def setup(args: argparse.Namespace, ctx: Dist) -> tuple[Run, dict[str, Any] | None]:
    """Settings (from the checkpoint on --resume), data, model (checkpointed, sharded), optimizer
    and schedule."""
    if args.out_dir is None:
        args.out_dir = str(default_out_dir(args))
    ckpt = resolve_resume(args)  # the run's settings come from the checkpoint, if any
    check_packages(args, ctx.device, [args.model])
    if args.fsdp and not dist.is_initialized():
        # One process without torchrun: FSDP over a process group of one (mixed precision and
        # sharded checkpoints as on many; nothing to shard).
        dist.init_process_group(
            "nccl" if ctx.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    out_dir = Path(args.out_dir)
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)

    data = prepare_data(args, ctx)
    if ctx.main and getattr(data.tokenizer, "path", None) is not None:
        # The run's tokenizer beside its checkpoint, for examples/generate.py.
        shutil.copyfile(data.tokenizer.path, out_dir / "tokenizer.json")

    torch.manual_seed(args.seed)
    model, info = build_model(
        args.model,
        data.vocab_size,
        args.seq_len,
        args.d_model,
        args.n_layer,
        args.dropout,
        args.memory_slots,
        args.conv_kernel,
        args.n_head,
        device=ctx.device,
    )
    if args.init == "gpt":
        for embedding in (model.token_embedding, model.pos_embedding):
            nn.init.normal_(embedding.weight, mean=0.0, std=0.02)
    model.to(ctx.device)
    n_params = model.num_parameters()
    # Autocast on either device (gam_ext has CPU and CUDA kernels for bf16 and fp16); fp16 with a
    # gradient scaler.
    use_amp = args.dtype != "fp32"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype, torch.float32)
    autocast = torch.autocast(ctx.device.type, dtype=amp_dtype) if use_amp else contextlib.nullcontext()
    memory_note = ""
    if args.activation_checkpointing:
        x, y = data.val_x[: args.batch_size].to(ctx.device), data.val_y[: args.batch_size].to(ctx.device)
        before = saved_activation_bytes(model, x, y, autocast)
        checkpoint_blocks(model)
        after = saved_activation_bytes(model, x, y, autocast)
        memory_note = (
            f"activation checkpointing: a step keeps {after / 2**20:,.1f} MiB of "
            f"activations for backward instead of {before / 2**20:,.1f} MiB "
            f"({100 * (1 - after / max(before, 1)):.0f}% less; per process, batch "
            f"{args.batch_size}); each block runs its forward twice"
        )
    parallel = f"DDP over {ctx.world} processes" if ctx.enabled else "one process"
    if args.fsdp:
        parallel = shard_model(model, ctx, amp_dtype if use_amp else None)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay
    )
    steps_per_epoch = data.train.steps_per_epoch
    if steps_per_epoch == 0:
        raise UserError(data.train.too_small)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.dtype == "fp16")
    run = Run(
        args,
        ctx,
        out_dir,
        data,
        model,
        info,
        n_params,
        optimizer,
        scheduler,
        scaler,
        steps_per_epoch,
        total_steps,
        args.eval_interval or steps_per_epoch,
        use_amp=use_amp,
        amp_dtype=amp_dtype,
        autocast=autocast,
        parallel=parallel,
        memory_note=memory_note,
    )
    return run, ckpt


def restore(run: Run, ckpt: dict[str, Any] | None) -> None:
    """Continue from ``ckpt`` (model, optimizer, counters, RNG), or seed a fresh run."""
    ctx = run.ctx
    if ckpt is not None:
        if "sharded" in ckpt:
            if not run.sharded:
                raise UserError(
                    "--resume: this checkpoint is sharded (a --fsdp run); resume it "
                    "with --fsdp under torchrun"
                )
            load_sharded_checkpoint(ckpt, run.model, run.optimizer)
        else:
            run.model.load_state_dict(ckpt["model"])
            run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        run.scaler.load_state_dict(ckpt["scaler"])
        run.step, run.loss_sum, run.loss_count = ckpt["step"], ckpt["loss_sum"], ckpt["loss_count"]
        if len(ckpt.get("local", [])) == ctx.world:
            run.loss_sum = ckpt["local"][ctx.rank]["loss_sum"]
        run.elapsed_before = ckpt["elapsed_s"]
        run.metrics = [m for m in ckpt["metrics"] if m["step"] <= run.step]
        if len(ckpt["rng"]) != ctx.world:
            raise UserError(
                f"--resume: the checkpoint comes from {len(ckpt['rng'])} processes, this run has {ctx.world}"
            )
        fingerprint = ckpt.get("data_order", {}).get("fingerprint")
        if fingerprint not in (None, run.data.train.position(run.step).get("fingerprint")):
            raise UserError(
                f"--resume: the shards in {run.args.shards} are not those the "
                "checkpoint was trained on (their index differs)"
            )
        rng = ckpt["rng"][ctx.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], ctx.device)
        run.log(f"resuming from step {run.step} of {run.total_steps}")
    else:
        torch.manual_seed(run.args.seed + ctx.rank)  # distinct dropout masks per process
    if ctx.main:
        with open(run.out_dir / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in run.metrics)


def parallelize(run: Run) -> None:
    """torch.compile (--compile), and DDP over the processes unless FSDP already shards the model."""
    ctx = run.ctx
    run.eval_model = torch.compile(run.model) if run.args.compile else run.model
    run.run_model = run.eval_model
    if ctx.enabled and not run.sharded:
        run.run_model = DistributedDataParallel(
            run.eval_model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
        )


def log_header(run: Run) -> None:
    args, ctx = run.args, run.ctx
    run.log(f"data:   {run.data.description}")
    run.log(
        f"model:  {run.info}: {run.n_params:,} parameters, D={args.d_model}, "
        f"{args.n_layer} layers, vocab {run.data.vocab_size}, seq {args.seq_len}, "
        f"{args.init} init"
    )
    if args.model == "gam":
        run.log(f"ops:    {gam_ext_backend(ctx.device)}")
    precision = f"{args.dtype} autocast" if run.use_amp else "fp32"
    if args.dtype == "fp16":
        precision += " with a gradient scaler"
    run.log(
        f"recipe: {run.total_steps} steps ({run.total_steps / run.steps_per_epoch:.2f} "
        f"epochs of {run.steps_per_epoch}), batch {args.batch_size} x {ctx.world} "
        f"process(es), lr {args.lr}, warm-up {args.warmup_steps}, device {ctx.device}, "
        f"{precision}, {torch.get_num_threads()} CPU thread(s)"
    )
    if ctx.enabled or run.sharded or run.memory_note:
        run.log(f"memory: {run.parallel}" + (f"; {run.memory_note}" if run.memory_note else ""))
    run.log(f"unigram perplexity of the validation targets: {run.data.unigram_ppl:.2f}")


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimizer step on (x, y); returns the loss and moves the counters."""
    args = run.args
    t0 = time.perf_counter()
    with run.autocast:
        _, loss = run.run_model(x, y)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if args.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    loss_value = loss.item()
    dt = time.perf_counter() - t0
    run.step += 1
    run.loss_sum, run.loss_count = run.loss_sum + loss_value, run.loss_count + 1
    run.train_time, run.window_time = run.train_time + dt, run.window_time + dt
    run.window_tokens += run.tokens_per_step
    return loss_value


def evaluate_and_record(run: Run, write: Any) -> None:
    """Validation loss and the training loss since the last evaluation, into metrics.jsonl."""
    ctx = run.ctx
    result = evaluate(
        run.eval_model, run.data, run.args, ctx, run.autocast, run.args.eval_batches, lockstep=run.sharded
    )
    (train_loss,) = all_mean([run.loss_sum / run.loss_count], ctx)
    record = {
        "step": run.step,
        "epoch": round(run.step / run.steps_per_epoch, 4),
        "train_loss": train_loss,
        **result,
        "tokens_per_s": run.window_tokens / run.window_time,
        "elapsed_s": run.elapsed_before + run.train_time,
    }
    if run.data.tokenizer is not None:
        record.pop("val_acc")
    run.metrics.append(record)
    if ctx.main:
        with open(run.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        acc = f" val acc {record['val_acc']:.3f}" if "val_acc" in record else ""
        write(
            f"step {run.step:>6}: train loss {train_loss:.4f}  val loss "
            f"{record['val_loss']:.4f}  val ppl {record['val_ppl']:.2f}{acc}  "
            f"{record['tokens_per_s']:,.0f} tok/s"
        )
    run.loss_sum, run.loss_count, run.window_time, run.window_tokens = 0.0, 0, 0.0, 0


def save(run: Run) -> None:
    """A checkpoint to resume from: ckpt.pt, and under FSDP the sharded states it names."""
    args = run.args
    state = dict(
        scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict(),
        step=run.step,
        epoch=run.step / run.steps_per_epoch,
        loss_sum=run.loss_sum,
        loss_count=run.loss_count,
        local={"loss_sum": run.loss_sum},  # each process's own, loss_sum is rank 0's
        metrics=run.metrics,
        elapsed_s=run.elapsed_before + run.train_time,
        data_order=run.data.train.position(run.step),
        args={k: v for k, v in vars(args).items() if k != "explicit"},
    )
    if run.sharded:
        save_sharded_checkpoint(run.out_dir, run.ctx, run.model, run.optimizer, **state)
    else:
        save_checkpoint(
            run.out_dir / "ckpt.pt",
            run.ctx,
            model=run.model.state_dict(),
            optimizer=run.optimizer.state_dict(),
            **state,
        )


def whole_model(run: Run) -> nn.Module | None:
    """The trained model in one piece on rank 0 (gathered from the shards under FSDP), for the
    sample and the export; None on the other processes."""
    if not run.sharded:
        return run.model if run.ctx.main else None
    state = full_state_dict(run.model, sharded=True)  # every process takes part
    if not run.ctx.main:
        return None
    args = run.args
    with torch.random.fork_rng(devices=[]):
        model, _ = build_model(
            args.model,
            run.data.vocab_size,
            args.seq_len,
            args.d_model,
            args.n_layer,
            args.dropout,
            args.memory_slots,
            args.conv_kernel,
            args.n_head,
            device=run.ctx.device,
        )
    model.load_state_dict(state)
    return model.to(run.ctx.device)


def finish(run: Run) -> dict[str, Any]:
    """The summary; for a finished run also the final validation, sample, plots and summary.json."""
    args, ctx, step = run.args, run.ctx, run.step
    elapsed = run.elapsed_before + run.train_time
    summary: dict[str, Any] = {
        "model": args.model,
        "dataset": run.data.name,
        "params": run.n_params,
        "steps": step,
        "total_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch,
        "train_time_s": elapsed,
        "s_per_epoch": elapsed * run.steps_per_epoch / max(step, 1),
        "tokens_per_s": (step * run.tokens_per_step) / max(elapsed, 1e-9),
        "unigram_ppl": run.data.unigram_ppl,
        "out_dir": str(run.out_dir),
    }
    if step < run.total_steps:
        run.log(
            f"stopped at step {step} of {run.total_steps}; continue with --resume --out-dir {run.out_dir}"
        )
        return summary

    # Final validation on the whole split, a sample, plots and the summary (rank 0 writes).
    final = (
        evaluate(run.eval_model, run.data, args, ctx, run.autocast, lockstep=run.sharded)
        if args.eval_batches
        else {k: v for k, v in run.metrics[-1].items() if k.startswith("val_")}
    )
    summary.update(final)
    if run.data.tokenizer is not None:
        summary.pop("val_acc", None)
    if ctx.device.type == "cuda":
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    model = whole_model(run)
    if ctx.main:
        files = plot_metrics(run.metrics, run.out_dir, f"{args.model} on {run.data.name}")
        if args.sample_tokens or run.data.tokenizer is None:
            sample = write_sample(model, run.data, args, ctx)
            (run.out_dir / "sample.txt").write_text(sample + "\n")
            files.append(run.out_dir / "sample.txt")
            print(f"\n{sample}\n")
        if args.save_pretrained is not None:
            target = (
                run.out_dir / "pretrained" if args.save_pretrained == "auto" else Path(args.save_pretrained)
            )
            model.save_pretrained(target)
            summary["pretrained"] = str(target)
        (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(summary_text(summary, files))
    return summary


def train(args: argparse.Namespace, ctx: Dist) -> dict[str, Any]:
    """Train one model as ``args`` says; returns the summary (rank 0's view)."""
    run, ckpt = setup(args, ctx)
    restore(run, ckpt)
    parallelize(run)
    log_header(run)

    from tqdm import tqdm

    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        disable=not ctx.main,
        dynamic_ncols=True,
        mininterval=1.0,
        desc=args.model,
    )
    run.run_model.train()
    while run.step < run.stop_at:
        x, y = run.data.train.batch(run.step)  # this process's share of the step's batch
        loss_value = train_step(run, x, y)
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss_value:.3f}", tok_s=f"{run.window_tokens / run.window_time:,.0f}", refresh=False
        )
        if run.step % run.eval_interval == 0 or run.step == run.total_steps:
            evaluate_and_record(run, bar.write)
        if run.step % run.eval_interval == 0 or run.step == run.stop_at:
            save(run)
    bar.close()
    return finish(run)


# ------------------------------------------------------------------------------------------------
# Comparison: several models on the same data and budget, a table like the paper's Table 1
# ------------------------------------------------------------------------------------------------


def compare(args: argparse.Namespace, ctx: Dist) -> list[dict[str, Any]]:
    """Train each of ``--models`` in turn; ``compare.md`` is rewritten after every model."""
    base = Path(args.out_dir) if args.out_dir else Path("runs") / f"compare-{dataset_name(args)}"
    if args.resume is not None:
        raise UserError("--compare does not take --resume; resume each model's run on its own")
    check_packages(args, ctx.device, args.models.split(","))
    summaries: list[dict[str, Any]] = []
    text = ""
    for name in args.models.split(","):
        run_args = argparse.Namespace(**vars(args))
        run_args.model, run_args.out_dir = name, str(base / name)
        if ctx.main:
            print(f"\n=== {name} ===")
        summaries.append(train(run_args, ctx))
        if ctx.main:
            s0 = summaries[0]
            text = (
                f"Dataset {s0['dataset']}, {s0['steps']} steps each "
                f"({s0['steps'] / s0['steps_per_epoch']:.2f} epochs), device {ctx.device} x "
                f"{ctx.world}; unigram PPL of the validation targets "
                f"{s0['unigram_ppl']:.2f}.\n\n"
                f"{compare_table(summaries, args.dataset == 'recall')}\n"
            )
            (base / "compare.md").write_text(text)
    if ctx.main:
        print(f"\n{text}\nwritten to {base / 'compare.md'}")
    return summaries


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads; 0 picks torch's default, or 1 on a machine already busy."""
    if threads == 0 and "OMP_NUM_THREADS" not in os.environ and hasattr(os, "getloadavg"):
        if os.getloadavg()[0] >= (os.cpu_count() or 1):
            threads = 1
    if threads:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    ctx: Dist | None = None
    try:
        ctx = setup_distributed(args.device)
        if args.compare:
            compare(args, ctx)
        else:
            train(args, ctx)
        if ctx.enabled:
            dist.barrier()  # every process done before any tears the process group down
    except (UserError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] in ("gam_ext", "torch"):
            raise
        print(
            f"error: the package `{exc.name}` is not installed (pip install {exc.name}, or "
            "pip install --no-build-isolation '.[train]' for everything the example uses)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with --resume (from the last checkpoint)", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, leave without the interpreter's teardown: objects that still hold the
        # destroyed process group (FSDP's device mesh, DTensors) can otherwise be freed while gloo's
        # threads wind down, and the process dies with SIGABRT after a successful run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
