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
from dataclasses import dataclass
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
from baselines import MODELS, build_model  # noqa: E402
from lm_data import (  # noqa: E402
    HF_DATASETS,
    IGNORE_INDEX,
    ByteTokenizer,
    DataError,
    RecallSpec,
    bpe_tokenizer,
    chunk,
    load_corpus,
    recall_examples,
    unigram_perplexity,
)
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402

import gam_ext  # noqa: E402

# The default preset fits `make train` (about 5 minutes on 2 CPU cores); `paper` is Table 1's.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        d_model=192, n_layer=4, memory_slots=192, conv_kernel=3, dropout=0.1, vocab_size=2048,
        seq_len=128, batch_size=16, max_steps=300, epochs=None, lr=1e-3, warmup_steps=30,
        weight_decay=0.1, grad_clip=1.0, eval_interval=50, eval_batches=0, init="gpt",
    ),
    "paper": dict(
        d_model=512, n_layer=6, memory_slots=512, conv_kernel=3, dropout=0.1, vocab_size=10000,
        seq_len=256, batch_size=32, max_steps=None, epochs=5, lr=3e-4, warmup_steps=100,
        weight_decay=0.1, grad_clip=1.0, eval_interval=None, eval_batches=0, init="torch",
    ),
}
# Flags that steer one invocation; everything else comes from the checkpoint on --resume.
RUN_CONTROL = {"resume", "out_dir", "device", "stop_at_step", "sample_tokens", "temperature",
               "top_k", "compile", "threads", "data_dir", "compare", "models", "explicit"}


class UserError(Exception):
    """A mistake in the command line or environment: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


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
            values = ", ".join(f"{name} {'-' if preset[action.dest] is None else preset[action.dest]}"
                               for name, preset in PRESETS.items())
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
    g.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="defaults for every knob below left unset")
    g.add_argument("--d-model", type=pos_int, help="width D")
    g.add_argument("--n-layer", type=pos_int, help="depth")
    g.add_argument("--memory-slots", type=pos_int, help="GAM memory slots S")
    g.add_argument("--conv-kernel", type=pos_int, help="GAM causal conv width K")
    g.add_argument("--n-head", type=pos_int, default=8, help="Transformer heads")
    g.add_argument("--dropout", type=_non_negative(float), help="dropout probability")
    g.add_argument("--init", choices=("torch", "gpt"),
                   help="embeddings: torch = N(0, 1) as the paper's code (initial loss about "
                   "3*sqrt(D) nats through the tied head), gpt = N(0, 0.02)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("pydoc", *HF_DATASETS, "recall"), default=None,
                   help="default: pydoc, the Python documentation topics (offline)")
    g.add_argument("--train-file", help="local UTF-8 text for training")
    g.add_argument("--val-file", help="local UTF-8 text for validation "
                   "(default: the last 10%% of --train-file)")
    g.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe",
                   help="BPE trained on the training split, or UTF-8 bytes")
    g.add_argument("--vocab-size", type=pos_int, help="BPE vocabulary size")
    g.add_argument("--data-dir", default=str(ROOT / "data"), help="tokenizer cache")
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
    g.add_argument("--warmup-steps", type=_non_negative(int),
                   help="linear warm-up, then cosine to 0")
    g.add_argument("--weight-decay", type=_non_negative(float), help="AdamW weight decay")
    g.add_argument("--grad-clip", type=_non_negative(float), help="0 disables")
    g.add_argument("--seed", type=int, default=1337, help="model init, data order, dropout")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-interval", type=pos_int, help="steps between evaluations (-: once per epoch)")
    g.add_argument("--eval-batches", type=_non_negative(int),
                   help="validation batches per evaluation (0: all)")
    g.add_argument("--out-dir", help="default: runs/<model>-<dataset> in the current directory "
                   "(with --compare: runs/compare-<dataset>)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default: <out-dir>/ckpt.pt)")
    g.add_argument("--stop-at-step", type=pos_int,
                   help="stop after this step with a checkpoint, as if interrupted "
                   "(the schedule still spans the whole run)")
    g.add_argument("--sample-tokens", type=_non_negative(int), default=200,
                   help="tokens to sample at the end (0: none)")
    g.add_argument("--temperature", type=pos_float, default=0.8, help="sampling temperature")
    g.add_argument("--top-k", type=pos_int, default=40, help="sample from the k likeliest")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available")
    g.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="bf16/fp16: autocast (on CPU or CUDA; fp16 with a gradient scaler)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=_non_negative(int), default=0,
                   help="CPU threads for torch; 0: torch's default, or 1 when the machine is "
                   "already busy (load average >= cores), where one thread runs faster")
    g = p.add_argument_group("comparison")
    g.add_argument("--compare", action="store_true",
                   help="train each of --models on the same data and budget, write a table")
    g.add_argument("--models", default="gam,transformer,mamba",
                   help="comma-separated models for --compare")
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
    for flag in ("train_file", "val_file"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            parser.error(f"--{flag.replace('_', '-')}: no such file: {path}")
    if args.recall_pairs > args.recall_keys:
        parser.error(f"--recall-pairs {args.recall_pairs} exceeds --recall-keys "
                     f"{args.recall_keys}: keys must be distinct within an example")
    if args.dataset is None:
        args.dataset = "pydoc" if args.train_file is None else "file"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        parser.error(f"--models: unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    args.models = ",".join(models)
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        parser.error(f"--resume: no such checkpoint: {args.resume}")
    return args


def dataset_name(args: argparse.Namespace) -> str:
    if args.train_file is not None:
        return "file-" + Path(args.train_file).stem
    return args.dataset


def default_out_dir(args: argparse.Namespace) -> Path:
    """runs/<model>-<dataset>, relative to the current directory."""
    return Path("runs") / f"{args.model}-{dataset_name(args)}"


# ------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
# ------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def all_mean(values: list[float], ctx: Dist) -> list[float]:
    """Mean of each value over the processes (identity without torchrun)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return (t / ctx.world).tolist()


