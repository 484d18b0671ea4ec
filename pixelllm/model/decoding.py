"""What a pass of a language model over ``N`` prompts needs from the model, and the heads' hooks into it.

``LanguageInputs`` gives the language model to run, the prompts' visual tokens and the hooks the
heads add. A ``DecodeHook`` may

- **read** the states: ``read(states, rows)`` is called on every state of every step (and once
  on the teacher-forced states), and what it returns is kept per step, under the hook's ``name``
  (the location head's boxes, or the states of chosen tokens themselves);
- **constrain** the next token: ``constrain(logits, history, rows)`` masks the vocabulary of each
  row given the tokens it wrote so far (typed slots: a box is four location tokens);
- **force runs**: ``ForcedRuns`` makes given tokens follow a trigger token one by one (a codebook
  group completed, queries inserted after a routing token);
- **spare tokens from the repeat rule** (``repeatable``), or turn the rule off (``block_repeats``).

Decoding (``pixelllm.generation``) knows no head: it runs whatever hooks it is given, batched and
with the LM's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NEG_INF = -1.0e9  # finite, so that arithmetic on "impossible" scores stays well defined


class DecodeHook:
    """A head's part in decoding; override what applies (every default does nothing).

    ``name``: the key of what ``read`` returns (empty: the hook reads nothing). ``repeatable``:
    token ids that the greedy rule against repeating the previous token spares. ``block_repeats``:
    False turns that rule off for the prompts decoded with this hook.
    """

    name: str = ""
    repeatable: tuple[int, ...] = ()
    block_repeats: bool = True

    def read(self, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """What to keep of ``states (M, ..., S)`` of the prompts ``rows (M,)``: ``(M, ..., *)``."""
        raise NotImplementedError

    def constrain(self, logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The next-token ``logits (M, V)`` of the prompts ``rows (M,)`` after writing ``history
        (M, t)``, with the tokens they may not take set to ``NEG_INF``."""
        return logits


class ForcedRuns(DecodeHook):
    """After a trigger token the tokens of its run follow, one per step, whatever the logits.

    ``runs``: trigger id -> the ids that follow it (never containing a trigger).
    """

    def __init__(self, runs: dict[int, list[int]]):
        self.runs = {trigger: list(run) for trigger, run in runs.items() if run}
        self.longest = max((len(run) for run in self.runs.values()), default=0)

    def constrain(self, logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        forced = torch.full((len(logits),), -1, dtype=torch.long, device=logits.device)
        for back in range(min(self.longest, history.shape[1]), 0, -1):  # the latest trigger wins
            past = history[:, -back]
            for trigger, run in self.runs.items():
                if back <= len(run):
                    forced = torch.where(past == trigger, run[back - 1], forced)
        if not bool((forced >= 0).any()):
            return logits
        only = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, forced.clamp(min=0)[:, None], True)
        return logits.masked_fill((forced >= 0)[:, None] & ~only, NEG_INF)


@dataclass
class LanguageInputs:
    """What a pass of a language model over ``N`` prompts needs: the ``language`` model (the LM
    adapter, or a head's own LM behind the same calls: ``forward``, ``start``, ``step``, ``select``,
    ``eos_token_id``), the prompts' ``visual`` tokens ``(N, T, D)``, and the heads' ``hooks``."""

    language: object
    visual: torch.Tensor
    hooks: list[DecodeHook] = field(default_factory=list)

    @property
    def readers(self) -> list[DecodeHook]:
        return [hook for hook in self.hooks if hook.name]

    @property
    def block_repeats(self) -> bool:
        return all(hook.block_repeats for hook in self.hooks)

    def repeatable(self, vocab: int, device) -> torch.Tensor:
        """``(V,)`` bool: the tokens the repeat rule spares."""
        spared = torch.zeros(vocab, dtype=torch.bool, device=device)
        ids = [i for hook in self.hooks for i in hook.repeatable]
        return spared.index_fill_(0, torch.tensor(ids, dtype=torch.long, device=device), True) if ids else spared

    def constrain(self, logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        for hook in self.hooks:
            logits = hook.constrain(logits, history, rows)
        return logits

    def read(self, states: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every reader's output of ``states (M, ..., S)`` of the prompts ``rows (M,)``."""
        return {hook.name: hook.read(states, rows) for hook in self.readers}
