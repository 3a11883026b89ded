"""Two transformers 4.x helpers that InstantMesh's ViT encoder (`src/models/encoder/dino.py`) still uses.

InstantMesh pins transformers 4.34; trl 0.23.1 needs a recent transformers, and transformers 5 removed
`pytorch_utils.find_pruneable_heads_and_indices` (imported by the encoder, used only to prune heads) and
`PreTrainedModel.get_head_mask` (called by the encoder's forward pass). `provide_transformers4_helpers` adds the
minimal versions InstantMesh needs, only where they are missing: no head pruning, and no head masks.
"""

from __future__ import annotations

__all__ = ["provide_transformers4_helpers"]


def _head_pruning_unsupported(*args, **kwargs):
    raise NotImplementedError("Pruning attention heads needs transformers 4 (InstantMesh's encoder never prunes).")


def _no_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False) -> list[None]:
    """One `None` per layer: the only head mask InstantMesh uses (`head_mask=None`)."""
    if head_mask is not None:
        raise NotImplementedError("Attention head masks need transformers 4; InstantMesh passes head_mask=None.")
    return [None] * num_hidden_layers


def provide_transformers4_helpers() -> None:
    """Add the two helpers to transformers when it lacks them (transformers 5); a no-op on transformers 4."""
    import transformers.pytorch_utils as pytorch_utils
    from transformers import PreTrainedModel

    if not hasattr(pytorch_utils, "find_pruneable_heads_and_indices"):
        pytorch_utils.find_pruneable_heads_and_indices = _head_pruning_unsupported
    if not hasattr(PreTrainedModel, "get_head_mask"):
        PreTrainedModel.get_head_mask = _no_head_mask
