"""functional-gpt as a model of EleutherAI's lm-evaluation-harness (`lm_eval`), registered
as "fgpt": `simple_evaluate(model="fgpt", model_args="weights=W,adapter=A")`, `fgpt eval
--tasks`, `fgpt lm_eval --model fgpt ...` (lm-eval's own command line, with this model
registered: lm-eval 0.4 has no way for another package to register one with `lm_eval`).

It is lm-eval's `TemplateLM`, so a request's text is split into context and continuation
tokens by lm-eval's own rules (trailing spaces move to the continuation; an empty context
becomes `<|endoftext|>`), rolling windows are lm-eval's `get_rolling_token_windows`, and
stop sequences and generation settings go through lm-eval's own helpers: the numbers
differ from its `hf` model on the same weights by rounding alone.

Scoring runs on the KV cache: a batch's contexts run once, into one cache row each (the
choices of a multiple-choice question share theirs); then each choice's continuation runs
after its context's cached keys and values, one choice per context in each call, the rows
rolled back to their contexts after it (the cache holds the batch's contexts, no copies).
"""

import sys
from collections.abc import Iterator

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..checks import describe
from ..device import pick_device
from ..errors import UserError
from ..generation.decoding import generate
from ..generation.sampling import Sampling
from ..model.checkpoint import load_params
from ..model.lora_files import with_adapter
from ..model.tokenizer import ENDOFTEXT, ENDOFTEXT_ID, decode, encode
from ..model.transformer import forward_cached, new_cache

# Continuation tokens per scoring call: bounds its [tokens, vocab] logits (about 200 MB at GPT-2's vocabulary).
TOKENS_PER_CALL = 1024


