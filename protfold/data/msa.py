"""MSA sampling, BERT masking, clustering and the msa_feat / extra_msa_feat tensors (AF2 supplement 1.2.6-1.2.7).

Inputs are the (column-cropped) alignment `msa` [N_msa, N] in the 23-class alphabet (20 aa, X=20,
gap=21, mask=22; row 0 is the query) and `deletion_matrix` [N_msa, N]. Steps, in AF2's order:

1. cluster centres: the query plus `max_msa_clusters - 1` other rows drawn at random; all other rows are
   the extra MSA candidates (`sample_clusters`);
2. BERT masking of the centres (`bert_mask_msa`);
3. every non-centre row is assigned to its nearest (masked) centre (`nearest_clusters`), and the cluster
   profile and deletion mean are averaged over each centre and its members (`cluster_summary`);
4. the extra MSA is the first `max_extra_msa` non-centre rows (already in random order).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from protfold import constants as rc
from protfold.config import DataConfig

N_CLASSES = rc.msa_num_classes  # 23
_N_AGREE = rc.unk_restype_index + 1  # classes that count as agreement: 20 aa + X (not gap, not mask)
_BF16_ONE = 0x3F80  # bit pattern of 1.0 in bfloat16
_BF16_EXACT = 256  # integers up to 256 are exact in bfloat16: agreement counts are summed in such chunks


def deletion_value(d: np.ndarray | Tensor) -> Tensor:
    """AF2's deletion transform 2/pi * arctan(d / 3), in [0, 1)."""
    return torch.atan(torch.as_tensor(d, dtype=torch.float32) / 3.0) * (2.0 / math.pi)


def _deletion_channels(d: np.ndarray) -> tuple[Tensor, Tensor]:
    """has_deletion and deletion_value of integer deletion counts [R, N], via a lookup over 0..max(d)."""
    d = np.asarray(d).astype(np.int64, copy=False)
    top = int(d.max()) if d.size else 0
    table = deletion_value(np.arange(top + 1, dtype=np.float32))
    idx = torch.from_numpy(d)
    return (idx > 0).float(), table[idx]


def msa_profile(msa: np.ndarray) -> np.ndarray:
    """Per-column class frequencies over all rows (AF2 `make_hhblits_profile`): [N_msa, N] -> [N, 23]."""
    n_rows, n_res = msa.shape
    keys = (np.arange(n_res, dtype=np.int64) * N_CLASSES + msa.astype(np.int64)).ravel()
    counts = np.bincount(keys, minlength=n_res * N_CLASSES).reshape(n_res, N_CLASSES)
    return (counts / max(n_rows, 1)).astype(np.float32)


