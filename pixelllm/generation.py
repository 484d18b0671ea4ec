"""Decoding that yields every token together with its location.

Greedy and beam search over ``N`` prompts at once (any mix of images and prompts per image).
Each step feeds the chosen token to the LM; the hidden state of that step gives both the
location of the token just fed and the logits of the next one, so text and trace come out of one
pass with a KV cache.

``use_cache=False`` keeps the official algorithm: no cache (the whole model re-runs over the
sequence at every step), then one teacher-forced pass over the result reads the locations. Both
modes produce the same tokens and boxes.

Search rules follow the official decoder: greedy never repeats the previous token (after GRiT)
and its score is the mean log-probability; beam search keeps ``k x beams`` candidates per step,
scores finished sequences by ``log p / ((5 + length) / 6) ** alpha`` and stops once no live beam
can beat the finished ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pixelllm.model.pixelllm import ImageFeatures, LanguageInputs, PixelLLM

NEG_INF = -1.0e9  # finite, so that arithmetic on "impossible" scores stays well defined


@dataclass
class GenerationOutput:
    """Per prompt: ``sequences[i]`` token ids (EOS excluded), ``boxes[i]`` ``(len, 4)`` canvas-pixel
    box of each token, ``scores (N,)`` the search score of the returned sequence."""

    sequences: list[list[int]]
    boxes: list[torch.Tensor]
    scores: torch.Tensor


class _CachedStepper:
    """Incremental decoding with the LM's KV cache."""

    def __init__(self, language, visual, prompt_ids, prompt_mask):
        self.language = language
        hidden, logits, self.state = language.start(visual, prompt_ids, prompt_mask)
        self.first = hidden, logits

    def step(self, tokens: torch.Tensor):
        hidden, logits, self.state = self.language.step(self.state, tokens)
        return hidden, logits

    def select(self, index: torch.Tensor) -> None:
        self.state = self.language.select(self.state, index)


class _UncachedStepper:
    """The official loop: the whole model runs over the sequence so far at every step."""

    def __init__(self, language, visual, prompt_ids, prompt_mask):
        self.language = language
        self.inputs = [visual, prompt_ids, prompt_mask]
        self.tokens = prompt_ids.new_zeros(prompt_ids.shape[0], 0)
        self.first = self._run()

    def _run(self):
        # The last label is a placeholder: only the state whose input is the last token is read.
        labels = torch.cat([self.tokens, self.tokens.new_zeros(self.tokens.shape[0], 1)], dim=1)
        hidden, logits = self.language(*self.inputs, labels)
        return hidden[:, -1], logits[:, -1]

    def step(self, tokens: torch.Tensor):
        self.tokens = torch.cat([self.tokens, tokens[:, None]], dim=1)
        return self._run()

    def select(self, index: torch.Tensor) -> None:
        self.inputs = [x[index] for x in self.inputs]
        self.tokens = self.tokens[index]


@torch.no_grad()
def generate(model: PixelLLM, images: ImageFeatures, image_index: torch.Tensor, prompt_boxes: torch.Tensor,
             prompt_is_point: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             scene: bool = False, num_beams: int = 1, max_new_tokens: int = 40, length_penalty: float = 0.6,
             candidates_per_beam: int = 2, block_repeats: bool = True, use_cache: bool = True,
             with_boxes: bool = True) -> GenerationOutput:
    """Decode a caption and its per-token boxes for each of ``N`` prompts.

    Args:
        images: encoded images (``B`` of them). image_index: ``(N,)`` image of each prompt.
        prompt_boxes: ``(N, 4)`` canvas pixels; prompt_is_point: ``(N,)``.
        input_ids, attention_mask: ``(N, Lp)`` text prompts.
        scene: the prompts caption their whole image (``PixelLLM.language_inputs``).
        num_beams: 1 for greedy. max_new_tokens: at most this many tokens, EOS included.
        length_penalty: the brevity penalty's alpha (beam search only).
        candidates_per_beam: candidates kept per beam and step (the official ``per_node_beam_size``:
            2 for captions, 1 for referring expressions).
        block_repeats: greedy never picks the token it just picked (the official rule).
        use_cache: False runs the official uncached algorithm (same results, far slower).
        with_boxes: False skips the localization head (captions only; ``boxes`` are zeros).
    """
    reader = model.language_inputs(images, image_index, prompt_boxes, prompt_is_point, scene)
    n = reader.visual.shape[0]
    inputs = [reader.visual, input_ids, attention_mask]
    if num_beams > 1:
        inputs = [x.repeat_interleave(num_beams, dim=0) for x in inputs]
    stepper = (_CachedStepper if use_cache else _UncachedStepper)(reader.language, *inputs)
    # each step locates its token; else one teacher-forced pass after decoding
    search_locate = reader.locate if use_cache and with_boxes else None
    eos = model.language.eos_token_id
    if num_beams > 1:
        out = _beam_search(stepper, search_locate, n, num_beams, max_new_tokens, eos, length_penalty,
                           candidates_per_beam)
    else:
        out = _greedy(stepper, search_locate, n, max_new_tokens, eos, block_repeats)
    if not with_boxes:
        out.boxes = [torch.zeros(len(s), 4) for s in out.sequences]
    elif not use_cache:
        out.boxes = teacher_forced_boxes(reader, input_ids, attention_mask, out.sequences)
    return out


