"""The scene captioner: whole-image captions written from the detected objects, each word pointing at one.

Not in the official design (the head ``scene``, after the proposal head; needs the extractor's box
pixels). On the shapes world the model
names an object's color and shape when a prompt gives it the object's box (region captions), but
from the whole image's 16 tokens its traced captions named objects that are not in the scene, and
their words pointed into the object they name 7 % of the time. The scene
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

In training it claims the whole-image captions (``prompt_scene``): its losses are its LM's
label-smoothed cross-entropy (``scene_text``) plus the cross-entropy of its object logits (the
reader's match plus the writer's attention) toward the best-detected object whose box holds the
center of each located token's target box (``scene_pointer``; tokens on no object are left out),
and the rest of the model sees those prompts with zero weight. In inference it answers whole-image
caption prompts (``language_inputs`` with ``scene``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixelllm.errors import ConfigError
from pixelllm.model.box_pixels import BOX_PIXEL_TOKENS
from pixelllm.model.decoding import NEG_INF, DecodeHook, LanguageInputs
from pixelllm.model.features import ImageFeatures, Prompts
from pixelllm.model.heads.base import BuildContext, Head, HeadLosses
from pixelllm.model.losses import smoothed_cross_entropy


@dataclass
class SceneConfig:
    objects: int = 8
    hidden: int = 128  # width of the matches between the LM's states and the objects
    text_weight: float = 1.0
    pointer_weight: float = 1.0


@dataclass
class SceneObjects:
    """The objects of ``N`` prompts: ``boxes (N, K, 4)`` canvas pixels, their detection ``scores
    (N, K)`` (0: padding), ``tokens (N, K, T, D)`` (all zeros for padding)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    tokens: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """``(N, K)`` bool: False for padding."""
        return self.scores > 0


class SceneCaptioner(Head):
    """Object tokens, an LM and a word-to-object pointer for whole-image captions; see the module
    docstring."""

    name = "scene"
    Config = SceneConfig
    loss_names = ("scene_text", "scene_pointer")
    requires = ("propose", "box_pixels")

    def __init__(self, config: SceneConfig, context: BuildContext):
        super().__init__(config, context)
        lm_dim, tokens_per_object = context.lm_dim, BOX_PIXEL_TOKENS
        self.language = copy.deepcopy(context.language)
        self.placement = nn.Linear(6, lm_dim)
        object_dim = tokens_per_object * lm_dim  # an object's tokens side by side: the 2 x 2 map keeps its layout
        # two queries: the state that reads a word already writes the next one, often about another object
        self.reader = nn.Sequential(nn.LayerNorm(lm_dim, eps=1e-6), nn.Linear(lm_dim, config.hidden))
        self.key = nn.Sequential(nn.LayerNorm(object_dim, eps=1e-6), nn.Linear(object_dim, config.hidden))
        self.writer = nn.Sequential(nn.LayerNorm(lm_dim, eps=1e-6), nn.Linear(lm_dim, config.hidden))
        self.fuse = nn.Linear(object_dim, lm_dim)
        nn.init.zeros_(self.fuse.weight)
        nn.init.zeros_(self.fuse.bias)

    @classmethod
    def check(cls, config: SceneConfig, model_config) -> None:
        if config.objects < 1 or config.hidden < 1:
            raise ConfigError(f"heads.scene needs objects >= 1 and hidden >= 1, got {config}")

    def start_from(self, model, missing: list[str]) -> None:
        """A new scene captioner's LM starts as a copy of the model's."""
        if any(name.startswith("language.") for name in missing):
            self.language.load_state_dict(model.language.state_dict())

    # -- what the captioner reads ------------------------------------------------------------------

    def objects(self, model, images: ImageFeatures, image_index: torch.Tensor) -> SceneObjects:
        """The objects of prompts on the images ``image_index (N,)``: the proposal head's best
        ``objects`` boxes of each image, however low their score (which the captioner reads; no
        gradient flows into the choice), read by the box pixel encoder once per image."""
        k, canvas = self.config.objects, model.config.image_size
        with torch.no_grad():
            found = model.capability("propose")(images, max_proposals=k, score_threshold=0.0)
        boxes = images.features.new_zeros(len(found), k, 4)  # (B, K, 4)
        scores = images.features.new_zeros(len(found), k)
        for i, (image_boxes, image_scores) in enumerate(found):
            boxes[i, : len(image_boxes)], scores[i, : len(image_scores)] = image_boxes, image_scores
        every_image = torch.arange(len(found), device=boxes.device)
        pixel_tokens = model.extractor.box_pixels(images.pixels, every_image.repeat_interleave(k),
                                                  boxes.reshape(-1, 4), canvas)
        tokens = self.object_tokens(pixel_tokens.view(len(found), k, *pixel_tokens.shape[1:]), boxes, scores,
                                    canvas, images.valid_size.amin(1))
        return SceneObjects(boxes[image_index], scores[image_index], tokens[image_index])

    def language_inputs(self, model, images: ImageFeatures, prompts: Prompts,
                        whole_image: bool) -> LanguageInputs | None:
        """Whole-image captions are this head's: its LM reads the prompts' visual tokens, then the
        objects' ``K x T`` tokens; each token's box is its object's."""
        return self._inputs(model, images, prompts)[0] if whole_image else None

    def _inputs(self, model, images: ImageFeatures, prompts: Prompts) -> tuple[LanguageInputs, SceneObjects]:
        objects = self.objects(model, images, prompts.image_index)
        visual = torch.cat([model.visual_tokens(images, prompts), objects.tokens.flatten(1, 2)], dim=1)
        language = ObjectConditionedLM(self, objects.tokens.shape[2])
        return LanguageInputs(language, visual, [_ObjectBoxes(self, objects)]), objects

    # -- training ------------------------------------------------------------------------------------

    def claims(self, batch: dict) -> torch.Tensor | None:
        return batch.get("prompt_scene")

    def claimed_losses(self, model, batch: dict, images: ImageFeatures, rows: torch.Tensor) -> HeadLosses:
        labels = batch["labels"][rows]
        prompts = Prompts(batch["prompt_image_index"][rows], batch["prompt_boxes"][rows],
                          batch["prompt_is_point"][rows])
        inputs, objects = self._inputs(model, images, prompts)
        hidden, logits = inputs.language(inputs.visual, batch["input_ids"][rows], batch["attention_mask"][rows],
                                         labels)
        pointer = self.location_logits(hidden[:, 1:], objects.tokens, objects.valid)
        located = batch["label_box_mask"][rows, :-1] & (batch["location_weight"][rows, None] > 0)
        targets = pointer_targets(batch["label_boxes"][rows, :-1], located, objects.boxes, objects.scores)
        terms = {"scene_text": smoothed_cross_entropy(logits, labels, batch["caption_weight"][rows],
                                                      model.config.label_smoothing),
                 "scene_pointer": pointer_loss(pointer, targets)}
        total = self.config.text_weight * terms["scene_text"] + self.config.pointer_weight * terms["scene_pointer"]
        return HeadLosses(total, terms)

    # -- the parts -----------------------------------------------------------------------------------

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


class _ObjectBoxes(DecodeHook):
    """Decoding's reader of the captioner's states: the box of each token's object."""

    name = "token_boxes"

    def __init__(self, captioner: SceneCaptioner, objects: SceneObjects):
        self.captioner, self.objects = captioner, objects

    def read(self, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        o = self.objects
        return self.captioner.locate(states, o.tokens[rows], o.boxes[rows], o.valid[rows])


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
