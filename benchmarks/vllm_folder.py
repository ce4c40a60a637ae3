"""A random transformers LLaVA saved as a folder vLLM serves offline.

vLLM needs a tokenizer, a processor and the checkpoint names of released
llava-hf models (vision tower under ``vision_tower.vision_model.*``); a model
built from a config has none of them. :func:`save_llava_folder` writes all
three: a word-level tokenizer (``w3 .. w{V-1}``, ``<image>`` = the config's
image token), the CLIP image processor and ``LlavaProcessor`` at the tower's
size, and the weights with the released names. Used by
``tests/test_vllm_plugin.py`` and ``benchmarks/bench_vllm.py``.
"""

from __future__ import annotations

import os


IMAGE_TOKEN = "<image>"


def word_tokenizer(image_token_id: int):
    """Words ``w3 .. w{image_token_id - 1}`` (0-2: unk, bos, eos), then ``<image>``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, image_token_id)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if fast.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
        raise ValueError(f"<image> got id {fast.convert_tokens_to_ids(IMAGE_TOKEN)}, the config says {image_token_id}")
    return fast


def llava_processor(config):
    """The processor of a LLaVA-1.5 ``config`` (CLIP preprocessing at the tower's size)."""
    import transformers

    vision = config.vision_config
    size = vision.image_size
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                                      crop_size={"height": size, "width": size})
    return transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=word_tokenizer(config.image_token_id),
        patch_size=vision.patch_size, vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1, image_token=IMAGE_TOKEN)


def released_names(state_dict):
    """transformers 5 names -> the released checkpoints' (the vision tower's
    blocks under ``vision_model``), which vLLM's LLaVA loader reads."""
    tower = "model.vision_tower."
    out = {}
    for key, value in state_dict.items():
        if key.startswith(tower) and not key.startswith(tower + "vision_model."):
            key = tower + "vision_model." + key[len(tower):]
        out[key] = value
    return out


def save_llava_folder(model, path: str):
    """Save ``model`` (a transformers ``LlavaForConditionalGeneration``) for
    vLLM under ``path``; returns its processor."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in released_names(model.state_dict()).items()}
    if model.config.text_config.tie_word_embeddings:
        raise ValueError("tied embeddings are not written by this helper")
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]  # what vLLM picks its model class by
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    processor = llava_processor(model.config)
    processor.save_pretrained(path)
    return processor


