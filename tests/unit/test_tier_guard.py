"""The unit tier's guard (tests/unit/conftest.py): Ray and vLLM cannot be imported here,
the error names the rule, and a test that would quietly skip without them fails instead."""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"


@pytest.mark.parametrize("name", ["ray", "vllm", "ray.util.placement_group", "vllm.distributed.weight_transfer"])
def test_importing_ray_or_vllm_in_a_unit_test_fails_naming_the_tier_rule(name, monkeypatch):
    top = name.partition(".")[0]
    for loaded in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        monkeypatch.delitem(sys.modules, loaded)  # as if never imported (a run of every tier may have); restored after
    with pytest.raises(ImportError, match=r"tests/unit/ is the tier that needs neither Ray nor vLLM"):
        importlib.import_module(name)


def test_other_modules_still_import():
    assert importlib.import_module("srpo_ray.records")
    with pytest.raises(ModuleNotFoundError, match="rayon_no_such_module"):  # only ray and vllm themselves are refused
        importlib.import_module("rayon_no_such_module")


def test_a_misfiled_test_fails_instead_of_passing_or_skipping(tmp_path):
    """A tier folder with this conftest: a test importing ray errors at collection, one that
    importorskips vllm fails, a pure one passes."""
    tier = tmp_path / "unit"
    tier.mkdir()
    shutil.copy(CONFTEST, tier / "conftest.py")
    (tier / "test_misfiled.py").write_text(textwrap.dedent("""
        import pytest

        def test_needs_vllm():
            pytest.importorskip("vllm")

        def test_pure():
            assert 1 + 1 == 2
    """))
    (tier / "test_imports_ray.py").write_text("import ray\n\ndef test_x():\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                          "--continue-on-collection-errors", str(tier)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    report = out.stdout + out.stderr
    assert out.returncode == 1, report
    assert "FAILED unit/test_misfiled.py::test_needs_vllm" in report, report
    assert "PASSED unit/test_misfiled.py::test_pure" in report, report
    assert "ERROR unit/test_imports_ray.py" in report and "'ray' imported by a unit test" in report, report
    assert "1 failed, 1 passed, 1 error" in report, report
