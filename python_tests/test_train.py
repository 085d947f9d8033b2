"""The training example (examples/train.py): models learn, resume is exact, torchrun, errors.

Everything runs tiny configurations on the CPU. The command line is exercised through subprocesses
where it is what is tested (exit codes, resume across processes, torchrun); the rest calls
``train.main`` in-process, which is cheaper.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TRAIN = EXAMPLES / "train.py"
sys.path.insert(0, str(EXAMPLES))

import baselines  # noqa: E402
import lm_data  # noqa: E402
import train  # noqa: E402

# One thread: tiny models run many times faster so, above all on a machine shared with builds.
# PYTHONPATH: the script imports the installed gam_ext; make that this source tree.
ENV = {
    **os.environ,
    "GAM_EXT_QUIET": "1",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
}
TINY = [
    "--d-model",
    "48",
    "--n-layer",
    "2",
    "--n-head",
    "4",
    "--memory-slots",
    "16",
    "--seq-len",
    "32",
    "--batch-size",
    "8",
    "--sample-tokens",
    "8",
    "--warmup-steps",
    "5",
    "--threads",
    "1",
]


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """In-process runs set torch's thread count (--threads 1); give the next test its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_cli(
    args: list[str], timeout: float = 120, env: dict | None = None, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    command = [sys.executable, *(launcher or []), str(TRAIN), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=ROOT)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, very learnable English-like text: sentences from a tiny grammar."""
    rng = random.Random(0)
    subjects = ["the cat", "a dog", "the old man", "my sister", "the bird"]
    verbs = ["sat on", "looked at", "ran to", "jumped over", "slept near"]
    objects = ["the mat.", "a red box.", "the green tree.", "the small house.", "a warm bed."]
    paragraphs = []
    for _ in range(300):
        paragraphs.append(
            " ".join(
                f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}" for _ in range(4)
            ).capitalize()
        )
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Data helpers
# ------------------------------------------------------------------------------------------------


def test_chunking_is_the_papers() -> None:
    x, y = lm_data.chunk(list(range(23)), seq_len=4)
    assert x.shape == y.shape == (4, 4)
    assert x[1].tolist() == [5, 6, 7, 8] and y[1].tolist() == [6, 7, 8, 9]


def test_pydoc_corpus_is_deterministic_and_disjoint() -> None:
    a, b = lm_data.pydoc_corpus(), lm_data.pydoc_corpus()
    assert a.train == b.train and a.val == b.val
    assert 0.08 < len(a.val) / (len(a.train) + len(a.val)) < 0.12
    assert a.val[0] not in a.train[:20]  # blocks interleave: validation is not one topic


def test_bpe_trains_on_train_split_only_and_is_cached(tmp_path: Path) -> None:
    corpus = lm_data.Corpus("t", ["alpha beta gamma " * 50], ["zeta zeta omega"])
    tok = lm_data.bpe_tokenizer(corpus, 300, tmp_path)
    vocab = tok.tokenizer.get_vocab()
    assert {"[UNK]", "[PAD]", "[SOS]", "[EOS]"} <= set(vocab)
    assert "zeta</w>" not in vocab  # validation text never reaches the tokenizer
    assert tok.decode(tok.encode_docs(["alpha beta"])[:-1]) == "alpha beta"
    again = lm_data.bpe_tokenizer(corpus, 300, tmp_path)
    assert again.path == tok.path and len(list(tmp_path.iterdir())) == 1


def test_recall_examples_layout() -> None:
    spec = lm_data.RecallSpec(num_pairs=4, num_keys=8, num_values=8)
    x, y = lm_data.recall_examples(5, spec, seed=0)
    assert x.shape == y.shape == (5, spec.seq_len)
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        pairs = dict(zip(row_x[0:8:2], row_x[1:8:2], strict=True))
        answers = [(t, row_y[t]) for t in range(len(row_y)) if row_y[t] != -100]
        assert len(answers) == 4
        for t, value in answers:
            assert pairs[row_x[t]] == value  # the query's value, as given in the context
    assert lm_data.unigram_perplexity(y) <= spec.num_values


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def test_paper_sized_parameter_counts() -> None:
    counts = {name: baselines.build_model(name, 10000, 256)[0].num_parameters() for name in baselines.MODELS}
    assert counts == {"gam": 22_599_680, "transformer": 24_166_400, "mamba": 20_507_648}


def test_models_share_one_language_model_base() -> None:
    from gam_ext.modules import LanguageModel

    for name in baselines.MODELS:
        model = baselines.build_model(name, 50, 16, d_model=16, n_layer=1, n_head=2)[0]
        assert isinstance(model, LanguageModel), name
        assert model.head.weight is model.token_embedding.weight
        with pytest.raises(ValueError, match="exceeds block_size 16"):
            model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.parametrize("model", baselines.MODELS)
def test_each_model_learns(model: str, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / model
    rc = train.main(
        [
            "--model",
            model,
            "--train-file",
            str(corpus),
            "--vocab-size",
            "120",
            *TINY,
            "--max-steps",
            "100",
            "--eval-interval",
            "25",
            "--lr",
            "3e-3",
            "--eval-batches",
            "4",
            "--out-dir",
            str(out),
            "--data-dir",
            str(tmp_path / "data"),
        ]
    )
    assert rc == 0
    metrics = read_metrics(out)
    summary = json.loads((out / "summary.json").read_text())
    assert [m["step"] for m in metrics] == [25, 50, 75, 100]
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] - 0.3
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert summary["val_ppl"] < 0.7 * summary["unigram_ppl"]  # it uses its context
    for name in ("ckpt.pt", "loss.png", "ppl.png", "sample.txt"):
        assert (out / name).stat().st_size > 0


def test_recall_task_runs(tmp_path: Path) -> None:
    rc = train.main(
        [
            "--dataset",
            "recall",
            "--recall-pairs",
            "4",
            "--recall-keys",
            "8",
            "--recall-values",
            "8",
            "--recall-train",
            "512",
            "--recall-val",
            "64",
            "--d-model",
            "32",
            "--n-layer",
            "1",
            "--memory-slots",
            "16",
            "--batch-size",
            "16",
            "--max-steps",
            "6",
            "--eval-interval",
            "3",
            "--threads",
            "1",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    metrics = read_metrics(tmp_path)
    assert all(0.0 <= m["val_acc"] <= 1.0 for m in metrics)
    assert "query -> predicted" in (tmp_path / "sample.txt").read_text()


def test_compare_writes_a_table(corpus: Path, tmp_path: Path) -> None:
    rc = train.main(
        [
            "--compare",
            "--models",
            "gam,transformer",
            "--train-file",
            str(corpus),
            "--tokenizer",
            "byte",
            *TINY,
            "--max-steps",
            "4",
            "--eval-batches",
            "2",
            "--sample-tokens",
            "0",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    table = (tmp_path / "compare.md").read_text()
    assert "| model | params | s/epoch | tokens/s | val loss | val PPL |" in table
    assert "| gam |" in table and "| transformer |" in table


# ------------------------------------------------------------------------------------------------
# The command line: resume, torchrun, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_continues_bit_for_bit(corpus: Path, tmp_path: Path) -> None:
    common = [
        "--train-file",
        str(corpus),
        *TINY,
        "--vocab-size",
        "120",
        "--max-steps",
        "12",
        "--eval-interval",
        "4",
        "--eval-batches",
        "3",
        "--sample-tokens",
        "0",
        "--data-dir",
        str(tmp_path / "data"),
    ]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert train.main([*common, "--out-dir", str(full)]) == 0  # uninterrupted, in-process
    first = run_cli([*common, "--out-dir", str(parts), "--stop-at-step", "6"])
    assert first.returncode == 0, first.stderr
    assert [m["step"] for m in read_metrics(parts)] == [4]
    second = run_cli([*common, "--out-dir", str(parts), "--resume"])
    assert second.returncode == 0, second.stderr
    assert "resuming from step 6" in second.stdout

    expected, got = read_metrics(full), read_metrics(parts)
    fields = {"step", "epoch", "train_loss", "val_loss", "val_ppl", "tokens_per_s", "elapsed_s"}
    assert all(set(m) == fields for m in expected + got)
    assert [m["step"] for m in got] == [4, 8, 12]
    for a, b in zip(expected, got, strict=True):
        assert (a["train_loss"], a["val_loss"], a["val_ppl"]) == (
            b["train_loss"],
            b["val_loss"],
            b["val_ppl"],
        )
    ckpt = torch.load(parts / "ckpt.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "scheduler", "step", "rng", "data_order"} <= set(ckpt)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(corpus: Path, tmp_path: Path) -> None:
    result = run_cli(
        [
            "--train-file",
            str(corpus),
            "--tokenizer",
            "byte",
            *TINY,
            "--max-steps",
            "4",
            "--eval-interval",
            "2",
            "--eval-batches",
            "2",
            "--out-dir",
            str(tmp_path),
        ],
        launcher=[
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
        ],
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 8 x 2 process(es)" in result.stdout
    assert result.stdout.count("val PPL:") == 1  # only rank 0 prints
    assert [m["step"] for m in read_metrics(tmp_path)] == [2, 4]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "rnn"], "--model: invalid choice"),
        (["--lr", "-1"], "--lr: must be > 0"),
        (["--batch-size", "two"], "--batch-size: expected an integer"),
        (["--train-file", "/nonexistent/corpus.txt"], "--train-file: no such file"),
        (["--val-file", "/tmp/x.txt"], "--val-file needs --train-file"),
        (["--resume", "/nonexistent/ckpt.pt"], "--resume: no such checkpoint"),
        (["--compare", "--models", "gam,lstm"], "--models: unknown model"),
        (
            ["--dataset", "recall", "--recall-pairs", "9", "--recall-keys", "8"],
            "--recall-pairs 9 exceeds --recall-keys 8",
        ),
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    ],
)
def test_bad_flags_give_clear_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_user_errors_exit_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = run_cli(["--train-file", "/nonexistent/corpus.txt"], timeout=60)
    assert result.returncode == 2
    assert "no such file: /nonexistent/corpus.txt" in result.stderr
    assert "Traceback" not in result.stderr
    assert train.main(["--resume", "--out-dir", str(tmp_path / "empty")]) == 2
    assert "error: --resume: no checkpoint at" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("datasets") is None, reason="the `datasets` package is not installed"
)
def test_offline_hf_dataset_fails_fast(tmp_path: Path) -> None:
    env = {**ENV, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli(["--dataset", "wikitext2", "--out-dir", str(tmp_path / "run")], env=env, timeout=60)
    assert result.returncode == 2
    assert "cannot load --dataset wikitext2" in result.stderr
    assert "--train-file" in result.stderr and "--dataset recall" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------
# Precision, packages, files, output folder, which gam_ext runs
# ------------------------------------------------------------------------------------------------

RECALL_TINY = [
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
    "3",
    "--eval-interval",
    "3",
    "--threads",
    "1",
]


def test_cpu_bf16_autocasts_for_real_on_auto_and_cpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = {}
    for name, flags in [
        ("fp32", ["--device", "cpu"]),
        ("auto", ["--dtype", "bf16"]),
        ("cpu", ["--dtype", "bf16", "--device", "cpu"]),
    ]:
        assert train.main([*RECALL_TINY, *flags, "--out-dir", str(tmp_path / name)]) == 0
        runs[name] = read_metrics(tmp_path / name)[-1]
        header = capsys.readouterr().out
        assert ("bf16 autocast" in header) == (name != "fp32"), header
    assert runs["auto"]["train_loss"] == runs["cpu"]["train_loss"]  # one behaviour both ways
    assert runs["auto"]["train_loss"] != runs["fp32"]["train_loss"]  # and really in bf16
    assert abs(runs["auto"]["val_loss"] - runs["fp32"]["val_loss"]) < 0.05


def test_cpu_fp16_autocasts_with_a_gradient_scaler(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train.main([*RECALL_TINY, "--dtype", "fp16", "--out-dir", str(tmp_path)]) == 0
    assert "fp16 autocast with a gradient scaler" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["scaler"]["scale"] > 0  # the scaler was enabled
    assert all(m["val_loss"] < 10 for m in read_metrics(tmp_path))


@pytest.mark.parametrize(
    ("argv", "package", "hint"),
    [
        ([], "tokenizers", "--tokenizer byte needs none"),
        ([], "tqdm", "progress bar"),
        ([], "matplotlib", "plots"),
        (["--model", "mamba", "--device", "cpu"], "mambapy", "--model mamba on CPU"),
    ],
)
def test_missing_optional_packages_give_one_line(
    argv: list[str],
    package: str,
    hint: str,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    rc = train.main(
        ["--train-file", str(corpus), *TINY, *argv, "--max-steps", "1", "--out-dir", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: this run needs packages")
    assert f"{package} (" in err and hint in err and f"pip install {package}" in err
    assert "'.[train]'" in err


def test_missing_package_found_late_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named 'somepkg'", name="somepkg")

    monkeypatch.setattr(train, "prepare_data", fail)
    assert train.main([*RECALL_TINY, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the package `somepkg` is not installed (pip install somepkg")
    assert err.count("\n") == 1


def test_default_out_dir_is_in_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert train.main([*RECALL_TINY, "--sample-tokens", "0"]) == 0
    assert (tmp_path / "runs" / "gam-recall" / "metrics.jsonl").is_file()
    assert "in the current directory" in " ".join(train.build_parser().format_help().split())


def test_file_without_blank_lines_is_split_by_lines(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line number {i} of the text\n" for i in range(40)))
    corpus = lm_data.file_corpus(str(path), None)
    assert len(corpus.train) == 36 and len(corpus.val) == 4
    assert corpus.val[0] == "line number 36 of the text"
    assert "documents: lines" in corpus.note
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"first paragraph\r\nstill first\r\n\r\nsecond\r\n\r\nthird\r\n")
    assert lm_data.file_corpus(str(crlf), str(crlf)).train == [
        "first paragraph\nstill first",
        "second",
        "third",
    ]
    one = tmp_path / "one.txt"
    one.write_text("just one line\n")
    with pytest.raises(lm_data.DataError, match="one line of text: too short .* --val-file"):
        lm_data.file_corpus(str(one), None)


def test_lines_file_trains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"the cat sat on mat number {i % 7}.\n" for i in range(400)))
    assert (
        train.main(
            [
                "--train-file",
                str(path),
                "--tokenizer",
                "byte",
                *TINY,
                "--max-steps",
                "2",
                "--eval-batches",
                "1",
                "--sample-tokens",
                "0",
                "--out-dir",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    assert "documents: lines, the last 40 of 400 for validation" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes(range(256)) * 8, r"is not a text file \(byte 0 is NUL\)"),
        ("café au lait\n\nencore\n".encode("latin-1"), r"is not UTF-8 text \(byte 3 is 0xe9\)"),
    ],
    ids=["binary", "latin1"],
)
def test_non_text_files_are_refused(
    data: bytes, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    with pytest.raises(lm_data.DataError, match=message):
        lm_data.file_corpus(str(path), None)
    assert (
        train.main(
            ["--train-file", str(path), "--tokenizer", "byte", *TINY, "--out-dir", str(tmp_path / "run")]
        )
        == 2
    )
    assert "data.bin is not" in capsys.readouterr().err


# Runs a script with only the gam_ext the test means on sys.path (this test environment may make
# another source tree importable): argv[1] is a folder to put on sys.path ('' for none), then the
# script and its arguments.
ISOLATED = """
import os, runpy, sys
extra = sys.argv[1]
sys.path[:] = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, "gam_ext"))]
if extra:
    sys.path.append(extra)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_isolated(extra: str, script: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", ISOLATED, extra, str(script), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_examples_use_the_installed_gam_ext(tmp_path: Path) -> None:
    # An "installed" gam_ext elsewhere (links to this tree's files, built _C included).
    site = tmp_path / "site"
    (site / "gam_ext").mkdir(parents=True)
    for f in (ROOT / "gam_ext").iterdir():
        if f.suffix in (".py", ".so", ".pyd"):
            (site / "gam_ext" / f.name).symlink_to(f)
    result = run_isolated(str(site), TRAIN, [*RECALL_TINY, "--out-dir", str(tmp_path / "run")], ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"ops:    gam_ext {site / 'gam_ext'}: compiled cpu kernels for causal_conv1d" in result.stdout


def test_source_tree_without_extension_says_why(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for folder in ("gam_ext", "examples"):
        (tree / folder).mkdir(parents=True)
        for f in (ROOT / folder).glob("*.py"):
            (tree / folder / f.name).write_bytes(f.read_bytes())
    env = {k: v for k, v in ENV.items() if k != "GAM_EXT_QUIET"}
    result = run_isolated(
        "", tree / "examples" / "train.py", [*RECALL_TINY, "--out-dir", str(tmp_path / "run")], env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    warning = [line for line in result.stderr.splitlines() if "gam_ext._C" in line]
    assert len(warning) == 1, result.stderr
    assert f"gam_ext._C is not built in {tree / 'gam_ext'}" in warning[0]
    assert "python setup.py build_ext --inplace" in warning[0]
    assert "circular import" not in result.stderr
    assert (
        f"ops:    gam_ext {tree / 'gam_ext'}: the pure-PyTorch reference for causal_conv1d, "
        "memory_retrieval, gate_fusion, gam_mixer, causal_conv1d_update, gam_mixer_step (the "
        "compiled extension gam_ext._C is not built" in result.stdout
    )


def test_package_check_reads_the_resumed_settings(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = [
        "--train-file",
        str(corpus),
        *TINY,
        "--max-steps",
        "2",
        "--eval-batches",
        "1",
        "--sample-tokens",
        "0",
        "--out-dir",
        str(tmp_path),
    ]
    assert train.main([*common, "--tokenizer", "byte", "--stop-at-step", "1"]) == 0
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    assert train.main([*common, "--resume"]) == 0  # a byte-tokenizer run needs no tokenizers


def test_compare_checks_every_model_first(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "mambapy", None)
    rc = train.main(
        [
            "--compare",
            "--models",
            "gam,mamba",
            "--train-file",
            str(corpus),
            "--tokenizer",
            "byte",
            *TINY,
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 2 and "mambapy (--model mamba on CPU)" in capsys.readouterr().err
    assert not (tmp_path / "gam").exists()  # stopped before training the first model
