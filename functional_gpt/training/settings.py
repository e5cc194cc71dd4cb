"""A training run's settings: `TrainConfig` (every flag of `fgpt train`, checked), built
from flags, a TOML or JSON file or a resumed run's state.json, and the defaults that
depend on the model (`resolve`).
"""

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..checks import check_choice, check_path, check_str, describe
from ..errors import UserError
from ..model.config import GPTConfig, preset
from ..model.lora import check_targets
from .data import DEFAULT_DATA_DIR
from ..device import DTYPES
from .budget import budget_seconds
from .optim import SCHEDULES, check_adamw, check_cooldown, check_schedule
from .runs import STATE, read_state
from .step import OPTIMIZERS

MAIN_JOB_BUDGET = "10m"  # the main job's training, final evaluation included: 11.5 minutes with the install (2 cores)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. The defaults are the main job: the cpu-small preset
    on the prepared Shakespeare corpus for MAIN_JOB_BUDGET of wall time, trained with
    Muon and a warmup-stable-decay schedule."""

    data: str = DEFAULT_DATA_DIR  # prepared data directory (train.bin, val.bin)
    out: str = "runs/shakespeare"  # run directory
    preset: str = "cpu-small"  # model preset when training from scratch
    init: str | None = None  # start from these weights (file, run dir or HF dir) instead
    max_steps: int | None = None  # optimizer updates in all (default: what --time_budget holds)
    time_budget: str | None = None  # the run's length as wall time: "10m" (default MAIN_JOB_BUDGET without --max_steps)
    decay_steps: int | None = None  # where the schedule reaches min_lr (default max_steps)
    schedule: str = "wsd"  # wsd: warm-up, constant, linear cooldown; cosine: warm-up, cosine
    cooldown: float = 0.25  # wsd: the share of the run in its final linear decay
    optimizer: str | None = None  # muon (Muon for block matrices, AdamW for the rest) or adamw (default: muon; LoRA adamw)
    batch_size: int = 8  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per update
    context_length: int | None = None  # tokens per window (default: the model's n_positions)
    stride: int | None = None  # offset between training windows (default context_length)
    lr: float = 2e-3  # peak learning rate (Muon + wsd, 2-minute sweep: 6.11 at 8e-4, 5.91 at 1.6e-3, 5.81 at 3.2e-3)
    min_lr: float | None = None  # where the schedule ends (default lr / 10)
    warmup_steps: int = 30
    weight_decay: float = 0.1  # on 2-D block weights only (see optim.decays)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    dropout: float | None = None  # sets all three dropout rates (default: the model's)
    seed: int = 0  # init, data order, dropout and samples
    eval_interval: int = 100  # steps between evaluations and checkpoints
    eval_windows: int = 64  # validation windows in a periodic evaluation (fixed set)
    sample_tokens: int = 48  # tokens of the sample printed at each evaluation; 0: none
    device: str | None = None  # cpu, cuda, mps (default: best available)
    dtype: str = "bfloat16"  # compute dtype: bfloat16 (float32 master weights), float32, float16 (CUDA)
    shard_optimizer: bool = False  # data parallel: each rank keeps its share of AdamW's moments (ZeRO-1)
    checkpoint_activations: bool = False  # recompute each block in the backward pass
    compile: bool = False  # torch.compile the model
    lora_rank: int | None = None  # train a LoRA adapter of this rank on --init's frozen weights (None: all train)
    lora_alpha: float | None = None  # the adapter's update is (alpha / rank) A @ B (default: the rank)
    lora_targets: str | None = None  # comma-separated block matrices to adapt (default attn.c_attn)
    lora_layers: str | None = None  # blocks to adapt: "6-11", "0,3,5" (default: all)

    def __post_init__(self):
        """Every field's type and range, checked once here, however the config is built
        (flags, a config file, a resumed state.json, Python): a UserError naming the field."""
        for field in dataclasses.fields(self):
            _check_type(field.name, str(field.type), getattr(self, field.name))
        for name in _POSITIVE:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("context_length", "stride"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        flag = lambda field: f"--{field}"  # the optimizer's settings follow StepSettings' rules
        check_schedule(lr=self.lr, min_lr=self.lr / 10 if self.min_lr is None else self.min_lr,
                       warmup_steps=self.warmup_steps,
                       decay_steps=self.decay_steps if self.decay_steps is not None else self.max_steps or 1, name=flag)
        if self.time_budget is not None:
            budget_seconds(self.time_budget)
            if self.max_steps is not None:
                raise UserError(f"--max_steps {self.max_steps} and --time_budget {self.time_budget} both set the run's "
                                f"length: give one (a budget run records the steps it reached, to replay it with "
                                f"--max_steps)")
            if self.decay_steps is not None:
                raise UserError(f"--decay_steps {self.decay_steps} does not go with --time_budget {self.time_budget}: "
                                f"under a budget, where the decay ends is fixed when the cooldown is due")
        check_choice("--schedule", self.schedule, SCHEDULES)
        check_cooldown(self.cooldown, "--cooldown")
        if self.optimizer is not None:
            check_choice("--optimizer", self.optimizer, OPTIMIZERS)
        if self.optimizer == "muon" and self.lora_rank is not None:
            raise UserError("--optimizer muon trains the full model's block matrices; a LoRA adapter (--lora_rank) "
                            "trains with adamw")
        check_adamw(beta1=self.beta1, beta2=self.beta2, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                    name=flag)
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be in 0..2**63-1, got {self.seed}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.init is None:
            preset(self.preset)  # an unknown name fails now, not after the data is read
        if self.lora_rank is None:
            given = next((f for f in ("lora_alpha", "lora_targets", "lora_layers") if getattr(self, f) is not None),
                         None)
            if given is not None:
                raise UserError(f"--{given} sets up a LoRA adapter: give its rank with --lora_rank")
        else:
            if self.init is None:
                raise UserError("--lora_rank trains an adapter of existing weights: give them with --init")
            if self.lora_rank < 1:
                raise UserError(f"--lora_rank must be >= 1, got {self.lora_rank}")
            if self.lora_alpha is not None and not self.lora_alpha > 0:
                raise UserError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
            lora_targets(self.lora_targets)
            lora_layers(self.lora_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_POSITIVE = ("max_steps", "batch_size", "grad_accum", "eval_interval")
_NON_NEGATIVE = ("eval_windows", "sample_tokens")


def lora_targets(text: str | None) -> tuple[str, ...]:
    """--lora_targets "attn.c_attn,mlp.c_fc" -> the TARGETS it names (None: attn.c_attn)."""
    if text is None:
        return ("attn.c_attn",)
    try:
        return check_targets([name.strip() for name in check_str("--lora_targets", text).split(",")])
    except UserError as e:  # "targets: ..."
        raise UserError(f"--lora_{e}") from None


MAX_LAYERS = 10_000  # a bound on --lora_layers before the model is known (GPT-2 XL has 48 blocks)


def lora_layers(text: str | None) -> list[int] | None:
    """--lora_layers "0-3,8" -> [0, 1, 2, 3, 8] (None: every block); the model's range is
    checked where the model is known."""
    if text is None:
        return None
    layers = []
    for part in check_str("--lora_layers", text).split(","):
        first, dash, last = part.strip().partition("-")
        last = last if dash else first
        if not (first.isdigit() and last.isdigit()) or int(last) < int(first):
            raise UserError(f"--lora_layers: {part.strip()!r} is not a block index or a range like 6-11")
        if int(last) >= MAX_LAYERS:
            raise UserError(f"--lora_layers: block {int(last)} is past any model's blocks (fewer than {MAX_LAYERS})")
        layers += range(int(first), int(last) + 1)
    return layers


def _check_type(key: str, kind: str, value) -> None:
    """kind: the field's annotation as text ("int", "float | None", "str | None", ...)."""
    if value is None:
        if "None" not in kind:
            raise UserError(f"--{key}: a value is required")
    elif "bool" in kind:
        if not isinstance(value, bool):
            raise UserError(f"--{key}: expected true or false, got {describe(value)}")
    elif "str" in kind:
        if not isinstance(value, str) or not value:
            raise UserError(f"--{key}: expected a non-empty string, got {describe(value)}")
    elif "float" in kind:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"--{key}: expected a finite number, got {describe(value)}")
    elif isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"--{key}: expected an integer, got {describe(value)}")


