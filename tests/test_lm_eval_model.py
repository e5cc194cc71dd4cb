"""lm-eval's "fgpt" model (reference/lm_eval_model.py) against lm-eval's own `hf` model on
the same weights (transformers' GPT2LMHeadModel, with peft for the adapter), request by
request, on the local tasks: multiple choice (with `<|endoftext|>` continuations),
rolling perplexity and generation; against our `local-completions` route over `fgpt
serve`; the shared context computed once; `fgpt eval --tasks`, `fgpt lm_eval`; bad input."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from functional_gpt import GPTConfig, UserError, save_params
from functional_gpt.cli import main

from conftest import hf_model, params_of

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("peft")

from functional_gpt.reference import lm_eval_model, lm_eval_run  # noqa: E402  (needs lm-eval)

ROOT = Path(__file__).resolve().parents[1]
# GPT-2's vocabulary (lm-eval's text is tokenized with it), a context of 128: the cloze passages
# (up to 24 lines) are cut from the left, the scenes run in several rolling windows.
CONFIG = GPTConfig(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4)
TASKS = ["shakespeare_cloze", "shakespeare_scenes", "shakespeare_next_line"]
LIMIT = 8
METADATA = {"lines_per_document": 60}  # shorter scenes: a few windows each


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(our weights file, the transformers directory of the same weights, a LoRA adapter)."""
    from functional_gpt.model.lora import init_adapter
    from functional_gpt.model.lora_files import save_adapter
    from functional_gpt.reference.export import export_hf

    root = tmp_path_factory.mktemp("lm_eval")
    params = params_of(hf_model(CONFIG, seed=3))
    save_params(root / "w.safetensors", params, CONFIG)
    export_hf(root / "w.safetensors", root / "hf")
    adapter = init_adapter(params, 4, alpha=8, targets=["attn.c_attn", "mlp.c_fc"], seed=1)
    gen = torch.Generator().manual_seed(2)
    adapter = adapter.with_tensors({k: torch.randn(t.shape, generator=gen) * 0.2 if k.endswith("lora_B") else t
                                    for k, t in adapter.tensors.items()})
    save_adapter(root / "adapter", adapter)
    return root / "w.safetensors", root / "hf", root / "adapter"


def responses(model: str, model_args: str, tasks=TASKS, limit=LIMIT) -> dict:
    """{task: [(request arguments, response) per request]} of lm-eval's run."""
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit, log_samples=True,
                                  task_manager=lm_eval_run.task_manager(metadata=METADATA), verbosity="ERROR",
                                  batch_size=4)
    return {task: [(tuple(req), resp) for s in out["samples"][task] for req, resp in zip(s["arguments"], s["resps"])]
            for task in tasks}


def assert_same_responses(ours: dict, theirs: dict, atol: float) -> None:
    """Log-likelihoods within atol (a scene's, within 4 float32 steps of its size when that
    is more), greedy flags and generated text equal, request by request."""
    for task in ours:
        assert len(ours[task]) == len(theirs[task]) > 0, task
        for (req, a), (req_b, b) in zip(ours[task], theirs[task]):
            assert req == req_b
            if task == "shakespeare_next_line":
                assert a == b, (task, req, a, b)
            elif task == "shakespeare_scenes":  # a scene's sum over windows, which hf adds in float32
                assert abs(a[0] - b[0]) <= max(atol, abs(b[0]) * 2**-21), (task, a, b)
            else:
                assert abs(a[0][0] - b[0][0]) <= atol and a[0][1] == b[0][1], (task, req, a, b)


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_fgpt_equals_lm_eval_s_hf_model_request_by_request(weights, with_adapter):
    """Every log-likelihood within 1e-4 (measured: 3e-6), every greedy flag and every
    generated line equal, on the cloze (its first questions end in `<|endoftext|>`;
    passages longer than the context are cut from the left), the rolling perplexity of
    scenes longer than the context, and greedy generation until a newline."""
    w, hf_dir, adapter = weights
    ours = responses("fgpt", f"weights={w}" + (f",adapter={adapter}" if with_adapter else ""))
    theirs = responses("hf", f"pretrained={hf_dir},dtype=float32,device=cpu" + (f",peft={adapter}" if with_adapter
                                                                                  else ""))
    assert_same_responses(ours, theirs, atol=1e-4)
    assert any(req[1] == "<|endoftext|>" for req, _ in ours["shakespeare_cloze"])
    contexts = [lm_eval_model.encode(req[0]) for req, _ in ours["shakespeare_cloze"]]
    assert max(map(len, contexts)) > CONFIG.n_positions  # some are cut to fit
    assert all(resp[0] < -500 for _, resp in ours["shakespeare_scenes"])  # many windows each
    assert len({resp[0] for _, resp in ours["shakespeare_next_line"]}) > 1  # not one string for all