def all_sum(values: list[float], ctx: Dist) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------------
# Data: token chunks for language modelling, or the recall task
# ------------------------------------------------------------------------------------------------


@dataclass
class Data:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    vocab_size: int
    tokenizer: Any  # None for recall
    description: str
    unigram_ppl: float


def prepare_data(args: argparse.Namespace, ctx: Dist) -> Data:
    name = dataset_name(args)
    if args.dataset == "recall":
        spec = RecallSpec(args.recall_pairs, args.recall_keys, args.recall_values)
        args.seq_len = spec.seq_len
        train_x, train_y = recall_examples(args.recall_train, spec, seed=args.seed)
        val_x, val_y = recall_examples(args.recall_val, spec, seed=args.seed + 1)
        desc = (f"recall: {spec.num_pairs} pairs + {spec.num_pairs} queries over "
                f"{spec.num_keys} keys / {spec.num_values} values, {args.recall_train} train / "
                f"{args.recall_val} val examples of {spec.seq_len} tokens")
        return Data(name, train_x, train_y, val_x, val_y, spec.vocab_size, None, desc,
                    unigram_perplexity(val_y))

    # Rank 0 trains (and caches) the tokenizer first; the others then read it from the cache.
    if ctx.enabled and not ctx.main:
        dist.barrier()
    corpus = load_corpus(None if args.dataset in ("pydoc", "file") else args.dataset,
                         args.train_file, args.val_file)
    if args.tokenizer == "byte":
        tokenizer: Any = ByteTokenizer()
    else:
        tokenizer = bpe_tokenizer(corpus, args.vocab_size, Path(args.data_dir) / "tokenizers")
    if ctx.enabled and ctx.main:
        dist.barrier()
    train_ids = tokenizer.encode_docs(corpus.train)
    val_ids = tokenizer.encode_docs(corpus.val)
    train_x, train_y = chunk(train_ids, args.seq_len)
    val_x, val_y = chunk(val_ids, args.seq_len)
    if len(val_x) == 0:
        raise UserError(f"the validation split has {len(val_ids)} tokens, fewer than one chunk "
                        f"of --seq-len {args.seq_len} + 1")
    desc = (f"{name}: {len(train_ids):,} train / {len(val_ids):,} val tokens, tokenizer "
            f"{tokenizer.description}" + (f"; {corpus.note}" if corpus.note else ""))
    return Data(name, train_x, train_y, val_x, val_y, tokenizer.vocab_size, tokenizer, desc,
                unigram_perplexity(val_y))


