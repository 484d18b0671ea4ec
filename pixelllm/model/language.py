"""Language-model adapters: the same interface over an encoder-decoder (T5) or any causal LM.

Both take the visual tokens of each prompt and the text prompt as a prefix and return, for every
target position, the final hidden state (after the LM's final norm) and the vocabulary logits.
Position ``j`` holds the state whose input is the start (``j = 0``) or the target token ``j - 1``,
and whose logits predict target token ``j``: the location of token ``j - 1`` is read from it.

- **encoder-decoder**: the encoder reads ``[visual tokens ; embedded prompt]``; the decoder writes
  the target, starting from ``decoder_start_token_id``.
- **decoder-only**: the sequence is ``[visual tokens ; embedded prompt ; target]``; the prefix is
  right-aligned per row (left padding), so the target starts at the same column in every row.

LoRA (peft) goes on the q and v projections, scaled by ``alpha / rank`` (2 by default, as the
official code); with ``lora_rank = 0`` the whole LM trains. A frozen LM still runs in the model's
mode: its dropout is active in training, as the official code runs T5 (``enable_dropout=train``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel

from pixelllm.errors import ConfigError

DEFAULT_LORA_TARGETS = {"encoder-decoder": ["q", "v"], "decoder-only": ["q_proj", "v_proj"]}


@dataclass
class DecodeState:
    """What incremental decoding carries between steps, for ``N`` rows (prompts x beams).

    ``cache``: the LM's key/value cache. Encoder-decoder: ``encoder_states (N, Le, D)`` and
    ``encoder_mask (N, Le)``. Decoder-only: ``attention_mask (N, T)`` over all positions so far and
    ``next_position (N,)``, the position id of the next token.
    """

    cache: object
    encoder_states: torch.Tensor | None = None
    encoder_mask: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    next_position: torch.Tensor | None = None


def apply_lora(model: nn.Module, rank: int, alpha: float | None, targets: list[str]) -> nn.Module:
    """Inject LoRA adapters into ``targets`` and freeze every other weight of ``model``; ``alpha``
    None: twice the rank (scale 2)."""
    from peft import LoraConfig, inject_adapter_in_model  # only models with LoRA need peft (0.1 s to import)

    alpha = 2 * rank if alpha is None else alpha
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    try:
        model = inject_adapter_in_model(config, model)
    except ValueError as exc:
        raise ConfigError(f"lora_targets {targets} match no module of the language model ({exc})") from None
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model


class LanguageModel(nn.Module):
    """Common part: holds the transformers model and applies LoRA."""

    family: str

    def __init__(self, model: PreTrainedModel, lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets: list[str] | None = None):
        super().__init__()
        if lora_rank > 0:  # the LM is frozen but for its LoRA weights (which have no dropout)
            model = apply_lora(model, lora_rank, lora_alpha, lora_targets or DEFAULT_LORA_TARGETS[self.family])
        self.model = model
        config = model.config
        self.hidden_size = config.get_text_config().hidden_size
        self.vocab_size = config.get_text_config().vocab_size
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        self.eos_token_id = config.eos_token_id

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def _prefix(self, visual: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        embeds = torch.cat([visual.to(self.model.dtype), self.embed(prompt_ids)], dim=1)
        mask = torch.cat([prompt_mask.new_ones(visual.shape[:2]), prompt_mask], dim=1)
        return embeds, mask

    def _targets_in(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.masked_fill(labels < 0, self.pad_token_id)


class EncoderDecoderLM(LanguageModel):
    """T5-family adapter (``T5ForConditionalGeneration``)."""

    family = "encoder-decoder"

    def forward(self, visual, prompt_ids, prompt_mask, labels):
        """Teacher-forced pass.

        Args:
            visual: ``(N, V, D)`` visual tokens. prompt_ids, prompt_mask: ``(N, Lp)``.
            labels: ``(N, L)`` target ids, -100 on padding.

        Returns:
            hidden ``(N, L, D)`` and logits ``(N, L, vocab)``.
        """
        states, mask = self._encode(visual, prompt_ids, prompt_mask)
        decoder_ids = self.model._shift_right(self._targets_in(labels))
        return self._decode(decoder_ids, states, mask, cache=None)

    def start(self, visual, prompt_ids, prompt_mask):
        """Encode the prefix and run the start token: ``(hidden (N, D), logits (N, vocab), state)``."""
        states, mask = self._encode(visual, prompt_ids, prompt_mask)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        state = DecodeState(cache=cache, encoder_states=states, encoder_mask=mask)
        start = torch.full((visual.shape[0],), self.model.config.decoder_start_token_id, device=visual.device)
        return self.step(state, start)

    def step(self, state: DecodeState, token_ids: torch.Tensor):
        """Feed one token per row: ``(hidden (N, D), logits (N, vocab), state)``."""
        hidden, logits = self._decode(token_ids[:, None], state.encoder_states, state.encoder_mask, state.cache)
        return hidden[:, -1], logits[:, -1], state

    def select(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        """Keep / repeat rows ``index`` (beam search)."""
        state.cache.reorder_cache(index)
        return replace(state, encoder_states=state.encoder_states[index], encoder_mask=state.encoder_mask[index])

    def _encode(self, visual, prompt_ids, prompt_mask):
        embeds, mask = self._prefix(visual, prompt_ids, prompt_mask)
        return self.model.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask

    def _decode(self, decoder_ids, states, mask, cache):
        out = self.model.decoder(
            input_ids=decoder_ids, encoder_hidden_states=states, encoder_attention_mask=mask,
            cache=cache, use_cache=cache is not None,
        )
        hidden = out.last_hidden_state
        return hidden, self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``(..., vocab)`` of final hidden states ``(..., D)``."""
        scaled = hidden * self.model.model_dim**-0.5 if self.model.config.scale_decoder_outputs else hidden
        return self.model.lm_head(scaled)


