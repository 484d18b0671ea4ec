"""PixelLLM: composes its parts, computes the losses, saves and loads checkpoints."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from pixelllm.config import CONFIG_NAME, PixelLLMConfig
from pixelllm.errors import CheckpointError, ConfigError
from pixelllm.model.box_pixels import box_crops
from pixelllm.model.extractor import PromptFeatureExtractor
from pixelllm.model.frozen import KeepsFrozenInEval
from pixelllm.model.heads import LocationHead, PointerLocationHead
from pixelllm.model.language import LanguageModel
from pixelllm.model.losses import cell_cross_entropy, location_l1, smoothed_cross_entropy
from pixelllm.model.mask_refiner import MaskRefiner
from pixelllm.model.masks import DICE_WEIGHT, FOCAL_WEIGHT, IOU_WEIGHT, MaskHead, mask_loss, upsample_masks
from pixelllm.model.prompt import PromptEncoder
from pixelllm.model.proposals import BOX_LOSS_WEIGHT, HEATMAP_LOSS_WEIGHT, ProposalHead, elementwise_box_iou
from pixelllm.model.reranker import ReferReranker
from pixelllm.model.scene import ObjectConditionedLM, SceneCaptioner, pointer_loss, pointer_targets
from pixelllm.model.vision import DualImageEncoder
from pixelllm.model.words import BoxWordHead, box_word_loss

WEIGHTS_NAME = "model.safetensors"


@dataclass
class ImageFeatures:
    """An encoded batch of images, reusable for any number of prompts.

    ``features (B, C, G, G)``: the concatenated SAM + semantic map. ``sam_embeddings (B, 256, g, g)``:
    SAM's own map, for the mask decoder. ``valid_size (B, 2)``: width and height of the resized
    image on the canvas, in pixels. ``pixels (B, 3, kS, kS)``: the canvas images themselves, for
    the extractor's ``box_pixels``.
    """

    features: torch.Tensor
    sam_embeddings: torch.Tensor
    valid_size: torch.Tensor
    pixels: torch.Tensor

    def select(self, index: torch.Tensor) -> ImageFeatures:
        return ImageFeatures(*(getattr(self, f.name)[index] for f in fields(self)))


@dataclass
class LanguageInputs:
    """What a pass of a language model over ``N`` prompts needs: the ``language`` model, the
    prompts' ``visual`` tokens ``(N, T, D)``, and ``locate(states (M, ..., S), rows (M,))``, which
    gives the canvas-pixel boxes ``(M, ..., 4)`` of the tokens read by ``states`` of the prompts
    ``rows``, the states as ``language`` returns them (the LM's hidden states, ``S = D``; the scene
    captioner's: ``S = D + K``, see ``ObjectConditionedLM``)."""

    language: LanguageModel | ObjectConditionedLM
    visual: torch.Tensor
    locate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SceneObjects:
    """The scene captioner's objects of ``N`` prompts: ``boxes (N, K, 4)`` canvas pixels, their
    detection ``scores (N, K)`` (0: padding), ``tokens (N, K, T, D)`` (all zeros for padding)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    tokens: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """``(N, K)`` bool: False for padding."""
        return self.scores > 0


@dataclass
class PixelLLMOutput:
    """Training outputs.

    ``loss``: the weighted total. ``losses``: each term before weighting. ``logits (N, L, V)``:
    ``logits[:, j]`` predicts ``labels[:, j]``. ``token_boxes (N, L - 1, 4)``: canvas-pixel box of
    ``labels[:, j]`` (the last label is EOS or padding and has none).
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    token_boxes: torch.Tensor | None = None


class PixelLLM(KeepsFrozenInEval):
    """The pixel-aligned language model.

    Receives its parts (see ``pixelllm.model.build`` for the builders):
    ``vision`` (dual image encoder), ``prompt_encoder``, ``extractor`` (prompt feature extractor),
    ``language`` (LM adapter), ``location_head``, ``mask_head`` (SAM decoder + adapter),
    ``proposal_head`` (dense captioning's detector), ``word_head`` (the box word head, or ``None``),
    ``pixel_word_head`` (a linear layer over the box pixel encoder's 2 x 2 map, or ``None``),
    ``mask_refiner``, ``refer_reranker`` and ``scene_captioner`` (or ``None``); and the tokenizer of
    the LM.
    """

    LOSS_NAMES = ("text", "location", "selection", "mask_focal", "mask_dice", "mask_iou", "detection_heatmap",
                  "detection_box", "words", "pixel_words", "rerank", "scene_text", "scene_pointer")

    def __init__(self, config: PixelLLMConfig, vision: DualImageEncoder, prompt_encoder: PromptEncoder,
                 extractor: PromptFeatureExtractor, language: LanguageModel,
                 location_head: LocationHead | PointerLocationHead,
                 mask_head: MaskHead, proposal_head: ProposalHead, word_head: BoxWordHead | None = None,
                 pixel_word_head: nn.Linear | None = None, mask_refiner: MaskRefiner | None = None,
                 refer_reranker: ReferReranker | None = None, scene_captioner: SceneCaptioner | None = None,
                 tokenizer=None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.prompt_encoder = prompt_encoder
        self.extractor = extractor
        self.language = language
        self.location_head = location_head
        self.mask_head = mask_head
        self.proposal_head = proposal_head
        self.word_head = word_head
        self.pixel_word_head = pixel_word_head
        self.mask_refiner = mask_refiner
        self.refer_reranker = refer_reranker
        self.scene_captioner = scene_captioner
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.extractor.output_tokens.device

    # ------------------------------------------------------------------------------------------
    # Forward pieces, usable one at a time (encode an image once, prompt it many times)

    def encode_images(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> ImageFeatures:
        """``(B, 3, S, S)`` canvas images in [0, 1] and ``(B, S, S)`` masks -> ``ImageFeatures``."""
        features, sam_embeddings = self.vision(pixel_values, pixel_mask)
        valid_size = torch.stack([pixel_mask.any(1).sum(-1), pixel_mask.any(2).sum(-1)], dim=-1)
        return ImageFeatures(features, sam_embeddings, valid_size.to(features.dtype), pixel_values)

    def visual_tokens(self, images: ImageFeatures, image_index: torch.Tensor, boxes: torch.Tensor,
                      is_point: torch.Tensor) -> torch.Tensor:
        """Visual tokens of ``N`` location prompts: ``(N, num_tokens, D_lm)``.

        Args:
            images: encoded images. image_index: ``(N,)`` image of each prompt.
            boxes: ``(N, 4)`` canvas pixels (a point prompt uses ``boxes[:, :2]``). is_point: ``(N,)``.

        Prompts that repeat (every referring expression of an image has the whole-image box) are
        extracted once.
        """
        key = torch.cat([image_index[:, None].to(boxes.dtype), boxes, is_point[:, None].to(boxes.dtype)], dim=1)
        unique, inverse = torch.unique(key, dim=0, return_inverse=True)
        first = torch.zeros(len(unique), dtype=torch.long, device=key.device).scatter_(
            0, inverse, torch.arange(len(key), device=key.device))
        return self._extract(images, image_index[first], boxes[first], is_point[first])[inverse]

    def _extract(self, images: ImageFeatures, image_index: torch.Tensor, boxes: torch.Tensor,
                 is_point: torch.Tensor) -> torch.Tensor:
        grid, spans = images.features.shape[-1], _points_as_boxes(boxes, is_point)
        return self.extractor(
            images.features, image_index, self.prompt_encoder(boxes, is_point),
            self.prompt_encoder.no_mask_embedding(grid), self.prompt_encoder.dense_positional_encoding(grid),
            spans, self.config.image_size, images.pixels, _covers_image(spans, images.valid_size[image_index]),
        )

    def location_cells(self, images: ImageFeatures):
        """What the location head reads from each image (``None`` for the MLP head): compute it
        once and pass it to ``token_boxes`` when locating many times (every decoding step)."""
        return self.location_head.cells(images.features)

    def token_boxes(self, hidden: torch.Tensor, images: ImageFeatures, image_index: torch.Tensor,
                    cells=None) -> torch.Tensor:
        """Boxes ``(N, ..., 4)`` in canvas pixels from hidden states ``(N, ..., D)`` of prompts on
        images ``image_index (N,)``; ``cells``: ``location_cells(images)`` if already computed."""
        return self._locate(hidden, images, image_index, cells)[0]

    def _locate(self, hidden, images, image_index, cells=None):
        cells = self.location_cells(images) if cells is None else cells
        return self.location_head.locate(hidden, cells, image_index, images.valid_size[image_index])

    def refer_boxes(self, hidden: torch.Tensor, images: ImageFeatures, image_index: torch.Tensor) -> torch.Tensor:
        """The box ``(N, 4)`` (canvas pixels) of ``N`` referring expressions from the hidden state
        ``(N, D)`` at each one's last word: the location head's, or with ``refer_reranker`` the best
        scored of its candidates."""
        if self.refer_reranker is None:
            return self.token_boxes(hidden, images, image_index)
        boxes, scores = self._rerank(hidden, images, image_index)
        return boxes[torch.arange(len(boxes), device=boxes.device), scores.argmax(1)]

    def _rerank(self, hidden: torch.Tensor, images: ImageFeatures, image_index: torch.Tensor, cells=None):
        """The pointer's candidate boxes ``(N, k, 4)`` (canvas pixels) and the re-ranker's scores
        ``(N, k)``; ``cells``: ``location_cells(images)`` if already computed."""
        k = self.config.refer_reranker.candidates
        cells = self.location_cells(images) if cells is None else cells
        boxes, pointer_logits = self.location_head.candidates(
            hidden, cells, image_index, images.valid_size[image_index], k)
        boxes = boxes.detach()  # the re-ranker chooses among the boxes; it does not move them
        crops = box_crops(images.pixels, image_index.repeat_interleave(k), boxes.reshape(-1, 4),
                          self.config.image_size, self.extractor.box_pixels.resolution)
        pixel_maps = self.extractor.box_pixels.features(crops).flatten(1).view(len(boxes), k, -1)
        return boxes, self.refer_reranker(hidden, pixel_maps, pointer_logits)

    def mask_logits(self, images: ImageFeatures, image_index: torch.Tensor, boxes: torch.Tensor,
                    visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        """Canvas-size mask logits ``(N, S, S)`` (refined by ``mask_refiner`` if the model has one)
        and predicted IoU ``(N,)`` for ``N`` boxes.

        Args:
            boxes: ``(N, 4)`` canvas pixels (the box predicted at the expression's last word).
            visual: ``(N, V, D)`` the prompts' visual tokens. text: ``(N, L, D)`` the LM's hidden
            states whose inputs are the expression's tokens; text_mask: ``(N, L)`` bool.
        """
        low_res, iou = self.mask_head(self.prompt_encoder, images.sam_embeddings[image_index], boxes, visual,
                                      text, text_mask)
        logits = upsample_masks(low_res, self.config.image_size)
        if self.mask_refiner is not None:
            logits = self.mask_refiner(images.pixels, image_index, boxes, logits)
        return logits, iou

    def propose(self, images: ImageFeatures, max_proposals: int | None = None,
                score_threshold: float | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Class-agnostic proposals per image: ``(boxes (K, 4) canvas pixels, scores (K,))``, best
        first; ``max_proposals`` and ``score_threshold`` override the proposal head's config."""
        outputs = self.proposal_head(images.features)
        return self.proposal_head.proposals(outputs, images.valid_size, max_proposals=max_proposals,
                                            score_threshold=score_threshold)

    def language_inputs(self, images: ImageFeatures, image_index: torch.Tensor, boxes: torch.Tensor,
                        is_point: torch.Tensor, scene: bool = False) -> LanguageInputs:
        """What the LM needs to read or write the text of ``N`` prompts (``image_index``, ``boxes``
        and ``is_point`` as ``visual_tokens``). ``scene``: the prompts caption their whole image
        (traced captions); with a ``scene_captioner`` they go to it."""
        if scene and self.scene_captioner is not None:
            return self._scene_inputs(images, image_index, boxes, is_point)[0]
        visual = self.visual_tokens(images, image_index, boxes, is_point)
        cells = []  # computed on the first call, then reused at every decoding step

        def locate_on_cells(hidden, rows):
            if not cells:
                cells.append(self.location_cells(images))
            return self.token_boxes(hidden, images, image_index[rows], cells[0])

        return LanguageInputs(self.language, visual, locate_on_cells)

    def _scene_inputs(self, images: ImageFeatures, image_index: torch.Tensor, boxes: torch.Tensor,
                      is_point: torch.Tensor) -> tuple[LanguageInputs, SceneObjects]:
        """``language_inputs`` of the scene captioner, and the objects its LM reads after the prompt's tokens."""
        objects = self.scene_objects(images, image_index)
        visual = torch.cat([self.visual_tokens(images, image_index, boxes, is_point), objects.tokens.flatten(1, 2)],
                           dim=1)

        def locate_on_objects(hidden, rows):
            return self.scene_captioner.locate(hidden, objects.tokens[rows], objects.boxes[rows], objects.valid[rows])

        language = ObjectConditionedLM(self.scene_captioner, objects.tokens.shape[2])
        return LanguageInputs(language, visual, locate_on_objects), objects

    def scene_objects(self, images: ImageFeatures, image_index: torch.Tensor) -> SceneObjects:
        """The scene captioner's objects for prompts on images ``image_index (N,)``: the proposal
        head's best ``scene_captioner.objects`` boxes of each image, however low their score (which
        the captioner reads; no gradient flows into the choice), read by the box pixel encoder."""
        k, canvas = self.scene_captioner.config.objects, self.config.image_size
        with torch.no_grad():
            found = self.propose(images, max_proposals=k, score_threshold=0.0)
        boxes = images.features.new_zeros(len(found), k, 4)  # (B, K, 4): each image's objects, read once
        scores = images.features.new_zeros(len(found), k)
        for i, (image_boxes, image_scores) in enumerate(found):
            boxes[i, : len(image_boxes)], scores[i, : len(image_scores)] = image_boxes, image_scores
        every_image = torch.arange(len(found), device=boxes.device)
        pixel_tokens = self.extractor.box_pixels(images.pixels, every_image.repeat_interleave(k), boxes.reshape(-1, 4),
                                                 canvas)
        tokens = self.scene_captioner.object_tokens(pixel_tokens.view(len(found), k, *pixel_tokens.shape[1:]),
                                                    boxes, scores, canvas, images.valid_size.amin(1))
        return SceneObjects(boxes[image_index], scores[image_index], tokens[image_index])

    # ------------------------------------------------------------------------------------------
    # Training

    def forward(self, batch: dict, all_heads: bool = False) -> PixelLLMOutput:
        """Losses of a collated batch (keys as in ``docs/architecture.md``, "The batch contract").

        ``all_heads``: run the mask and proposal heads (and a scene captioner) even when the batch
        has no target for them (with zero weight), so that every parameter takes part in every
        step, as FSDP requires.
        With a ``scene_captioner``, the whole-image captions (``prompt_scene``) train it, and the rest
        of the model sees them with zero weight (or not at all when the batch has nothing else).
        """
        images = self.encode_images(batch["pixel_values"], batch["pixel_mask"])
        scene = batch.get("prompt_scene") if self.scene_captioner is not None else None
        if scene is None or not bool(scene.any()):
            out = self._losses(batch, images, all_heads)
            if all_heads and self.scene_captioner is not None:  # it takes part too, with zero weight
                unused = self._scene_losses(batch, images, torch.zeros(1, dtype=torch.long, device=self.device))
                out.loss = out.loss + 0.0 * sum(unused.values())
            return out
        losses = self._scene_losses(batch, images, scene.nonzero()[:, 0])
        loss = losses["scene_text"] + losses["scene_pointer"]
        if bool(scene.all()) and not all_heads:
            return PixelLLMOutput(loss=loss, losses=losses)
        rest = {**batch, **{key: batch[key] * ~scene for key in ("caption_weight", "location_weight")}}
        out = self._losses(rest, images, all_heads)
        return PixelLLMOutput(out.loss + loss, {**out.losses, **losses}, out.logits, out.token_boxes)

    def _scene_losses(self, batch: dict, images: ImageFeatures, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The scene captioner's losses on the prompts ``rows``: its LM's text loss and the
        cross-entropy of its tokens' object logits toward the object that holds each located token's target."""
        index, labels = batch["prompt_image_index"][rows], batch["labels"][rows]
        inputs, objects = self._scene_inputs(images, index, batch["prompt_boxes"][rows], batch["prompt_is_point"][rows])
        hidden, logits = inputs.language(inputs.visual, batch["input_ids"][rows], batch["attention_mask"][rows],
                                         labels)
        pointer = self.scene_captioner.location_logits(hidden[:, 1:], objects.tokens, objects.valid)
        located = batch["label_box_mask"][rows, :-1] & (batch["location_weight"][rows, None] > 0)
        targets = pointer_targets(batch["label_boxes"][rows, :-1], located, objects.boxes, objects.scores)
        return {"scene_text": smoothed_cross_entropy(logits, labels, batch["caption_weight"][rows],
                                                     self.config.label_smoothing),
                "scene_pointer": pointer_loss(pointer, targets)}

    def _losses(self, batch: dict, images: ImageFeatures, all_heads: bool) -> PixelLLMOutput:
        """``forward``'s losses of every part but the scene captioner."""
        index = batch["prompt_image_index"]
        visual = self.visual_tokens(images, index, batch["prompt_boxes"], batch["prompt_is_point"])
        labels = batch["labels"]
        hidden, logits = self.language(visual, batch["input_ids"], batch["attention_mask"], labels)
        # The state whose input is labels[:, j] (position j + 1) locates labels[:, j].
        cells = self.location_cells(images)
        token_boxes, cell_logits = self._locate(hidden[:, 1:], images, index, cells)
        located = (batch["label_boxes"][:, :-1], batch["label_box_mask"][:, :-1], batch["location_weight"])
        per_prompt = self.config.location_average == "prompt"
        losses = {
            "text": smoothed_cross_entropy(logits, labels, batch["caption_weight"], self.config.label_smoothing),
            "location": location_l1(token_boxes, *located, per_prompt=per_prompt),
        }
        loss = losses["text"] + self.config.location_loss_weight * losses["location"]
        if cell_logits is not None:
            losses["selection"] = cell_cross_entropy(cell_logits, *located, self.config.image_size, per_prompt)
            loss = loss + self.config.location_head.selection_weight * losses["selection"]
        if self.word_head is not None or self.pixel_word_head is not None:
            losses.update(self._word_losses(batch, images))
            loss = loss + self.config.word_loss_weight * losses.get("words", 0.0) \
                + self.config.box_pixel_word_loss_weight * losses.get("pixel_words", 0.0)
        if self.refer_reranker is not None:
            losses["rerank"] = self._rerank_loss(batch, images, hidden, cells)
            loss = loss + losses["rerank"]
        has_masks = "gt_masks" in batch and bool((batch["mask_weight"] > 0).any())
        if has_masks or all_heads:
            terms = self._mask_losses(batch, images, visual, hidden, token_boxes)
            loss = loss + FOCAL_WEIGHT * terms["mask_focal"] + DICE_WEIGHT * terms["mask_dice"] \
                + IOU_WEIGHT * terms["mask_iou"]
            losses.update(terms if has_masks else {})
        has_boxes = "gt_boxes" in batch and bool((batch["detection_weight"] > 0).any())
        if has_boxes or all_heads:
            outputs = self.proposal_head(images.features)
            b = images.features.shape[0]
            gt = (batch["gt_boxes"], batch["gt_boxes_mask"], batch["detection_weight"]) if has_boxes else (
                images.features.new_zeros(b, 1, 4), torch.zeros(b, 1, dtype=torch.bool, device=self.device),
                images.features.new_zeros(b))
            detection = self.proposal_head.loss(outputs, *gt)
            loss = loss + HEATMAP_LOSS_WEIGHT * detection["heatmap"] + BOX_LOSS_WEIGHT * detection["box"]
            losses.update({f"detection_{name}": value for name, value in detection.items()} if has_boxes else {})
        return PixelLLMOutput(loss=loss, losses=losses, logits=logits, token_boxes=token_boxes)

    def _word_losses(self, batch: dict, images: ImageFeatures) -> dict[str, torch.Tensor]:
        """The word heads' losses on the captions of a box: prompts with a text target and no
        location target (region and dense captions). ``words``: the box word head on the semantic
        tower's channels only (SAM's feed the mask decoder; trained on every prompt and all
        channels, it cost masks more, docs/model_card.md, stop 16). ``pixel_words``: the pixel word
        head on the box pixel encoder's map of each box."""
        gate = batch["caption_weight"] * (batch["location_weight"] == 0)
        rows = (gate > 0).nonzero()[:, 0]  # pool only the prompts the loss counts
        boxes = _points_as_boxes(batch["prompt_boxes"][rows], batch["prompt_is_point"][rows])
        index, size = batch["prompt_image_index"][rows], self.config.image_size
        words = partial(box_word_loss, labels=batch["labels"][rows], weight=gate[rows],
                        eos_token_id=self.language.eos_token_id)
        losses = {}
        if self.word_head is not None:
            semantic = images.features[:, self.vision.sam_channels:]
            losses["words"] = words(self.word_head(semantic, index, boxes, size))
        if self.pixel_word_head is not None:
            crops = box_crops(images.pixels, index, boxes, size, self.extractor.box_pixels.resolution)
            losses["pixel_words"] = words(self.box_pixel_word_logits(crops))
        return losses

    def _rerank_loss(self, batch: dict, images: ImageFeatures, hidden: torch.Tensor, cells) -> torch.Tensor:
        """Cross-entropy of the re-ranker's scores over the candidates of the prompts located at
        one token (referring expressions), toward the candidate that overlaps the target box most;
        prompts none of whose candidates reaches IoU 0.5 are left out (0 if none is left)."""
        located = batch["label_box_mask"][:, :-1]
        rows = ((located.sum(1) == 1) & (batch["location_weight"] > 0)).nonzero()[:, 0]
        if len(rows) == 0:
            return hidden.new_zeros(())
        token = located[rows].float().argmax(1)  # the located label; the state whose input it is: 1 + token
        boxes, scores = self._rerank(hidden[rows, 1 + token], images, batch["prompt_image_index"][rows], cells)
        overlap = elementwise_box_iou(boxes, batch["label_boxes"][rows, token][:, None])  # (n, k)
        reachable = overlap.max(1).values >= 0.5
        if not bool(reachable.any()):
            return scores.sum() * 0.0
        return F.cross_entropy(scores[reachable].float(), overlap[reachable].argmax(1))

    def box_pixel_word_logits(self, crops: torch.Tensor) -> torch.Tensor:
        """The pixel word head on the box pixel encoder's 2 x 2 map of ``box_crops``' output
        ``(N, 3, R, R)``, flattened (the cells the LM reads as 4 tokens; pooled over them, the
        shapes were learned far slower) -> ``(N, V)``."""
        return self.pixel_word_head(self.extractor.box_pixels.features(crops).flatten(1))

    def _mask_losses(self, batch, images, visual, hidden, token_boxes) -> dict[str, torch.Tensor]:
        """The mask loss of the prompts that have a mask target, prompted with the box at the last
        word of the teacher-forced expression: predicted (the official code) or the target's.
        Without any mask target, one prompt passes with zero weight (for ``all_heads``)."""
        weight = batch.get("mask_weight", torch.zeros(len(batch["labels"]), device=self.device))
        rows = (weight > 0).nonzero()[:, 0]
        if len(rows) == 0:
            rows = rows.new_zeros(1)
        labels = batch["labels"][rows]
        last_word = (labels >= 0).sum(1) - 2  # the token just before EOS
        if self.config.mask_prompt_box == "target":
            boxes = batch["label_boxes"][rows, last_word]
        else:
            boxes = token_boxes[rows, last_word].detach()
        inputs = labels[:, :-1]
        text_mask = (inputs >= 0) & (inputs != self.language.eos_token_id)
        logits, iou = self.mask_logits(images, batch["prompt_image_index"][rows], boxes, visual[rows],
                                       hidden[rows, 1:], text_mask)
        valid = batch["pixel_mask"][batch["prompt_image_index"][rows]]
        targets = batch["gt_masks"][rows] if "gt_masks" in batch else torch.zeros_like(valid)
        terms = mask_loss(logits, iou, targets, valid, weight[rows])
        return {f"mask_{name}": value for name, value in terms.items()}

    # ------------------------------------------------------------------------------------------
    # Parameters and checkpoints

    def train_only(self, parts: list[str]) -> None:
        """Train only the named parts (``mask_refiner``, ``mask_head``, ...: attributes of this
        model): the weights of every other part stop taking gradients, and its modules stay in eval
        mode (no dropout), so that a new part can learn on top of a trained model."""
        names = [name for name, _ in self.named_children()]
        unknown = sorted(set(parts) - set(names))
        if unknown:
            raise ConfigError(
                f"train_only names no part of the model: {', '.join(unknown)} (parts: {', '.join(names)})"
            )
        self.frozen = tuple(name for name in names if name not in parts)
        for name in self.frozen:
            getattr(self, name).requires_grad_(False)
        self.train(self.training)

    def num_parameters(self, trainable: bool | None = None) -> int:
        """Count parameters: all (``None``), only trainable (``True``) or only frozen (``False``)."""
        return sum(p.numel() for p in self.parameters() if trainable is None or p.requires_grad == trainable)

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer files; each file atomically.

        ``state_dict``: the weights to write instead of this module's own (a sharded model's,
        gathered to one process).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as tmp:
            if state_dict is None:
                save_model(self, os.path.join(tmp, WEIGHTS_NAME))
            else:
                tied = self._tied_names()
                weights = {k: v.contiguous() for k, v in state_dict.items() if k not in tied}
                save_file(weights, os.path.join(tmp, WEIGHTS_NAME))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            self.config.save(tmp)
            for name in sorted(os.listdir(tmp), key=lambda n: n == CONFIG_NAME):  # config last
                os.replace(os.path.join(tmp, name), directory / name)
        return directory

    def _tied_names(self) -> set[str]:
        """Names of tensors that share storage with an earlier one (tied embeddings): a checkpoint
        holds each shared tensor once, as ``safetensors.torch.save_model`` writes it."""
        seen, tied = set(), set()
        for name, parameter in self.named_parameters(remove_duplicate=False):
            (tied.add(name) if id(parameter) in seen else seen.add(id(parameter)))
        return tied

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None,
                        config: PixelLLMConfig | None = None) -> PixelLLM:
        """Load a directory written by ``save_pretrained`` (safetensors only: no pickle).

        ``config``: build this config instead of the checkpoint's own (for example its own with a
        new part): the parts the checkpoint has no weights for keep their fresh initialization (a new
        scene captioner's LM starts as a copy of the model's), while weights the config has no place
        for are an error.
        """
        from pixelllm.model.build import build_model

        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} does not exist")
        weights = directory / WEIGHTS_NAME
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint directory {directory} lacks {', '.join(missing)}")
        model = build_model(config or PixelLLMConfig.load(directory), tokenizer=_load_tokenizer(directory))
        try:
            missing, unexpected = load_model(model, weights, strict=config is None)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()
            against = "the given config" if config is not None else "its config.json"
            raise CheckpointError(f"{weights} does not match {against}: {first[0] if first else exc}") from None
        if unexpected:
            raise CheckpointError(f"{weights} does not match the given config: it has no place for "
                                  f"{len(unexpected)} weights, such as {sorted(unexpected)[0]}")
        if any(name.startswith("scene_captioner.language.") for name in missing):
            model.scene_captioner.language.load_state_dict(model.language.state_dict())  # a new one starts as a copy
        if device is not None:
            model.to(device)
        return model.eval()


def _points_as_boxes(boxes: torch.Tensor, is_point: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` prompt boxes with each point prompt ``(x0, y0)`` as the empty box ``(x0, y0, x0, y0)``."""
    return torch.where(is_point[:, None], boxes[:, :2].repeat(1, 2), boxes)


def _covers_image(boxes: torch.Tensor, valid_size: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: the boxes ``(N, 4)`` (canvas pixels) that span their image's whole resized
    area ``valid_size (N, 2)`` (width, height), within a pixel: the prompt of traced captions and
    referring expressions."""
    return (boxes[:, :2] <= 1).all(1) & (boxes[:, 2:] >= valid_size - 1).all(1)


def _load_tokenizer(directory: Path):
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
