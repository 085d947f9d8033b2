"""Generate text with a trained GAM language model, streaming it as it comes.

    python examples/generate.py "The for statement"                 # runs/gam-pydoc/ (make train)
    echo "Exceptions are" | python examples/generate.py --greedy --max-new-tokens 60
    python examples/generate.py --checkpoint runs/gam-wikitext2 --top-p 0.9 "The city"
    python examples/generate.py --checkpoint paper.pt --tokenizer tokenizer.json "Once upon"

The model runs with a constant-size recurrent state (GAMModel.prefill, then GAMModel.step per
token): memory and time per token do not grow with the length of the text. The checkpoint is
one written by examples/train.py (its ckpt.pt, or the run's directory; the tokenizer is the
run's tokenizer.json, or rebuilt from the run's settings) or a state_dict of the paper's GAM_Model
(GAMModel.from_official; pass its tokenizer with --tokenizer). Without a prompt argument (or
with "-") the prompt is read from stdin. At the end a line on stderr gives the prompt's prefill
time and the generation speed in tokens/s (after one untimed warm-up step; the time includes
sampling and decoding).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
# gam_ext as installed; only when none is, the source tree this script lives in.
if importlib.util.find_spec("gam_ext") is None:
    sys.path.insert(1, str(ROOT))

import torch  # noqa: E402

import gam_ext  # noqa: E402
from gam_ext.generation import StepGraph, sample_logits  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UserError(Exception):
    """A mistake in the command line or the files: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate text with a GAM language model; see examples/README.md."
    )
    p.add_argument(
        "prompt", nargs="?", default=None, help="the text to continue (default, or '-': read it from stdin)"
    )
    p.add_argument(
        "--checkpoint",
        default="runs/gam-pydoc",
        help="ckpt.pt of examples/train.py or its run directory, or a GAM_Model "
        "state_dict (default: %(default)s)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizers JSON file, or 'byte' (default: the run's tokenizer.json, "
        "else rebuilt from the run's settings)",
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="(default: %(default)s)")
    p.add_argument("--top-k", type=int, default=40, help="0: no top-k (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--greedy", action="store_true", help="always the likeliest token")
    p.add_argument(
        "--stop-at-eos",
        action="store_true",
        help="stop at the end-of-document token (else it starts a new paragraph)",
    )
    p.add_argument("--seed", type=int, default=1337, help="(default: %(default)s)")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available"
    )
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp32", help="the model's dtype (default: %(default)s)"
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="on a GPU, replay each step from a CUDA graph (gam_ext.generation.StepGraph) "
        "instead of launching its kernels one by one",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads; 0: torch's default, or 1 when the machine is already busy "
        "(load average >= cores), where one thread runs much faster",
    )
    return p


# ------------------------------------------------------------------------------------------------
# Checkpoint and tokenizer
# ------------------------------------------------------------------------------------------------


def load_checkpoint(path_text: str) -> tuple[Path, Any]:
    path = Path(path_text)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        hint = (
            " (train one with `make train`, or pass --checkpoint)"
            if path_text == build_parser().get_default("checkpoint")
            else ""
        )
        raise UserError(f"no checkpoint at {path}{hint}")
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"cannot read {path} as a checkpoint of tensors: {str(exc).splitlines()[0]}"
        ) from None


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, the end-of-document id (or None), and whether
    decoded pieces are whole words that a space separates (BPE with a word-end suffix)."""

    def __init__(
        self,
        encode: Any,
        decode: Any,
        vocab_size: int,
        eos_id: int | None,
        description: str,
        words: bool = True,
    ) -> None:
        self.encode, self.decode = encode, decode
        self.vocab_size, self.eos_id, self.description = vocab_size, eos_id, description
        self.words = words


def byte_tokenizer() -> Tokenizer:
    return Tokenizer(
        lambda text: list(text.encode("utf-8")),
        lambda ids: bytes(i for i in ids if 0 <= i < 256).decode("utf-8", "replace"),
        256,
        None,
        "bytes",
        words=False,
    )


def json_tokenizer(path: Path) -> Tokenizer:
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise UserError(
            "reading a tokenizer needs the `tokenizers` package (pip install tokenizers)"
        ) from None
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as exc:
        raise UserError(f"cannot read the tokenizer {path}: {exc}") from None
    return Tokenizer(
        lambda text: tok.encode(text).ids,
        tok.decode,
        tok.get_vocab_size(),
        tok.token_to_id("[EOS]"),
        f"BPE ({tok.get_vocab_size()}) from {path}",
    )


def find_tokenizer(spec: str | None, ckpt_path: Path, run: dict[str, Any] | None) -> Tokenizer:
    if spec == "byte":
        return byte_tokenizer()
    if spec is not None:
        if not Path(spec).is_file():
            raise UserError(f"--tokenizer: no such file: {spec}")
        return json_tokenizer(Path(spec))
    beside = ckpt_path.parent / "tokenizer.json"
    if beside.is_file():
        return json_tokenizer(beside)
    if run is None:
        raise UserError(
            f"{ckpt_path} holds no settings of examples/train.py and no "
            "tokenizer.json lies beside it: pass --tokenizer FILE (or byte)"
        )
    if run.get("dataset") == "recall":
        raise UserError("this model was trained on the synthetic recall task: it has no text")
    if run.get("tokenizer") == "byte":
        return byte_tokenizer()
    # Rebuild the run's BPE (a cache hit when the run's data directory still holds it).
    from lm_data import DataError, bpe_tokenizer, load_corpus

    dataset = run.get("dataset")
    try:
        corpus = load_corpus(
            None if dataset in ("pydoc", "file") else dataset, run.get("train_file"), run.get("val_file")
        )
        bpe = bpe_tokenizer(corpus, run["vocab_size"], Path(run["data_dir"]) / "tokenizers")
    except DataError as exc:
        raise UserError(f"cannot rebuild the run's tokenizer: {exc}") from None
    return Tokenizer(
        lambda text: bpe.tokenizer.encode(text).ids, bpe.decode, bpe.vocab_size, bpe.eos_id, bpe.description
    )


def load_model(ckpt: Any, dtype: torch.dtype, device: torch.device) -> gam_ext.GAMModel:
    run = ckpt.get("args") if isinstance(ckpt, dict) else None
    if isinstance(run, dict) and run.get("model", "gam") != "gam":
        raise UserError(
            f"this checkpoint holds a {run['model']} model; generate.py runs GAM "
            "models (the baselines have generate() in examples/baselines.py)"
        )
    try:
        model = gam_ext.GAMModel.from_official(ckpt, dropout=0.0)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise UserError(f"not a GAM checkpoint: {exc}") from None
    return model.to(device=device, dtype=dtype).eval()


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


class Printer:
    """Writes the text of the generated ids as it grows; an end-of-document id becomes a paragraph
    break. It decodes the current paragraph whole each time (BPE pieces join with their
    neighbours) and writes what is new."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.paragraph, self.printed = tokenizer, [], ""

    def add(self, token: int) -> None:
        if token == self.tokenizer.eos_id:
            sys.stdout.write("\n\n")
            self.paragraph, self.printed = [], ""
        else:
            self.paragraph.append(token)
            text = self.tokenizer.decode(self.paragraph)
            if text.startswith(self.printed):
                sys.stdout.write(text[len(self.printed) :])
                self.printed = text
        sys.stdout.flush()


