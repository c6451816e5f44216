"""vl_moe: LLaVA-layout VLM with upcycled MoE FFNs (MoE-LLaVA top-2 capacity, MoIIE modality pools, any core router)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

import moezoo
from moezoo.cache_compat import output_cache
from moezoo.core import MoELayer
from moezoo.models.vl_moe import MoezooVlMoeConfig, MoezooVlMoeForConditionalGeneration, MoezooVlMoeProcessor

TOWER = dict(vision_tower="vit_tiny_patch16_224",
             vision_tower_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
QWEN2 = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def make(text=LLAMA, **kw):
    torch.manual_seed(0)
    cfg = MoezooVlMoeConfig(**{**TOWER, "text_config": dict(text), "num_experts": 4, "num_experts_per_tok": 2, **kw})
    return MoezooVlMoeForConditionalGeneration(cfg)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:", "what", "shape", "is", "this", "?", "circle",
             "square", "triangle", "red", "blue", "green", "yes", "no", "the", "a", "color"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    return fast


def _with_image_token(tok):
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


# ---------------------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("mode,expected", [("sparse", [0, 2]), ("dense", [0, 1, 2, 3]), ("second_half", [2, 3])])
def test_moe_layers_follow_moe_mode(mode, expected):
    m = make(moe_mode=mode, router_type="top2_capacity")
    layers = m.model.language_model.layers
    got = [i for i, layer in enumerate(layers) if isinstance(layer.mlp, MoELayer)]
    assert got == expected
    assert all(type(layers[i].mlp).__name__ == "LlamaMLP" for i in range(4) if i not in expected)
    router = layers[expected[0]].mlp.gate
    assert type(router).__name__ == "Top2CapacityRouter"
    assert (router.capacity_factor, router.eval_capacity_factor, router.min_capacity) == (1.5, 2.0, 0)


def test_upcycled_dense_model_keeps_its_output():
    """Stage 3 of MoE-tuning: a dense VLM upcycled with a renormalised top-k router gives the same logits."""
    dense = make(moe_mode="none").eval()
    inputs = dense.example_inputs(labels=False, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(**inputs).logits
    assert not dense.moe_layers()
    dense.upcycle(moe_mode="dense", router_type="topk")
    assert len(dense.moe_layers()) == 4
    with torch.no_grad():
        got = dense(**inputs).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_qwen2_decoder_and_clip_tower_and_projectors():
    clip = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=32, patch_size=8)
    m = make(QWEN2, vision_config=clip, vision_tower=None, projector_type="linear", moe_mode="dense",
             router_type="topk")
    assert type(m.model.language_model).__name__ == "Qwen2Model"
    assert m.config.image_seq_length == 16  # 4x4 patches, CLS dropped ("default")
    assert len(m.model.multi_modal_projector) == 1
    out = m(**m.example_inputs(generator=torch.Generator().manual_seed(0)))
    out.loss.backward()
    assert len(out.router_logits) == 2
    m3 = make(projector_type="mlp3x_gelu", vision_feature_select_strategy="full")
    assert m3.config.image_seq_length == 17 and len(m3.model.multi_modal_projector) == 5


def test_timm_cnn_tower():
    m = make(vision_tower="resnet10t", vision_tower_kwargs=None, image_size=64)
    assert m.config.image_seq_length == 4  # 64 / 32 = 2x2 feature map
    m(**m.example_inputs(generator=torch.Generator().manual_seed(0))).loss.backward()


# ---------------------------------------------------------------------------------------------------------- routing
def test_moiie_pools_split_image_and_text_tokens():
    m = make(router_type="modality", moe_mode="dense", moiie_num_intra_experts=1).eval()
    assert m.config.router_kwargs["expert_pools"] == [[1, 2, 3], [0, 1, 2]]
    inputs = m.example_inputs(labels=False, generator=torch.Generator().manual_seed(0))
    out = m.model(**inputs)
    img = (inputs["input_ids"] == m.config.image_token_id).reshape(-1)
    for ro in out.router_outputs:
        assert not (ro.indices[img] == 3).any(), "image tokens must not reach the text-only expert"
        assert not (ro.indices[~img] == 0).any(), "text tokens must not reach the image-only expert"
        assert torch.equal(ro.extras["modality_ids"], img.long())
    for logits in out.router_logits:
        assert torch.isfinite(logits).all()


def test_moe_llava_capacity_drops_tokens_in_training():
    m = make(router_type="top2_capacity", router_kwargs=dict(capacity_factor=0.25, eval_capacity_factor=2.0))
    inputs = m.example_inputs(generator=torch.Generator().manual_seed(0))
    m.train()
    out = m.model(**{k: v for k, v in inputs.items() if k != "labels"})
    assert any(float(ro.extras["drop_rate"]) > 0 for ro in out.router_outputs)
    m.eval()
    out = m.model(**{k: v for k, v in inputs.items() if k != "labels"})
    assert all(float(ro.extras["drop_rate"]) == 0 for ro in out.router_outputs)  # E=4, eval cf 2: capacity = T
    l_aux = sum(ro.extras["l_aux"] for ro in out.router_outputs)
    torch.testing.assert_close(out.aux_loss, 0.01 * l_aux)


def test_any_core_router_and_shared_experts():
    m = make(router_type="topk", num_shared_experts=1, moe_mode="dense")
    assert all(layer.shared_expert is not None for _, layer in m.moe_layers())
    out = m(**m.example_inputs(generator=torch.Generator().manual_seed(0)))
    out.loss.backward()
    assert torch.isfinite(out.aux_loss)


# ---------------------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("router", ["top2_capacity", "modality"])
def test_greedy_generate_with_and_without_cache_agree(router):
    m = make(router_type=router, moe_mode="dense").eval()
    inputs = m.example_inputs(labels=False, generator=torch.Generator().manual_seed(2))
    a = m.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    b = m.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(a, b)
    # continuing from a returned cache equals decoding from scratch
    with torch.no_grad():
        full = m(input_ids=a, pixel_values=inputs["pixel_values"]).logits[:, -1]
        n = a.shape[1] - 1
        first = m(input_ids=a[:, :n], pixel_values=inputs["pixel_values"], use_cache=True)
        cache = output_cache(first)
        step = m(input_ids=a[:, n:], cache=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


def test_cache_and_past_key_values_names():
    from transformers import DynamicCache

    m = make().eval()
    inputs = m.example_inputs(labels=False, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(**inputs, use_cache=True)
        cache = output_cache(out)
        nxt = torch.tensor([[3], [4]])
        a = m(input_ids=nxt, cache=cache, use_cache=True).logits
    with torch.no_grad():
        cache2 = output_cache(m(**inputs, use_cache=True))
        b = m(input_ids=nxt, past_key_values=cache2, use_cache=True).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
        m(input_ids=nxt, cache=DynamicCache(), past_key_values=DynamicCache())
    with pytest.raises(TypeError, match="`cache` must be a transformers Cache"):
        m(input_ids=nxt, cache=[(torch.zeros(1), torch.zeros(1))])


# ---------------------------------------------------------------------------------------------------------- processor
def test_processor_then_generate_like_llava(tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    tok = _with_image_token(_tokenizer())
    m = make(image_token_id=tok.convert_tokens_to_ids("<image>")).eval()
    proc = MoezooVlMoeProcessor.for_model(m.config, tok)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is this ?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == "USER: <image>\nwhat shape is this ?\nASSISTANT:"  # LLaVA-1.5 layout, the question's line ended
    two = msgs + [{"role": "assistant", "content": "circle"}, {"role": "user", "content": "and the colour ?"}]
    assert proc.apply_chat_template(two, add_generation_prompt=True).endswith(
        f"\nASSISTANT: circle{tok.eos_token}\nUSER: and the colour ?\nASSISTANT:")
    img = Image.new("RGB", (50, 40), (255, 0, 0))
    inputs = proc(images=img, text=prompt)
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert int((inputs["input_ids"] == m.config.image_token_id).sum()) == m.config.image_seq_length
    out = m.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert isinstance(proc.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0], str)
    # saved together, the Auto classes rebuild both
    m.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    m2 = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(proc2) is MoezooVlMoeProcessor and proc2.image_seq_length == m.config.image_seq_length
    inputs2 = proc2(images=img, text=prompt)
    torch.testing.assert_close(inputs2["pixel_values"], inputs["pixel_values"])
    assert torch.equal(m2.generate(**inputs2, max_new_tokens=4, min_new_tokens=4, do_sample=False), out)


# ---------------------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    m = make().eval()
    inputs = m.example_inputs(labels=False, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="2 image\\(s\\) x 16 tokens"):
        m(input_ids=inputs["input_ids"][:1], pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="no pixel_values"):
        m(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="expected 32x32"):
        m(input_ids=inputs["input_ids"], pixel_values=torch.zeros(2, 3, 48, 48))
    with pytest.raises(ValueError, match="1 channels, expected num_channels=3"):
        m(input_ids=inputs["input_ids"], pixel_values=torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="has no image token '<image>'.*add_special_tokens"):
        MoezooVlMoeProcessor(image_processor=None, tokenizer=_tokenizer())
    tok = _with_image_token(_tokenizer())
    proc = MoezooVlMoeProcessor.for_model(MoezooVlMoeConfig(**{**TOWER, "text_config": LLAMA, "num_experts": 4,
                                                               "image_token_id": tok.convert_tokens_to_ids("<image>"),
                                                               "image_size": 32, "image_seq_length": 16}), tok)
    from PIL import Image
    img = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="1 '<image>' placeholder\\(s\\) but 2 image"):
        proc(images=[img, img], text="USER: <image>\nwhat")
    with pytest.raises(ValueError, match="image_token_id"):
        MoezooVlMoeProcessor.for_model(m.config, tok)


class _OddMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in = nn.Linear(32, 48)
        self.w_out = nn.Linear(48, 32)


def test_unknown_decoder_mlp_names_the_supported_forms():
    m = make(moe_mode="none")
    m.model.language_model.layers[0].mlp = _OddMLP()
    with pytest.raises(ValueError, match="has no dense MLP the upcycler knows at layers \\[0\\].*_OddMLP.*gate_proj.*gate_up_proj.*fc1"):
        m.upcycle(moe_mode="sparse")


def test_bad_config_values():
    with pytest.raises(ValueError, match="projector_type"):
        MoezooVlMoeConfig(**TOWER, text_config=LLAMA, projector_type="conv")
    with pytest.raises(ValueError, match="moe_mode"):
        MoezooVlMoeConfig(**TOWER, text_config=LLAMA, moe_mode="half")
    with pytest.raises(ValueError, match="num_experts_per_tok must be 2"):
        MoezooVlMoeConfig(**TOWER, text_config=LLAMA, router_type="top2_capacity", num_experts=4, num_experts_per_tok=1)
    with pytest.raises(ValueError, match="not a timm model name"):
        make(vision_tower="no_such_model_xyz", vision_tower_kwargs=None)


def test_siglip_tower_and_phi3_fused_mlp_decoder():
    siglip = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    phi3 = dict(model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    m = make(phi3, vision_config=siglip, vision_tower=None, moe_mode="dense", router_type="modality")
    assert m.config.image_seq_length == 16  # SigLIP: no CLS token to drop
    assert len(m.moe_layers()) == 2
    out = m(**m.example_inputs(generator=torch.Generator().manual_seed(0)))
    out.loss.backward()
    assert torch.isfinite(out.loss)
