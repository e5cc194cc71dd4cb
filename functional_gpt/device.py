"""Choosing where tensors live (a GPU when present, never required) and the training dtype."""

import os

import torch

from .checks import describe
from .errors import UserError

KINDS = ("cpu", "cuda", "mps")


def pick_device(name: str | torch.device | None = None, *, flag: str = "--device") -> torch.device:
    """The named device ("cpu", "cuda", "cuda:1", "mps", or a torch.device), or the best
    available when None: CUDA, then Apple's MPS, then the CPU. A name torch does not know,
    a kind this project does not run on (xpu, meta, ...), an absent GPU or a GPU index
    past the last one is a one-line UserError naming `flag` (the CLI's flag, or the Python
    argument) and the value."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"{flag} {name!r}: unknown device (try {', '.join(KINDS)} or cuda:0)") from None
    if device.type not in KINDS:
        raise UserError(f"{flag} {device}: not supported; use one of {', '.join(KINDS)} (or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {device}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} {device}: MPS is not available on this machine")
    if device.type in ("cpu", "mps") and device.index not in (None, 0):
        raise UserError(f"{flag} {device}: there is one {device.type} device ({device.type} or {device.type}:0)")
    return device


def check_device(name: str, value, *, meta: bool = False) -> torch.device:
    """A Python argument naming a device this machine has (a string or a torch.device;
    see pick_device) -> the torch.device. meta: "meta" (shapes without values) is allowed."""
    if not isinstance(value, (str, torch.device)):
        raise UserError(f"{name}: expected a device such as 'cpu' or 'cuda', got {describe(value)}")
    if meta and str(value) == "meta":
        return torch.device("meta")
    return pick_device(value, flag=name)


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether a and b name one device: "cpu" and "cpu:0" do, and "cuda" (the current GPU)
    matches any index."""
    return a.type == b.type and (a.type != "cuda" or a.index is None or b.index is None or a.index == b.index)


def free_memory(device: torch.device) -> int | None:
    """Bytes `device` can still allocate: the CPU's MemAvailable (/proc/meminfo), a GPU's
    free memory; None where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            line = next((line for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        return None
    return int(line.split()[1]) * 1024 if line else None


def check_memory(what: str, nbytes: int, device: torch.device) -> None:
    """A one-line UserError before allocating `nbytes` that `device` does not have: Linux
    hands out more memory than it has and kills the process once it is touched, so a
    too-large request must be refused before, not caught after."""
    free = free_memory(device)
    if free is not None and nbytes > free:
        raise UserError(f"{what} needs {nbytes / 2**30:.1f} GiB, and {device} has {free / 2**30:.1f} GiB free")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (avx2, avx512_bf16, ...; Arm's
    Features); empty where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [line for line in f if line.startswith(("flags", "Features"))]
    except OSError:
        return set()
    return {flag for line in lines[:1] for flag in line.split(":", 1)[-1].split()}


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "bf16")  # what the speed paths pick by


def cpu_summary() -> str:
    """One line: the CPU's model name, cores, the SPEED_FLAGS it has, and whether training
    in bfloat16 runs in bf16 here (`fgpt info`; every published figure names it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    flags = " ".join(f for f in SPEED_FLAGS if f in cpu_flags()) or "none of " + ", ".join(SPEED_FLAGS)
    bf16 = "bfloat16 training in bf16" if cpu_has_bf16() else "bfloat16 training falls back to float32"
    return f"{name or 'unknown model'}, {os.cpu_count()} cores, flags: {flags} ({bf16})"


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (x86 AVX512-BF16 or AMX, Arm's BF16).
    Without it torch emulates bf16 matmuls, 50-500x slower than float32 (pytorch#146508)."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags())


def pick_dtype(name: str, device: torch.device, log=print) -> torch.dtype:
    """The compute dtype for training on `device` from --dtype's value: float32, bfloat16
    (on a CPU without bf16 arithmetic: float32, said in one line through `log`), float16
    (CUDA only, with a loss scaler). Anything else is a one-line UserError."""
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    if name == "float16" and device.type != "cuda":
        raise UserError(f"--dtype float16: float16 training needs a CUDA GPU (this run is on {device.type}); "
                        f"use --dtype bfloat16")
    if name == "bfloat16" and device.type == "cpu" and not cpu_has_bf16():
        log("--dtype bfloat16: this CPU has no bfloat16 arithmetic (no AVX512-BF16 or AMX), where bf16 is "
            "far slower than float32; training in float32")
        return torch.float32
    return DTYPES[name]
