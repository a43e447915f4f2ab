"""The whole network: embedders, extra MSA stack, Evoformer, structure module, heads, recycling."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from protfold import constants as rc
from protfold.config import MemoryConfig, ModelConfig
from protfold.model.embedders import ExtraMSAEmbedder, InputEmbedder, RecyclingEmbedder, embed_pair_in_place
from protfold.model.evoformer import EvoformerStack, ExtraMSAStack
from protfold.model.heads import AuxiliaryHeads
from protfold.model.plan import MemoryPlan, resolve
from protfold.model.structure import StructureModule

_CA, _CB = rc.atom_order["CA"], rc.atom_order["CB"]
_GLY = rc.restype_order["G"]


def pseudo_beta(aatype: Tensor, atom37: Tensor) -> Tensor:
    """CB position (CA for glycine): aatype [*, N], atom37 [*, N, 37, 3] -> [*, N, 3]."""
    is_gly = (aatype == _GLY)[..., None]
    return torch.where(is_gly, atom37[..., _CA, :], atom37[..., _CB, :])


class AlphaFold(nn.Module):
    """AF2 supplement, Algorithm 2 without templates.

    Recycling (supplement 1.10): `n_recycles` extra passes run without gradient, each feeding m[0], z and
    the predicted pseudo-beta positions (detached) into the next; only the last pass builds a graph.
    `memory` is resolved into at most two plans (`protfold.model.plan.resolve`), one for the pass with grad and
    one for the passes without, and the plans are passed down; no module stores a memory setting.
    forward(batch) reads target_feat [B, N, 22], residue_index [B, N], seq_mask [B, N], msa_feat
    [B, S, N, 49], msa_mask [B, S, N], extra_msa_feat [B, E, N, 25], extra_msa_mask [B, E, N], aatype [B, N].
    """

    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embedder = InputEmbedder.from_config(cfg)
        self.recycling_embedder = RecyclingEmbedder.from_config(cfg)
        self.extra_msa_embedder = ExtraMSAEmbedder.from_config(cfg)
        self.extra_msa_stack = ExtraMSAStack(cfg)
        self.evoformer = EvoformerStack(cfg)
        self.structure_module = StructureModule(cfg=cfg)
        self.heads = AuxiliaryHeads(cfg=cfg)

    def forward(self, batch: dict[str, Tensor], *, n_recycles: int = 0,
                memory: MemoryConfig = MemoryConfig()) -> dict[str, Tensor]:
        grad_on = torch.is_grad_enabled()
        device = batch["aatype"].device
        modes = {grad_on} | ({False} if n_recycles else set())  # the last pass, and the recycling passes
        plans = {grad: resolve(memory, grad=grad, device=device) for grad in modes}
        pair_dtype = None
        if not grad_on and plans[False].pair_storage == "bf16":
            if not torch.is_autocast_enabled(device.type):
                raise ValueError("MemoryConfig.pair_storage='bf16' needs bf16 autocast (predict --precision bf16): "
                                 "fp32 modules cannot read a bf16 z")
            pair_dtype = torch.bfloat16  # z lives in prev[1]'s storage through every pass (embed_pair_in_place)
        prev = self._initial_recycling_inputs(batch, pair_dtype)
        for i in range(n_recycles + 1):
            last = i == n_recycles
            with torch.set_grad_enabled(grad_on and last):
                outputs = self.iteration(batch, prev, plan=plans[grad_on and last])
            if not last:
                prev = (outputs["msa_first_row"].detach(), outputs["pair"].detach(),
                        pseudo_beta(batch["aatype"], outputs["final_atom37"]).detach())
        outputs["n_recycles"] = torch.tensor(n_recycles)
        return outputs

    def _initial_recycling_inputs(self, batch: dict[str, Tensor],
                                  pair_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        b, n = batch["aatype"].shape
        ref = batch["msa_feat"]
        return (ref.new_zeros(b, n, self.cfg.c_m), ref.new_zeros(b, n, n, self.cfg.c_z, dtype=pair_dtype),
                ref.new_zeros(b, n, 3))

    def iteration(self, batch: dict[str, Tensor], prev: tuple[Tensor, Tensor, Tensor], *,
                  plan: MemoryPlan) -> dict[str, Tensor]:
        """One pass of Algorithm 2 (lines 5-19). Besides the structure module's outputs (`single` is its final
        single representation) and the heads' logits: single_evoformer [B, N, c_s] (the Evoformer's single,
        input of the structure module and the experimentally resolved head), msa_first_row, pair."""
        seq_mask = batch["seq_mask"]
        pair_mask = seq_mask[..., :, None] * seq_mask[..., None, :]
        rows = plan.head_chunk  # set only without grad
        if rows is None:
            m, z = self.input_embedder(batch["target_feat"], batch["residue_index"], batch["msa_feat"])
            m0_update, z_update = self.recycling_embedder(*prev)
            z = z + z_update
        else:  # no grad, plan.head_chunk: z is made in row chunks in the storage of the previous z (handed over)
            m = self.input_embedder.msa(batch["target_feat"], batch["msa_feat"])
            m0_update = self.recycling_embedder.norm_m(prev[0])
            z = embed_pair_in_place(self.input_embedder, self.recycling_embedder, batch["target_feat"],
                                    batch["residue_index"], prev[1], prev[2], rows)
        m = torch.cat([m[..., :1, :, :] + m0_update[..., None, :, :], m[..., 1:, :, :]], dim=-3)
        e = self.extra_msa_embedder(batch["extra_msa_feat"])
        own = not plan.grad  # e, m, z were made here: without grad the stacks may update them in place
        z = self.extra_msa_stack(e, z, batch["extra_msa_mask"], pair_mask, plan=plan, inplace_inputs=own)
        m, z, s = self.evoformer(m, z, batch["msa_mask"], pair_mask, plan=plan, inplace_inputs=own)
        outputs = self.structure_module(s, z, batch["aatype"], seq_mask, plan=plan)
        outputs.update(self.heads(m, z, s_evoformer=s, s_structure=outputs["single"], seq_mask=seq_mask, plan=plan))
        outputs["single_evoformer"] = s
        outputs["msa_first_row"] = m[..., 0, :, :]
        outputs["pair"] = z
        return outputs


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
