"""Residue and atom constants, loaded once from `resources/residue_constants.json`.

The JSON holds AlphaFold2's idealised chemistry (atom names, rigid-group atom positions, chi angles);
everything here is derived from it, never retyped. Arrays are numpy; index conventions follow AF2:

- residue types: the 20 amino acids in `restypes` order, then X (unknown) at index 20;
- atom37: one slot per heavy-atom name over all residue types (`atom_types`);
- atom14: per residue type, its own atoms in a fixed order (`restype_name_to_atom14_names`);
- rigid groups (8): backbone, pre-omega, phi, psi, chi1..chi4 (supplement Table 2);
- MSA alphabet (23 classes): 20 amino acids, X, gap (21), mask token (22).
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

_RAW = json.loads(resources.files("protfold").joinpath("resources/residue_constants.json").read_text())

restypes: list[str] = list(_RAW["restypes"])
restype_order: dict[str, int] = {r: i for i, r in enumerate(restypes)}
restype_num = len(restypes)  # 20
unk_restype_index = restype_num  # X
restypes_with_x: list[str] = restypes + ["X"]
restype_1to3: dict[str, str] = dict(_RAW["restype_1to3"])
restype_3to1: dict[str, str] = {v: k for k, v in restype_1to3.items()}
resnames: list[str] = [restype_1to3[r] for r in restypes] + ["UNK"]

atom_types: list[str] = list(_RAW["atom_types"])
atom_order: dict[str, int] = {a: i for i, a in enumerate(atom_types)}
atom_type_num = len(atom_types)  # 37
restype_name_to_atom14_names: dict[str, list[str]] = {k: list(v) for k, v in _RAW["restype_name_to_atom14_names"].items()}
restype_name_to_atom14_names.setdefault("UNK", [""] * 14)
residue_atoms: dict[str, list[str]] = {k: list(v) for k, v in _RAW["residue_atoms"].items()}
chi_angles_atoms: dict[str, list[list[str]]] = {k: [list(a) for a in v] for k, v in _RAW["chi_angles_atoms"].items()}
residue_atom_renaming_swaps: dict[str, dict[str, str]] = {k: dict(v) for k, v in _RAW["residue_atom_renaming_swaps"].items()}
van_der_waals_radius: dict[str, float] = dict(_RAW["van_der_waals_radius"])
ca_ca = float(_RAW["ca_ca"])
between_res_bond_length_c_n: list[float] = list(_RAW["between_res_bond_length_c_n"])
between_res_bond_length_stddev_c_n: list[float] = list(_RAW["between_res_bond_length_stddev_c_n"])
between_res_cos_angles_c_n_ca: list[float] = list(_RAW["between_res_cos_angles_c_n_ca"])
between_res_cos_angles_ca_c_n: list[float] = list(_RAW["between_res_cos_angles_ca_c_n"])

# MSA alphabet: AF2's 22 letters (20 aa, X, gap) plus the BERT mask token.
msa_gap_index = 21
msa_mask_index = 22
msa_num_classes = 23
_MSA_ALIASES = {"B": "D", "Z": "E", "U": "C", "J": "X", "O": "X"}


def msa_letter_to_id(letter: str) -> int:
    """Map one upper-case alignment letter (or '-') to the 23-class MSA alphabet; unknown letters -> X."""
    if letter == "-":
        return msa_gap_index
    letter = _MSA_ALIASES.get(letter, letter)
    return restype_order.get(letter, unk_restype_index)


def sequence_to_aatype(sequence: str) -> np.ndarray:
    """One-letter sequence -> int64 [L] residue types (0..19, 20 for anything else)."""
    return np.array([restype_order.get(c, unk_restype_index) for c in sequence], dtype=np.int64)


def aatype_to_sequence(aatype: np.ndarray) -> str:
    return "".join(restypes_with_x[int(a)] for a in aatype)


def _chi_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = np.zeros((restype_num + 1, 4), dtype=np.float32)
    mask[:restype_num] = np.asarray(_RAW["chi_angles_mask"], dtype=np.float32)
    periodic = np.zeros((restype_num + 1, 4), dtype=np.float32)
    raw_periodic = np.asarray(_RAW["chi_pi_periodic"], dtype=np.float32)  # 21 rows (X included) in the JSON
    periodic[: len(raw_periodic)] = raw_periodic
    indices = np.zeros((restype_num + 1, 4, 4), dtype=np.int64)
    for r, name in enumerate(resnames[:restype_num]):
        for k, atoms in enumerate(chi_angles_atoms[name]):
            indices[r, k] = [atom_order[a] for a in atoms]
    return mask, periodic, indices


chi_angles_mask, chi_pi_periodic, chi_atom_indices = _chi_arrays()


def _atom_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    atom37_mask = np.zeros((restype_num + 1, atom_type_num), dtype=np.float32)
    atom14_mask = np.zeros((restype_num + 1, 14), dtype=np.float32)
    to37 = np.zeros((restype_num + 1, 14), dtype=np.int64)
    to14 = np.zeros((restype_num + 1, atom_type_num), dtype=np.int64)
    for r, name in enumerate(resnames[:restype_num]):
        for i, atom in enumerate(restype_name_to_atom14_names[name]):
            if atom:
                atom14_mask[r, i] = 1.0
                atom37_mask[r, atom_order[atom]] = 1.0
                to37[r, i] = atom_order[atom]
                to14[r, atom_order[atom]] = i
    return atom37_mask, atom14_mask, to37, to14


restype_atom37_mask, restype_atom14_mask, restype_atom14_to_atom37, restype_atom37_to_atom14 = _atom_maps()


def _ambiguity() -> tuple[np.ndarray, np.ndarray]:
    """Atom14 index of each atom's symmetric partner (identity where none) and an is-ambiguous mask."""
    swap = np.tile(np.arange(14, dtype=np.int64), (restype_num + 1, 1))
    ambiguous = np.zeros((restype_num + 1, 14), dtype=np.float32)
    for resname, pairs in residue_atom_renaming_swaps.items():
        r = restype_order[restype_3to1[resname]]
        names = restype_name_to_atom14_names[resname]
        for a, b in pairs.items():
            i, j = names.index(a), names.index(b)
            swap[r, i], swap[r, j] = j, i
            ambiguous[r, i] = ambiguous[r, j] = 1.0
    return swap, ambiguous


