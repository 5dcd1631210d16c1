"""SSD baseline of Table 1/2 (DESIGN §5), on the shared backbone.

HEADER_PLACEHOLDER
"""

from __future__ import annotations

import torch

#: Negatives kept per positive by the hard negative miner (Liu et al., SSD).
NEGATIVES_PER_POSITIVE = 3


def hard_negative_mask(
    background_loss: torch.Tensor, labels: torch.Tensor, negatives_per_positive: int = NEGATIVES_PER_POSITIVE
) -> torch.Tensor:
    """Hard negative mining: per volume, the ``negatives_per_positive × P`` negatives with the
    highest background loss, P being that volume's number of positives.

    Args:
        background_loss: (N, A) loss of each anchor for the background class (−log p₀).
        labels: (N, A) int64 anchor labels: −1 ignored, 0 negative, c > 0 positive.
        negatives_per_positive: ratio of kept negatives to positives.

    Returns:
        (N, A) bool, True for the kept negatives (never a positive or an ignored anchor). A volume
        with fewer negatives than wanted keeps them all; one with no positive keeps none.
    """
    if background_loss.shape != labels.shape or background_loss.ndim != 2:
        raise ValueError(
            f"hard_negative_mask: background_loss {tuple(background_loss.shape)} and labels "
            f"{tuple(labels.shape)} must both be (N, A)"
        )
    is_negative = labels == 0
    num_keep = (labels > 0).sum(dim=1, keepdim=True) * negatives_per_positive  # (N, 1)
    # Rank the negatives by decreasing loss; the others sort last.
    loss = torch.where(is_negative, background_loss.detach(), torch.full_like(background_loss, -float("inf")))
    order = loss.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)
    return is_negative & (rank < num_keep)
