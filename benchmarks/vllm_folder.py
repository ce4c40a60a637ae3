"""Random transformers LLaVA and Qwen-VL models saved as folders vLLM serves offline.

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


def save_released(model, path: str) -> None:
    """Save a transformers LLaVA-type ``model`` (config, generation config,
    weights) under ``path`` with the released checkpoints' names, which vLLM's
    loaders read."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in released_names(model.state_dict()).items()}
    if model.config.text_config.tie_word_embeddings:
        raise ValueError("tied embeddings are not written by this helper")
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]  # what vLLM picks its model class by
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)


def save_llava_folder(model, path: str):
    """Save ``model`` (a transformers ``LlavaForConditionalGeneration``) for
    vLLM under ``path``; returns its processor."""
    save_released(model, path)
    processor = llava_processor(model.config)
    processor.save_pretrained(path)
    return processor


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>")
# LLaVA-OneVision's tokenizer: Qwen2's, with <image> and <video> added.
ONEVISION_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")


def qwen_tokenizer(ids=None, specials=QWEN_SPECIALS):
    """A byte-level BPE ``Qwen2Tokenizer``: the 256 byte symbols (no merges),
    then ``specials`` — at ids 256, 257, …, or at ``ids`` (``{token: id}``,
    e.g. the released models' 151643…; unused ids in between are filler
    entries no text encodes to)."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    if ids is None:
        ids = {token: len(vocab) + i for i, token in enumerate(specials)}
    taken = set(ids.values())
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), max(taken) + 1) if i not in taken})
    vocab.update(ids)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    got = {t: tok.convert_tokens_to_ids(t) for t in specials}
    if got != {t: ids[t] for t in specials}:
        raise ValueError(f"special token ids {got}, expected {ids}")
    return tok


def video_item(frames, fps: float = 2.0):
    """A vLLM video item: ``frames [T, H, W, 3]`` uint8 with the metadata
    vLLM's Qwen processors require (every frame taken, at ``fps``)."""
    n = frames.shape[0]
    return frames, {"fps": fps, "duration": n / fps, "total_num_frames": n, "frames_indices": list(range(n)),
                    "video_backend": "opencv", "do_sample_frames": False}


