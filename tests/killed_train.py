"""``python -m pixelllm.train`` that kills itself with SIGKILL, for ``tests/test_resume.py``:

    python tests/killed_train.py step:N ARGS...   # as step N begins
    python tests/killed_train.py swap:N ARGS...   # between the two renames that swap in step N's checkpoint

(``swap``: the swap by two renames, as where the system cannot exchange two directories in one step.)
"""

import os
import signal
import sys
from pathlib import Path

from pixelllm import files, train


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_as_step_begins(step: int) -> None:
    learning_rate = train.learning_rate

    def dying(index, *args):  # called as each step begins, with its 0-based index
        if index + 1 == step:
            _die()
        return learning_rate(index, *args)

    train.learning_rate = dying


def _kill_inside_the_swap(step: int) -> None:
    save, replace, saving = train.save_training_checkpoint, os.replace, []

    def recorded(directory, model, optimizer, at, *args):
        saving[:] = [at]
        return save(directory, model, optimizer, at, *args)

    def dying(source, target):
        replace(source, target)
        if saving == [step] and Path(target).name == ".last.old":  # the old copy moved aside, the new not in
            _die()

    train.save_training_checkpoint, os.replace = recorded, dying
    files._exchange = lambda a, b: False


if __name__ == "__main__":
    kind, _, at = sys.argv.pop(1).partition(":")
    {"step": _kill_as_step_begins, "swap": _kill_inside_the_swap}[kind](int(at))
    sys.exit(train.main())