restype_atom14_swap_index, restype_atom14_is_ambiguous = _ambiguity()


def _frame(ex: np.ndarray, ey: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """4x4 transform with x-axis along ex and the xy-plane spanned by ex, ey (Gram-Schmidt)."""
    e0 = ex / np.linalg.norm(ex)
    e1 = ey - e0 * np.dot(ey, e0)
    e1 = e1 / np.linalg.norm(e1)
    frame = np.eye(4)
    frame[:3, :3] = np.stack([e0, e1, np.cross(e0, e1)], axis=-1)
    frame[:3, 3] = translation
    return frame


def _rigid_groups() -> tuple[np.ndarray, ...]:
    """Default frames of the 8 rigid groups, and each atom's group and local position (AF2 Table 2).

    Atom positions in the JSON are local to their group; chi_{k+1} frames are given in the chi_k frame,
    and each next rotation axis starts at the previous frame's origin.
    """
    frames = np.tile(np.eye(4, dtype=np.float32), (restype_num + 1, 8, 1, 1))
    atom14_group = np.zeros((restype_num + 1, 14), dtype=np.int64)
    atom14_pos = np.zeros((restype_num + 1, 14, 3), dtype=np.float32)
    atom37_group = np.zeros((restype_num + 1, atom_type_num), dtype=np.int64)
    atom37_pos = np.zeros((restype_num + 1, atom_type_num, 3), dtype=np.float32)
    for r, name in enumerate(resnames[:restype_num]):
        local = {}
        for atom, group, pos in _RAW["rigid_group_atom_positions"][name]:
            local[atom] = np.asarray(pos, dtype=np.float64)
            atom37_group[r, atom_order[atom]] = group
            atom37_pos[r, atom_order[atom]] = pos
            i = restype_name_to_atom14_names[name].index(atom)
            atom14_group[r, i] = group
            atom14_pos[r, i] = pos
        frames[r, 2] = _frame(local["N"] - local["CA"], np.array([1.0, 0.0, 0.0]), local["N"])  # phi
        frames[r, 3] = _frame(local["C"] - local["CA"], local["CA"] - local["N"], local["C"])  # psi
        chis = chi_angles_atoms[name]
        if chis:
            a, b, c = (local[n] for n in chis[0][:3])
            frames[r, 4] = _frame(c - b, a - b, c)
        for k in range(1, len(chis)):
            end = local[chis[k][2]]
            frames[r, 4 + k] = _frame(end, np.array([-1.0, 0.0, 0.0]), end)
    return frames, atom14_group, atom14_pos, atom37_group, atom37_pos


(
    restype_rigid_group_default_frame,
    restype_atom14_to_rigid_group,
    restype_atom14_rigid_group_positions,
    restype_atom37_to_rigid_group,
    restype_atom37_rigid_group_positions,
) = _rigid_groups()

# Which of the 8 rigid groups exist per residue type (backbone, pre-omega, phi, psi always; chis per mask)
restype_rigid_group_mask = np.concatenate(
    [np.ones((restype_num + 1, 4), dtype=np.float32), chi_angles_mask], axis=-1
)
restype_rigid_group_mask[unk_restype_index, 1:] = 0.0
