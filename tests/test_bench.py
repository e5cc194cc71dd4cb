"""`fgpt bench`: a real (tiny) run in subprocesses, its report and its agreement check."""

import json

import pytest

from functional_gpt import UserError
from functional_gpt.bench import _check_agreement, bench, markdown
from functional_gpt.cli import main


@pytest.mark.slow
def test_a_tiny_bench_reports_every_contender_and_they_agree(capsys):
    lines = []
    report = bench("cpu-tiny", batch=1, seq=32, rounds=2, steps=1, progress=lines.append,
                   contenders=("ours-float32", "transformers-float32"))
    assert len(lines) == 4 and report["rounds"] == 2
    rows = report["contenders"]
    assert set(rows) == {"ours-float32", "transformers-float32"}
    assert abs(rows["ours-float32"]["first_loss"] - rows["transformers-float32"]["first_loss"]) < 1e-4
    for row in rows.values():
        assert row["tokens_per_s"] == pytest.approx(32 / row["step_s"])
        assert 0 < row["mfu"] < 1 and row["peak_rss_mib"] > 100 and len(row["speed_ratios"]) == 2
    assert rows["transformers-float32"]["speed_vs_baseline"] == 1.0
    table = markdown(report)
    assert table.count("\n| ") == len(rows) + 2 and "ours-float32" in table


def test_no_speed_is_reported_when_the_first_losses_differ():
    results = {"ours-float32": [{"first_loss": 10.0}], "transformers-float32": [{"first_loss": 10.0002}]}
    with pytest.raises(UserError, match="first-step losses differ by 2.00e-04"):
        _check_agreement(results)
    results["ours-float32"][0]["first_loss"] = 10.00015
    _check_agreement(results)


@pytest.mark.parametrize("argv, message", [
    (["--seq", "0"], "--seq: expected an integer in 1..128, got 0"),
    (["--rounds", "0"], "--rounds: expected an integer >= 1, got 0"),
    (["--contenders", "nanogpt"], "--contenders: expected one of 'ours-float32', "),
    (["--preset", "gpt5"], "unknown preset 'gpt5'"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    preset = [] if "--preset" in argv else ["--preset", "cpu-tiny"]
    assert main(["bench", *preset, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_json_output_is_one_object(monkeypatch, capsys):
    import functional_gpt.bench as bench_module
    monkeypatch.setattr(bench_module, "_run", lambda job: {"float32": 100.0, "bfloat16": 400.0} if job["kind"] == "peak"
                        else {"first_loss": 5.0, "step_s": 0.5, "tokens_per_s": 64.0, "forward_s": 0.1,
                              "peak_rss_mib": 300.0})
    assert main(["bench", "--preset", "cpu-tiny", "--seq", "32", "--rounds", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["contenders"]["ours-float32"]["speed_vs_baseline"] == 1.0
    assert report["flops_per_step"] > 0


def test_only_bfloat16_contenders_on_a_cpu_without_bf16_is_one_line(monkeypatch):
    """It was a StopIteration from an empty report."""
    import functional_gpt.bench as bench_module
    import functional_gpt.device as device_module
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(bench_module, "_run", lambda job: pytest.fail("nothing should run"))
    with pytest.raises(UserError, match=r"^--contenders: every one asked for is bfloat16, and this CPU has no bfloat16 "
                                        r"arithmetic"):
        bench_module.bench("cpu-tiny", contenders=["ours-bfloat16"], progress=lambda line: None)
