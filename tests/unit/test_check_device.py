"""tests/gpu/check_device.py on a machine without CUDA, with only torch importable (a
site folder of torch and its own dependencies stands in for a GPU image that lacks the
project's other packages): every
step is SKIPped with its reason, none FAILs; --cpu-dry-run runs the torch-only FSDP2 step."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "gpu" / "check_device.py"
# torch and what torch itself imports: the site-packages of a `pip install torch` venv
TORCH_ONLY = ("torch", "torchgen", "filelock", "fsspec", "jinja2", "markupsafe", "mpmath", "networkx", "sympy",
              "typing_extensions")


def torch_only_site(folder: Path) -> Path:
    """A folder holding links to torch and its own dependencies, nothing else."""
    folder.mkdir()
    for name in TORCH_ONLY:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        origin = Path(spec.origin)
        target = origin.parent if origin.name == "__init__.py" else origin
        (folder / target.name).symlink_to(target)
    return folder


def run(site: Path, *args: str) -> tuple[int, list[str]]:
    """check_device.py under `python -S` (no site-packages) seeing only `site` and the repo."""
    code = (f"import runpy, sys; sys.path[:0] = [{str(SCRIPT.parent)!r}, {str(REPO)!r}, {str(site)!r}]; "
            f"sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]; runpy.run_path(sys.argv[0], run_name='__main__')")
    done = subprocess.run([sys.executable, "-S", "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    lines = [line for line in done.stdout.splitlines() if line[:5].strip() in ("PASS", "FAIL", "SKIP")]
    return done.returncode, lines


def test_torch_alone_skips_every_step_with_its_reason(tmp_path):
    rc, lines = run(torch_only_site(tmp_path / "site"))
    assert rc == 0 and len(lines) >= 8, lines
    assert all(line.startswith("SKIP") for line in lines), lines
    assert any("no CUDA device" in line for line in lines if "fsdp2" in line), lines
    assert any("needs numpy, omegaconf" in line for line in lines if "dcp_save_load" in line), lines


def test_the_torch_only_steps_run_without_the_projects_packages(tmp_path):
    rc, lines = run(torch_only_site(tmp_path / "site"), "--part", "1", "--cpu-dry-run")
    status = {line.split()[1].rstrip(":"): line.split()[0] for line in lines}
    assert rc == 0 and status["fsdp2_bf16_train_step"] == "PASS" and status["nccl_broadcast"] == "PASS", lines
    assert status["dcp_save_load"] == "SKIP", lines


def test_the_log_prob_head_step_finds_the_learners_function_with_torch_alone(tmp_path):
    """Without numpy and pyarrow srpo_ray.learner.core cannot be imported: the step
    compiles token_logprobs from core.py's own source, the function the learner runs."""
    site = torch_only_site(tmp_path / "site")
    code = (f"import sys; sys.path[:0] = [{str(SCRIPT.parent)!r}, {str(REPO)!r}, {str(site)!r}]\n"
            "import torch, torch_steps\n"
            "f = torch_steps.logprob_head()\n"
            "logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))\n"
            "mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]])\n"
            "got, _ = f(logits, ids, mask, 0.5)\n"
            "want = torch.log_softmax(logits[:, :-1] / 0.5, -1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]\n"
            "assert torch.allclose(got[:, 1:], want, atol=1e-6), (got, want)\n"
            "print('ok', f.__module__)")
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
