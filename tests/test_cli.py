"""The command line: one line per error, non-zero exit, no traceback."""

import math
import re
import subprocess
import sys

import pytest
import torch

import functional_gpt.device as device_module
import functional_gpt.generation.decoding as decoding
from functional_gpt import PRESETS, UserError, init_params, new_cache, preset, save_params
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


@pytest.mark.parametrize("flags, shown, bf16", [
    ({"fpu", "avx2", "avx512f"}, "flags: avx2 avx512f", "falls back to float32"),
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "flags: avx2 avx512f avx512_bf16 amx_bf16", "in bf16"),
    (set(), "flags: none of avx2", "falls back to float32"),
])
def test_info_names_the_cpus_speed_flags_and_its_bf16_path(monkeypatch, capsys, flags, shown, bf16):
    """The CPU line every published figure quotes: the flags the speed paths pick by, and
    which way --dtype bfloat16 goes on it."""
    monkeypatch.setattr(device_module, "cpu_flags", lambda: flags)
    assert main(["info", "--preset", "cpu-tiny"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cpu "))
    assert shown in line and f"(bfloat16 training {bf16})" in line


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


def test_running_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    """An allocation torch refuses deep inside a command: one line, exit 2, no traceback."""
    params = init_params(preset("cpu-tiny"))
    save_params(tmp_path / "m.safetensors", params, params.config)

    def refused(*args, **kwargs):
        return torch.empty(10**15, dtype=torch.uint8)  # DefaultCPUAllocator: can't allocate memory

    monkeypatch.setattr(decoding, "generate", refused)
    code = main(["generate", "--weights", str(tmp_path / "m.safetensors"), "--max_new_tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fgpt generate: error: out of memory ([enforce fail") and err.count("\n") == 1


def test_a_cache_larger_than_the_free_memory_is_refused_before_it_is_allocated(monkeypatch):
    monkeypatch.setattr(device_module, "free_memory", lambda device: 2**30)
    with pytest.raises(UserError, match=r"^a KV cache of batch_size=2000 rows x max_len=128 positions needs 2\.0 GiB, and "
                                        r"cpu has 1\.0 GiB free$"):
        new_cache(preset("cpu-small"), 2000)  # 1 MiB a row: 4 layers x k, v x 128 positions x 256 x 4 bytes
    new_cache(preset("cpu-small"), 500)