def make_config(values: dict) -> TrainConfig:
    """A TrainConfig from {field: value} (defaults for the rest): a wrong name is a
    UserError, an integer field given as an integral float (4.0, as JSON may) is taken as
    the integer, and TrainConfig checks every type and range."""
    if not isinstance(values, dict):
        raise UserError(f"training settings: expected a table of settings, got {type(values).__name__}")
    kinds = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    unknown = next((k for k in values if k not in kinds), None)
    if unknown is not None:
        raise UserError(f"unknown training setting {describe(unknown)}; known: {', '.join(kinds)}")
    integral = lambda k, v: isinstance(v, float) and v.is_integer() and "int" in kinds[k] and "float" not in kinds[k]
    return TrainConfig(**{k: int(v) if integral(k, v) else v for k, v in values.items()})


def read_config_file(path: str | os.PathLike) -> dict:
    """Training settings from a TOML or JSON file (keys are TrainConfig's field names)."""
    path = check_path("--config", path, "a TOML or JSON file of settings")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        if path.suffix == ".toml":
            import tomllib  # Python 3.11+

            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ImportError:
        raise UserError(f"{path}: TOML needs Python 3.11 or later; use a JSON file") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a table of settings")
    return values


def resume_config(run_dir: str | os.PathLike, overrides: dict) -> TrainConfig:
    """The stored configuration of the run in `run_dir`. `overrides` (flags given on the
    command line) may extend max_steps and change how the step computes (dtype: the master
    weights are float32 whatever the compute dtype; shard_optimizer, checkpoint_activations,
    compile); any other that differs is a UserError."""
    state_file = Path(run_dir) / STATE
    stored = read_state(run_dir)["config"]
    # Runs from before --dtype trained in float32, from before --schedule on a cosine, with AdamW.
    values = {"dtype": "float32", "schedule": "cosine", "optimizer": "adamw", **stored, "out": str(Path(run_dir))}
    for key, given in overrides.items():
        if key == "lora_rank" and stored.get(key) is None:
            raise UserError(f"--lora_rank: {run_dir} is a full training run, which LoRA cannot continue; train an "
                            f"adapter of its weights into a new run: --init {run_dir} --lora_rank {given} --out DIR")
        if key in _MAY_CHANGE_ON_RESUME:
            values[key] = given
            continue
        same = given == stored.get(key)
        if key in ("data", "out", "init") and given is not None and stored.get(key) is not None:
            same = Path(given).resolve() == Path(stored[key]).resolve()
        if not same:
            raise UserError(
                f"--{key} {given} differs from the checkpoint's {key}={stored.get(key)} "
                f"({state_file}); drop the flag, or train into a new --out"
            )
    try:
        return make_config(values)
    except UserError as e:
        raise UserError(f"{state_file}: config: {e}") from None


