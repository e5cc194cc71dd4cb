"""The bugs issue 9 found every test letting through, put back one at a time into a private
copy of the tree (never this one), with the quick tests of the core and of training run on
each: python tools/injected_bugs.py -> one line per bug, how many tests failed and which.
A bug that fails no test is a hole in the suite."""
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]
COPY = Path(tempfile.gettempdir()) / "functional_gpt_injected_bugs"
TESTS = ["tests/test_layers.py", "tests/test_model.py", "tests/test_reference.py", "tests/test_generate.py",
         "tests/test_train.py", "tests/test_train_behaviour.py", "tests/test_step.py", "tests/test_optim.py",
         "tests/test_export.py", "tests/test_compare.py"]
BUGS = [
    ("the block uses ln_1 for ln_2", "functional_gpt/model/layers.py",
     "layer_norm(x, **ln_2, eps=eps)", "layer_norm(x, **ln_1, eps=eps)"),
    ("cached attention drops its end-aligned mask", "functional_gpt/model/layers.py",
     "attn_mask=mask,\n", "attn_mask=None,\n"),
    ("gradient ascent (lr sign flipped)", "functional_gpt/training/step.py",
     "opt = adamw_step(flat, grads, state.opt, lr=lr,", "opt = adamw_step(flat, grads, state.opt, lr=-lr,"),
    ("resume without restoring the RNG", "functional_gpt/training/step.py", "    _set_rng(state.rng)\n", "    pass\n"),
    ("no gradient clipping in the step", "functional_gpt/training/step.py",
     "norm = clip_grad_norm(grads, settings.grad_clip)", "norm = clip_grad_norm(grads, None)"),
    ("constant lr in the step", "functional_gpt/training/step.py",
     "    lr = lr_at(state.step, lr=settings.lr,", "    lr = settings.lr or lr_at(state.step, lr=settings.lr,"),
    ("exact-erf GELU", "functional_gpt/model/layers.py", 'F.gelu(x, approximate="tanh")', "F.gelu(x)"),
]
shutil.rmtree(COPY, ignore_errors=True)
shutil.copytree(SRC, COPY, ignore=shutil.ignore_patterns(".venv", ".git", "mutants", "runs", "data", "__pycache__"))
holes = 0  # bugs no test caught
for name, file, old, new in BUGS:
    text = (SRC / file).read_text()
    assert text.count(old) == 1, (name, text.count(old))
    (COPY / file).write_text(text.replace(old, new))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                           *TESTS], cwd=COPY, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", done.stdout, re.M)
    print(f"{name}: {len(failed)} failed; e.g. {', '.join(failed[:3])}", flush=True)
    (COPY / file).write_text(text)
    holes += not failed
sys.exit(1 if holes else 0)
