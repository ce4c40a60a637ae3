"""The C++ extension must build wherever the package is installed and tested:
scripts/setup.sh and the test suite fail without it, unless DYMU_NO_EXT=1 opts
out on purpose (the variable setup.py reads to skip building it)."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

import conftest
from conftest import EXT_MISSING, ROOT

from dymu_kernels import _ext

MISSING = "the C++ extension dymu_kernels._C is not built (blocked for the test)"


def test_extension_is_built_unless_opted_out():
    if conftest.EXT_OPT_OUT:
        pytest.skip("DYMU_NO_EXT=1: the extension is skipped on purpose")
    assert _ext.missing_reason() is None, _ext.missing_reason()
    assert _ext.check_built() is None


def test_a_missing_extension_is_an_error_unless_opted_out(monkeypatch):
    monkeypatch.setattr(_ext, "_load", lambda: (None, MISSING))
    monkeypatch.delenv("DYMU_NO_EXT", raising=False)
    error = _ext.check_built()
    assert error is not None and error.startswith(MISSING) and "Set DYMU_NO_EXT=1" in error
    with pytest.raises(pytest.fail.Exception, match="blocked for the test.*DYMU_NO_EXT=1"):
        conftest.needs_extension()
    monkeypatch.setenv("DYMU_NO_EXT", "1")
    assert _ext.check_built() is None
    with pytest.raises(pytest.skip.Exception, match=re.escape(EXT_MISSING)):
        conftest.needs_extension()


def _setup_sh(tmp_path, block_ext, opt_out):
    """Run scripts/setup.sh with a python whose ``-m pip`` does nothing (and
    which cannot import the extension when ``block_ext``)."""
    fake = tmp_path / "python"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import os, sys
        if sys.argv[1:3] == ["-m", "pip"]:
            sys.exit(0)
        os.execv({sys.executable!r}, [{sys.executable!r}] + sys.argv[1:])
        """))
    fake.chmod(0o755)
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent("""\
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "dymu_kernels._C":
                    raise ImportError("blocked for the test")

        sys.meta_path.insert(0, Block())
        """))
    env = {k: v for k, v in os.environ.items() if k not in ("DYMU_NO_EXT", "PYTHONPATH")}
    env["PYTHON"] = str(fake)
    if block_ext:
        env["PYTHONPATH"] = str(site)
    if opt_out:
        env["DYMU_NO_EXT"] = "1"
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup.sh")], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_setup_script_fails_when_the_extension_did_not_build(tmp_path):
    res = _setup_sh(tmp_path, block_ext=True, opt_out=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "[setup] ERROR: C++ extension NOT available" in res.stderr and "DYMU_NO_EXT=1" in res.stderr
    res = _setup_sh(tmp_path, block_ext=True, opt_out=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[setup] C++ extension: skipped on purpose (DYMU_NO_EXT=1)" in res.stdout
    if _ext.extension() is not None:  # built here: the script says so and succeeds
        res = _setup_sh(tmp_path, block_ext=False, opt_out=False)
        assert res.returncode == 0 and "[setup] C++ extension: built" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow
def test_suite_turns_a_missing_extension_skip_into_a_failure(tmp_path):
    """This conftest applies the rule to any test that skips with the reason
    "C++ extension not built": it fails, unless DYMU_NO_EXT=1."""
    (tmp_path / "conftest.py").write_text(open(os.path.join(ROOT, "tests", "conftest.py")).read())
    (tmp_path / "test_needs_ext.py").write_text(textwrap.dedent(f"""\
        import pytest

        @pytest.mark.skipif(True, reason="{EXT_MISSING}")
        def test_uses_the_extension():
            pass
        """))
    env = {k: v for k, v in os.environ.items() if k != "DYMU_NO_EXT"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    res = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 1 and "1 error" in res.stdout and "DYMU_NO_EXT=1 is not set" in res.stdout, res.stdout
    res = subprocess.run(args, env=dict(env, DYMU_NO_EXT="1"), capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0 and "1 skipped" in res.stdout, res.stdout