@register_model("fgpt")
class FunctionalGPTLM(TemplateLM):
    """weights: a checkpoint (file, run directory or Hugging Face GPT-2 directory);
    adapter: a LoRA adapter directory merged into them; device: cpu, cuda, mps (default
    the best there is; a CUDA device on a machine without one falls back to it in one line); batch_size: contexts per call (lm-eval's "auto": 16); max_length:
    the context in tokens (default the model's n_positions)."""

    def __init__(self, weights: str, adapter: str | None = None, device: str | None = None,
                 batch_size: int | str = 16, max_length: int | str | None = None, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise UserError(f"model_args: unknown argument {next(iter(unknown))!r}; the fgpt model takes weights, "
                            f"adapter, device, batch_size, max_length")
        if not isinstance(weights, str) or not weights:
            raise UserError(f"model_args weights: expected the path of a checkpoint, got {describe(weights)}")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 unless told otherwise, as for its hf model
            print(f"fgpt model: device {device} is not available here; running on {pick_device()}", file=sys.stderr)
            device = None
        self._device = pick_device(device, flag="model_args device")
        params, self.config = load_params(weights, device=self._device)
        self.params = with_adapter(params, adapter or None)
        if self.config.vocab_size <= ENDOFTEXT_ID:
            raise UserError(f"{weights}: vocab_size {self.config.vocab_size} is not GPT-2's tokenizer's "
                            f"({ENDOFTEXT_ID + 1}): lm-eval's text cannot be tokenized for it")
        self._batch_size = 16 if str(batch_size).startswith("auto") else _positive("batch_size", batch_size)
        n_positions = self.config.n_positions
        self._max_length = n_positions if max_length is None else _positive("max_length", max_length)
        if self._max_length > n_positions:
            raise UserError(f"model_args max_length: {self._max_length} is more than the model's n_positions "
                            f"{n_positions}")

    @property
    def eot_token_id(self) -> int:
        return ENDOFTEXT_ID

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256  # lm-eval's default, as its hf model's

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return encode(string)  # "<|endoftext|>" in the text is the token, as transformers' GPT-2 tokenizer reads it

    def tok_decode(self, tokens) -> str:
        return decode(tokens)

    # ------------------------------------------------------------- scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context ids, continuation ids)] -> per request
        (sum of the continuation's log-probabilities, whether it is the greedy one)."""
        pairs = [self._fit(context, continuation) for _, context, continuation in requests]
        groups: dict[tuple, list[int]] = {}  # context -> the requests that continue it
        for i, (context, _) in enumerate(pairs):
            groups.setdefault(context, []).append(i)
        # Longest contexts first: a batch's contexts are then of similar lengths (less padding).
        order = sorted(groups, key=lambda context: -len(context))
        results: list = [None] * len(requests)
        with torch.inference_mode(), tqdm(total=len(requests), disable=disable_tqdm or len(requests) < 2,
                                          desc="fgpt: log-likelihoods") as bar:
            for start in range(0, len(order), self._batch_size):
                contexts = order[start : start + self._batch_size]
                batch = [(g, i) for g, context in enumerate(contexts) for i in groups[context]]
                for (g, i), result in zip(batch, self._score(contexts, [(g, pairs[i][1]) for g, i in batch])):
                    results[i] = result
                bar.update(len(batch))
        return results

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[tuple, tuple]:
        """The pair as transformers' model sees it: the last max_length + 1 tokens of
        context + continuation, the continuation kept whole."""
        if not continuation:
            raise UserError("lm-eval request: an empty continuation has no log-likelihood")
        if len(continuation) > self._max_length:
            raise UserError(f"lm-eval request: a continuation of {len(continuation)} tokens does not fit the context "
                            f"of {self._max_length}")
        whole = (list(context) + list(continuation))[-(self._max_length + 1) :]
        return tuple(whole[: len(whole) - len(continuation)]), tuple(continuation)

    def _score(self, contexts: list[tuple], continuations: list[tuple[int, tuple]]) -> list[tuple[float, bool]]:
        """contexts: G token tuples; continuations: (index of its context, tokens) -> per
        continuation (log-likelihood, greedy). The contexts run once, into a cache of G rows
        (their last logits score each continuation's first token); then, in passes, the
        rest of each context's first continuation, of its second, ..., every row after its
        own context's cached keys and values, each row put back to its context's length
        after each pass."""
        device = self._device
        counts = [len(c) for c in contexts]
        tokens = torch.zeros(len(contexts), max(counts), dtype=torch.long, device=device)
        for g, context in enumerate(contexts):
            tokens[g, : len(context)] = torch.tensor(context)
        longest = max(counts[g] + len(cont) - 1 for g, cont in continuations)
        w = self.params["wpe"]["weight"]
        cache = new_cache(self.config, len(contexts), max_len=longest, dtype=w.dtype, device=device)
        last, cache = forward_cached(self.params, tokens, cache, self.config, counts=tuple(counts), last_only=True)
        first = torch.log_softmax(last[:, -1].float(), dim=-1)  # [G, V]: each context's next-token log-probs
        greedy = first.argmax(-1).tolist()
        scored = [(float(first[g, cont[0]]), greedy[g] == cont[0]) for g, cont in continuations]
        passes: list[list[int]] = []  # pass k: the k-th continuation of each context that has one
        taken = [0] * len(contexts)
        for j, (g, cont) in enumerate(continuations):
            if len(cont) > 1:
                if taken[g] == len(passes):
                    passes.append([])
                passes[taken[g]].append(j)
                taken[g] += 1
        for rows in passes:
            for chunk in _chunks(rows, [len(continuations[j][1]) - 1 for j in rows], TOKENS_PER_CALL):
                for j, (logprob, greedy) in zip(chunk, self._score_rest(cache, [continuations[j] for j in chunk])):
                    scored[j] = (scored[j][0] + logprob, scored[j][1] and greedy)
        return scored

    def _score_rest(self, cache, continuations: list[tuple[int, tuple]]) -> Iterator[tuple[float, bool]]:
        """Continuations of distinct contexts (cache rows): each one's tokens after the first,
        predicted from its context's cache row followed by its earlier tokens. The rows'
        buffers take the continuations' keys and values; their lengths stay the contexts'."""
        device = self._device
        counts = [len(cont) - 1 for _, cont in continuations]
        inputs = torch.zeros(len(continuations), max(counts), dtype=torch.long, device=device)
        for r, (_, cont) in enumerate(continuations):
            inputs[r, : len(cont) - 1] = torch.tensor(cont[:-1])
        logits, _ = forward_cached(self.params, inputs, cache, self.config, counts=tuple(counts),
                                   cache_rows=tuple(g for g, _ in continuations))
        for r, (_, cont) in enumerate(continuations):
            logprobs = torch.log_softmax(logits[r, : len(cont) - 1].float(), dim=-1)
            targets = torch.tensor(cont[1:], device=device)
            yield float(logprobs.gather(1, targets[:, None]).sum()), bool((logprobs.argmax(-1) == targets).all())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over lm-eval's disjoint rolling windows of max_length."""
        windows, owners = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            rolling = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self._max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[r] += logprob
        return totals

    # ---------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation of its context, until one of its stop sequences (or
        `<|endoftext|>`) or max_gen_toks tokens, the stop sequence cut off; greedy unless
        do_sample; the context cut from the left to leave room for max_gen_toks, as lm-eval's
        hf model does. Requests of the same settings run as one batch of up to batch_size."""
        results: list = [None] * len(requests)
        by_settings: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_settings.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        with tqdm(total=len(requests), disable=disable_tqdm or len(requests) < 2, desc="fgpt: generating") as bar:
            for indices in by_settings.values():
                for start in range(0, len(indices), self._batch_size):
                    batch = indices[start : start + self._batch_size]
                    texts = self._generate([requests[i].args[0] for i in batch], requests[batch[0]].args[1])
                    for i, text in zip(batch, texts):
                        results[i] = text
                    bar.update(len(batch))
        return results

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        if not isinstance(gen_kwargs, dict):
            raise UserError(f"lm-eval request: generation settings must be a dict, got {describe(gen_kwargs)}")
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=ENDOFTEXT)
        max_gen_toks = kwargs.pop("max_gen_toks")
        room = self._max_length - max_gen_toks
        if room < 1:
            raise UserError(f"lm-eval request: max_gen_toks {max_gen_toks} leaves no room for a context in "
                            f"{self._max_length} tokens")
        prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-room:] for c in contexts]
        sampling = (Sampling(temperature=float(kwargs.get("temperature", 1.0)), top_p=float(kwargs.get("top_p", 1.0)))
                    if kwargs.get("do_sample") else Sampling(greedy=True))
        generator = torch.Generator(device=self._device).manual_seed(int(kwargs.get("seed", 1234)))
        made: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        with torch.inference_mode():
            for step in generate(self.params, prompts, self.config, max_new_tokens=max_gen_toks, sampling=sampling,
                                 generator=generator, stop_tokens=(ENDOFTEXT_ID,)):
                for r, token in enumerate(step.tolist()):
                    if not done[r]:
                        made[r].append(token)
                        done[r] = token == ENDOFTEXT_ID or any(s in self.tok_decode(made[r]) for s in until)
                if all(done):
                    break
        return [postprocess_generated_text(generation=self.tok_decode(m), stop=until, think_end_token=None)
                for m in made]


def _positive(name: str, value) -> int:
    """A model_args integer (lm-eval passes them as text or numbers) that must be >= 1."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise UserError(f"model_args {name}: expected an integer >= 1, got {value!r}")
    return number


def _chunks(items: list[int], sizes: list[int], budget: int) -> Iterator[list[int]]:
    """`items` in order, in runs whose sizes sum to at most `budget` (one item at least)."""
    run, total = [], 0
    for item, size in zip(items, sizes):
        if run and total + size > budget:
            yield run
            run, total = [], 0
        run.append(item)
        total += size
    if run:
        yield run
