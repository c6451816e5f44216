"""MoFME parity and conversion.

1. ``run_parity`` on the shared fixtures (``mofme``: one FME layer; ``mofme_full``: the whole MoWE model), and reference
   detection telling the two folders apart.
2. DIFFERENT configs (6 experts top-3, dim 48, 3 heads x 8, depth 2; a heads=1 layer without ``to_out``; a whole model
   with patch 4, out_ch 6, out_ch_scale 2, non-square images, residual learning): random weights in the official key
   layout, expected outputs from an independent plain-torch re-implementation of the official forward written from
   the fixtures' READMEs (off-by-one expert mapping included), written in the fixture format, checked with run_parity.
3. ``moezoo convert mofme`` CLI round trip (safetensors; ``.pth`` only with ``--allow-pickle``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moezoo.parity import ParityError, load_folder, run_parity  # noqa: E402

SHARED = Path(os.environ.get("MOEZOO_PARITY_DIR", Path(__file__).resolve().parents[3].parent / "shared" / "parity"))
LAYER_DIR = SHARED / "mofme"
FULL_DIR = SHARED / "mofme" / "mowe_full"
REPO = "RoyZry98/MoFME-Pytorch"


def _check(ref: str, folder: Path):
    lines = []
    results = run_parity(ref, folder, printer=lines.append)
    assert results and all(c.ok for c in results), "\n".join(lines)
    _, _, io, _ = load_folder(folder)
    assert {c.name for c in results} == {k for k in io if k.startswith("out.")}
    return results


# ---------------------------------------------------------------------------------------------------- shared fixtures
def test_shared_layer_fixture():
    if not LAYER_DIR.is_dir():
        pytest.skip(f"{LAYER_DIR} not available")
    _check("mofme", LAYER_DIR)


def test_shared_full_model_fixture():
    if not FULL_DIR.is_dir():
        pytest.skip(f"{FULL_DIR} not available")
    _check("mofme_full", FULL_DIR)


def test_reference_detection_tells_layer_and_model_apart():
    if not FULL_DIR.is_dir():
        pytest.skip(f"{FULL_DIR} not available")
    with pytest.raises(ParityError, match="MoWE"):
        run_parity("mofme", FULL_DIR, verbose=False)
    with pytest.raises(ParityError, match="Transformer_MoE_FiLM"):
        run_parity("mofme_full", LAYER_DIR, verbose=False)


# ------------------------------------------------------------------------ independent official re-implementation
def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def _lin(x, sd, p, bias=True):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"] if bias else None)


def official_transformer(sd: dict, prefix: str, x: torch.Tensor, heads: int, num_expert: int, top_k: int,
                         record: dict, rec_prefix: str):
    """Transformer_MoE_FiLM.forward in eval (README quirks: off-by-one slots, KeepTopK + softmax, dense experts)."""
    weights_list = []
    depth = len({k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + "layers.")})
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        # PreNorm attention, no qkv bias, scale dim_head^-0.5
        h = _ln(x, sd, p + "0.norm")
        q, k, v = F.linear(h, sd[p + "0.fn.to_qkv.weight"]).chunk(3, dim=-1)
        b, n, inner = q.shape
        d = inner // heads
        q, k, v = (t.reshape(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(b, n, inner)
        if p + "0.fn.to_out.0.weight" in sd:
            o = _lin(o, sd, p + "0.fn.to_out.0")
        x = o + x
        record[f"{rec_prefix}{i}.fme_in"] = x.clone()
        logits = _lin(x, sd, p + "1.0")
        record[f"{rec_prefix}{i}.router_logits"] = logits.clone()
        kth = torch.topk(logits, top_k)[0][..., -1:]
        weights = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
        y = _ln(x, sd, p + "3.0")
        y_temp = F.gelu(_lin(y, sd, p + "3.1.0.0")) * _lin(y, sd, p + "3.1.1.0")
        record[f"{rec_prefix}{i}.basenet_out"] = y_temp.clone()
        mix = 0
        for idx in range(num_expert):
            j = idx + 2  # ff_list[idx + 2]: 2 is the GELU module, 3.. are the experts
            if j == 2:
                f = F.gelu(y_temp)
            else:
                f = _lin(y_temp, sd, f"{p}3.{j}.expert.0") * y_temp + _lin(y_temp, sd, f"{p}3.{j}.expert.1")
            mix = mix + weights[..., idx:idx + 1] * f
        record[f"{rec_prefix}{i}.expert_mix"] = mix.clone()
        x = _lin(F.gelu(_lin(mix, sd, p + "2.0")), sd, p + "2.3") + x
        weights_list.append(weights)
    return x, weights_list


def _conv(x, sd, p):
    w = sd[p + ".weight"]
    return F.conv2d(x, w, sd[p + ".bias"], padding=w.shape[-1] // 2)


def _resblock(x, sd, p):
    return _conv(F.relu(_conv(x, sd, p + ".body.0")), sd, p + ".body.2") + x


def official_mowe(sd: dict, cfg: dict, img: torch.Tensor, record: dict):
    """MoWE.forward (gate='film', eval): head, PatchEmbed (no position embedding), transformer, Linear + rearrange, tail."""
    f = _resblock(_resblock(_conv(img, sd, "head.0"), sd, "head.1"), sd, "head.2")
    record["out.encoder.input"] = f.clone()
    enc = "Img_Encoder.vision_transformer."
    t = F.conv2d(f, sd[enc + "to_patch_embedding.proj.weight"], sd[enc + "to_patch_embedding.proj.bias"],
                 stride=cfg["patch_size"])
    t = _ln(t.flatten(2).transpose(1, 2), sd, enc + "to_patch_embedding.norm")
    t, weights = official_transformer(sd, enc + "transformer.", t, cfg["n_heads"], cfg["num_expert"], cfg["top_k"],
                                      record, "out.encoder.transformer.layers.")
    record["out.encoder.output"] = t.clone()
    p = cfg["patch_size"]
    H, W = img.shape[-2:]
    z = _lin(t, sd, "patch_embed_to_img_feature.0")
    B, N, D = z.shape
    c = D // (p * p)
    z = z.reshape(B, H // p, W // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, H, W)
    z = _resblock(z, sd, "tail.1")
    z = _conv(z, sd, "tail.2")
    z = _resblock(z, sd, "tail.3")
    z = _conv(z, sd, "tail.4")
    record["out.tail_pre_sigmoid"] = z.clone()
    out = torch.sigmoid(z)
    if cfg["residual_learning"]:
        out = out + img
    record["out.img_hq"] = out
    for i, w in enumerate(weights):
        record[f"out.weights.{i}"] = w
    return out


def random_layer_state(g, prefix, depth, dim, heads, dim_head, mlp_dim, E, with_to_out=True):
    def mat(r, c):
        return torch.randn(r, c, generator=g) / c ** 0.5

    def vec(n, base=0.0):
        return base + 0.1 * torch.randn(n, generator=g)

    sd = {}
    inner = heads * dim_head
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        sd[p + "0.norm.weight"], sd[p + "0.norm.bias"] = vec(dim, 1.0), vec(dim)
        sd[p + "0.fn.to_qkv.weight"] = mat(3 * inner, dim)
        if with_to_out:
            sd[p + "0.fn.to_out.0.weight"], sd[p + "0.fn.to_out.0.bias"] = mat(dim, inner), vec(dim)
        sd[p + "1.0.weight"], sd[p + "1.0.bias"] = mat(E, dim) * 3, vec(E)
        sd[p + "2.0.weight"], sd[p + "2.0.bias"] = mat(mlp_dim, dim), vec(mlp_dim)
        sd[p + "2.3.weight"], sd[p + "2.3.bias"] = mat(dim, mlp_dim), vec(dim)
        sd[p + "3.0.weight"], sd[p + "3.0.bias"] = vec(dim, 1.0), vec(dim)
        for j in (0, 1):
            sd[f"{p}3.1.{j}.0.weight"], sd[f"{p}3.1.{j}.0.bias"] = mat(dim, dim), vec(dim)
        for e in range(E):
            for j in (0, 1):
                sd[f"{p}3.{e + 3}.expert.{j}.weight"], sd[f"{p}3.{e + 3}.expert.{j}.bias"] = mat(dim, dim), vec(dim)
            sd[f"{p}3.{e + 3}.norm.weight"], sd[f"{p}3.{e + 3}.norm.bias"] = vec(dim, 1.0), vec(dim)
    return sd


def write_folder(path: Path, config: dict, model: dict, io: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.items()}, str(path / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in io.items()}, str(path / "io.safetensors"))
    (path / "io.json").write_text(json.dumps({"tensors": {k: list(v.shape) for k, v in io.items()}}))
    return path


@pytest.mark.parametrize("dims", [dict(dim=48, heads=3, dim_head=8, mlp_dim=96, E=6, top_k=3, depth=2, n=10),
                                  dict(dim=16, heads=1, dim_head=16, mlp_dim=32, E=3, top_k=1, depth=1, n=5)])
def test_layer_parity_other_configs(tmp_path, dims):
    g = torch.Generator().manual_seed(11)
    with_to_out = not (dims["heads"] == 1 and dims["dim_head"] == dims["dim"])
    sd = random_layer_state(g, "", dims["depth"], dims["dim"], dims["heads"], dims["dim_head"], dims["mlp_dim"],
                            dims["E"], with_to_out)
    x = torch.randn(3, dims["n"], dims["dim"], generator=g)
    io = {"in.x": x}
    with torch.no_grad():
        out, weights = official_transformer(sd, "", x, dims["heads"], dims["E"], dims["top_k"], io, "out.layers.")
    io["out.x"] = out
    io.update({f"out.weights.{i}": w for i, w in enumerate(weights)})
    assert ((io["out.weights.0"] > 0).sum(-1) == dims["top_k"]).all()
    cfg = dict(dim=dims["dim"], depth=dims["depth"], heads=dims["heads"], dim_head=dims["dim_head"],
               mlp_dim=dims["mlp_dim"], dropout=0.1, num_expert=dims["E"], top_k=dims["top_k"], gate="film",
               _reference={"repo": REPO, "class": "Transformer_MoE_FiLM"})
    _check("mofme", write_folder(tmp_path / "layer", cfg, sd, io))


def _full_case(g, residual=True, heads=3, dim_head=8):
    cfg = dict(task_scale="1+1+1", is_single_task=False, img_size=[16, 24], in_ch=3, out_ch=6, patch_size=4,
               residual_learning=residual, transformer_type="vit", moe_enable=True, num_expert=5, type_expert="ffn",
               top_k=2, gate="film", embed_dim=24, dim_head=dim_head, n_heads=heads, depth=2, scale_dim=2, dropout=0.1,
               embed_dropout=0, kernel_size=3, out_ch_scale=2,
               _reference={"repo": REPO, "class": "MoWE"})
    C, p, D = cfg["out_ch"], cfg["patch_size"], cfg["embed_dim"]
    ch = C * cfg["out_ch_scale"]

    def conv(p_, cin, cout):
        return {p_ + ".weight": torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5),
                p_ + ".bias": 0.1 * torch.randn(cout, generator=g)}

    enc = "Img_Encoder.vision_transformer."
    sd = random_layer_state(g, enc + "transformer.", 2, D, heads, dim_head, 2 * D, 5)
    sd.update(conv("head.0", 3, C))
    for i in (1, 2):
        sd.update(conv(f"head.{i}.body.0", C, C)), sd.update(conv(f"head.{i}.body.2", C, C))
    sd[enc + "to_patch_embedding.proj.weight"] = torch.randn(D, C, p, p, generator=g) / (p * C ** 0.5)
    sd[enc + "to_patch_embedding.proj.bias"] = 0.1 * torch.randn(D, generator=g)
    sd[enc + "to_patch_embedding.norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    sd[enc + "to_patch_embedding.norm.bias"] = 0.1 * torch.randn(D, generator=g)
    sd[enc + "img_pos_embedding"] = torch.randn(1, 24, D, generator=g)
    sd["patch_embed_to_img_feature.0.weight"] = torch.randn(ch * p * p, D, generator=g) / D ** 0.5
    sd["patch_embed_to_img_feature.0.bias"] = 0.1 * torch.randn(ch * p * p, generator=g)
    sd.update(conv("tail.1.body.0", ch, ch)), sd.update(conv("tail.1.body.2", ch, ch))
    sd.update(conv("tail.2", ch, ch // 2))
    sd.update(conv("tail.3.body.0", ch // 2, ch // 2)), sd.update(conv("tail.3.body.2", ch // 2, ch // 2))
    sd.update(conv("tail.4", ch // 2, 3))
    return cfg, sd


def test_config_without_head_sizes_uses_mowe_defaults():
    """A config written like the official training script's leaves n_heads / dim_head to MoWE's defaults (8 x 64)."""
    from moezoo.models.deweather.convert_mofme import load_official

    g = torch.Generator().manual_seed(6)
    cfg, sd = _full_case(g, heads=8, dim_head=64)
    short = {k: v for k, v in cfg.items() if k not in ("n_heads", "dim_head", "dropout", "_reference")}
    model = load_official(short, sd)
    assert (model.config.num_attention_heads, model.config.head_dim, model.config.dropout) == (8, 64, 0.1)
    img = torch.randn(2, 3, 16, 24, generator=g)
    with torch.no_grad():
        want = official_mowe(sd, cfg, img, {})
        got = model(pixel_values=img).reconstruction
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    _, sd3 = _full_case(g)  # 3 heads x 8: the defaults do not fit, and the error says so
    with pytest.raises(ValueError, match="n_heads=8 does not divide|dim_head=64"):
        load_official(short, sd3)


def test_full_model_parity_other_config(tmp_path):
    g = torch.Generator().manual_seed(5)
    cfg, sd = _full_case(g)
    img = torch.randn(2, 3, 16, 24, generator=g)
    io = {"in.img": img}
    with torch.no_grad():
        official_mowe(sd, cfg, img, io)
    _check("mofme_full", write_folder(tmp_path / "full", cfg, sd, io))


# --------------------------------------------------------------------------------------------- converter CLI
def test_convert_cli_round_trip(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForImageToImage

    from moezoo.cli import main
    from moezoo.models.deweather.convert_mofme import convert_mofme
    from moezoo.safety import PickleCheckpointError

    g = torch.Generator().manual_seed(2)
    cfg, sd = _full_case(g, residual=False)
    src = tmp_path / "official"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(src / "model.safetensors"))
    img = torch.randn(1, 3, 24, 16, generator=g)  # any size divisible by the patch works
    rec = {}
    with torch.no_grad():
        want = official_mowe(sd, cfg, img, rec)

    assert main(["convert", "mofme", str(src), str(tmp_path / "dst")]) == 0
    assert "converted mofme" in capsys.readouterr().out
    assert AutoConfig.from_pretrained(tmp_path / "dst").official_expert_offset is True
    model = AutoModelForImageToImage.from_pretrained(tmp_path / "dst").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=img).reconstruction, want, atol=1e-5, rtol=1e-4)

    pth = tmp_path / "pth"
    pth.mkdir()
    (pth / "config.json").write_text(json.dumps(cfg))
    torch.save({"state_dict": sd}, pth / "mowe.pth")
    assert main(["convert", "mofme", str(pth / "mowe.pth"), str(tmp_path / "dst2")]) != 0
    assert "allow-pickle" in capsys.readouterr().err and not (tmp_path / "dst2").exists()
    with pytest.raises(PickleCheckpointError):
        convert_mofme(pth / "mowe.pth", tmp_path / "dst2")
    assert main(["convert", "mofme", str(pth / "mowe.pth"), str(tmp_path / "dst2"), "--allow-pickle"]) == 0
    a, b = load_file(str(tmp_path / "dst" / "model.safetensors")), load_file(str(tmp_path / "dst2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_converter_rejects_non_film_and_inconsistent_configs():
    from moezoo.models.deweather.convert_mofme import config_from_official

    g = torch.Generator().manual_seed(0)
    cfg, sd = _full_case(g)
    with pytest.raises(ValueError, match="gate='film'"):
        config_from_official(dict(cfg, gate="cosine"), sd)
    with pytest.raises(ValueError, match="num_expert=7"):
        config_from_official(dict(cfg, num_expert=7), sd)
    with pytest.raises(ValueError, match="n_heads"):
        config_from_official(dict(cfg, n_heads=5), sd)
    c = config_from_official(cfg, sd)
    assert (c.num_experts, c.num_experts_per_tok, c.hidden_size, c.head_dim, c.head_channels, c.out_ch_scale,
            c.patch_size, c.image_size) == (5, 2, 24, 8, 6, 2, 4, [16, 24])


def test_convert_shared_fixture_and_layer_folder_error(tmp_path, capsys):
    if not FULL_DIR.is_dir():
        pytest.skip(f"{FULL_DIR} not available")
    from transformers import AutoModelForImageToImage

    from moezoo.cli import main

    assert main(["convert", "mofme-full", str(FULL_DIR), str(tmp_path / "m")]) == 0
    io = load_file(str(FULL_DIR / "io.safetensors"))
    model = AutoModelForImageToImage.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=io["in.img"]).reconstruction, io["out.img_hq"],
                                   atol=1e-5, rtol=1e-4)
    capsys.readouterr()
    assert main(["convert", "mofme", str(LAYER_DIR), str(tmp_path / "l")]) != 0
    assert "moezoo parity mofme" in capsys.readouterr().err
    assert main(["convert", "--list"]) == 0
    listed = dict(line.split() for line in capsys.readouterr().out.splitlines() if line.strip())
    assert listed["mofme"] == "model" and listed["mofme_full"] == "model"