# ------------------------------------------------------------------------------------------------
# Schedule, evaluation, checkpoints
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
def evaluate(model: nn.Module, data: Data, args: argparse.Namespace, ctx: Dist,
             autocast: Any, max_batches: int = 0) -> dict[str, float]:
    """Mean over validation batches of the batch-mean cross-entropy (as the paper), and for the
    recall task the accuracy on the answers. Batches are shared out over the processes."""
    model.eval()
    n_batches = math.ceil(len(data.val_x) / args.batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    loss_sum, correct, answers = 0.0, 0.0, 0.0
    for i in range(ctx.rank, n_batches, ctx.world):
        x = data.val_x[i * args.batch_size:(i + 1) * args.batch_size].to(ctx.device)
        y = data.val_y[i * args.batch_size:(i + 1) * args.batch_size].to(ctx.device)
        with autocast:
            logits, loss = model(x, y)
        loss_sum += loss.item()
        mask = y != IGNORE_INDEX
        correct += (logits.argmax(-1)[mask] == y[mask]).sum().item()
        answers += mask.sum().item()
    loss_sum, correct, answers = all_sum([loss_sum, correct, answers], ctx)
    model.train()
    val_loss = loss_sum / n_batches
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)),
            "val_acc": correct / max(answers, 1.0)}


def rng_state(ctx: Dist) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def save_checkpoint(path: Path, ctx: Dist, **state: Any) -> None:
    """Rank 0 writes ``path`` atomically; every process's RNG state goes in (dropout masks)."""
    rngs = [rng_state(ctx)]
    if ctx.enabled:
        rngs = [None] * ctx.world
        dist.all_gather_object(rngs, {k: v.cpu() for k, v in rng_state(ctx).items()})
    if ctx.main:
        tmp = path.with_suffix(".tmp")
        torch.save({**state, "rng": rngs}, tmp)
        os.replace(tmp, path)
    if ctx.enabled:
        dist.barrier()


def resolve_resume(args: argparse.Namespace) -> dict[str, Any] | None:
    """Load the checkpoint to resume from and take its run-defining settings over ``args``."""
    if args.resume is None:
        return None
    path = Path(args.out_dir) / "ckpt.pt" if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"--resume: cannot read {path}: {exc}") from None
    if not isinstance(ckpt, dict) or "args" not in ckpt or "model" not in ckpt:
        raise UserError(f"--resume: {path} is not a checkpoint of this script")
    for key, value in ckpt["args"].items():
        if key in RUN_CONTROL:
            continue
        if key in args.explicit and getattr(args, key, None) != value:
            print(f"warning: resuming keeps the checkpoint's {key}={value!r} "
                  f"(ignoring --{key.replace('_', '-')} {getattr(args, key)!r})", file=sys.stderr)
        setattr(args, key, value)
    return ckpt


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

        lines = ["context: " + " ".join(name(int(t)) for t in x[0, : 2 * args.recall_pairs]),
                 "query -> predicted (true)"]
        for t in (y != IGNORE_INDEX).nonzero().flatten().tolist():
            mark = "" if predicted[t] == y[t] else "   <- wrong"
            lines.append(f"{name(int(x[0, t]))} -> {name(int(predicted[t]))} "
                         f"({name(int(y[t]))}){mark}")
        return "\n".join(lines)
    prompt = data.val_x[:1, :16].to(ctx.device)
    generator = torch.Generator(device=ctx.device).manual_seed(args.seed)
    out = model.generate(prompt, args.sample_tokens, temperature=args.temperature,
                         top_k=args.top_k, generator=generator)
    prompt_text = data.tokenizer.decode(prompt[0].tolist())
    return (f"[prompt] {prompt_text}\n[sample] "
            f"{data.tokenizer.decode(out[0, prompt.shape[1]:].tolist())}")


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


