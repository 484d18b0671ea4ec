"""The user-facing tasks on an image encoded once: caption (with a trace), locate, segment, dense captions.

    predictor = pixelllm.load()                  # the embedded default, or load(path)
    image = predictor.encode("photo.jpg")        # features computed once
    image.caption()                              # Caption(text, words); each word has a box and point
    image.caption(box=[x0, y0, x1, y1])          # a caption of that region
    image.locate("the red circle")               # [x0, y0, x1, y1]
    image.find("the red circle")                 # Location(box, score, found): is it there at all?
    image.segment("the red circle")              # Segmentation(box, mask, score, found)
    image.dense_caption()                        # [Region(box, score, caption)], scores from 0.4
    image.detect(["circle", "red star"])         # [Detection(label, box, score, mask)]: models whose
                                                 # answers are written in location tokens
    encoded = predictor.encode_batch(paths)      # many images in one pass, then all their prompts
    predictor.locate_batch(encoded, texts)       # in one pass (texts[i] on encoded[i]); likewise
                                                 # find_batch, caption_batch, caption_regions_batch,
                                                 # segment_batch, dense_caption_batch, token_boxes

Every coordinate in and out is in pixels of the original image. Decoding follows the official
settings: captions beam 4 with length penalty 0.6; region and dense captions greedy, at most 40
tokens. A referring expression is not decoded: as the official inference does for RefCOCO, the
model reads the expression itself (teacher-forced under the "where is ..." prompt) and its box is
the one at the expression's last word. A model with a head that writes boxes as tokens (the
capabilities ``locate`` and ``detect``) decodes them instead: greedy, the head's grammar as decoding
hooks, and the head reads the boxes back from the tokens.

A referring expression always gets a box, whether or not the image holds what it names; its score
(``find_batch``) tells the two apart; ``pixelllm.thresholds`` holds the thresholds measured on the
shapes world's held-out split.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pixelllm.data.images import load_image
from pixelllm.data.transforms import CanvasTransform, prepare_image
from pixelllm.data.words import words_from_ids
from pixelllm.errors import InputError
from pixelllm.generation import GenerationOutput, generate, teacher_forced_reads, teacher_forced_states
from pixelllm.model import ImageFeatures, PixelLLM, Prompts
from pixelllm.model.boxes import box_area
from pixelllm.results import Caption, Detection, Location, Region, Segment, Segmentation
from pixelllm.thresholds import DENSECAP_MIN_SCORE, LOCATE_MIN_SCORE
from pixelllm.tokenization import encode_prompt

CAPTION_DECODING = {"num_beams": 4, "length_penalty": 0.6}
TOKEN_BOXES = "token_boxes"  # what a head reads from each state: the box of the token it read
REGION_DECODING = {"num_beams": 1, "max_new_tokens": 40}
DUPLICATE_SHARE = 0.5
"""A dense region repeats a better one with its caption when this share of the smaller box lies in the other."""
EDGE_TOLERANCE = 1.0
"""Pixels: a prompt box or point this far past the image's edge is clipped to it; farther is an error."""


@dataclass
class _Prompt:
    """One decoding request on the canvas: a location prompt (box or point) and a text prompt."""

    box: np.ndarray  # (4,) canvas pixels
    is_point: bool
    text: str
    whole_image: bool = False  # a caption of the whole image (a head may answer it: ``PixelLLM.language_inputs``)


@dataclass
class _ReadExpressions:
    """``N`` referring expressions read in one teacher-forced pass, with what their masks need.

    ``features``/``index``: the images and each expression's image ``(N,)``; ``visual``: the
    prompts' visual tokens ``(N, T, D)``; ``hidden``: the states whose inputs are the expression's
    tokens ``(N, L, D)`` and ``text_mask`` ``(N, L)``; ``canvas_boxes``: the box at each last word
    ``(N, 4)`` canvas pixels; ``boxes``: the same in original pixels, clipped to the image;
    ``sequences``: each expression's token ids.
    """

    images: list[EncodedImage]
    expressions: list[str]
    sequences: list[list[int]]
    features: ImageFeatures
    index: torch.Tensor
    visual: torch.Tensor
    hidden: torch.Tensor
    text_mask: torch.Tensor
    canvas_boxes: torch.Tensor
    boxes: list[list[float]]


