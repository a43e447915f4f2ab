"""Structure and MSA parsing (Biopython) and structure writing (PDB / mmCIF)."""

from protfold.io.msa import (
    MSA,
    check_query,
    find_msa_files,
    load_msas,
    parse_a3m,
    parse_fasta_alignment,
    parse_msa,
    parse_stockholm,
    single_sequence_msa,
)
from protfold.io.structure import ProteinChain, list_protein_chains, parse_structure, residue_letter
from protfold.io.writer import to_mmcif, to_pdb

__all__ = [
    "MSA",
    "ProteinChain",
    "check_query",
    "find_msa_files",
    "list_protein_chains",
    "load_msas",
    "parse_a3m",
    "parse_fasta_alignment",
    "parse_msa",
    "parse_stockholm",
    "parse_structure",
    "residue_letter",
    "single_sequence_msa",
    "to_mmcif",
    "to_pdb",
]
