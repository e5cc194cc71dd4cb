"""The command line: one line per error, non-zero exit, no traceback."""

import math
import re
import subprocess
import sys

from functional_gpt import PRESETS, save_params
from functional_gpt.cli import main


def test_info_reports_a_fresh_model(capsys):
    assert main(["info", "--preset", "cpu-tiny"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "threads" in out
    count = int(re.search(r"parameters\s+([\d,]+)", out).group(1).replace(",", ""))
    c = PRESETS["cpu-tiny"]
    C = c.n_embd  # closed form: embeddings, 12C^2 + 13C per block, final layer norm
    assert count == c.vocab_size * C + c.n_positions * C + c.n_layer * (12 * C * C + 13 * C) + 2 * C
    loss = float(re.search(r"loss ([\d.]+) nats", out).group(1))
    assert abs(loss - math.log(50257)) < 0.3


def test_info_reads_weights(tmp_path, capsys, tiny_params, tiny_config):
    save_params(tmp_path / "m.safetensors", tiny_params, tiny_config)
    assert main(["info", "--weights", str(tmp_path / "m.safetensors")]) == 0
    assert "n_embd=32" in capsys.readouterr().out


def test_errors_are_one_line_without_traceback(tmp_path):
    for args, message in [
        (["info", "--preset", "gpt5"], "fgpt info: error: unknown preset 'gpt5'"),
        (["info", "--weights", str(tmp_path / "none")], "no such file or directory"),
    ]:
        run = subprocess.run([sys.executable, "-m", "functional_gpt.cli", *args], capture_output=True, text=True)
        assert run.returncode == 2
        assert message in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