class Predictor:
    """A PixelLLM with its pre- and post-processing: images in, results in original pixels out."""

    def __init__(self, model: PixelLLM, device: str | torch.device | None = None, embedded: bool = False):
        """``embedded``: the model is the embedded default, which knows only the shapes world."""
        if model.tokenizer is None:
            raise InputError("this checkpoint has no tokenizer files; the tasks need one")
        self.embedded = embedded
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.tokenizer = model.tokenizer
        self.prompts = model.config.prompts

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def encode(self, image) -> EncodedImage:
        """Encode one image (a path, PIL image or ``H x W x 3`` uint8 array) for any number of prompts."""
        return self.encode_batch([image])[0]

    @torch.no_grad()
    def encode_batch(self, images) -> list[EncodedImage]:
        """Encode many images in one pass of the image encoders."""
        loaded = [load_image(image) for image in images]
        if not loaded:
            return []
        config = self.model.config
        prepared = [prepare_image(image, config.image_size, pixel_scale=config.pixel_scale) for image in loaded]
        pixel_values = torch.stack([p[0] for p in prepared]).to(self.device)
        pixel_mask = torch.stack([p[1] for p in prepared]).to(self.device)
        features = self.model.encode_images(pixel_values, pixel_mask)
        return [EncodedImage(self, features.select(torch.tensor([i], device=self.device)), p[2])
                for i, p in enumerate(prepared)]

    def caption_batch(self, images, **decoding) -> list[Caption]:
        """Traced captions of many images (or ``EncodedImage`` objects), decoded together."""
        encoded = self._encoded(images)
        requests = [(e, e._trace_prompt()) for e in encoded]
        out = self._generate(requests, **{**CAPTION_DECODING, **decoding})
        return [e._caption(out, i) for i, e in enumerate(encoded)]

    def caption_regions_batch(self, encoded: list[EncodedImage], boxes, **decoding) -> list[list[Caption]]:
        """Captions of the regions ``boxes[i]`` (original pixels) of every ``encoded[i]``, decoded in
        one batch."""
        requests = [(e, e._region_prompt(box)) for e, image_boxes in zip(encoded, boxes, strict=True)
                    for box in image_boxes]
        out = self._generate(requests, **{**REGION_DECODING, **decoding})
        captions = [e._caption(out, row) for row, (e, _) in enumerate(requests)]
        return _per_image(captions, [len(b) for b in boxes])

    def locate_batch(self, encoded: list[EncodedImage], expressions) -> list[list[list[float]]]:
        """The box of every expression ``expressions[i][j]`` on ``encoded[i]``, all read in one pass
        (or, with a head that writes boxes as tokens, all decoded in one batch)."""
        if self.model.has_capability("locate"):
            pairs = [(e, _check_text(text, "expression")) for e, texts in zip(encoded, expressions, strict=True)
                     for text in texts]
            written = self._answer([e for e, _ in pairs], self.model.capability("locate")([t for _, t in pairs]))
            boxes = [found[0][1] if found else _clip_box(e.transform.boxes_to_original(e.transform.valid_box),
                                                         e.image_size)
                     for (e, _), found in zip(pairs, written, strict=True)]
            return _per_image(boxes, [len(x) for x in expressions])
        read = self._read_expressions(encoded, expressions)
        return _per_image(read.boxes if read else [], [len(x) for x in expressions])

    def detect_batch(self, encoded: list[EncodedImage], labels) -> list[list[Detection]]:
        """The objects of the classes ``labels[i]`` (names) on ``encoded[i]``, decoded in one batch
        (the capability ``detect``); each detection's score is its answer's (the geometric mean of
        its tokens' probabilities)."""
        labels = [[_check_text(label, "label") for label in names] for names in labels]
        self._require("detect", "detect", "visionllm-v1 and visionllm-v2")
        written = self._answer(list(encoded), self.model.capability("detect")(labels))
        return [[Detection(label, box, score) for label, box, score in found] for found in written]

    def _require(self, capability: str, task: str, systems: str) -> None:
        """``InputError`` naming the systems that have ``task`` when no head of this model gives ``capability``."""
        if not self.model.has_capability(capability):
            raise InputError(f"this model has no {task}: that is a task of {systems} "
                             f"(its heads: {', '.join(self.model.heads) or 'none'})")

    @torch.no_grad()
    def _answer(self, encoded: list[EncodedImage], answers) -> list[list[tuple[str | None, list[float], float]]]:
        """Decode ``answers`` (a head's answers in location tokens: its prompts, hooks and reader) on
        ``encoded[i]`` for row ``i``: each row's ``(label, box in original pixels, score)``."""
        out = self._generate(_on_whole_images(encoded, answers.prompts), num_beams=1,
                             max_new_tokens=answers.max_new_tokens, hooks=answers.hooks)
        written = []
        for row, e in enumerate(encoded):
            score = math.exp(float(out.scores[row]))
            found = answers.read(row, out.sequences[row], e.transform.valid_box[2:])
            written.append([(label, _clip_box(e.transform.boxes_to_original(box), e.image_size), score)
                            for label, box in found])
        return written

    @torch.no_grad()
    def segment_all_batch(self, encoded: list[EncodedImage], queries, **decoding) -> list[list[Segment]]:
        """Every target that ``queries[i]`` names on ``encoded[i]`` (any number, ``[]`` for none), in
        the order its answer names them: the answers decoded in one batch with the capability
        ``codebook_answers`` (each started codebook group completed), then every group's mask in one
        pass (``codebook_masks``). A segment's box is its mask's extent, its score the mean
        probability over the pixels it claims."""
        queries = [_check_text(query, "query") for query in queries]
        self._require("codebook_answers", "segment_all (segment --all)", "pixellm")
        if not queries:
            return []
        answers = self.model.capability("codebook_answers")(queries)
        out = self._generate(_on_whole_images(encoded, answers.prompts), num_beams=1,
                             max_new_tokens=answers.max_new_tokens, hooks=answers.hooks, **decoding)
        features, index = _stack(list(encoded))
        logits = self.model.capability("codebook_masks")(features, index, out.sequences, out.reads[answers.reader])
        return [[_segment(mask, e.transform) for mask in row] for row, e in zip(logits, encoded, strict=True)]

    def find_batch(self, encoded: list[EncodedImage], expressions,
                   min_score: float = LOCATE_MIN_SCORE) -> list[list[Location]]:
        """``locate_batch`` with every box's score (``_expression_scores``) and whether it is found:
        a score of at least ``min_score``."""
        min_score = _check_min_score(min_score)
        read = self._read_expressions(encoded, expressions)
        if read is None:
            return [[] for _ in expressions]
        found = [Location(text, box, score, score >= min_score, image.image_size)
                 for image, text, box, score in zip(read.images, read.expressions, read.boxes,
                                                    self._expression_scores(read), strict=True)]
        return _per_image(found, [len(x) for x in expressions])

    @torch.no_grad()
    def segment_batch(self, encoded: list[EncodedImage], expressions,
                      min_score: float = LOCATE_MIN_SCORE) -> list[list[Segmentation]]:
        """The box and mask of every expression ``expressions[i][j]`` on ``encoded[i]``: the mask
        decoder prompted with each box and reading the expression's hidden states, all in one batch;
        each with its score and ``found`` as ``find_batch`` gives them."""
        min_score = _check_min_score(min_score)
        read = self._read_expressions(encoded, expressions)
        if read is None:
            return [[] for _ in expressions]
        mask_logits = self.model.capability("mask_logits")
        logits, iou = mask_logits(read.features, read.index, read.canvas_boxes, read.visual, read.hidden,
                                  read.text_mask)
        scores = self._expression_scores(read)
        masks = [Segmentation(text, box, image.transform.mask_to_original(logits[row]), image.image_size,
                              scores[row], scores[row] >= min_score, float(iou[row]))
                 for row, (image, text, box) in enumerate(zip(read.images, read.expressions, read.boxes, strict=True))]
        return _per_image(masks, [len(x) for x in expressions])

    @torch.no_grad()
    def dense_caption_batch(self, encoded: list[EncodedImage], max_regions: int | None = None,
                            min_score: float | None = DENSECAP_MIN_SCORE, deduplicate: bool = True,
                            **decoding) -> list[list[Region]]:
        """Detected regions of every image with their captions, best score first; the proposals of
        all images are captioned in one batch.

        ``min_score``: the least proposal score kept (None: the proposal head's own threshold, every
        proposal it gives, as the dense captioning evaluation takes them). ``deduplicate``: leave out
        a region that repeats a better one (``_without_repeats``).
        """
        if max_regions is not None and max_regions < 1:
            raise InputError(f"max_regions must be at least 1, got {max_regions}")
        if min_score is not None:
            min_score = _check_min_score(min_score)
        if not encoded:
            return []
        features, _ = _stack(encoded)
        proposals = self.model.capability("propose")(features, max_proposals=max_regions, score_threshold=min_score)
        found = [(e, box, score) for e, (boxes, scores) in zip(encoded, proposals, strict=True)
                 for box, score in zip(boxes.cpu().numpy(), scores.tolist(), strict=True)]
        out = self._generate([(e, _Prompt(box, False, self.prompts["region"])) for e, box, _ in found],
                             **{**REGION_DECODING, **decoding})
        regions = []
        for row, (e, box, score) in enumerate(found):
            caption = e._caption(out, row)
            box = _clip_box(e.transform.boxes_to_original(box), e.image_size)
            regions.append(Region(box, score, caption.text, caption.words))
        per_image = _per_image(regions, [len(scores) for _, scores in proposals])
        return [_without_repeats(image_regions) for image_regions in per_image] if deduplicate else per_image

    @torch.no_grad()
    def token_boxes(self, encoded: list[EncodedImage], token_ids: list[list[int]]) -> list[np.ndarray]:
        """The box of every token when the model reads ``token_ids[i]`` (EOS excluded) as the
        caption of ``encoded[i]`` (the trace prompt, teacher-forced): ``(len, 4)`` original pixels."""
        if not encoded:
            return []
        inputs, _, _, input_ids, attention_mask = self._model_inputs([(e, e._trace_prompt()) for e in encoded])
        reads = teacher_forced_reads(inputs, input_ids, attention_mask, token_ids)[TOKEN_BOXES]
        return [np.stack([_clip_box(b, e.image_size) for b in e.transform.boxes_to_original(c[1:].cpu().numpy())])
                if len(c) > 1 else np.zeros((0, 4)) for e, c in zip(encoded, reads, strict=True)]

    def _encoded(self, images) -> list[EncodedImage]:
        if all(isinstance(image, EncodedImage) for image in images):
            return list(images)
        return self.encode_batch(images)

    @torch.no_grad()
    def _read_expressions(self, encoded: list[EncodedImage], expressions) -> _ReadExpressions | None:
        """Read every expression ``expressions[i][j]`` on ``encoded[i]`` in one teacher-forced pass
        under the referring prompt (the official RefCOCO inference: the ground-truth text is the
        decoder's input, nothing is decoded); each box is the location at the expression's last word,
        the position whose next token is EOS, where training puts it. None: no expressions."""
        pairs = [(e, _check_text(text, "expression")) for e, image_texts in zip(encoded, expressions, strict=True)
                 for text in image_texts]
        if not pairs:
            return None
        inputs, features, index, input_ids, attention_mask = self._model_inputs(
            [(e, e._refer_prompt(text)) for e, text in pairs])
        sequences = [_token_ids(self.tokenizer, text) for _, text in pairs]
        hidden = teacher_forced_states(inputs, input_ids, attention_mask, sequences)[:, 1:]  # position j reads token j
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        last = hidden[torch.arange(len(pairs), device=self.device), lengths - 1]  # (N, D)
        canvas_boxes = self.model.capability("refer_boxes")(last, features, index).float()
        boxes = [_clip_box(e.transform.boxes_to_original(b), e.image_size)
                 for (e, _), b in zip(pairs, canvas_boxes.cpu().numpy(), strict=True)]
        text_mask = torch.arange(hidden.shape[1], device=self.device) < lengths[:, None]
        return _ReadExpressions([e for e, _ in pairs], [t for _, t in pairs], sequences, features, index, inputs.visual,
                                hidden, text_mask, canvas_boxes, boxes)

    @torch.no_grad()
    def _expression_scores(self, read: _ReadExpressions) -> list[float]:
        """How well each box found fits its expression, in (0, 1]: the geometric mean of the
        probabilities of the expression's tokens when the model reads the expression as the caption
        of that box (the region prompt, teacher-forced). The referring pass cannot tell: its
        likelihood of an expression follows the language prior, and it always points somewhere; the
        region caption of a red square or a blue circle does not say "red circle"
        (docs/model_card.md, "Scores": measured against the pointer's logits, the re-ranker's and
        the proposals' scores)."""
        requests = [(image, _Prompt(image.transform.boxes_to_canvas(box).astype(np.float32), False,
                                    self.prompts["region"]))
                    for image, box in zip(read.images, read.boxes, strict=True)]
        inputs, _, _, input_ids, attention_mask = self._model_inputs(requests)
        states = teacher_forced_states(inputs, input_ids, attention_mask, read.sequences)
        log_probs = inputs.language.logits(states).float().log_softmax(-1)  # position j: the odds of token j
        return [float(log_probs[row, torch.arange(len(ids)), torch.tensor(ids, device=log_probs.device)].mean().exp())
                for row, ids in enumerate(read.sequences)]

    @torch.no_grad()
    def _generate(self, requests: list[tuple[EncodedImage, _Prompt]], **decoding) -> GenerationOutput:
        """Decode prompts on any mix of encoded images in one batch; output row i answers request i."""
        decoding.setdefault("max_new_tokens", self.model.config.max_text_tokens)
        if not requests:
            return GenerationOutput([], torch.zeros(0))
        features, index = _stack([e for e, _ in requests])
        input_ids, attention_mask, boxes, is_point = self._prompt_tensors([r for _, r in requests])
        return generate(self.model, features, index, boxes, is_point, input_ids, attention_mask,
                        whole_image=_all_whole_image(requests), **decoding)

    def _model_inputs(self, requests: list[tuple[EncodedImage, _Prompt]]):
        """For a teacher-forced pass: the requests' ``LanguageInputs``, their images as one feature
        batch, each request's image index ``(N,)``, ``input_ids`` and ``attention_mask`` ``(N, Lp)``."""
        features, index = _stack([e for e, _ in requests])
        input_ids, attention_mask, boxes, is_point = self._prompt_tensors([r for _, r in requests])
        inputs = self.model.language_inputs(features, Prompts(index, boxes, is_point), _all_whole_image(requests))
        return inputs, features, index, input_ids, attention_mask

    def _prompt_tensors(self, requests: list[_Prompt]):
        """``input_ids``, ``attention_mask`` ``(N, Lp)``, canvas ``boxes (N, 4)``, ``is_point (N,)``."""
        ids = [encode_prompt(self.tokenizer, r.text) for r in requests]
        length = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(ids), length, dtype=torch.long)
        for row, row_ids in enumerate(ids):
            input_ids[row, : len(row_ids)] = torch.tensor(row_ids)
            attention_mask[row, : len(row_ids)] = 1
        boxes = torch.tensor(np.stack([r.box for r in requests]), dtype=torch.float32, device=self.device)
        is_point = torch.tensor([r.is_point for r in requests], device=self.device)
        return input_ids.to(self.device), attention_mask.to(self.device), boxes, is_point


