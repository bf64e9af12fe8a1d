"""Seeded, class-stratified index selection.

Several datasets ship without a train/test split (Animal-MNIST, scikit-learn digits, image folders),
and experiments often train on a subset. Both need the same thing: pick ``n`` indices so that every
class is represented in proportion to its size, reproducibly from a seed. Doing it per class (rather
than one global random draw) keeps small test sets balanced, which matters for 10-class tasks with a
few hundred test images where a random draw can easily be off by several percent per class.
"""

from __future__ import annotations

import torch


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``; isolated from the global RNG so loading data never
    changes (or depends on) the random state of model initialisation."""
    g = torch.Generator()
    g.manual_seed(int(seed) % (2**63))
    return g


def class_quotas(labels: torch.Tensor, n: int, keep_one: bool = False) -> dict[int, int]:
    """Split ``n`` picks over the classes in proportion to their counts (largest remainder).

    Largest remainder makes the quotas sum exactly to ``n`` (e.g. 360 test images for the digits),
    which plain rounding per class does not guarantee.

    Args:
        labels: int64 labels of the pool.
        n: total number of picks, ``0 <= n <= len(labels)``.
        keep_one: cap every quota at ``count - 1`` so at least one sample of each class stays
            out of the pick (used for test splits so no class vanishes from training).

    Returns:
        Class id -> number of samples to pick from that class.
    """
    classes, counts = torch.unique(labels, return_counts=True)
    total = int(counts.sum())
    if total == 0 or n <= 0:
        return {int(c): 0 for c in classes}
    exact = counts.double() * n / total
    base = exact.floor().long()
    rest = n - int(base.sum())
    if rest > 0:
        # Ties broken by class id (stable sort) so the quotas are deterministic.
        order = torch.sort(exact - base.double(), descending=True, stable=True).indices
        base[order[:rest]] += 1
    if keep_one:
        base = torch.minimum(base, (counts - 1).clamp(min=0))
    return {int(c): int(q) for c, q in zip(classes, base, strict=True)}


def stratified_pick(labels: torch.Tensor, n: int, seed: int,
                    keep_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``n`` indices stratified by class; return ``(picked, rest)``, both sorted.

    Args:
        labels: int64 labels (N,).
        n: number to pick; clipped to ``[0, N]``.
        seed: split seed; the same seed and labels always give the same indices.
        keep_one: see :func:`class_quotas`.

    Returns:
        Sorted int64 index tensors of the picked samples and of the remaining ones.
    """
    labels = labels.cpu()
    n = max(0, min(int(n), labels.numel()))
    g = generator(seed)
    quotas = class_quotas(labels, n, keep_one=keep_one)
    picked = []
    for c in sorted(quotas):
        idx = torch.nonzero(labels == c, as_tuple=True)[0]
        perm = idx[torch.randperm(idx.numel(), generator=g)]
        picked.append(perm[: quotas[c]])
    chosen = torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    mask[chosen] = True
    return torch.nonzero(mask, as_tuple=True)[0], torch.nonzero(~mask, as_tuple=True)[0]
