"""What the training example reports: the run's header, plots, a text sample, the final summary and
the comparison table of ``--compare``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from lm_data import IGNORE_INDEX
from train_data import Data
from train_parallel import Dist

import gam_ext


def plot_metrics(metrics: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [m["train_loss"] for m in metrics], "o-", label="train")
    ax.plot(steps, [m["val_loss"] for m in metrics], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title=f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "loss.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [m["val_ppl"] for m in metrics], "o-", color="C1", label="validation")
    ax.set(xlabel="step", ylabel="perplexity", yscale="log", title=f"{title}: perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "ppl.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def write_sample(model: nn.Module, data: Data, args: argparse.Namespace, ctx: Dist) -> str:
    """A continuation of the start of the validation text, or the recall answers of one example."""
    model.eval()
    if data.tokenizer is None:
        x, y = data.val_x[:1].to(ctx.device), data.val_y[0]
        with torch.no_grad():
            predicted = model(x)[0][0].argmax(-1).cpu()

        def name(token: int) -> str:
            keys = args.recall_keys
            return f"k{token}" if token < keys else f"v{token - keys}"

        lines = [
            "context: " + " ".join(name(int(t)) for t in x[0, : 2 * args.recall_pairs]),
            "query -> predicted (true)",
        ]
        for t in (y != IGNORE_INDEX).nonzero().flatten().tolist():
            mark = "" if predicted[t] == y[t] else "   <- wrong"
            lines.append(f"{name(int(x[0, t]))} -> {name(int(predicted[t]))} ({name(int(y[t]))}){mark}")
        return "\n".join(lines)
    prompt = data.val_x[:1, :16].to(ctx.device)
    generator = torch.Generator(device=ctx.device).manual_seed(args.seed)
    out = model.generate(
        prompt, args.sample_tokens, temperature=args.temperature, top_k=args.top_k, generator=generator
    )
    prompt_text = data.tokenizer.decode(prompt[0].tolist())
    return f"[prompt] {prompt_text}\n[sample] {data.tokenizer.decode(out[0, prompt.shape[1] :].tolist())}"


def gam_ext_backend(device: torch.device) -> str:
    """Which gam_ext runs and what runs each op on ``device``, for the run's header."""
    info = gam_ext.backend_info()
    ops = info["ops"][device.type]
    where = Path(gam_ext.__file__).parent
    if all(how == "kernel" for how in ops.values()):
        text = f"compiled {device.type} kernels for {', '.join(ops)}"
    elif all(how == "reference" for how in ops.values()):
        text = f"the pure-PyTorch reference for {', '.join(ops)}"
    else:
        text = ", ".join(f"{op} {how}" for op, how in ops.items())
    if info["backend"] == "reference":
        text += " (forced: backend reference)"
    elif info["extension_error"]:
        text += f" ({info['extension_error']})"
    return f"gam_ext {where}: {text}"


def compare_table(summaries: list[dict[str, Any]], recall: bool) -> str:
    """A markdown table like the paper's Table 1, one row per finished run."""
    header = "| model | params | s/epoch | tokens/s | val loss | val PPL |"
    rule = "|---|---|---|---|---|---|"
    if recall:
        header, rule = header + " val acc |", rule + "---|"
    rows = [header, rule]
    for s in summaries:
        row = (
            f"| {s['model']} | {s['params'] / 1e6:.2f}M | {s['s_per_epoch']:.1f} | "
            f"{s['tokens_per_s']:,.0f} | {s.get('val_loss', math.nan):.4f} | "
            f"{s.get('val_ppl', math.nan):.2f} |"
        )
        rows.append(row + (f" {s.get('val_acc', math.nan):.3f} |" if recall else ""))
    return "\n".join(rows)


def summary_text(summary: dict[str, Any], files: list[Path]) -> str:
    """The lines printed at the end of a finished run."""
    acc = f"\nval accuracy:   {summary['val_acc']:.4f}" if "val_acc" in summary else ""
    step, steps_per_epoch = summary["steps"], summary["steps_per_epoch"]
    return (
        f"model:          {summary['model']} ({summary['params']:,} parameters)\n"
        f"steps:          {step} ({step / steps_per_epoch:.2f} epochs) in "
        f"{summary['train_time_s']:.1f} s of training, {summary['tokens_per_s']:,.0f} tok/s\n"
        f"val loss:       {summary['val_loss']:.4f}\n"
        f"val PPL:        {summary['val_ppl']:.2f}\n"
        f"unigram PPL:    {summary['unigram_ppl']:.2f} (validation targets, no context)"
        f"{acc}\n"
        + (
            f"peak memory:    {summary['peak_memory_gib']:.2f} GiB (CUDA, rank 0)\n"
            if "peak_memory_gib" in summary
            else ""
        )
        + (
            f"exported:       {summary['pretrained']}/ config.json model.safetensors "
            "(GAMModel.from_pretrained)\n"
            if "pretrained" in summary
            else ""
        )
        + f"files:          {summary['out_dir']}/ metrics.jsonl ckpt.pt summary.json "
        + " ".join(p.name for p in files)
    )
