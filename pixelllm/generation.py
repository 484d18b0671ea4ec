"""Decoding that yields every token together with what the heads read from its state.

Greedy and beam search over ``N`` prompts at once (any mix of images and prompts per image).
Each step feeds the chosen token to the LM; the state of that step gives the logits of the next
token and whatever the heads' readers take from it (the location head: the box of the token just
fed), so text and trace come out of one pass with a KV cache. The heads' hooks
(``pixelllm.model.decoding``) also constrain the vocabulary, force runs of tokens and spare tokens
from the repeat rule; decoding runs them without knowing which head they come from.

``use_cache=False`` keeps the official algorithm: no cache (the whole model re-runs over the
sequence at every step), then one teacher-forced pass over the result feeds the readers. Both
modes produce the same tokens and reads.

Search rules follow the official decoder: greedy never repeats the previous token (after GRiT)
and its score is the mean log-probability; beam search keeps ``k x beams`` candidates per step,
scores finished sequences by ``log p / ((5 + length) / 6) ** alpha`` and stops once no live beam
can beat the finished ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from pixelllm.model import ImageFeatures, PixelLLM, Prompts
from pixelllm.model.decoding import NEG_INF, DecodeHook, LanguageInputs


@dataclass
class GenerationOutput:
    """Per prompt: ``sequences[i]`` token ids (EOS excluded), ``scores (N,)`` the search score of the
    returned sequence, and ``reads[name][i]`` ``(len + 1, ...)``: what the reader ``name`` took from
    each state of prompt ``i``, the start state first, then the state that read each token."""

    sequences: list[list[int]]
    scores: torch.Tensor
    reads: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def per_token(self, name: str) -> list[torch.Tensor] | None:
        """``reads[name]`` of each token (``(len, ...)``: from the state that read it), or None."""
        return [r[1:] for r in self.reads[name]] if name in self.reads else None


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


class _Reads:
    """What the readers take from every step's states, kept per row and step: ``(rows, steps + 1, ...)``."""

    def __init__(self, inputs: LanguageInputs | None, rows: int, steps: int):
        self.inputs, self.rows, self.steps = inputs, rows, steps
        self.values: dict[str, torch.Tensor] = {}

    def record(self, states: torch.Tensor, prompts: torch.Tensor, rows: torch.Tensor, step: int) -> None:
        """Read ``states (M, S)`` of the prompts ``prompts (M,)`` into the rows ``rows`` at ``step``."""
        if self.inputs is None:
            return
        for name, value in self.inputs.read(states, prompts).items():
            if name not in self.values:
                self.values[name] = value.new_zeros(self.rows, self.steps + 1, *value.shape[1:])
            self.values[name][rows, step] = value.to(self.values[name].dtype)

    def reorder(self, rows: torch.Tensor) -> None:
        self.values = {name: value[rows] for name, value in self.values.items()}