# Optional packages of the training example (pyproject's [train] extra), and what needs them.
def _installed(package: str) -> bool:
    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def check_packages(args: argparse.Namespace, device: torch.device, models: list[str]) -> None:
    """Stop with one line naming every optional package a run of ``models`` needs and lacks."""
    needs = {"tqdm": "the progress bar", "matplotlib": "the plots"}
    if args.dataset != "recall" and args.tokenizer == "bpe":
        needs["tokenizers"] = "the BPE tokenizer; --tokenizer byte needs none"
    if args.dataset in HF_DATASETS:
        needs["datasets"] = f"--dataset {args.dataset}"
    if "mamba" in models and not (device.type == "cuda" and _installed("mamba_ssm")):
        needs["mambapy"] = "--model mamba" + ("" if device.type == "cuda" else " on CPU")
    missing = {package: why for package, why in needs.items() if not _installed(package)}
    if missing:
        names = " ".join(missing)
        listing = ", ".join(f"{package} ({why})" for package, why in missing.items())
        raise UserError(
            f"this run needs packages that are not installed: {listing}. Install them with "
            f"`pip install {names}`, or every dependency of the training example with "
            "`pip install --no-build-isolation '.[train]'` in the gam_ext source tree")


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace, ctx: Dist) -> dict[str, Any]:
    """Train one model as ``args`` says; returns the summary (rank 0's view)."""
    if args.out_dir is None:
        args.out_dir = str(default_out_dir(args))
    ckpt = resolve_resume(args)  # the run's settings come from the checkpoint, if any
    check_packages(args, ctx.device, [args.model])
    out_dir = Path(args.out_dir)
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = print if ctx.main else (lambda *a, **k: None)

    data = prepare_data(args, ctx)
    if ctx.main and getattr(data.tokenizer, "path", None) is not None:
        # The run's tokenizer beside its checkpoint, for examples/generate.py.
        shutil.copyfile(data.tokenizer.path, out_dir / "tokenizer.json")

    torch.manual_seed(args.seed)
    model, info = build_model(
        args.model, data.vocab_size, args.seq_len, args.d_model, args.n_layer, args.dropout,
        args.memory_slots, args.conv_kernel, args.n_head, device=ctx.device,
    )
    if args.init == "gpt":
        for embedding in (model.token_embedding, model.pos_embedding):
            nn.init.normal_(embedding.weight, mean=0.0, std=0.02)
    model.to(ctx.device)
    n_params = model.num_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay)
    sampler = DistributedSampler(range(len(data.train_x)), num_replicas=ctx.world,
                                 rank=ctx.rank, shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"the training split has {len(data.train_x)} chunks of --seq-len {args.seq_len} + 1 "
            f"tokens, fewer than one batch (--batch-size {args.batch_size} x {ctx.world} "
            "processes): lower --batch-size or --seq-len, or give more text")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    eval_interval = args.eval_interval or steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.warmup_steps, total_steps))
    # Autocast on either device (gam_ext has CPU and CUDA kernels for bf16 and fp16); fp16 with a
    # gradient scaler.
    use_amp = args.dtype != "fp32"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype, torch.float32)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.dtype == "fp16")

    step, loss_sum, loss_count, elapsed_before = 0, 0.0, 0, 0.0
    metrics: list[dict[str, Any]] = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, loss_sum, loss_count = ckpt["step"], ckpt["loss_sum"], ckpt["loss_count"]
        elapsed_before = ckpt["elapsed_s"]
        metrics = [m for m in ckpt["metrics"] if m["step"] <= step]
        if len(ckpt["rng"]) != ctx.world:
            raise UserError(f"--resume: the checkpoint comes from {len(ckpt['rng'])} processes, "
                            f"this run has {ctx.world}")
        rng = ckpt["rng"][ctx.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], ctx.device)
        log(f"resuming from step {step} of {total_steps}")
    else:
        torch.manual_seed(args.seed + ctx.rank)  # distinct dropout masks per process
    if ctx.main:
        with open(out_dir / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metrics)

    eval_model: nn.Module = torch.compile(model) if args.compile else model
    run_model = eval_model
    if ctx.enabled:
        run_model = DistributedDataParallel(
            eval_model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    autocast = (torch.autocast(ctx.device.type, dtype=amp_dtype) if use_amp
                else contextlib.nullcontext())

    log(f"data:   {data.description}")
    log(f"model:  {info}: {n_params:,} parameters, D={args.d_model}, {args.n_layer} layers, "
        f"vocab {data.vocab_size}, seq {args.seq_len}, {args.init} init")
    if args.model == "gam":
        log(f"ops:    {gam_ext_backend(ctx.device)}")
    precision = f"{args.dtype} autocast" if use_amp else "fp32"
    if args.dtype == "fp16":
        precision += " with a gradient scaler"
    log(f"recipe: {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs of "
        f"{steps_per_epoch}), batch {args.batch_size} x {ctx.world} process(es), lr {args.lr}, "
        f"warm-up {args.warmup_steps}, device {ctx.device}, {precision}, "
        f"{torch.get_num_threads()} CPU thread(s)")
    log(f"unigram perplexity of the validation targets: {data.unigram_ppl:.2f}")

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not ctx.main, dynamic_ncols=True,
               mininterval=1.0, desc=args.model)
    tokens_per_step = args.batch_size * args.seq_len * ctx.world
    train_time, window_time, window_tokens = 0.0, 0.0, 0
    order: torch.Tensor | None = None
    stop_at = min(total_steps, args.stop_at_step or total_steps)
    run_model.train()
    while step < stop_at:
        epoch, i = divmod(step, steps_per_epoch)
        if order is None or i == 0:
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
        idx = order[i * args.batch_size:(i + 1) * args.batch_size]
        x, y = data.train_x[idx].to(ctx.device), data.train_y[idx].to(ctx.device)

        t0 = time.perf_counter()
        with autocast:
            _, loss = run_model(x, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_value = loss.item()
        dt = time.perf_counter() - t0
        step += 1
        loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
        train_time, window_time = train_time + dt, window_time + dt
        window_tokens += tokens_per_step
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{window_tokens / window_time:,.0f}",
                        refresh=False)

        if step % eval_interval == 0 or step == total_steps:
            result = evaluate(eval_model, data, args, ctx, autocast, args.eval_batches)
            (train_loss,) = all_mean([loss_sum / loss_count], ctx)
            record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                      "train_loss": train_loss, **result,
                      "tokens_per_s": window_tokens / window_time,
                      "elapsed_s": elapsed_before + train_time}
            if data.tokenizer is not None:
                record.pop("val_acc")
            metrics.append(record)
            if ctx.main:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                acc = f" val acc {record['val_acc']:.3f}" if "val_acc" in record else ""
                bar.write(f"step {step:>6}: train loss {train_loss:.4f}  val loss "
                          f"{record['val_loss']:.4f}  val ppl {record['val_ppl']:.2f}{acc}  "
                          f"{record['tokens_per_s']:,.0f} tok/s")
            loss_sum, loss_count, window_time, window_tokens = 0.0, 0, 0.0, 0
        if step % eval_interval == 0 or step == stop_at:
            save_checkpoint(
                out_dir / "ckpt.pt", ctx, model=model.state_dict(),
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(), step=step, epoch=step / steps_per_epoch,
                loss_sum=loss_sum, loss_count=loss_count, metrics=metrics,
                elapsed_s=elapsed_before + train_time,
                data_order={"sampler_seed": args.seed, "epoch": step // steps_per_epoch,
                            "index_in_epoch": step % steps_per_epoch},
                args={k: v for k, v in vars(args).items() if k != "explicit"},
            )
    bar.close()

    summary: dict[str, Any] = {
        "model": args.model, "dataset": data.name, "params": n_params, "steps": step,
        "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "train_time_s": elapsed_before + train_time,
        "s_per_epoch": (elapsed_before + train_time) * steps_per_epoch / max(step, 1),
        "tokens_per_s": (step * tokens_per_step) / max(elapsed_before + train_time, 1e-9),
        "unigram_ppl": data.unigram_ppl, "out_dir": str(out_dir),
    }
    if step < total_steps:
        log(f"stopped at step {step} of {total_steps}; continue with --resume "
            f"--out-dir {out_dir}")
        return summary

    # Final validation on the whole split, a sample, plots and the summary (rank 0 writes).
    final = evaluate(eval_model, data, args, ctx, autocast) if args.eval_batches else {
        k: v for k, v in metrics[-1].items() if k.startswith("val_")}
    summary.update(final)
    if data.tokenizer is not None:
        summary.pop("val_acc", None)
    if ctx.main:
        files = plot_metrics(metrics, out_dir, f"{args.model} on {data.name}")
        if args.sample_tokens or data.tokenizer is None:
            sample = write_sample(model, data, args, ctx)
            (out_dir / "sample.txt").write_text(sample + "\n")
            files.append(out_dir / "sample.txt")
            print(f"\n{sample}\n")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        acc = f"\nval accuracy:   {summary['val_acc']:.4f}" if "val_acc" in summary else ""
        print(
            f"model:          {args.model} ({n_params:,} parameters)\n"
            f"steps:          {step} ({step / steps_per_epoch:.2f} epochs) in "
            f"{summary['train_time_s']:.1f} s of training, {summary['tokens_per_s']:,.0f} tok/s\n"
            f"val loss:       {summary['val_loss']:.4f}\n"
            f"val PPL:        {summary['val_ppl']:.2f}\n"
            f"unigram PPL:    {data.unigram_ppl:.2f} (validation targets, no context)"
            f"{acc}\n"
            f"files:          {out_dir}/ metrics.jsonl ckpt.pt summary.json "
            + " ".join(p.name for p in files)
        )
    return summary


