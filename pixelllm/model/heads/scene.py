"""Scene captioner: whole-image captions written from the detected objects, each word pointing at one.

Not in the official design (``PixelLLMConfig.scene_captioner``). On the shapes world the model
names an object's color and shape when a prompt gives it the object's box (region captions), but
from the whole image's 16 tokens its traced captions named objects that are not in the scene, and
their words pointed into the object they name 7 % of the time (docs/model_card.md). The scene
captioner gives whole-image captions what region captions have, once per object:

- **objects**: the proposal head's ``objects`` best boxes of the image, however low their score
  (padded with all-zero tokens where it has fewer), each read by the box pixel encoder into its 4
  tokens, plus a learned embedding of the box (canvas fractions), its detection score and its size
  (its longer side over the image's shorter side); the LM reads them after the prompt's own tokens;
- **its own LM**, a copy of the model's (initialized from it), so that learning to write from
  objects leaves every other task's LM as it was;
- **object-conditioned words**: the next word's logits read the hidden state plus a projection of
  the objects it attends to (their tokens side by side, weighted by a softmax match of the state
  against each object; the projection starts at zero), so that the words of one mention come from
  one object: with the LM's cross-attention alone, the captions mixed one object's color with
  another's shape;
- **words located on their object**: a word's box is the box of the object that best matches both
  the state that read the word (a second match, the reader's) and the attention that wrote it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pixelllm.config import SceneCaptionerConfig
from pixelllm.model.language import LanguageModel

NEG_INF = -1.0e9


class SceneCaptioner(nn.Module):
    """Object tokens, an LM and a word-to-object pointer for whole-image captions; see the module
    docstring."""

    def __init__(self, config: SceneCaptionerConfig, language: LanguageModel, lm_dim: int, tokens_per_object: int):
        super().__init__()
        self.config = config
        self.language = language
        self.placement = nn.Linear(6, lm_dim)
        object_dim = tokens_per_object * lm_dim  # an object's tokens side by side: the 2 x 2 map keeps its layout
        # two queries: the state that reads a word already writes the next one, often about another object
        self.reader = nn.Sequential(nn.LayerNorm(lm_dim, eps=1e-6), nn.Linear(lm_dim, config.hidden))
        self.key = nn.Sequential(nn.LayerNorm(object_dim, eps=1e-6), nn.Linear(object_dim, config.hidden))
        self.writer = nn.Sequential(nn.LayerNorm(lm_dim, eps=1e-6), nn.Linear(lm_dim, config.hidden))
        self.fuse = nn.Linear(object_dim, lm_dim)
        nn.init.zeros_(self.fuse.weight)
        nn.init.zeros_(self.fuse.bias)

    def object_tokens(self, pixel_tokens: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                      canvas_size: int, image_sides: torch.Tensor) -> torch.Tensor:
        """``pixel_tokens (N, K, T, D)``: the box pixel encoder's tokens of each object; ``boxes
        (N, K, 4)`` canvas pixels; ``scores (N, K)`` (0: padding); ``image_sides (N,)`` the shorter
        side of each prompt's image on the canvas -> object tokens ``(N, K, T, D)``, all zeros for
        padding. Besides the box and score, the placement reads the box's longer side over the
        image's shorter side (the crop the pixel tokens read is resampled, so they lose the size)."""
        longer = (boxes[..., 2:] - boxes[..., :2]).amax(-1) / image_sides[:, None]
        placement = torch.cat([boxes / canvas_size, scores[..., None], longer[..., None]], dim=-1)
        return (pixel_tokens + self.placement(placement)[:, :, None]) * (scores > 0)[:, :, None, None]

    def match_logits(self, query: nn.Module, hidden: torch.Tensor, objects: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        """How well each hidden state ``(N, ..., D)``, projected by ``query`` (``reader`` or
        ``writer``), matches each object of its prompt (``objects (N, K, T, D)``, ``valid (N, K)``
        bool) -> ``(N, ..., K)``; padding objects get ``NEG_INF``."""
        keys = self.key(objects.flatten(2))  # (N, K, H)
        queries = query(hidden.to(keys.dtype))
        flat = queries.reshape(len(queries), -1, queries.shape[-1])  # (N, M, H)
        logits = flat @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1])
        logits = logits.masked_fill(~valid[:, None], NEG_INF)
        return logits.view(*hidden.shape[:-1], keys.shape[1])

    def write(self, hidden: torch.Tensor, objects: torch.Tensor, valid: torch.Tensor):
        """The next word from hidden states ``(N, ..., D)``: its vocabulary logits ``(N, ..., V)``,
        read from the state plus the objects it attends to, and the attention's logits ``(N, ..., K)``."""
        attention = self.match_logits(self.writer, hidden, objects, valid)
        weights = attention.softmax(-1)
        flat = weights.reshape(len(weights), -1, weights.shape[-1])
        attended = self.fuse(flat @ objects.flatten(2)).view(*hidden.shape)
        return self.language.logits(hidden + attended), attention

    def location_logits(self, states: torch.Tensor, objects: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Object logits ``(N, ..., K)`` of the tokens that states ``(N, ..., D + K)`` (``ObjectConditionedLM``'s:
        each the LM's state that read a token, then the logits of the objects that token was written
        from) locate: the reader's match plus the writer's attention."""
        hidden, written = states.split([states.shape[-1] - objects.shape[1], objects.shape[1]], dim=-1)
        return self.match_logits(self.reader, hidden, objects, valid) + written

    def locate(self, states: torch.Tensor, objects: torch.Tensor, boxes: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
        """The boxes ``(N, ..., 4)`` of the tokens that ``states`` locate (see ``location_logits``):
        the best object's box (``boxes (N, K, 4)``)."""
        best = self.location_logits(states, objects, valid).argmax(-1)  # (N, ...)
        chosen = boxes.gather(1, best.reshape(len(best), -1, 1).expand(-1, -1, 4))
        return chosen.view(*best.shape, 4)


class ObjectConditionedLM:
    """The scene captioner's LM behind the LM adapter's calls (``__call__`` as ``forward``, ``start``,
    ``step``, ``select``, ``eos_token_id``), writing with the captioner's ``write``. It finds each
    row's objects in its visual tokens: the last ``K x T`` of them (all-zero tokens: padding).

    The states it returns, ``(..., D + K)``, are the LM's hidden state that read a token followed by
    the logits of the objects the token was written from (zeros where no token was read), which
    ``SceneCaptioner.locate`` reads: a word is located where the reader and the writer agree. One
    instance serves one decoding: it keeps the rows' objects and last attention between steps.
    """

    def __init__(self, captioner: SceneCaptioner, tokens_per_object: int):
        self.captioner, self.language = captioner, captioner.language
        self.eos_token_id = self.language.eos_token_id
        self.shape = (captioner.config.objects, tokens_per_object)
        self.objects = self.attention = None

    def _objects(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, t = self.shape
        objects = visual[:, -k * t:].reshape(len(visual), k, t, visual.shape[-1])
        return objects, objects.flatten(2).ne(0).any(-1)

    def __call__(self, visual, prompt_ids, prompt_mask, labels):
        """Teacher-forced pass: ``(states (N, L, D + K), logits (N, L, V))``, as ``LanguageModel.forward``."""
        hidden, _ = self.language(visual, prompt_ids, prompt_mask, labels)
        logits, attention = self.captioner.write(hidden, *self._objects(visual))
        written = torch.cat([torch.zeros_like(attention[:, :1]), attention[:, :-1]], dim=1)
        return torch.cat([hidden, written.to(hidden.dtype)], dim=-1), logits

    def start(self, visual, prompt_ids, prompt_mask):
        self.objects = self._objects(visual)
        hidden, _, state = self.language.start(visual, prompt_ids, prompt_mask)
        return self._written(hidden, torch.zeros_like(self.objects[1], dtype=hidden.dtype), state)

    def step(self, state, token_ids):
        hidden, _, state = self.language.step(state, token_ids)
        return self._written(hidden, self.attention, state)

    def _written(self, hidden, written, state):
        logits, self.attention = self.captioner.write(hidden, *self.objects)
        return torch.cat([hidden, written.to(hidden.dtype)], dim=-1), logits, state

    def select(self, state, index):
        self.objects = tuple(x[index] for x in self.objects)
        self.attention = self.attention[index]
        return self.language.select(state, index)


def pointer_targets(label_boxes: torch.Tensor, label_mask: torch.Tensor, boxes: torch.Tensor,
                    scores: torch.Tensor) -> torch.Tensor:
    """The object each located token should point at: ``(N, L)`` index into the ``K`` objects, or
    -100 (ignored) where the token has no location or no object's box holds the center of its
    target box (its trace). Where several do, the best detected (a part of an object that the
    detector also proposed, with a lower score, is not the object).

    Args:
        label_boxes: ``(N, L, 4)`` canvas pixels; label_mask: ``(N, L)`` bool.
        boxes: ``(N, K, 4)`` the objects' boxes; scores: ``(N, K)`` their detection scores (0: padding).
    """
    center = (label_boxes[..., :2] + label_boxes[..., 2:]) / 2  # (N, L, 2)
    inside = ((center[:, :, None] >= boxes[:, None, :, :2]) & (center[:, :, None] <= boxes[:, None, :, 2:])).all(-1)
    inside = inside & (scores > 0)[:, None] & label_mask[..., None]  # (N, L, K)
    target = scores[:, None].expand_as(inside).masked_fill(~inside, -1.0).argmax(-1)
    return target.masked_fill(~inside.any(-1), -100)


def pointer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits (N, L, K)`` toward ``targets (N, L)`` (-100 ignored); 0 if none counts."""
    if not bool((targets >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