class EncodedImage:
    """An image encoded once; every task method reuses its features."""

    def __init__(self, predictor: Predictor, features: ImageFeatures, transform: CanvasTransform):
        self.predictor = predictor
        self.features = features
        self.transform = transform
        self.image_size = tuple(transform.original_size)  # (W, H)

    # -- tasks ---------------------------------------------------------------------------------

    def caption(self, box=None, point=None, prompt: str | None = None, **decoding) -> Caption:
        """A caption with a box and point for every word.

        Without a location prompt: the whole image and the long-caption prompt (a traced caption,
        beam 4). With ``box`` ``[x0, y0, x1, y1]`` or ``point`` ``[x, y]``: a caption of that region
        (the region prompt, greedy). ``prompt`` replaces the text prompt.
        """
        if box is not None and point is not None:
            raise InputError("give a box or a point, not both")
        if box is None and point is None:
            request, options = self._trace_prompt(), CAPTION_DECODING
        else:
            canvas, is_point = (self._check_box(box), False) if box is not None else (self._check_point(point), True)
            request, options = _Prompt(canvas, is_point, self.predictor.prompts["region"]), REGION_DECODING
        if prompt is not None:
            request.text = _check_text(prompt, "prompt")
        out = self._decode([request], **{**options, **decoding})
        return self._caption(out, 0)

    def caption_regions(self, boxes, **decoding) -> list[Caption]:
        """Captions of many regions of this image, decoded together in one batch."""
        return self.predictor.caption_regions_batch([self], [boxes], **decoding)[0]

    def locate(self, expression: str) -> list[float]:
        """The box ``[x0, y0, x1, y1]`` of a referring expression (read at its last word)."""
        return self.predictor.locate_batch([self], [[expression]])[0][0]

    def find(self, expression: str, min_score: float = LOCATE_MIN_SCORE) -> Location:
        """The box of a referring expression with its score, and whether it is found (``find_batch``)."""
        return self.predictor.find_batch([self], [[expression]], min_score)[0][0]

    def segment(self, expression: str, min_score: float = LOCATE_MIN_SCORE) -> Segmentation:
        """The box and ``(H, W)`` bool mask of a referring expression, with its score and ``found``."""
        return self.predictor.segment_batch([self], [[expression]], min_score)[0][0]

    def segment_all(self, query: str, **decoding) -> list[Segment]:
        """Every target of ``query`` ("all the red objects"), any number (``Predictor.segment_all_batch``)."""
        return self.predictor.segment_all_batch([self], [query], **decoding)[0]

    def detect(self, labels) -> list[Detection]:
        """The objects of the classes ``labels`` (names) on this image (``Predictor.detect_batch``)."""
        return self.predictor.detect_batch([self], [labels])[0]

    def dense_caption(self, max_regions: int | None = None, min_score: float | None = DENSECAP_MIN_SCORE,
                      **decoding) -> list[Region]:
        """Detected regions scored at least ``min_score``, each with its caption, best score first,
        without repeats (``Predictor.dense_caption_batch``)."""
        return self.predictor.dense_caption_batch([self], max_regions, min_score, **decoding)[0]

    # -- shared steps --------------------------------------------------------------------------

    def _trace_prompt(self) -> _Prompt:
        return _Prompt(self.transform.valid_box.astype(np.float32), False, self.predictor.prompts["trace"],
                       whole_image=True)

    def _region_prompt(self, box) -> _Prompt:
        return _Prompt(self._check_box(box), False, self.predictor.prompts["region"])

    def _refer_prompt(self, expression: str) -> _Prompt:
        text = self.predictor.prompts["refer"].format(expression=expression)
        return _Prompt(self._trace_prompt().box, False, text)

    def _decode(self, requests: list[_Prompt], **decoding) -> GenerationOutput:
        return self.predictor._generate([(self, r) for r in requests], **decoding)

    def _caption(self, out: GenerationOutput, row: int) -> Caption:
        ids, located = out.sequences[row], out.per_token(TOKEN_BOXES)
        canvas = located[row].cpu().numpy() if located is not None else np.zeros((len(ids), 4))
        boxes = self.transform.boxes_to_original(canvas) if ids else np.zeros((0, 4))
        boxes = np.stack([_clip_box(b, self.image_size) for b in boxes]) if len(boxes) else boxes
        words = words_from_ids(self.predictor.tokenizer, ids, boxes)
        text = self.predictor.tokenizer.decode(ids, skip_special_tokens=True)
        return Caption(text, words, self.image_size, float(out.scores[row]))

    def _check_box(self, box) -> np.ndarray:
        """A prompt box on the canvas; up to ``EDGE_TOLERANCE`` past the image's edge, clipped to it."""
        values = _numbers(box, 4, "box")
        x0, y0, x1, y1 = values
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"box {_show(values)} needs x1 > x0 and y1 > y0")
        self._check_inside(f"box {_show(values)}", {"x0": x0, "y0": y0, "x1": x1, "y1": y1})
        clipped = np.array(_clip_box(values, self.image_size))
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            raise InputError(f"box {_show(values)} has no area inside the {self._size_text()} image")
        return self.transform.boxes_to_canvas(clipped).astype(np.float32)

    def _check_point(self, point) -> np.ndarray:
        """A prompt point on the canvas (as a box of no size); up to ``EDGE_TOLERANCE`` past the edge, clipped."""
        values = _numbers(point, 2, "point")
        self._check_inside(f"point {_show(values)}", {"x": values[0], "y": values[1]})
        x, y = self.transform.points_to_canvas(np.clip(values, 0, self.image_size))
        return np.array([x, y, x, y], dtype=np.float32)

    def _check_inside(self, what: str, coordinates: dict[str, float]) -> None:
        """``InputError`` naming the edge that a coordinate (``x...`` or ``y...``) lies past by
        more than ``EDGE_TOLERANCE``."""
        width, height = self.image_size
        for name, value in coordinates.items():
            horizontal = name.startswith("x")
            side = width if horizontal else height
            if value < -EDGE_TOLERANCE:
                edge, limit = ("left" if horizontal else "top"), f"{name} = {value:g} < 0"
            elif value > side + EDGE_TOLERANCE:
                edge, limit = ("right" if horizontal else "bottom"), f"{name} = {value:g} > {side}"
            else:
                continue
            raise InputError(f"{what} extends past the {edge} edge of the {self._size_text()} image ({limit})")

    def _size_text(self) -> str:
        return "{}x{}".format(*self.image_size)