# ------------------------------------------------------------------------------------------------
# Comparison: several models on the same data and budget, a table like the paper's Table 1
# ------------------------------------------------------------------------------------------------


def compare_table(summaries: list[dict[str, Any]], recall: bool) -> str:
    """A markdown table like the paper's Table 1, one row per finished run."""
    header = "| model | params | s/epoch | tokens/s | val loss | val PPL |"
    rule = "|---|---|---|---|---|---|"
    if recall:
        header, rule = header + " val acc |", rule + "---|"
    rows = [header, rule]
    for s in summaries:
        row = (f"| {s['model']} | {s['params'] / 1e6:.2f}M | {s['s_per_epoch']:.1f} | "
               f"{s['tokens_per_s']:,.0f} | {s.get('val_loss', math.nan):.4f} | "
               f"{s.get('val_ppl', math.nan):.2f} |")
        rows.append(row + (f" {s.get('val_acc', math.nan):.3f} |" if recall else ""))
    return "\n".join(rows)


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
            text = (f"Dataset {s0['dataset']}, {s0['steps']} steps each "
                    f"({s0['steps'] / s0['steps_per_epoch']:.2f} epochs), device {ctx.device} x "
                    f"{ctx.world}; unigram PPL of the validation targets "
                    f"{s0['unigram_ppl']:.2f}.\n\n"
                    f"{compare_table(summaries, args.dataset == 'recall')}\n")
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
    except (UserError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] in ("gam_ext", "torch"):
            raise
        print(f"error: the package `{exc.name}` is not installed (pip install {exc.name}, or "
              "pip install --no-build-isolation '.[train]' for everything the example uses)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with --resume (from the last checkpoint)", file=sys.stderr)
        return 130
    finally:
        if ctx is not None and ctx.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
