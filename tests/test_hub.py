"""Hub glue up to the network boundary: rendered cards, dry-run folders, uploads through a patched HfApi (token never
printed), and the refusal of pickled checkpoints."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import moezoo  # noqa: E402
from moezoo import hub, registry  # noqa: E402
from moezoo.safety import PickleCheckpointError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_TESTTOKEN_do_not_print_0123456789"


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return moezoo.create_model("lm_tiny_e8k2", tiny=True)


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


def test_every_family_has_a_card_template():
    for fam in moezoo.list_families():
        path = hub.card_template_path(fam)
        assert path is not None, f"model_cards/{registry.get_family(fam).card}.md is missing for family {fam}"
        meta = _front_matter(path.read_text())
        for key in ("library_name", "tags", "license", "pipeline_tag", "datasets", "metrics", "base_model"):
            assert key in meta, f"{path.name}: YAML header lacks {key}"


def test_top_level_model_cards_is_the_packaged_folder():
    top = ROOT / "model_cards"
    assert top.is_dir()
    packaged = hub.model_cards_dir()
    assert {p.name for p in top.glob("*.md")} == {p.name for p in packaged.glob("*.md")}
    for p in top.glob("*.md"):
        assert p.read_bytes() == (packaged / p.name).read_bytes()


def test_render_card(model):
    card = hub.render_model_card(model.config, repo_id="someone/lm-x", model=model, base_model="org/base",
                                 datasets=["pydoc"], tags=["extra-tag"], training_notes="trained on pydoc")
    data = card.data.to_dict()
    assert data["library_name"] == "moezoo" and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "text-generation" and data["base_model"] == "org/base"
    assert data["datasets"] == ["pydoc"] and "perplexity" in data["metrics"]
    assert {"moezoo", "mixture-of-experts", "moezoo_lm", "extra-tag"} <= set(data["tags"])
    text = str(card)
    assert "# lm-x" in text and 'from_pretrained("someone/lm-x")' in text and "trained on pydoc" in text
    s = model.parameter_summary()
    assert moezoo.safety.format_count(s["total"]) in text
    assert moezoo.safety.format_count(s["active"]) in text
    assert "{{" not in text and "}}" not in text


def test_dry_run_writes_the_exact_folder(model, tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    def boom(*a, **k):
        raise AssertionError("dry run must not touch the network")

    monkeypatch.setattr(HfApi, "create_repo", boom)
    monkeypatch.setattr(HfApi, "upload_folder", boom)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    stage = tmp_path / "stage"
    out = model.push_to_hub("someone/lm-x", dry_run=True, staging_dir=stage)
    assert Path(out) == stage
    files = {p.name for p in stage.iterdir()}
    assert {"README.md", "config.json", "model.safetensors"} <= files
    printed = capsys.readouterr().out
    assert str(stage) in printed and "model.safetensors" in printed and "README.md" in printed
    assert SECRET not in printed
    reloaded = type(model).from_pretrained(stage)
    x = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x).logits, model.eval()(x).logits)
    with pytest.raises(ValueError, match="not empty"):
        model.push_to_hub("someone/lm-x", dry_run=True, staging_dir=stage)


def test_push_uploads_through_hfapi(model, tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    seen = {}

    def create_repo(self, repo_id, **kw):
        seen["create"] = dict(repo_id=repo_id, **kw)
        seen["token"] = self.token
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        seen["upload"] = dict(repo_id=repo_id, **kw)
        seen["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        seen["card"] = (Path(folder_path) / "README.md").read_text()

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"
        return Info()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    url = hub.push_to_hub(folder, "someone/lm-x", private=True)
    assert url.endswith("/commit/abc")
    assert seen["create"]["repo_id"] == "someone/lm-x" and seen["create"]["private"] is True
    assert seen["create"]["exist_ok"] is True
    assert seen["token"] == SECRET  # the token from the environment reached HfApi ...
    assert {"README.md", "config.json", "model.safetensors"} <= set(seen["files"])
    assert "library_name: moezoo" in seen["card"]
    out = capsys.readouterr()
    assert SECRET not in out.out and SECRET not in out.err  # ... and was never printed


def test_push_error_redacts_token(model, tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    def create_repo(self, repo_id, **kw):
        raise RuntimeError(f"401 unauthorized for token {self.token}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(RuntimeError) as info:
        model.push_to_hub("someone/lm-x")
    assert SECRET not in str(info.value) and "***" in str(info.value)
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err


def test_push_without_token(model, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "_resolve_token", lambda token: token)
    with pytest.raises(ValueError, match="HF_TOKEN"):
        model.push_to_hub("someone/lm-x")


def test_bad_repo_id(model):
    with pytest.raises(ValueError, match="repo_id"):
        model.push_to_hub("a/b/c", dry_run=True)


def _pickled_folder(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickled_checkpoint_refused_unless_opt_in(model, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = _pickled_folder(model, tmp_path / "pickled")
    with pytest.raises(PickleCheckpointError, match="allow_pickle=True"):
        type(model).from_pretrained(folder)
    with pytest.raises(PickleCheckpointError, match="pytorch_model.bin"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(PickleCheckpointError):
        type(model).from_pretrained(folder, use_safetensors=False)
    loaded = AutoModelForCausalLM.from_pretrained(folder, allow_pickle=True).eval()
    x = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits)


def test_pickle_files_refused_elsewhere(model, tmp_path):
    from moezoo.checkpoints import load_state_dict

    pt = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, pt)
    with pytest.raises(PickleCheckpointError):
        load_state_dict(pt)
    assert torch.equal(load_state_dict(pt, allow_pickle=True)["w"], torch.ones(2))
    with pytest.raises(PickleCheckpointError):
        type(model).from_pretrained(pt)
    folder = _pickled_folder(model, tmp_path / "pickled")
    with pytest.raises(PickleCheckpointError):
        hub.push_to_hub(folder, "someone/x", dry_run=True, staging_dir=tmp_path / "stage")


def test_official_checkpoint_config_lookup_and_dtype(tmp_path):
    from safetensors.torch import save_file

    from moezoo.checkpoints import float_dtype, load_official_checkpoint

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    cfg, sd = load_official_checkpoint(tmp_path)
    assert cfg == {} and list(sd) == ["w"]
    with pytest.raises(ValueError, match="no config.json next to .*pass config="):
        load_official_checkpoint(tmp_path / "model.safetensors", require_config=True)
    (tmp_path / "config.json").write_text('{"hidden": 4}')
    assert load_official_checkpoint(tmp_path, require_config=True)[0] == {"hidden": 4}
    assert load_official_checkpoint(tmp_path, config={"hidden": 8})[0] == {"hidden": 8}
    with pytest.raises(ValueError, match="does not exist"):
        load_official_checkpoint(tmp_path / "nope")
    assert float_dtype("torch.bfloat16") is torch.bfloat16 and float_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="floating torch dtype"):
        float_dtype("int8")
