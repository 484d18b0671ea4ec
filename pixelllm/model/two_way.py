"""Running ``transformers``' ``SamTwoWayTransformer`` with an attention bias on every token-to-image step.

``SamTwoWayTransformer.forward`` passes its ``attention_similarity`` to the blocks but not to the
final token-to-image attention; this runs the same layers with the bias applied there too.
"""

from __future__ import annotations

import torch
from transformers.models.sam.modeling_sam import SamTwoWayTransformer


def two_way(transformer: SamTwoWayTransformer, queries: torch.Tensor, keys: torch.Tensor,
            query_position: torch.Tensor, key_position: torch.Tensor,
            bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens attend to keys and back, as SAM's two-way transformer.

    Args:
        queries, query_position: ``(N, T, C)`` tokens and their positional encoding (SAM uses the
            initial tokens themselves).
        keys, key_position: ``(N, K, C)`` image (or other) features and their encoding.
        bias: additive bias on the token-to-image attention logits, broadcastable to
            ``(N, heads, T, K)`` (``-inf`` hides a key from a token), or None.

    Returns:
        The tokens ``(N, T, C)`` and the keys ``(N, K, C)`` after the last layer.
    """
    queries, keys = queries[:, None], keys[:, None]
    query_position, key_position = query_position[:, None], key_position[:, None]
    for layer in transformer.layers:
        queries, keys, _ = layer(queries=queries, keys=keys, query_point_embedding=query_position,
                                 key_point_embedding=key_position, attention_similarity=bias)
    final, _ = transformer.final_attn_token_to_image(query=queries + query_position, key=keys + key_position,
                                                     value=keys, attention_similarity=bias)
    return transformer.layer_norm_final_attn(queries + final)[:, 0], keys[:, 0]
