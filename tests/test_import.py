"""`import dymu_kernels` needs only torch: no Triton, transformers, extension or GPU."""

import subprocess
import sys
import textwrap


def test_import_without_optional_dependencies():
    code = textwrap.dedent(
        """
        import sys, importlib.abc

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("triton", "transformers", "skimage") or name == "dymu_kernels._C":
                    raise ImportError(f"blocked for the test: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import dymu_kernels
        from dymu_kernels import _ext
        assert _ext.extension() is None and "not built" in _ext.missing_reason()
        x = torch.randn(2, 3, 6, 4)
        idx = torch.tensor([[0, 1, 1, -1, 2, 0], [2, 2, 2, 2, 2, 2]])
        out = dymu_kernels.segment_mean(x, idx, 3)  # auto falls back to torch
        assert out.shape == (2, 3, 3, 4)
        assert not any(m.split(".")[0] in ("triton", "transformers") for m in sys.modules)
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
