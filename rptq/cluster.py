"""K-means over per-channel [max, min] features -> a permutation with clusters contiguous."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from models.spec import HeadLayout


@dataclass(frozen=True)
class Layout:
    """A reorder decision for one activation point: new order and contiguous group sizes."""

    perm: torch.Tensor  # new channel i is old channel perm[i]
    sizes: tuple[int, ...]


def kmeans_labels(features: np.ndarray, clusters: int, seed: int,
                  pools: ThreadpoolController | None = None) -> np.ndarray:
    """``pools``: the process's thread pools, when the caller found them already (finding them
    scans every loaded library, 6-10 ms here, against ~20 ms for a whole 64-channel k-means)."""
    clusters = max(1, min(clusters, features.shape[0]))
    if clusters == 1:
        return np.zeros(features.shape[0], dtype=np.int64)
    # Lazy on purpose: scikit-learn takes ~1.7 s to import here, and the registry imports this module for every
    # command (a refused flag, a method that never clusters).
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    # One thread: a few thousand 2-D points are too little work to share, and under load
    # OpenMP hand-offs made k-means 40x slower here (3.7 s vs 0.1 s for 4096 channels, k=32);
    # it also keeps the labels independent of the machine's core count.
    pools = pools if pools is not None else ThreadpoolController()
    with warnings.catch_warnings(), pools.limit(limits=1):  # fewer distinct clusters than k: fine
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=clusters, init="k-means++", n_init=10, random_state=seed)
        return km.fit(features).labels_.astype(np.int64)


CLUSTER_ORDERS = ("label", "feature")


def labels_to_layout(labels: np.ndarray, features: np.ndarray, order: str = "label") -> Layout:
    """Clusters contiguous; in k-means' label order, channels as ``torch.argsort(labels)`` leaves them (``label``:
    the RPTQ reference's own permutation; torch's default sort is not stable, so inside a cluster the channels
    are not in index order), or clusters by their mean feature vector and channels by index inside each
    (``feature``: independent of k-means' arbitrary numbering, ties broken by the smallest channel index). Both
    orders change nothing but the order of GPTQ's columns."""
    if order == "label":
        perm = torch.argsort(torch.as_tensor(labels, dtype=torch.long))
        return Layout(perm, tuple(int(n) for n in np.bincount(labels) if n))
    keys = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        feature_key = tuple(features[members].mean(axis=0).round(8)) if order == "feature" else ()
        keys.append((feature_key, int(label) if order == "label" else int(members[0]), label))
    rank = {label: r for r, (_, _, label) in enumerate(sorted(keys))}
    cluster_rank = np.array([rank[label] for label in labels])
    channels = np.arange(labels.shape[0])
    perm = np.lexsort((channels, cluster_rank))  # stable: by cluster, then channel index
    sizes = tuple(int(n) for n in np.bincount(cluster_rank))
    return Layout(torch.as_tensor(perm, dtype=torch.long), sizes)


def cluster_channels(features: torch.Tensor, clusters: int, seed: int,
                     pools: ThreadpoolController | None = None, order: str = "label") -> Layout:
    """Layout for one set of channels; ``features`` is (channels, n_features)."""
    feats = features.detach().float().cpu().numpy()
    return labels_to_layout(kmeans_labels(feats, clusters, seed, pools), feats, order)


def range_features(cmin: torch.Tensor, cmax: torch.Tensor) -> torch.Tensor:
    return torch.stack([cmax, cmin], dim=-1)


def cluster_heads(features: torch.Tensor, heads: HeadLayout, clusters: int, seed: int,
                  rope: bool, order: str = "label") -> list[Layout]:
    """One local layout per key/value head.

    ``features`` is (kv_heads, head_dim, n_features): the features of every tensor sharing
    that head's permutation, concatenated. With RoPE, channels i and i + head_dim/2 form a
    rotation pair and must move together, so pairs are clustered and the same pair order is
    used in both halves (each cluster then occupies one group in each half).
    """
    layouts = []
    half = heads.head_dim // 2
    pools = ThreadpoolController()  # found once for every head
    for g in range(heads.num_kv_heads):
        f = features[g]
        if rope:
            pairs = torch.cat([f[:half], f[half:]], dim=-1)
            local = cluster_channels(pairs, clusters, seed, pools, order)
            perm = torch.cat([local.perm, local.perm + half])
            layouts.append(Layout(perm, local.sizes + local.sizes))
        else:
            layouts.append(cluster_channels(f, clusters, seed, pools, order))
    return layouts


def head_layout(local: list[Layout], heads_per_layout: int, head_dim: int) -> Layout:
    """Global layout over ``len(local) * heads_per_layout`` heads, each reusing its group's local layout."""
    perms, sizes = [], []
    for g, lay in enumerate(local):
        for r in range(heads_per_layout):
            h = g * heads_per_layout + r
            perms.append(lay.perm + h * head_dim)
            sizes.extend(lay.sizes)
    return Layout(torch.cat(perms), tuple(sizes))