def test_a_shared_context_is_computed_once(weights, monkeypatch):
    """Four choices of one 20-token context, and a lone pair: the model sees each
    context's tokens once and each continuation's tokens but its last once."""
    seen = []
    real = lm_eval_model.forward_cached
    monkeypatch.setattr(lm_eval_model, "forward_cached",
                        lambda params, tokens, cache, config, counts, **kw: (
                            seen.append(sum(counts)), real(params, tokens, cache, config, counts=counts, **kw))[1])
    model = lm_eval_model.FunctionalGPTLM(str(weights[0]))
    context = list(range(100, 120))
    choices = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    requests = [(("", ""), context, c) for c in choices] + [(("", ""), [1, 2, 3], [4, 5])]
    scored = model._loglikelihood_tokens(requests)
    assert sum(seen) == 20 + 3 + (2 + 0 + 1 + 3) + 1
    from functional_gpt.model.transformer import forward  # each against a whole forward pass of its own

    for (_, ctx, cont), (logprob, _) in zip(requests, scored):
        whole = torch.tensor([ctx + cont])
        expected = torch.log_softmax(forward(model.params, whole[:, :-1], CONFIG), -1)[0, len(ctx) - 1 :]
        assert logprob == pytest.approx(float(expected.gather(1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fgpt_equals_our_local_completions_route_over_fgpt_serve(weights, monkeypatch):
    """The same requests through lm-eval's local-completions client over `fgpt serve` on
    the same weights: every log-likelihood within 1e-4, every greedy flag equal. (The
    client sends at most max_length - 1 tokens and predicts all but the first: our model's
    max_length is two less for the same windows.)"""
    import tiktoken

    from functional_gpt.model.tokenizer import gpt2_encoding

    class ReadsEndOfText:  # the client's tiktoken, reading "<|endoftext|>" as the token, as transformers' does
        def __init__(self, encoding):
            self._encoding = encoding

        def encode(self, text, **kwargs):
            return self._encoding.encode(text, allowed_special="all")

        def __getattr__(self, name):
            return getattr(self._encoding, name)

    w = weights[0]
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda name: ReadsEndOfText(gpt2_encoding()))  # offline
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "functional_gpt", "serve", "--weights", str(w), "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stderr.read().decode()[-2000:]
                time.sleep(0.2)
        tasks = ["shakespeare_cloze", "shakespeare_scenes"]
        theirs = responses("local-completions", f"base_url=http://127.0.0.1:{port}/v1/completions,model={w},"
                           f"tokenizer_backend=tiktoken,tokenized_requests=True,num_concurrent=1,max_retries=1,"
                           f"max_length={CONFIG.n_positions}", tasks=tasks)
    finally:
        server.terminate()
        server.wait(timeout=30)
    ours = responses("fgpt", f"weights={w},max_length={CONFIG.n_positions - 2}", tasks=tasks)
    assert_same_responses(ours, theirs, atol=1e-4)
    assert any(req[1] == "<|endoftext|>" for req, _ in ours["shakespeare_cloze"])


def test_fgpt_eval_tasks_and_fgpt_lm_eval_print_lm_eval_s_table(weights, capsys):
    w = weights[0]
    assert main(["eval", "--weights", str(w), "--tasks", "shakespeare_cloze", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "|shakespeare_cloze|" in out.replace(" ", "") and "acc" in out
    assert main(["lm_eval", "--model", "fgpt", "--model_args", f"weights={w}", "--tasks", "shakespeare_cloze",
                 "--limit", "4"]) == 0
    assert "shakespeare_cloze" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "hellaswag"], "--tasks: 'hellaswag' is one of lm-eval's tasks, whose data is downloaded from the "
                               "Hugging Face Hub, which is not possible offline; the tasks here are shakespeare_cloze, "
                               "shakespeare_next_line, shakespeare_scenes (and any under --include_path DIR)"),
    (["--tasks", "no_such_task"], "--tasks: 'no_such_task' is not a task lm-eval knows; the tasks here are"),
    (["--tasks", "shakespeare_cloze", "--include_path", "NOWHERE"],
     "--include_path NOWHERE: no such directory of task YAML files"),
    (["--tasks", "shakespeare_cloze", "--limit", "0"], "--limit must be an integer >= 1, got 0"),
])
def test_bad_eval_tasks_flags_are_one_line(weights, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in argv]
    assert main(["eval", "--weights", str(weights[0]), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("NOWHERE", str(tmp_path / "nowhere")) in err[0], err


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "model_args batch_size: expected an integer >= 1, got 0"),
    (dict(batch_size="x"), "model_args batch_size: expected an integer >= 1, got 'x'"),
    (dict(max_length=129), "model_args max_length: 129 is more than the model's n_positions 128"),
    (dict(pretrained="gpt2"), "model_args: unknown argument 'pretrained'; the fgpt model takes weights, adapter"),
])
def test_bad_model_args_are_one_line(weights, kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lm_eval_model.FunctionalGPTLM(str(weights[0]), **kwargs)


def test_a_model_without_gpt2_s_vocabulary_is_refused(tmp_path, tiny_config, tiny_params):
    save_params(tmp_path / "tiny.safetensors", tiny_params, tiny_config)
    with pytest.raises(UserError, match="vocab_size 128 is not GPT-2's tokenizer's"):
        lm_eval_model.FunctionalGPTLM(str(tmp_path / "tiny.safetensors"))
