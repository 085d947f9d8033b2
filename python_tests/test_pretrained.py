"""GAMModel.save_pretrained / from_pretrained: config.json + model.safetensors, locally or from the Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gam_ext
from gam_ext import GAMConfig, GAMModel

pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = GAMConfig(
    vocab_size=61, block_size=20, d_model=24, n_layer=2, dropout=0.0, num_memory_slots=7, conv_kernel_size=4
)


def _model(seed: int = 0, config: GAMConfig = CONFIG) -> GAMModel:
    torch.manual_seed(seed)
    model = GAMModel(config)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor would show
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model = _model()
    model.save_pretrained(tmp_path / "gam")
    assert sorted(p.name for p in (tmp_path / "gam").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "gam" / "config.json").read_text())
    assert config["model_type"] == "gam" and config["d_model"] == 24 and config["n_layer"] == 2
    loaded = GAMModel.from_pretrained(tmp_path / "gam").eval()
    assert loaded.config == model.config
    assert loaded.head.weight is loaded.token_embedding.weight  # still tied
    idx = torch.randint(0, 61, (3, 20))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert loaded.state_dict().keys() == model.state_dict().keys()
    # The tied head is stored once.
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "gam" / "model.safetensors"))
    assert "head.weight" not in stored and "token_embedding.weight" in stored
    # A str path works too, and saving again replaces the files.
    _model(seed=1).save_pretrained(str(tmp_path / "gam"))
    again = GAMModel.from_pretrained(str(tmp_path / "gam"))
    assert not torch.equal(again.token_embedding.weight, model.token_embedding.weight)


def test_paper_checkpoints_still_load_through_from_official(tmp_path: Path) -> None:
    model = _model()
    torch.save(model.state_dict(), tmp_path / "paper.pt")
    official = GAMModel.from_official(tmp_path / "paper.pt", dropout=0.0).eval()
    official.save_pretrained(tmp_path / "gam")
    idx = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        assert torch.equal(GAMModel.from_pretrained(tmp_path / "gam").eval()(idx)[0], model(idx)[0])


def test_bad_directories_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no directory '.*nowhere'"):
        GAMModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no directory"):
        GAMModel.from_pretrained("./not/a/hub/id")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a saved GAMModel: it has no config.json"):
        GAMModel.from_pretrained(tmp_path / "empty")
    model = _model()
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="is a file; .*GAMModel.from_official"):
        GAMModel.from_pretrained(tmp_path / "ckpt.pt")
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="it has no model.safetensors"):
        GAMModel.from_pretrained(saved)
    model.save_pretrained(saved)
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read model.safetensors of .*saved"):
        GAMModel.from_pretrained(saved)
    model.save_pretrained(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read config.json of .*saved"):
        GAMModel.from_pretrained(saved)


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        (
            {"d_model": 32},
            ValueError,
            r"model.safetensors does not match config.json in .*: token_embedding.weight has shape "
            r"\(61, 24\), the config makes \(61, 32\)",
        ),
        ({"n_layer": 3}, ValueError, r"does not match config.json .*missing \['blocks.2."),
        ({"n_layer": 1}, ValueError, r"does not match config.json .*unexpected \['blocks.1."),
        ({"num_memory_slots": 9}, ValueError, r"blocks.0.memory_bank has shape \(7, 24\)"),
        ({"model_type": "llama"}, ValueError, "describes a 'llama' model, not a GAM model"),
        ({"d_state": 16}, ValueError, r"does not match GAMConfig: unknown fields \['d_state'\]"),
        ({"vocab_size": None}, ValueError, r"missing fields \['vocab_size'\]"),
        ({"dropout": 2.0}, ValueError, r"config.json of .*GAMConfig.dropout must be in \[0, 1\)"),
    ],
    ids=["width", "more-layers", "fewer-layers", "slots", "model-type", "unknown", "missing", "bad-value"],
)
def test_mismatched_config_gives_a_clear_error(
    changes: dict, error: type, message: str, tmp_path: Path
) -> None:
    _model().save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(error, match=message):
        GAMModel.from_pretrained(tmp_path)


def test_sharded_parameters_are_refused_with_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()

    class DTensor(torch.Tensor):  # stands in for FSDP's sharded parameters
        pass

    state = {k: v.as_subclass(DTensor) for k, v in model.state_dict().items()}
    monkeypatch.setattr(model, "state_dict", lambda: state)
    with pytest.raises(ValueError, match="sharded .*full_state_dict=True"):
        model.save_pretrained(tmp_path)


def test_hub_ids_download_through_huggingface_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    model = _model()
    repo = tmp_path / "snapshot"
    model.save_pretrained(repo)
    calls = []

    def fake_download(
        repo_id: str, filename: str, revision: str | None = None, cache_dir: str | None = None
    ) -> str:
        calls.append((repo_id, filename, revision, cache_dir))
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = GAMModel.from_pretrained("someone/gam-tiny", revision="v1", cache_dir="/c").eval()
    assert calls == [
        ("someone/gam-tiny", "config.json", "v1", "/c"),
        ("someone/gam-tiny", "model.safetensors", "v1", "/c"),
    ]
    idx = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_hub_without_huggingface_hub_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="needs the `huggingface_hub` package: pip install"):
        GAMModel.from_pretrained("someone/gam-tiny")


def test_hub_offline_fails_at_once_with_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "GAM_EXT_QUIET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    code = (
        "import gam_ext\n"
        "try:\n"
        "    gam_ext.GAMModel.from_pretrained('someone/gam-tiny')\n"
        "except OSError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cannot load 'someone/gam-tiny' from the Hugging Face Hub (config.json)" in result.stdout
    assert "HF_HUB_OFFLINE=1" in result.stdout


def test_package_exports() -> None:
    assert callable(gam_ext.GAMModel.save_pretrained)
    assert callable(gam_ext.GAMModel.from_pretrained)