def _greedy(stepper, locate, n: int, max_new_tokens: int, eos: int, block_repeats: bool) -> GenerationOutput:
    hidden, logits = stepper.first
    device = logits.device
    rows = torch.arange(n, device=device)  # prompt of each row still decoding
    tokens_out = torch.full((n, max_new_tokens), eos, dtype=torch.long, device=device)
    boxes_out = torch.zeros(n, max_new_tokens, 4, device=device)
    log_prob = torch.zeros(n, device=device)
    previous = None
    for step in range(max_new_tokens):
        logits = logits.float()
        if block_repeats and previous is not None:  # the official rule, after GRiT
            blocked = logits.gather(1, previous[:, None]).clamp(max=-1e4)
            logits = logits.scatter(1, previous[:, None], blocked)
        step_log_prob, tokens = torch.log_softmax(logits, dim=-1).max(dim=-1)
        log_prob[rows] += step_log_prob
        tokens_out[rows, step] = tokens
        alive = tokens != eos
        if not alive.any():
            break
        if not alive.all():
            keep = alive.nonzero()[:, 0]
            stepper.select(keep)
            rows, tokens = rows[keep], tokens[keep]
        hidden, logits = stepper.step(tokens)
        if locate is not None:
            boxes_out[rows, step] = locate(hidden, rows).float()
        previous = tokens
    lengths = (tokens_out != eos).long().cumprod(dim=1).sum(dim=1).tolist()
    sequences = [tokens_out[i, :length].tolist() for i, length in enumerate(lengths)]
    boxes = [boxes_out[i, :length] for i, length in enumerate(lengths)]
    return GenerationOutput(sequences, boxes, log_prob / torch.tensor(lengths, device=device).clamp(min=1))


def _beam_search(stepper, locate, n: int, beams: int, max_new_tokens: int, eos: int,
                 alpha: float, candidates_per_beam: int = 2) -> GenerationOutput:
    hidden, logits = stepper.first
    device = logits.device
    vocab = logits.shape[-1]
    live_scores = torch.full((n, beams), NEG_INF, device=device)
    live_scores[:, 0] = 0.0  # all beams start identical: let only the first one expand
    history = torch.zeros(n * beams, 0, dtype=torch.long, device=device)
    history_boxes = torch.zeros(n * beams, 0, 4, device=device)
    finished: list[list[tuple[float, torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]
    base = torch.arange(n, device=device)[:, None] * beams
    min_penalty = _brevity_penalty(alpha, max_new_tokens)
    for step in range(max_new_tokens):
        candidates = torch.log_softmax(logits.float(), dim=-1).view(n, beams, vocab) + live_scores[..., None]
        top_scores, top_index = candidates.view(n, beams * vocab).topk(candidates_per_beam * beams, dim=1)
        origin, tokens = top_index // vocab, top_index % vocab
        is_eos = tokens == eos
        penalty = _brevity_penalty(alpha, step + 1)
        for prompt, slot in is_eos.nonzero().tolist():
            row = base[prompt, 0] + origin[prompt, slot]
            finished[prompt].append((top_scores[prompt, slot].item() / penalty, history[row], history_boxes[row]))
        for prompt in set(is_eos.nonzero()[:, 0].tolist()):
            finished[prompt] = sorted(finished[prompt], key=lambda f: -f[0])[:beams]
        live_scores, keep = top_scores.masked_fill(is_eos, NEG_INF).topk(beams, dim=1)
        rows = (base + origin.gather(1, keep)).view(-1)
        tokens = tokens.gather(1, keep).view(-1)
        if all(len(f) == beams and f[-1][0] > live_scores[i].max().item() / min_penalty
               for i, f in enumerate(finished)):
            break  # no live beam can still beat the finished ones
        stepper.select(rows)
        history = torch.cat([history[rows], tokens[:, None]], dim=1)
        history_boxes = history_boxes[rows]
        hidden, logits = stepper.step(tokens)
        if locate is not None:
            history_boxes = torch.cat([history_boxes, locate(hidden, rows // beams)[:, None]], dim=1)
    sequences, boxes, scores = [], [], []
    for prompt in range(n):
        if finished[prompt]:
            score, tokens, token_boxes = finished[prompt][0]
        else:  # nothing finished within the length limit: the best live beam
            best = int(live_scores[prompt].argmax())
            row = prompt * beams + best
            score, tokens, token_boxes = live_scores[prompt, best].item(), history[row], history_boxes[row]
        sequences.append(tokens.tolist())
        boxes.append(token_boxes)
        scores.append(score)
    return GenerationOutput(sequences, boxes, torch.tensor(scores))


def _brevity_penalty(alpha: float, length: int) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def teacher_forced_hidden(reader: LanguageInputs, input_ids, attention_mask, sequences) -> torch.Tensor:
    """The states ``(N, L, S)`` whose inputs are the tokens of each ``sequences[i]`` (row i holds
    ``len(sequences[i])`` of them, then padding), from one teacher-forced pass of ``reader``'s LM
    (``LanguageInputs``: hidden states, ``S = D``, unless the scene captioner's)."""
    length = max(len(s) for s in sequences) + 1
    visual = reader.visual
    labels = torch.full((len(sequences), length), -100, dtype=torch.long, device=visual.device)
    for i, seq in enumerate(sequences):
        labels[i, : len(seq) + 1] = torch.tensor([*seq, reader.language.eos_token_id])
    hidden, _ = reader.language(visual, input_ids, attention_mask, labels)
    return hidden[:, 1:]  # position j + 1 reads token j


def teacher_forced_boxes(reader: LanguageInputs, input_ids, attention_mask, sequences) -> list[torch.Tensor]:
    """Read every token's box with one teacher-forced pass (the official way, after decoding)."""
    hidden = teacher_forced_hidden(reader, input_ids, attention_mask, sequences)
    boxes = reader.locate(hidden, torch.arange(len(sequences), device=hidden.device))
    return [boxes[i, : len(seq)] for i, seq in enumerate(sequences)]