class DecoderOnlyLM(LanguageModel):
    """Adapter for any ``AutoModelForCausalLM`` (Llama, Qwen2, Mistral, GPT-NeoX, ...)."""

    family = "decoder-only"

    def forward(self, visual, prompt_ids, prompt_mask, labels):
        """Teacher-forced pass; same arguments and returns as ``EncoderDecoderLM.forward``."""
        prefix, prefix_mask = self._aligned_prefix(visual, prompt_ids, prompt_mask)
        targets_in = self._targets_in(labels[:, :-1])
        embeds = torch.cat([prefix, self.embed(targets_in)], dim=1)
        mask = torch.cat([prefix_mask, (labels[:, :-1] >= 0).to(prefix_mask.dtype)], dim=1)
        length = labels.shape[1]
        out = self.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=self._positions(mask),
            output_hidden_states=True, logits_to_keep=length,
        )
        return out.hidden_states[-1][:, -length:], out.logits

    def start(self, visual, prompt_ids, prompt_mask):
        """Run the prefix: ``(hidden (N, D), logits (N, vocab), state)`` of its last position."""
        embeds, mask = self._aligned_prefix(visual, prompt_ids, prompt_mask)
        state = DecodeState(cache=DynamicCache(), attention_mask=mask, next_position=mask.sum(1))
        return self._run(state, embeds, self._positions(mask))

    def step(self, state: DecodeState, token_ids: torch.Tensor):
        """Feed one token per row: ``(hidden (N, D), logits (N, vocab), state)``."""
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(token_ids.shape[0], 1)], dim=1)
        positions = state.next_position[:, None]
        state = replace(state, attention_mask=mask, next_position=state.next_position + 1)
        return self._run(state, self.embed(token_ids[:, None]), positions)

    def select(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        state.cache.reorder_cache(index)
        return replace(state, attention_mask=state.attention_mask[index], next_position=state.next_position[index])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``(..., vocab)`` of final hidden states ``(..., D)``."""
        return self.model.get_output_embeddings()(hidden)

    def _run(self, state, embeds, positions):
        out = self.model(
            inputs_embeds=embeds, attention_mask=state.attention_mask, position_ids=positions,
            cache=state.cache, use_cache=True, output_hidden_states=True, logits_to_keep=1,
        )
        return out.hidden_states[-1][:, -1], out.logits[:, -1], state

    def _aligned_prefix(self, visual, prompt_ids, prompt_mask):
        """``[visual ; prompt]`` with each row's padding moved to the left: ``(N, T, D)``, ``(N, T)``."""
        embeds, mask = self._prefix(visual, prompt_ids, prompt_mask)
        length = mask.shape[1]
        pads = length - mask.sum(1, keepdim=True)
        index = (torch.arange(length, device=mask.device)[None] - pads) % length
        return embeds.gather(1, index[..., None].expand_as(embeds)), mask.gather(1, index)

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.long().cumsum(1) - 1).clamp(min=0)


def language_model(model: PreTrainedModel, lora_rank: int = 0, lora_alpha: float | None = None,
                   lora_targets: list[str] | None = None) -> LanguageModel:
    """Wrap a transformers LM in the adapter of its family."""
    cls = EncoderDecoderLM if model.config.is_encoder_decoder else DecoderOnlyLM
    return cls(model, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets)