def sample_clusters(n_rows: int, max_clusters: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the cluster centres (query first, then a random draw) and of the rest (random order)."""
    order = np.concatenate([[0], 1 + rng.permutation(n_rows - 1)]).astype(np.int64)
    n_clusters = min(max_clusters, n_rows)
    return order[:n_clusters], order[n_clusters:]


def bert_mask_msa(
    msa: np.ndarray, profile: np.ndarray, cfg: DataConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """AF2 `make_masked_msa`: [S, N] -> (masked msa [S, N], bert_mask [S, N] float32).

    Each position is selected with probability `masked_msa_prob`; a selected position becomes a uniformly
    drawn amino acid (`masked_msa_uniform`), a draw from its column's profile (`masked_msa_profile`,
    profile [N, 23] over all MSA rows), stays unchanged (`masked_msa_same`), or else the mask token.
    """
    shape = msa.shape
    selected = rng.random(shape) < cfg.masked_msa_prob
    branch = rng.random(shape)
    uniform_aa = rng.integers(0, rc.restype_num, size=shape)
    cdf = np.cumsum(profile[:, : rc.msa_gap_index + 1], axis=-1)  # mask token never comes from the profile
    cdf = cdf / np.maximum(cdf[:, -1:], 1e-12)
    u = rng.random(shape)
    from_profile = (u[..., None] > cdf[None]).sum(-1).clip(max=rc.msa_gap_index)

    t_uniform = cfg.masked_msa_uniform
    t_profile = t_uniform + cfg.masked_msa_profile
    t_same = t_profile + cfg.masked_msa_same
    replaced = np.where(
        branch < t_uniform,
        uniform_aa,
        np.where(branch < t_profile, from_profile, np.where(branch < t_same, msa, rc.msa_mask_index)),
    )
    out = np.where(selected, replaced, msa).astype(msa.dtype)
    return out, selected.astype(np.float32)


def agreement(centres: np.ndarray, others: np.ndarray) -> Tensor:
    """Number of columns where a row and a centre hold the same residue (20 aa or X) [E, S] (fp32, exact).

    Gaps and mask tokens never agree (AF2's gap_agreement_weight is 0). Computed as a matmul of one-hots
    restricted to the (column, class) pairs that occur among the centres (the others can never agree),
    in bfloat16 over blocks of at most 256 columns, where counts are exact, summed in fp32.
    """
    n_clusters, n_res = centres.shape
    cols = np.arange(n_res)
    present = np.zeros((n_res, N_CLASSES), dtype=bool)
    present[cols[None, :], centres.astype(np.int64)] = True
    present[:, _N_AGREE:] = False
    slot = np.cumsum(present.ravel()).reshape(n_res, N_CLASSES) - 1
    n_slots = int(present.sum())
    slot = np.where(present, slot, n_slots)  # absent pairs go to one spare column, dropped below
    col_start = np.concatenate([[0], np.cumsum(present.sum(1))])

    def one_hot(rows: np.ndarray) -> Tensor:
        # written as raw bfloat16 bits in numpy: several times faster than a torch scatter on CPU
        width = n_slots + 1
        flat = (slot[cols[None, :], rows.astype(np.int64)] + np.arange(rows.shape[0])[:, None] * width).ravel()
        bits = np.zeros(rows.shape[0] * width, dtype=np.int16)
        bits[flat] = _BF16_ONE
        return torch.from_numpy(bits).view(torch.bfloat16).reshape(rows.shape[0], width)

    c, o = one_hot(centres), one_hot(others)
    total = torch.zeros(others.shape[0], n_clusters)
    for start in range(0, n_res, _BF16_EXACT):
        lo, hi = int(col_start[start]), int(col_start[min(start + _BF16_EXACT, n_res)])
        total += (o[:, lo:hi] @ c[:, lo:hi].T).float()
    return total


def nearest_clusters(centres: np.ndarray, others: np.ndarray) -> np.ndarray:
    """AF2 `nearest_neighbor_clusters`: index of the centre each row agrees with most (first on ties) [E]."""
    if others.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return agreement(centres, others).argmax(-1).numpy().astype(np.int64)


def cluster_summary(
    centres: np.ndarray,
    centre_deletions: np.ndarray,
    others: np.ndarray,
    other_deletions: np.ndarray,
    assignment: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """AF2 `summarize_clusters`: profile [S, N, 23] and deletion mean [S, N] of each centre and its members."""
    n_clusters, n_res = centres.shape
    cols = np.arange(n_res, dtype=np.int64)
    keys = (assignment[:, None] * n_res + cols) * N_CLASSES + others.astype(np.int64)
    counts = np.bincount(keys.ravel(), minlength=n_clusters * n_res * N_CLASSES).astype(np.float32)
    counts = counts.reshape(n_clusters, n_res, N_CLASSES)
    counts[np.arange(n_clusters)[:, None], cols, centres.astype(np.int64)] += 1.0
    members = np.bincount(assignment, minlength=n_clusters).astype(np.float32) + 1.0
    del_keys = (assignment[:, None] * n_res + cols).ravel()
    del_sum = np.bincount(del_keys, weights=other_deletions.ravel().astype(np.float64), minlength=n_clusters * n_res)
    del_sum = del_sum.reshape(n_clusters, n_res) + centre_deletions
    return counts / members[:, None, None], (del_sum / members[:, None]).astype(np.float32)


_EXTRA_TABLE = torch.cat([torch.eye(N_CLASSES), torch.zeros(N_CLASSES, 2)], dim=-1)  # one-hot + 2 deletion slots


def _one_hot(msa: np.ndarray) -> Tensor:
    return torch.nn.functional.embedding(torch.from_numpy(msa).long(), torch.eye(N_CLASSES))


def make_msa_features(
    msa: np.ndarray, deletion_matrix: np.ndarray, cfg: DataConfig, rng: np.random.Generator
) -> dict[str, Tensor]:
    """All MSA features of one (column-cropped) example; see the module docstring for the steps.

    Returns msa_feat [S, N, 49] (one-hot 23, has_deletion, deletion_value, cluster profile 23, cluster
    deletion mean transformed like deletion_value), msa_mask [S, N], true_msa long [S, N], bert_mask
    [S, N], extra_msa_feat [E, N, 25] (one-hot 23, has_deletion, deletion_value), extra_msa_mask [E, N].
    AF2-DIFF: with no rows left for the extra MSA, E = 1 with an all-zero row and mask 0 (no empty tensors).
    """
    profile = msa_profile(msa)
    centre_rows, rest_rows = sample_clusters(msa.shape[0], cfg.max_msa_clusters, rng)
    true_msa = msa[centre_rows]
    centre_del = deletion_matrix[centre_rows].astype(np.float32)
    masked, bert = bert_mask_msa(true_msa, profile, cfg, rng)
    rest, rest_del = msa[rest_rows], deletion_matrix[rest_rows]
    assignment = nearest_clusters(masked, rest)
    cluster_profile, cluster_del = cluster_summary(masked, centre_del, rest, rest_del, assignment)

    msa_feat = torch.empty(*masked.shape, 2 * N_CLASSES + 3)
    msa_feat[..., :N_CLASSES] = _one_hot(masked)
    msa_feat[..., N_CLASSES], msa_feat[..., N_CLASSES + 1] = _deletion_channels(deletion_matrix[centre_rows])
    msa_feat[..., N_CLASSES + 2 : 2 * N_CLASSES + 2] = torch.from_numpy(cluster_profile)
    msa_feat[..., -1] = deletion_value(cluster_del)

    extra = rest[: cfg.max_extra_msa]
    extra_feat = torch.nn.functional.embedding(torch.from_numpy(extra).long(), _EXTRA_TABLE)
    extra_feat[..., N_CLASSES], extra_feat[..., N_CLASSES + 1] = _deletion_channels(rest_del[: cfg.max_extra_msa])
    extra_mask = torch.ones(extra.shape, dtype=torch.float32)
    if extra.shape[0] == 0:
        extra_feat = torch.zeros(1, msa.shape[1], N_CLASSES + 2)
        extra_mask = torch.zeros(1, msa.shape[1])
    return {
        "msa_feat": msa_feat,
        "msa_mask": torch.ones(masked.shape, dtype=torch.float32),
        "true_msa": torch.from_numpy(true_msa.astype(np.int64)),
        "bert_mask": torch.from_numpy(bert),
        "extra_msa_feat": extra_feat,
        "extra_msa_mask": extra_mask,
    }
