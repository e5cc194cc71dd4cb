"""Training: `data` (corpus -> token files -> windows), `loss` (the chunked LM-head loss),
`optim` (AdamW, schedules, clipping) -> `muon` (Muon for the block matrices), `distributed`
(data parallel, ZeRO-1) -> `step` (`train_step(state, batch, settings) -> (state,
metrics)`) -> `runs` (a run's files) -> `budget` (a run's length as wall time), `settings`
(`TrainConfig`, the flags of `fgpt train`) -> `loop` (`fgpt train`: batches, progress,
evaluation, checkpoints).
"""

from .data import Position, load_tokens, next_batch, prepare
from .distributed import World, world_from_env
from .loop import train
from .loss import lm_head_loss
from .optim import AdamWState, adamw_init, adamw_step, clip_grad_norm, lr_at
from .runs import load_checkpoint
from .settings import TrainConfig, make_config, read_config_file, resume_config
from .step import Batch, Diverged, StepSettings, TrainState, new_state, train_step

__all__ = [
    "AdamWState", "Batch", "Diverged", "Position", "StepSettings", "TrainConfig", "TrainState", "World",
    "adamw_init", "adamw_step", "clip_grad_norm", "lm_head_loss", "load_checkpoint", "load_tokens",
    "lr_at", "make_config", "new_state", "next_batch", "prepare", "read_config_file",
    "resume_config", "train", "train_step", "world_from_env",
]