@torch.no_grad()
def generate(model: PixelLLM, images: ImageFeatures, image_index: torch.Tensor, prompt_boxes: torch.Tensor,
             prompt_is_point: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             whole_image: bool = False, num_beams: int = 1, max_new_tokens: int = 40, length_penalty: float = 0.6,
             candidates_per_beam: int = 2, block_repeats: bool = True, use_cache: bool = True,
             read: bool = True, hooks: Sequence[DecodeHook] = ()) -> GenerationOutput:
    """Decode a text and the heads' reads of its states for each of ``N`` prompts.

    Args:
        images: encoded images (``B`` of them). image_index: ``(N,)`` image of each prompt.
        prompt_boxes: ``(N, 4)`` canvas pixels; prompt_is_point: ``(N,)``.
        input_ids, attention_mask: ``(N, Lp)`` text prompts.
        whole_image: the prompts caption their whole image (``PixelLLM.language_inputs``).
        num_beams: 1 for greedy. max_new_tokens: at most this many tokens, EOS included.
        length_penalty: the brevity penalty's alpha (beam search only).
        candidates_per_beam: candidates kept per beam and step (the official ``per_node_beam_size``:
            2 for captions, 1 for referring expressions).
        block_repeats: greedy never picks the token it just picked (the official rule), unless a
            hook spares that token or turns the rule off.
        use_cache: False runs the official uncached algorithm (same results, far slower).
        read: False skips the readers (text only; ``reads`` is empty).
        hooks: more hooks for this call only, after the heads' (a head's answer format: typed slots).
    """
    inputs = model.language_inputs(images, Prompts(image_index, prompt_boxes, prompt_is_point), whole_image)
    inputs = replace(inputs, hooks=[*inputs.hooks, *hooks])
    n = inputs.visual.shape[0]
    lm_inputs = [inputs.visual, input_ids, attention_mask]
    if num_beams > 1:
        lm_inputs = [x.repeat_interleave(num_beams, dim=0) for x in lm_inputs]
    stepper = (_CachedStepper if use_cache else _UncachedStepper)(inputs.language, *lm_inputs)
    reads = _Reads(inputs if use_cache and read else None, n * num_beams, max_new_tokens)
    eos = model.language.eos_token_id
    if num_beams > 1:
        out = _beam_search(stepper, inputs, reads, n, num_beams, max_new_tokens, eos, length_penalty,
                           candidates_per_beam)
    else:
        out = _greedy(stepper, inputs, reads, n, max_new_tokens, eos, block_repeats and inputs.block_repeats)
    if read and not use_cache:
        out.reads = teacher_forced_reads(inputs, input_ids, attention_mask, out.sequences)
    return out


def _greedy(stepper, inputs: LanguageInputs, reads: _Reads, n: int, max_new_tokens: int, eos: int,
            block_repeats: bool) -> GenerationOutput:
    hidden, logits = stepper.first
    device = logits.device
    rows = torch.arange(n, device=device)  # prompt of each row still decoding
    reads.record(hidden, rows, rows, 0)
    tokens_out = torch.full((n, max_new_tokens), eos, dtype=torch.long, device=device)
    log_prob = torch.zeros(n, device=device)
    repeatable = inputs.repeatable(logits.shape[-1], device)
    previous = None
    for step in range(max_new_tokens):
        logits = logits.float()
        if block_repeats and previous is not None:  # the official rule, after GRiT
            kept = logits.gather(1, previous[:, None])
            blocked = torch.where(repeatable[previous][:, None], kept, kept.clamp(max=-1e4))
            logits = logits.scatter(1, previous[:, None], blocked)
        logits = inputs.constrain(logits, tokens_out[rows, :step], rows)
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
        reads.record(hidden, rows, rows, step + 1)
        previous = tokens
    lengths = (tokens_out != eos).long().cumprod(dim=1).sum(dim=1).tolist()
    sequences = [tokens_out[i, :length].tolist() for i, length in enumerate(lengths)]
    scores = log_prob / torch.tensor(lengths, device=device).clamp(min=1)
    return GenerationOutput(sequences, scores, _per_prompt(reads.values, range(n), lengths))