def save_qwen_processor(kind: str, path: str, tokenizer, *, min_pixels: int = 112 * 112, max_pixels: int = 112 * 224):
    """The processor of a Qwen-VL ``kind`` (image and video processors, frames
    not sampled) with ``tokenizer``, saved under ``path``; returned. Needs
    transformers' torchvision-based processors."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    if kind.startswith("qwen3"):  # Qwen3-VL, Qwen3.5: 16-px patches; videos as timestamped frames (Qwen3-VL's own)
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        sizes = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=16, merge_size=2, temporal_patch_size=2)
        video = Qwen3VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=16,
                                      merge_size=2, temporal_patch_size=2, do_sample_frames=False)
        processor = transformers.Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes),
                                                  tokenizer=tokenizer, video_processor=video)
        processor.save_pretrained(path)
        return processor
    cls = {"qwen2_5_vl": transformers.Qwen2_5_VLProcessor, "qwen2_vl": transformers.Qwen2VLProcessor}[kind]
    sizes = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = cls(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                    video_processor=Qwen2VLVideoProcessor(**sizes, do_sample_frames=False))
    processor.save_pretrained(path)
    return processor


def save_qwen_folder(kind: str, path: str, *, seed: int = 0):
    """A random tiny Qwen2.5-VL (``kind="qwen2_5_vl"``: windows of 4x4 units,
    full attention in block 1), Qwen2-VL (``"qwen2_vl"``), Qwen3-VL
    (``"qwen3_vl"``, ``"qwen3_vl_moe"``: deepstack, 128 × 128 to 128 × 256 px) or
    Qwen3.5 (``"qwen3_5"``, ``"qwen3_5_moe"``: as Qwen3-VL without deepstack, a
    hybrid language model of 3 Gated DeltaNet layers and 1 gated attention) saved under
    ``path`` with its tokenizer (:func:`qwen_tokenizer`) and processor (image
    and video processors, 112 × 112 to 112 × 224 px: at most 32 placeholders
    per image or frame pair, so a small token budget chunks prefill); head
    dim 64 (vLLM's CPU minimum). Needs transformers' torchvision-based
    processors. Returns the processor."""
    import torch
    import transformers

    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-6,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]})
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=False)
    if kind == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=128,
                      fullatt_block_indexes=[1], window_size=112, tokens_per_second=2)
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    elif kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, hidden_size=128)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
        cls = transformers.Qwen2VLForConditionalGeneration
    elif kind in ("qwen3_vl", "qwen3_vl_moe"):  # 3 blocks, deepstack taps after blocks 0 and 1; interleaved M-RoPE
        text.update(head_dim=64, rope_parameters=dict(text["rope_parameters"], mrope_section=[8, 12, 12],
                                                      mrope_interleaved=True))
        vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                      num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        if kind == "qwen3_vl":
            config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
            cls = transformers.Qwen3VLForConditionalGeneration
        else:
            # (norm_topk_prob: what vLLM reads and transformers 5.19's config lacks; transformers normalises always)
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, decoder_sparse_step=1,
                        norm_topk_prob=True)
            config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **tokens)
            cls = transformers.Qwen3VLMoeForConditionalGeneration
        sizes = dict(min_pixels=128 * 128, max_pixels=128 * 256)  # 4 x 4 to 4 x 8 units per image or frame pair
    elif kind in ("qwen3_5", "qwen3_5_moe"):  # Qwen3-VL's tower without deepstack; 3 Gated DeltaNet layers, then
        # gated attention rotating a quarter of each head (interleaved M-RoPE)
        text.update(num_hidden_layers=4, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=64, linear_value_head_dim=64,
                    rope_parameters=dict(text["rope_parameters"], mrope_section=[2, 3, 3], mrope_interleaved=True,
                                         partial_rotary_factor=0.25))
        vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                      num_position_embeddings=16)
        if kind == "qwen3_5":
            config = transformers.Qwen3_5Config(text_config=text, vision_config=vision, **tokens)
            cls = transformers.Qwen3_5ForConditionalGeneration
        else:
            # Every expert routed (top 4 of 4): served in bfloat16 (vLLM's CPU Gated DeltaNet), a top-k choice
            # would flip between engines at near ties; the weights stay per token.
            text.update(num_experts=4, num_experts_per_tok=4, moe_intermediate_size=128,
                        shared_expert_intermediate_size=128, norm_topk_prob=True)
            config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision, **tokens)
            cls = transformers.Qwen3_5MoeForConditionalGeneration
        assert config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
        sizes = dict(min_pixels=128 * 128, max_pixels=128 * 256)
    else:
        raise ValueError(f"kind={kind!r}: expected 'qwen2_5_vl', 'qwen2_vl', 'qwen3_vl', 'qwen3_vl_moe', 'qwen3_5' "
                         "or 'qwen3_5_moe'")
    config.architectures = [cls.__name__]  # what vLLM picks its model class by
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # wide logit margins: greedy tokens compare robustly
        for layer in getattr(model.model.language_model, "layers", []):
            if hasattr(layer, "linear_attn"):  # Gated DeltaNet: a slow decay (exp(-A·softplus(a + dt)) near 1),
                # so each position's output depends on the positions before it (not mostly on its own input)
                layer.linear_attn.A_log.fill_(-4.0)
    model.generation_config = transformers.GenerationConfig(bos_token_id=ids["<|endoftext|>"],
                                                            eos_token_id=ids["<|im_end|>"],
                                                            pad_token_id=ids["<|endoftext|>"], do_sample=False)
    model.save_pretrained(path)
    if kind == "qwen3_vl_moe":
        _released_expert_layout(path)
    return save_qwen_processor(kind, path, tok, **(sizes if kind.startswith("qwen3") else {}))


def _released_expert_layout(path: str) -> None:
    """Rewrite a saved Qwen3-VL-MoE's expert weights in the released
    checkpoints' layout (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``),
    which vLLM's loader reads and transformers 5.25 transposes on load;
    transformers 5.19 (the vLLM environment's) saves them transposed."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    state = {k: (v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v) for k, v in state.items()}
    save_file(state, file, metadata={"format": "pt"})


ONEVISION_CROP = 84  # px per crop: 6 x 6 patches of 14 px
# Grids of up to 4 x 4 crops: an image's unpadded grid can exceed 9 crops' worth of patches, so the AnyRes
# downscale (vision_aspect_ratio "anyres_max_9") is reached.
ONEVISION_PINPOINTS = [[ONEVISION_CROP * h, ONEVISION_CROP * w] for h in range(1, 5) for w in range(1, 5)]


def save_onevision_folder(path: str, *, seed: int = 0):
    """A random tiny LLaVA-OneVision (SigLIP tower of 84-px crops, 6 x 6
    patches; AnyRes grids up to 4 x 4 crops; Qwen2 language model, head dim 64
    — vLLM's CPU minimum) saved under ``path`` with a byte-level tokenizer
    (:func:`qwen_tokenizer` with ``<image>`` / ``<video>``) and its processor
    (image and video processors; frames not sampled). Needs transformers'
    torchvision-based processors. Returns the processor."""
    import torch
    import transformers

    tok = qwen_tokenizer(specials=ONEVISION_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ONEVISION_SPECIALS}
    vision = transformers.SiglipVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=ONEVISION_CROP, patch_size=14,
                                             vision_use_head=False)
    text = transformers.Qwen2Config(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                                    rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"],
                                    eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                                    tie_word_embeddings=False)
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_9", vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_token_id=ids["<image>"], video_token_id=ids["<video>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # wide logit margins: greedy tokens compare robustly
    model.generation_config = transformers.GenerationConfig(bos_token_id=ids["<|endoftext|>"],
                                                            eos_token_id=ids["<|im_end|>"],
                                                            pad_token_id=ids["<|endoftext|>"], do_sample=False)
    save_released(model, path)
    size = {"height": ONEVISION_CROP, "width": ONEVISION_CROP}
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=ONEVISION_PINPOINTS),
        video_processor=transformers.LlavaOnevisionVideoProcessor(size=size, do_sample_frames=False),
        tokenizer=tok, num_image_tokens=(ONEVISION_CROP // 14) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", image_token="<image>", video_token="<video>")
    processor.save_pretrained(path)
    return processor