def check_sampling(args: argparse.Namespace) -> None:
    if not args.temperature >= 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")


def set_threads(threads: int) -> None:
    """A step is a few small products: on a machine busy with other work, threads that wait for
    one another cost more than they bring."""
    if threads == 0 and "OMP_NUM_THREADS" not in os.environ and hasattr(os, "getloadavg"):
        if os.getloadavg()[0] >= (os.cpu_count() or 1):
            threads = 1
    if threads > 0:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    try:
        if args.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        check_sampling(args)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
        device = torch.device(
            "cuda"
            if args.device == "auto" and torch.cuda.is_available()
            else "cpu"
            if args.device == "auto"
            else args.device
        )
        if args.cuda_graph and device.type != "cuda":
            raise UserError("--cuda-graph needs a GPU (the model runs on the CPU here)")
        ckpt_path, ckpt = load_checkpoint(args.checkpoint)
        run = ckpt.get("args") if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) else None
        model = load_model(ckpt, DTYPES[args.dtype], device)
        tokenizer = find_tokenizer(args.tokenizer, ckpt_path, run)
        if tokenizer.vocab_size != model.config.vocab_size:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model "
                f"{model.config.vocab_size}: pass the model's own --tokenizer"
            )
        prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
        prompt = prompt.strip()
        ids = tokenizer.encode(prompt) if prompt else []
        if not ids:
            if tokenizer.eos_id is None:
                raise UserError("the prompt is empty: give some text to continue")
            ids = [tokenizer.eos_id]  # a document boundary: start a new document
        sampling = dict(
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            greedy=args.greedy,
            generator=torch.Generator(device=device).manual_seed(args.seed),
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    idx = torch.tensor([ids], device=device)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    printer = Printer(tokenizer)
    if prompt and tokenizer.words:
        sys.stdout.write(" ")  # the prompt's last word is complete: a new one follows
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        state = model.allocate_state(1)
        model.step(model.prefill(idx[:, :1], state).argmax(-1), state)  # warm-up, not timed
        # The graph holds the state's tensors, which the prefill below rewrites in place.
        step = StepGraph(model, state) if args.cuda_graph else (lambda token: model.step(token, state))
        sync()
        t0 = time.perf_counter()
        logits = model.prefill(idx, state)
        sync()
        t1 = time.perf_counter()
        generated = 0
        for i in range(args.max_new_tokens):
            token = sample_logits(logits, **sampling)
            value = int(token)
            generated += 1
            if args.stop_at_eos and value == tokenizer.eos_id:
                break
            printer.add(value)
            if i + 1 < args.max_new_tokens:
                logits = step(token)
        sync()
        t2 = time.perf_counter()
    sys.stdout.write("\n")
    sys.stdout.flush()
    rate = generated / (t2 - t1) if generated else 0.0
    print(
        f"[{len(ids)} prompt tokens prefilled in {1e3 * (t1 - t0):.1f} ms; {generated} tokens "
        f"generated in {t2 - t1:.2f} s: {rate:.1f} tokens/s; {model.num_parameters():,} "
        f"parameters, {args.dtype}, {device}"
        + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else "")
        + f"; state {state.nbytes:,} bytes]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