def load(name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = None) -> Predictor:
    """Load an embedded system by name (``"pixelllm"``, the default), a checkpoint directory or a
    Hugging Face repository id (``pixelllm.assets.system_checkpoint``)."""
    from pixelllm.assets import DEFAULT_CHECKPOINT, system_checkpoint

    checkpoint = system_checkpoint(name_or_path)
    embedded = Path(checkpoint).resolve() == DEFAULT_CHECKPOINT.resolve()
    return Predictor(PixelLLM.from_pretrained(checkpoint), device=device, embedded=embedded)


def _stack(encoded: list[EncodedImage]) -> tuple[ImageFeatures, torch.Tensor]:
    """The distinct images of ``encoded`` as one feature batch, and the index of each entry in it."""
    distinct = list({id(e): e for e in encoded}.values())
    position = {id(e): i for i, e in enumerate(distinct)}
    features = ImageFeatures.concat([e.features for e in distinct])
    index = torch.tensor([position[id(e)] for e in encoded], dtype=torch.long, device=features.features.device)
    return features, index


def _all_whole_image(requests: list[tuple[EncodedImage, _Prompt]]) -> bool:
    """Whether every request captions its whole image (then a head of the model may answer them)."""
    return all(r.whole_image for _, r in requests)


def _per_image(results: list, counts: list[int]) -> list[list]:
    """A flat list of results cut into consecutive groups of ``counts``."""
    groups, start = [], 0
    for count in counts:
        groups.append(results[start : start + count])
        start += count
    return groups


