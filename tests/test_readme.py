"""The README's Python examples run as written."""

import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_MARK = "# In the vLLM environment"  # first line of the examples that need vLLM


def readme_vllm_blocks():
    """The README's Python examples that run in the vLLM environment."""
    text = open(os.path.join(ROOT, "README.md")).read()
    return [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if b.startswith(VLLM_MARK)]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    blocks = [b for b in blocks if not b.startswith(VLLM_MARK)]  # tests/test_vllm_plugin.py runs those
    monkeypatch.chdir(tmp_path)  # examples may write files
    scope = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["vtu_out"].shape == (1, 8, 5, 64)
    from dymu_kernels.reference import vtu_attention_expand

    names = ("q", "k", "v", "merge_map", "cos", "sin")
    torch.testing.assert_close(scope["o"], vtu_attention_expand(*(scope[n] for n in names)))
    assert scope["o_new"].shape == (1, 8, 1, 64)
    assert scope["state"].lengths.shape == (4,)
    assert os.path.exists(scope["path"]) and not os.listdir(tmp_path)  # written to a temporary folder, not here
    assert scope["gen"].sequences.shape[1] > 8 and not hasattr(scope["llava"], "_dymu")
    assert scope["kept"] == [8] and scope["seq"].shape[1] > scope["input_ids"].shape[1]  # the Qwen quick start
    assert scope["kept35"] == [8] and scope["seq35"].shape[1] == scope["ids35"].shape[1] + 4  # Qwen3.5's
    out = scope["out"]  # trimmed on the CPU (trim="auto"): capacity = the longest image
    assert len(out.tokens_per_layer) == 23 and out.features.shape[:2] == (2, int(out.lengths.max()))
