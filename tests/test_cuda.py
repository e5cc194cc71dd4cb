"""On a CUDA GPU, where present: every entry point that builds tensors of its own (token
batches, caches, masks, the repetition penalty's seen-set, evaluation windows) builds them
on the params' device, and gives what the CPU gives. Skipped on a machine without CUDA;
these are the only checks of the `device=` choices that a CPU cannot tell apart."""

import io

import pytest
import torch

from functional_gpt import flatten, unflatten
from functional_gpt.reference.perplexity import evaluate
from functional_gpt.generation.decoding import generate, print_samples
from functional_gpt.generation.sampling import Sampling
from functional_gpt.training.step import Batch, StepSettings, new_state, train_step
from functional_gpt.training.data import Position

from conftest import TINY, hf_model, params_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on(params, device):
    return unflatten({k: t.to(device) for k, t in flatten(params).items()})


def test_padded_batched_generation_with_a_repetition_penalty_equals_the_cpus():
    params = params_of(hf_model(TINY, seed=1))
    prompts = [[5, 9, 2, 7], [3], [8, 8]]
    sampling = Sampling(greedy=True, repetition_penalty=1.5)
    cpu = [t.tolist() for t in generate(params, prompts, TINY, max_new_tokens=6, sampling=sampling, window=8)]
    steps = list(generate(on(params, "cuda"), prompts, TINY, max_new_tokens=6, sampling=sampling, window=8))
    assert all(t.device.type == "cuda" for t in steps)
    assert [t.tolist() for t in steps] == cpu


def test_evaluate_and_print_samples_equal_the_cpus():
    params = params_of(hf_model(TINY, seed=2))
    text = [torch.randint(TINY.vocab_size, (90,), generator=torch.Generator().manual_seed(0))]
    cpu = evaluate(params, text, TINY, max_length=16, stride=8, show_progress=False)
    gpu = evaluate(on(params, "cuda"), text, TINY, max_length=16, stride=8, show_progress=False)
    assert gpu.nats_per_token == pytest.approx(cpu.nats_per_token, rel=1e-4)
    outputs = []
    for p in (params, on(params, "cuda")):
        out = io.StringIO()
        print_samples(p, "", TINY, max_new_tokens=5, sampling=Sampling(greedy=True), num_samples=2, seed=3,
                      out=out, err=io.StringIO())
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_training_step_on_the_gpu_stays_there_and_matches_the_cpu(dtype):
    params = params_of(hf_model(TINY, seed=4))
    t = torch.randint(TINY.vocab_size, (1, 2, 17), generator=torch.Generator().manual_seed(0))
    settings = StepSettings(TINY, lr=1e-3, min_lr=1e-4, warmup_steps=1, decay_steps=10, dtype=dtype, dropout=False)
    results = []
    for device in ("cpu", "cuda"):
        state = new_state(on(params, device), 0, torch.device(device))
        batch = Batch(t[..., :-1].to(device), t[..., 1:].to(device), Position())
        after, metrics = train_step(state, batch, settings)
        assert all(x.device.type == device for x in flatten(after.params).values())
        results.append(metrics["loss"])
    assert results[1] == pytest.approx(results[0], rel=1e-2)