def _on_whole_images(encoded: list[EncodedImage], prompts: list[str]) -> list[tuple[EncodedImage, _Prompt]]:
    """Decoding requests: text prompt ``prompts[i]`` on the whole of ``encoded[i]`` (not a caption of it)."""
    return [(e, _Prompt(e._trace_prompt().box, False, text)) for e, text in zip(encoded, prompts, strict=True)]


def _segment(logits: torch.Tensor, transform: CanvasTransform) -> Segment:
    """``logits (S, S)`` of one target on the canvas as a ``Segment`` in original pixels."""
    mask = transform.mask_to_original(logits)
    claimed = logits > 0
    score = float(torch.sigmoid(logits[claimed]).mean()) if bool(claimed.any()) else 0.0
    ys, xs = np.nonzero(mask)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)] if len(xs) else [0.0] * 4
    return Segment(box, mask, score)


def _without_repeats(regions: list[Region]) -> list[Region]:
    """``regions`` (best first) less each one that repeats a better one: the same caption (case,
    spaces and a final period aside) on a box of which ``DUPLICATE_SHARE`` lies in the other box or
    that holds that share of it. The proposals' NMS (IoU over 0.5) keeps a box nested in a larger
    one: on the shapes world, the same object twice (its twins never overlap that much)."""
    kept: list[Region] = []
    for region in regions:
        if not any(_caption_key(k.caption) == _caption_key(region.caption)
                   and _nested_share(k.box, region.box) >= DUPLICATE_SHARE for k in kept):
            kept.append(region)
    return kept


