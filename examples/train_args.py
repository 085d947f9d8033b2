"""The training example's command line: presets, flags, their checks, and the packages a run needs.

``parse_args`` fills every knob a flag left unset from the preset (``cpu``, the default, or the
paper's); ``check_packages`` stops a run at once, in one line, when an optional package it needs is
missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from baselines import MODELS
from lm_data import HF_DATASETS

ROOT = Path(__file__).resolve().parent.parent

# The default preset fits `make train` (about 5 minutes on 2 CPU cores); `paper` is Table 1's.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        d_model=192,
        n_layer=4,
        memory_slots=192,
        conv_kernel=3,
        dropout=0.1,
        vocab_size=2048,
        seq_len=128,
        batch_size=16,
        max_steps=300,
        epochs=None,
        lr=1e-3,
        warmup_steps=30,
        weight_decay=0.1,
        grad_clip=1.0,
        eval_interval=50,
        eval_batches=0,
        init="gpt",
    ),
    "paper": dict(
        d_model=512,
        n_layer=6,
        memory_slots=512,
        conv_kernel=3,
        dropout=0.1,
        vocab_size=10000,
        seq_len=256,
        batch_size=32,
        max_steps=None,
        epochs=5,
        lr=3e-4,
        warmup_steps=100,
        weight_decay=0.1,
        grad_clip=1.0,
        eval_interval=None,
        eval_batches=0,
        init="torch",
    ),
}
# Flags that steer one invocation; everything else comes from the checkpoint on --resume.
RUN_CONTROL = {
    "resume",
    "out_dir",
    "device",
    "stop_at_step",
    "sample_tokens",
    "temperature",
    "top_k",
    "compile",
    "threads",
    "data_dir",
    "compare",
    "models",
    "explicit",
    "activation_checkpointing",
    "save_pretrained",
}
# Paths that come from the checkpoint on --resume unless given again (a moved copy of the data).
RELOCATABLE = {"shards"}


class UserError(Exception):
    """A mistake in the command line or environment: printed as one line, exit code 2."""


_KIND = {int: "an integer", float: "a number"}


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_KIND[kind]}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _non_negative(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_KIND[kind]}, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each knob's preset values, and the default of the other flags that have one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.dest in PRESETS["cpu"]:
            values = ", ".join(
                f"{name} {'-' if preset[action.dest] is None else preset[action.dest]}"
                for name, preset in PRESETS.items()
            )
            return f"{text} (preset {values})".strip()
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            return f"{text} (default: %(default)s)".strip()
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train GAM or the paper's baselines; see examples/README.md.",
        formatter_class=_HelpFormatter,
    )
    pos_int, pos_float = _positive(int), _positive(float)
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODELS, default="gam", help="which model to train")
    g.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu", help="defaults for every knob below left unset"
    )
    g.add_argument("--d-model", type=pos_int, help="width D")
    g.add_argument("--n-layer", type=pos_int, help="depth")
    g.add_argument("--memory-slots", type=pos_int, help="GAM memory slots S")
    g.add_argument("--conv-kernel", type=pos_int, help="GAM causal conv width K")
    g.add_argument("--n-head", type=pos_int, default=8, help="Transformer heads")
    g.add_argument("--dropout", type=_non_negative(float), help="dropout probability")
    g.add_argument(
        "--init",
        choices=("torch", "gpt"),
        help="embeddings: torch = N(0, 1) as the paper's code (initial loss about "
        "3*sqrt(D) nats through the tied head), gpt = N(0, 0.02)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=("pydoc", *HF_DATASETS, "recall"),
        default=None,
        help="default: pydoc, the Python documentation topics (offline)",
    )
    g.add_argument("--train-file", help="local UTF-8 text for training")
    g.add_argument(
        "--val-file", help="local UTF-8 text for validation (default: the last 10%% of --train-file)"
    )
    g.add_argument(
        "--tokenizer",
        choices=("bpe", "byte"),
        default="bpe",
        help="BPE trained on the training split, or UTF-8 bytes",
    )
    g.add_argument("--vocab-size", type=pos_int, help="BPE vocabulary size")
    g.add_argument("--data-dir", default=str(ROOT / "data"), help="tokenizer cache")
    g.add_argument(
        "--shards",
        metavar="DIR",
        help="token shards written by examples/prepare_data.py, memory-mapped and read "
        "in random windows (vocabulary and tokenizer from their index)",
    )
    g.add_argument("--recall-pairs", type=pos_int, default=16, help="key-value pairs per example")
    g.add_argument("--recall-keys", type=pos_int, default=64, help="distinct key tokens")
    g.add_argument("--recall-values", type=pos_int, default=64, help="distinct value tokens")
    g.add_argument("--recall-train", type=pos_int, default=20000, help="training examples")
    g.add_argument("--recall-val", type=pos_int, default=1000, help="validation examples")
    g = p.add_argument_group("recipe")
    g.add_argument("--seq-len", type=pos_int, help="tokens per training sequence")
    g.add_argument("--batch-size", type=pos_int, help="per process")
    g.add_argument("--max-steps", type=pos_int, help="optimizer steps (wins over --epochs)")
    g.add_argument("--epochs", type=pos_int, help="passes over the training split")
    g.add_argument("--lr", type=pos_float, help="peak learning rate (AdamW, betas 0.9/0.95)")
    g.add_argument("--warmup-steps", type=_non_negative(int), help="linear warm-up, then cosine to 0")
    g.add_argument("--weight-decay", type=_non_negative(float), help="AdamW weight decay")
    g.add_argument("--grad-clip", type=_non_negative(float), help="0 disables")
    g.add_argument("--seed", type=int, default=1337, help="model init, data order, dropout")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-interval", type=pos_int, help="steps between evaluations (-: once per epoch)")
    g.add_argument(
        "--eval-batches", type=_non_negative(int), help="validation batches per evaluation (0: all)"
    )
    g.add_argument(
        "--out-dir",
        help="default: runs/<model>-<dataset> in the current directory "
        "(with --compare: runs/compare-<dataset>)",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CKPT",
        help="continue from CKPT (default: <out-dir>/ckpt.pt)",
    )
    g.add_argument(
        "--stop-at-step",
        type=pos_int,
        help="stop after this step with a checkpoint, as if interrupted "
        "(the schedule still spans the whole run)",
    )
    g.add_argument(
        "--sample-tokens", type=_non_negative(int), default=200, help="tokens to sample at the end (0: none)"
    )
    g.add_argument("--temperature", type=pos_float, default=0.8, help="sampling temperature")
    g.add_argument("--top-k", type=pos_int, default=40, help="sample from the k likeliest")
    g.add_argument(
        "--save-pretrained",
        nargs="?",
        const="auto",
        default=None,
        metavar="DIR",
        help="at the end, export the GAM model with GAMModel.save_pretrained "
        "(config.json + model.safetensors) into DIR (default: <out-dir>/pretrained)",
    )
    g = p.add_argument_group("hardware")
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available"
    )
    g.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="bf16/fp16: autocast (on CPU or CUDA; fp16 with a gradient scaler)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument(
        "--threads",
        type=_non_negative(int),
        default=0,
        help="CPU threads for torch; 0: torch's default, or 1 when the machine is "
        "already busy (load average >= cores), where one thread runs faster",
    )
    g.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="under torchrun: shard parameters, gradients and optimizer states over "
        "the processes with FSDP2 (each block, then the whole model) instead of DDP; "
        "with --dtype bf16/fp16 the gathered parameters are in that dtype and "
        "gradients are reduced in fp32; checkpoints are sharded "
        "(torch.distributed.checkpoint)",
    )
    g.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each block's activations in backward (torch.utils.checkpoint, "
        "non-reentrant): less memory for about one more forward pass; the header "
        "reports the memory saved",
    )
    g = p.add_argument_group("comparison")
    g.add_argument(
        "--compare",
        action="store_true",
        help="train each of --models on the same data and budget, write a table",
    )
    g.add_argument("--models", default="gam,transformer,mamba", help="comma-separated models for --compare")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = {k for k, v in vars(args).items() if v is not None}
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if "epochs" in args.explicit and "max_steps" not in args.explicit:
        args.max_steps = None
    if args.max_steps is None and args.epochs is None:
        args.epochs = 1
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.val_file is not None and args.train_file is None:
        parser.error("--val-file needs --train-file")
    if args.train_file is not None and args.dataset is not None:
        parser.error(f"--train-file and --dataset {args.dataset} exclude each other")
    if args.shards is not None:
        other = (
            "--train-file"
            if args.train_file is not None
            else f"--dataset {args.dataset}"
            if args.dataset is not None
            else "--vocab-size"
            if "vocab_size" in args.explicit
            else None
        )
        if other:
            parser.error(f"--shards and {other} exclude each other (the shards' index gives the vocabulary)")
        if not os.path.isdir(args.shards):
            parser.error(f"--shards: no such folder: {args.shards}")
    for flag in ("train_file", "val_file"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            parser.error(f"--{flag.replace('_', '-')}: no such file: {path}")
    if args.recall_pairs > args.recall_keys:
        parser.error(
            f"--recall-pairs {args.recall_pairs} exceeds --recall-keys "
            f"{args.recall_keys}: keys must be distinct within an example"
        )
    if args.dataset is None:
        args.dataset = "shards" if args.shards is not None else "pydoc" if args.train_file is None else "file"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        parser.error(f"--models: unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    args.models = ",".join(models)
    if args.save_pretrained is not None and (args.compare or args.model != "gam"):
        parser.error("--save-pretrained exports a GAM model: it goes with --model gam, without --compare")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        parser.error(f"--resume: no such checkpoint: {args.resume}")
    return args


def dataset_name(args: argparse.Namespace) -> str:
    if args.dataset == "shards":
        return "shards-" + Path(args.shards).resolve().name
    if args.train_file is not None:
        return "file-" + Path(args.train_file).stem
    return args.dataset


def default_out_dir(args: argparse.Namespace) -> Path:
    """runs/<model>-<dataset>, relative to the current directory."""
    return Path("runs") / f"{args.model}-{dataset_name(args)}"


# Optional packages of the training example (pyproject's [train] extra), and what needs them.
def _installed(package: str) -> bool:
    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def _shards_tokenizer(folder: str) -> str | None:
    """The tokenizer type in a shard folder's index (None when unreadable: reading the shards
    then says why)."""
    try:
        return json.loads((Path(folder) / "index.json").read_text())["tokenizer"]["type"]
    except Exception:
        return None


def check_packages(args: argparse.Namespace, device: torch.device, models: list[str]) -> None:
    """Stop with one line naming every optional package a run of ``models`` needs and lacks."""
    needs = {"tqdm": "the progress bar", "matplotlib": "the plots"}
    if args.dataset == "shards":
        if _shards_tokenizer(args.shards) != "byte":
            needs["tokenizers"] = "the shards' tokenizer"
    elif args.dataset != "recall" and args.tokenizer == "bpe":
        needs["tokenizers"] = "the BPE tokenizer; --tokenizer byte needs none"
    if args.dataset in HF_DATASETS:
        needs["datasets"] = f"--dataset {args.dataset}"
    if args.save_pretrained is not None:
        needs["safetensors"] = "--save-pretrained"
    if "mamba" in models and not (device.type == "cuda" and _installed("mamba_ssm")):
        needs["mambapy"] = "--model mamba" + ("" if device.type == "cuda" else " on CPU")
    missing = {package: why for package, why in needs.items() if not _installed(package)}
    if missing:
        names = " ".join(missing)
        listing = ", ".join(f"{package} ({why})" for package, why in missing.items())
        raise UserError(
            f"this run needs packages that are not installed: {listing}. Install them with "
            f"`pip install {names}`, or every dependency of the training example with "
            "`pip install --no-build-isolation '.[train]'` in the gam_ext source tree"
        )