_MAY_CHANGE_ON_RESUME = ("max_steps", "dtype", "shard_optimizer", "checkpoint_activations", "compile")


def resolve(cfg: TrainConfig, config: GPTConfig) -> TrainConfig:
    """Fill the defaults that depend on the model, and check the run fits it."""
    context = cfg.context_length or config.n_positions
    if context > config.n_positions:
        raise UserError(f"--context_length {context} does not fit the model's n_positions={config.n_positions}")
    return dataclasses.replace(
        cfg,
        data=str(Path(cfg.data).resolve()),
        init=None if cfg.init is None else str(Path(cfg.init).resolve()),
        context_length=context,
        stride=cfg.stride or context,
        decay_steps=cfg.decay_steps or cfg.max_steps,
        time_budget=MAIN_JOB_BUDGET if cfg.max_steps is None and cfg.time_budget is None else cfg.time_budget,
        optimizer=cfg.optimizer or ("adamw" if cfg.lora_rank is not None else "muon"),
        min_lr=cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr,
        lora_alpha=float(cfg.lora_rank) if cfg.lora_rank is not None and cfg.lora_alpha is None else cfg.lora_alpha,
        lora_targets=",".join(lora_targets(cfg.lora_targets)) if cfg.lora_rank is not None else None,
    )