def _caption_key(caption: str) -> str:
    return " ".join(caption.lower().rstrip(". ").split())


def _nested_share(a: list[float], b: list[float]) -> float:
    """The share of the smaller of two boxes that lies in the other (0 for an empty box)."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    intersection = box_area(torch.cat([torch.maximum(a[:2], b[:2]), torch.minimum(a[2:], b[2:])]))
    smaller = torch.minimum(box_area(a), box_area(b))
    return float(intersection / smaller) if smaller > 0 else 0.0


def _check_min_score(min_score) -> float:
    if isinstance(min_score, bool) or not isinstance(min_score, int | float) or not 0 <= min_score <= 1:
        raise InputError(f"min_score must be a number from 0 to 1, got {min_score!r}")
    return float(min_score)


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_text(text, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"empty {what}: give at least one word")
    return text.strip()


def _numbers(values, count: int, what: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be {count} numbers, got {values!r}") from None
    if array.size != count or not all(math.isfinite(v) for v in array):
        raise InputError(f"{what} must be {count} finite numbers, got {values!r}")
    return array


def _clip_box(box: np.ndarray, image_size: tuple[int, int]) -> list[float]:
    width, height = image_size
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64)
    x0, x1 = sorted((float(np.clip(x0, 0, width)), float(np.clip(x1, 0, width))))
    y0, y1 = sorted((float(np.clip(y0, 0, height)), float(np.clip(y1, 0, height))))
    return [x0, y0, x1, y1]


def _show(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"
