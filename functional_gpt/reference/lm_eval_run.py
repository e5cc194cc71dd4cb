"""lm-eval's tasks on functional-gpt in one call (`fgpt eval --tasks`), and lm-eval's own
command line with the "fgpt" model and the local tasks registered (`fgpt lm_eval`).

The local tasks (lm_eval_tasks/) run offline; lm-eval's own tasks download their data
from the Hugging Face Hub, so here, with no network, a name that is not local is refused
in one line that lists the local ones.
"""

import sys
from pathlib import Path

from ..checks import describe
from ..errors import UserError

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("lm-eval is not installed: pip install 'functional-gpt[eval]'") from None
    from . import lm_eval_model  # registers "fgpt" with lm-eval

    return lm_eval_model


def task_manager(include_path=None, *, lm_eval_s_own: bool = False, metadata: dict | None = None):
    """lm-eval's TaskManager over the local tasks and those in `include_path` (and, with
    lm_eval_s_own, lm-eval's own: indexing those takes seconds). metadata: settings for the
    tasks' document builders (lm_eval_tasks/plays.py: plays, questions, ...)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)]
    if include_path is not None:
        path = Path(include_path)
        if not path.is_dir():
            raise UserError(f"--include_path {include_path}: no such directory of task YAML files")
        paths.append(str(path))
    return TaskManager(include_path=paths, include_defaults=lm_eval_s_own, metadata=metadata)


def check_tasks(names, manager, include_path=None) -> list[str]:
    """names: a comma-separated string or a list -> the task names, each one the local
    `manager` (task_manager(include_path)) knows; any other is a UserError listing those."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"--tasks: expected task names, got {describe(names)}")
    local = manager.all_tasks
    for name in names:
        if name not in local:
            everything = task_manager(include_path, lm_eval_s_own=True).all_tasks
            where = ("one of lm-eval's tasks, whose data is downloaded from the Hugging Face Hub, which is not "
                     "possible offline" if name in everything else "not a task lm-eval knows")
            raise UserError(f"--tasks: {name!r} is {where}; the tasks here are {', '.join(local)} (and any under "
                            f"--include_path DIR)")
    return list(names)


def evaluate_tasks(weights: str, tasks, *, adapter: str | None = None, include_path=None, limit: int | None = None,
                   num_fewshot: int | None = None, batch_size: int = 16, device: str | None = None,
                   log_samples: bool = False) -> dict:
    """lm-eval's `simple_evaluate` of `tasks` on the "fgpt" model of `weights` (+ `adapter`)
    -> its results dict ("results", "configs", "samples" with log_samples, ...)."""
    lm_eval_model = _lm_eval()
    from lm_eval import simple_evaluate

    manager = task_manager(include_path)
    names = check_tasks(tasks, manager, include_path)
    model = lm_eval_model.FunctionalGPTLM(weights, adapter=adapter, device=device, batch_size=batch_size)
    return simple_evaluate(model=model, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                           log_samples=log_samples, verbosity="ERROR")


def results_table(results: dict) -> str:
    """lm-eval's own Markdown table of the results."""
    from lm_eval.utils import make_table

    return make_table(results)


def lm_eval_main(argv: list[str]) -> int:
    """lm-eval's command line (`lm_eval ARGS`) with the "fgpt" model registered and the
    local tasks found beside lm-eval's own (and beside --include_path's)."""
    _lm_eval()
    import lm_eval.tasks
    from lm_eval.__main__ import cli_evaluate

    plain = lm_eval.tasks.TaskManager

    class WithLocalTasks(plain):
        def __init__(self, *args, include_path=None, **kwargs):
            given = [] if include_path is None else include_path if isinstance(include_path, list) else [include_path]
            super().__init__(*args, include_path=[str(TASKS_DIR), *given], **kwargs)

    lm_eval.tasks.TaskManager = WithLocalTasks  # lm-eval's run imports it from there when it runs
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        sys.argv, lm_eval.tasks.TaskManager = saved, plain
    return 0