def _beam_search(stepper, inputs: LanguageInputs, reads: _Reads, n: int, beams: int, max_new_tokens: int, eos: int,
                 alpha: float, candidates_per_beam: int = 2) -> GenerationOutput:
    hidden, logits = stepper.first
    device = logits.device
    vocab = logits.shape[-1]
    every_row = torch.arange(n * beams, device=device)
    reads.record(hidden, every_row // beams, every_row, 0)
    live_scores = torch.full((n, beams), NEG_INF, device=device)
    live_scores[:, 0] = 0.0  # all beams start identical: let only the first one expand
    history = torch.zeros(n * beams, 0, dtype=torch.long, device=device)
    finished: list[list[tuple[float, torch.Tensor, dict]]] = [[] for _ in range(n)]  # (score, tokens, reads)
    base = torch.arange(n, device=device)[:, None] * beams
    min_penalty = _brevity_penalty(alpha, max_new_tokens)
    for step in range(max_new_tokens):
        step_logits = inputs.constrain(logits.float(), history, every_row // beams)
        candidates = torch.log_softmax(step_logits, dim=-1).view(n, beams, vocab) + live_scores[..., None]
        top_scores, top_index = candidates.view(n, beams * vocab).topk(candidates_per_beam * beams, dim=1)
        origin, tokens = top_index // vocab, top_index % vocab
        is_eos = tokens == eos
        penalty = _brevity_penalty(alpha, step + 1)
        for prompt, slot in is_eos.nonzero().tolist():
            row = int(base[prompt, 0] + origin[prompt, slot])
            taken = {name: value[row, : step + 1] for name, value in reads.values.items()}
            finished[prompt].append((top_scores[prompt, slot].item() / penalty, history[row], taken))
        for prompt in set(is_eos.nonzero()[:, 0].tolist()):
            finished[prompt] = sorted(finished[prompt], key=lambda f: -f[0])[:beams]
        live_scores, keep = top_scores.masked_fill(is_eos, NEG_INF).topk(beams, dim=1)
        rows = (base + origin.gather(1, keep)).view(-1)
        tokens = tokens.gather(1, keep).view(-1)
        if all(len(f) == beams and f[-1][0] > live_scores[i].max().item() / min_penalty
               for i, f in enumerate(finished)):
            break  # no live beam can still beat the finished ones
        stepper.select(rows)
        reads.reorder(rows)
        history = torch.cat([history[rows], tokens[:, None]], dim=1)
        hidden, logits = stepper.step(tokens)
        reads.record(hidden, every_row // beams, every_row, step + 1)
    sequences, scores, taken = [], [], []
    for prompt in range(n):
        if finished[prompt]:
            score, tokens, prompt_reads = finished[prompt][0]
        else:  # nothing finished within the length limit: the best live beam
            best = int(live_scores[prompt].argmax())
            row = prompt * beams + best
            score, tokens = live_scores[prompt, best].item(), history[row]
            prompt_reads = {name: value[row, : len(tokens) + 1] for name, value in reads.values.items()}
        sequences.append(tokens.tolist())
        scores.append(score)
        taken.append(prompt_reads)
    return GenerationOutput(sequences, torch.tensor(scores), {name: [t[name] for t in taken] for name in reads.values})


def _per_prompt(values: dict[str, torch.Tensor], rows, lengths: list[int]) -> dict[str, list[torch.Tensor]]:
    """Each prompt's reads, cut to its start state and its tokens' states."""
    return {name: [value[row, : length + 1] for row, length in zip(rows, lengths, strict=True)]
            for name, value in values.items()}


def _brevity_penalty(alpha: float, length: int) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def teacher_forced_states(inputs: LanguageInputs, input_ids, attention_mask, sequences) -> torch.Tensor:
    """The states ``(N, L + 1, S)`` of one teacher-forced pass of ``inputs``' LM over each ``sequences[i]``:
    position 0 reads the start, position ``j + 1`` token ``j`` (row i holds ``len(sequences[i]) + 1``
    of them, then padding). ``S = D`` for the trunk's LM."""
    length = max(len(s) for s in sequences) + 1
    visual = inputs.visual
    labels = torch.full((len(sequences), length), -100, dtype=torch.long, device=visual.device)
    for i, seq in enumerate(sequences):
        labels[i, : len(seq) + 1] = torch.tensor([*seq, inputs.language.eos_token_id])
    hidden, _ = inputs.language(visual, input_ids, attention_mask, labels)
    return hidden


def teacher_forced_reads(inputs: LanguageInputs, input_ids, attention_mask, sequences) -> dict[str, list[torch.Tensor]]:
    """The readers' take of every state of one teacher-forced pass (the official way, after
    decoding): ``{name: [(len(sequences[i]) + 1, ...)]}`` as ``GenerationOutput.reads``."""
    states = teacher_forced_states(inputs, input_ids, attention_mask, sequences)
    values = inputs.read(states, torch.arange(len(sequences), device=states.device))
    return _per_prompt(values, range(len(sequences)), [len(s) for s in sequences])
