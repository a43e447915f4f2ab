"""One table of parameter names: AlphaFold2 (`.npz`, Haiku) <-> OpenFold (state dict) <-> protfold.

Each line of `parameter_table` is one module: its AF2 path (after `alphafold/alphafold_iteration/`), its
OpenFold and protfold prefixes, and what kind of module it is (Linear, LayerNorm, attention). A Haiku key
is `<module path>//<parameter>`. The layout changes, stated once:

AF2 -> OpenFold (what OpenFold's own `import_jax_weights_` does):
  - Linear weights are [in, out] in AF2 and [out, in] in torch: transposed.
  - Attention query/key/value/gating weights [c_in, H, C] -> [H*C, c_in]; output weights [H, C, c_out] ->
    [c_out, H*C]; gating biases [H, C] -> [H*C]; the outer product mean's output weights [C, C, c_z] ->
    [c_z, C*C] (flattened like attention outputs, with C = `opm_hidden` in place of H).
  - LayerNorm `scale`/`offset` -> `weight`/`bias`.
  - Evoformer and extra-MSA blocks are stacked on a leading axis: block i is array[i].
  - `triangle_multiplication_incoming`: AF2's `left_*` are `linear_b_*`, its `right_*` are `linear_a_*`
    (AF2 commit b88f8da swapped them; OpenFold's importer does the same swap).
OpenFold -> protfold: the same tensors under other names, except for invariant point attention, whose fused
projections protfold lays out per head (`model.structure.InvariantPointAttention`):
  - `kv` rows [h][k|v][c] -> [k|v][h][c];
  - `q_pts` / `kv_pts` rows [x|y|z][h][p] -> [h][p][x|y|z] (AF2 splits x, y, z first);
  - `out` columns: the point block [x|y|z][h][p_v] -> [h][p_v][x|y|z]; scalar, norm and pair blocks unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from protfold.config import ModelConfig

AF2_PREFIX = "alphafold/alphafold_iteration/"

Layout = Literal["vector", "linear", "heads_in", "heads_out", "heads_bias"]
IPA = Literal["kv", "q_points", "kv_points", "out"]
Stack = Literal["evoformer", "extra_msa"]


@dataclass(frozen=True)
class Param:
    """One parameter: its three names (`{i}` = block index of a stacked one) and AF2's layout of it."""

    af2: str  # after AF2_PREFIX
    openfold: str
    protfold: str
    layout: Layout = "vector"
    heads: str | None = None  # the ModelConfig field that is H of a heads_* layout
    ipa: IPA | None = None  # protfold's own layout of an IPA projection
    stack: Stack | None = None  # stacked on AF2's leading axis, one block per index


# ----------------------------------------------------------------------------------- the table's line kinds
def linear(af2: str, openfold: str, protfold: str, *, ipa: IPA | None = None) -> list[Param]:
    # IPA's output projection permutes the columns of its weight only; the others permute rows, so biases too
    return [Param(f"{af2}//weights", f"{openfold}.weight", f"{protfold}.weight", "linear", ipa=ipa),
            Param(f"{af2}//bias", f"{openfold}.bias", f"{protfold}.bias", ipa=None if ipa == "out" else ipa)]


def weight(af2: str, openfold: str, protfold: str) -> list[Param]:
    """A bias-free projection stored as a module parameter (`feat_2d_weights`: pair bias of an attention)."""
    return [Param(af2, openfold, protfold, "linear")]


def norm(af2: str, openfold: str, protfold: str) -> list[Param]:
    return [Param(f"{af2}//scale", f"{openfold}.weight", f"{protfold}.weight"),
            Param(f"{af2}//offset", f"{openfold}.bias", f"{protfold}.bias")]


def attention(af2: str, openfold: str, protfold: str, *, heads: str, global_kv: bool = False) -> list[Param]:
    """Gated multi-head attention; `global_kv`: AF2's global column attention, one key/value head [c_in, C]."""
    kv: dict[str, Any] = {"layout": "linear"} if global_kv else {"layout": "heads_in", "heads": heads}
    return [
        Param(f"{af2}//query_w", f"{openfold}.linear_q.weight", f"{protfold}.linear_q.weight", "heads_in", heads),
        Param(f"{af2}//key_w", f"{openfold}.linear_k.weight", f"{protfold}.linear_k.weight", **kv),
        Param(f"{af2}//value_w", f"{openfold}.linear_v.weight", f"{protfold}.linear_v.weight", **kv),
        Param(f"{af2}//gating_w", f"{openfold}.linear_g.weight", f"{protfold}.linear_g.weight", "heads_in", heads),
        Param(f"{af2}//gating_b", f"{openfold}.linear_g.bias", f"{protfold}.linear_g.bias", "heads_bias", heads),
        Param(f"{af2}//output_w", f"{openfold}.linear_o.weight", f"{protfold}.linear_o.weight", "heads_out", heads),
        Param(f"{af2}//output_b", f"{openfold}.linear_o.bias", f"{protfold}.linear_o.bias"),
    ]


def triangle_multiplication(direction: Literal["outgoing", "incoming"]) -> list[Param]:
    af2, short = f"triangle_multiplication_{direction}", "out" if direction == "outgoing" else "in"
    of, pf = f"pair_stack.tri_mul_{short}", f"tri_mul_{short}"
    left, right = ("a", "b") if direction == "outgoing" else ("b", "a")
    return [
        *norm(f"{af2}/layer_norm_input", f"{of}.layer_norm_in", f"{pf}.norm_in"),
        *linear(f"{af2}/left_projection", f"{of}.linear_{left}_p", f"{pf}.linear_{left}_p"),
        *linear(f"{af2}/right_projection", f"{of}.linear_{right}_p", f"{pf}.linear_{right}_p"),
        *linear(f"{af2}/left_gate", f"{of}.linear_{left}_g", f"{pf}.linear_{left}_g"),
        *linear(f"{af2}/right_gate", f"{of}.linear_{right}_g", f"{pf}.linear_{right}_g"),
        *norm(f"{af2}/center_layer_norm", f"{of}.layer_norm_out", f"{pf}.norm_out"),
        *linear(f"{af2}/output_projection", f"{of}.linear_z", f"{pf}.linear_o"),
        *linear(f"{af2}/gating_linear", f"{of}.linear_g", f"{pf}.linear_g"),
    ]


def triangle_attention(node: Literal["starting", "ending"]) -> list[Param]:
    af2, short = f"triangle_attention_{node}_node", "start" if node == "starting" else "end"
    of, pf = f"pair_stack.tri_att_{short}", f"tri_att_{short}"
    return [
        *norm(f"{af2}/query_norm", f"{of}.layer_norm", f"{pf}.norm"),
        *weight(f"{af2}//feat_2d_weights", f"{of}.linear.weight", f"{pf}.linear_b.weight"),
        *attention(f"{af2}/attention", f"{of}.mha", f"{pf}.attention", heads="pair_heads"),
    ]


def block(stack: Stack) -> list[Param]:
    """One Evoformer or extra-MSA block; they differ in MSA column attention (global in the extra stack)."""
    heads = "msa_heads" if stack == "evoformer" else "extra_msa_heads"
    if stack == "evoformer":
        col = attention("msa_column_attention/attention", "msa_att_col._msa_att.mha", "msa_col.attention", heads=heads)
        col_norm = norm("msa_column_attention/query_norm", "msa_att_col._msa_att.layer_norm_m", "msa_col.norm")
    else:
        col = attention("msa_column_global_attention/attention", "msa_att_col.global_attention",
                        "msa_col.attention", heads=heads, global_kv=True)
        col_norm = norm("msa_column_global_attention/query_norm", "msa_att_col.layer_norm_m", "msa_col.norm")
    row = "msa_row_attention_with_pair_bias"
    params = [
        *norm(f"{row}/query_norm", "msa_att_row.layer_norm_m", "msa_row.norm_m"),
        *norm(f"{row}/feat_2d_norm", "msa_att_row.layer_norm_z", "msa_row.norm_z"),
        *weight(f"{row}//feat_2d_weights", "msa_att_row.linear_z.weight", "msa_row.linear_z.weight"),
        *attention(f"{row}/attention", "msa_att_row.mha", "msa_row.attention", heads=heads),
        *col_norm, *col,
        *norm("msa_transition/input_layer_norm", "msa_transition.layer_norm", "msa_trans.norm"),
        *linear("msa_transition/transition1", "msa_transition.linear_1", "msa_trans.up"),
        *linear("msa_transition/transition2", "msa_transition.linear_2", "msa_trans.down"),
        *norm("outer_product_mean/layer_norm_input", "outer_product_mean.layer_norm", "opm.norm"),
        *linear("outer_product_mean/left_projection", "outer_product_mean.linear_1", "opm.linear_a"),
        *linear("outer_product_mean/right_projection", "outer_product_mean.linear_2", "opm.linear_b"),
        Param("outer_product_mean//output_w", "outer_product_mean.linear_out.weight", "opm.linear_o.weight",
              "heads_out", "opm_hidden"),
        Param("outer_product_mean//output_b", "outer_product_mean.linear_out.bias", "opm.linear_o.bias"),
        *triangle_multiplication("outgoing"), *triangle_multiplication("incoming"),
        *triangle_attention("starting"), *triangle_attention("ending"),
        *norm("pair_transition/input_layer_norm", "pair_stack.pair_transition.layer_norm", "pair_trans.norm"),
        *linear("pair_transition/transition1", "pair_stack.pair_transition.linear_1", "pair_trans.up"),
        *linear("pair_transition/transition2", "pair_stack.pair_transition.linear_2", "pair_trans.down"),
    ]
    af2, torch_prefix = {"evoformer": ("evoformer/evoformer_iteration", "evoformer.blocks.{i}"),
                         "extra_msa": ("evoformer/extra_msa_stack", "extra_msa_stack.blocks.{i}")}[stack]
    return [replace(p, af2=f"{af2}/{p.af2}", openfold=f"{torch_prefix}.{p.openfold}",
                    protfold=f"{torch_prefix}.{p.protfold}", stack=stack) for p in params]


def parameter_table(n_resnet_blocks: int) -> list[Param]:
    """Every parameter of a template-free monomer AlphaFold2 with the pTM head, in AF2's file order."""
    sm, fi = "structure_module", "structure_module/fold_iteration"
    ipa, ipa_of, ipa_pf = f"{fi}/invariant_point_attention", f"{sm}.ipa", f"{sm}.ipa"
    rs, res_of, res_pf = f"{fi}/rigid_sidechain", f"{sm}.angle_resnet", f"{sm}.angle_resnet"
    resnet = []
    for b in range(n_resnet_blocks):  # Haiku names repeated modules resblock1, resblock1_1, resblock1_2, ...
        suffix = f"_{b}" if b else ""
        resnet += [*linear(f"{rs}/resblock1{suffix}", f"{res_of}.layers.{b}.linear_1", f"{res_pf}.blocks.{b}.1"),
                   *linear(f"{rs}/resblock2{suffix}", f"{res_of}.layers.{b}.linear_2", f"{res_pf}.blocks.{b}.3")]
    return [
        *linear("evoformer/preprocess_1d", "input_embedder.linear_tf_m", "input_embedder.linear_tf_m"),
        *linear("evoformer/preprocess_msa", "input_embedder.linear_msa_m", "input_embedder.linear_msa_m"),
        *linear("evoformer/left_single", "input_embedder.linear_tf_z_i", "input_embedder.linear_tf_z_i"),
        *linear("evoformer/right_single", "input_embedder.linear_tf_z_j", "input_embedder.linear_tf_z_j"),
        *linear("evoformer/prev_pos_linear", "recycling_embedder.linear", "recycling_embedder.linear_d"),
        *norm("evoformer/prev_msa_first_row_norm", "recycling_embedder.layer_norm_m", "recycling_embedder.norm_m"),
        *norm("evoformer/prev_pair_norm", "recycling_embedder.layer_norm_z", "recycling_embedder.norm_z"),
        # "activiations" is AF2's spelling
        *linear("evoformer/pair_activiations", "input_embedder.linear_relpos", "input_embedder.linear_relpos"),
        *linear("evoformer/extra_msa_activations", "extra_msa_embedder.linear", "extra_msa_embedder.linear"),
        *block("extra_msa"),
        *block("evoformer"),
        *linear("evoformer/single_activations", "evoformer.linear", "evoformer.linear_s"),
        *norm(f"{sm}/single_layer_norm", f"{sm}.layer_norm_s", f"{sm}.norm_s"),
        *linear(f"{sm}/initial_projection", f"{sm}.linear_in", f"{sm}.embed_s"),
        *norm(f"{sm}/pair_layer_norm", f"{sm}.layer_norm_z", f"{sm}.norm_z"),
        *linear(f"{ipa}/q_scalar", f"{ipa_of}.linear_q", f"{ipa_pf}.q"),
        *linear(f"{ipa}/kv_scalar", f"{ipa_of}.linear_kv", f"{ipa_pf}.kv", ipa="kv"),
        *linear(f"{ipa}/q_point_local", f"{ipa_of}.linear_q_points.linear", f"{ipa_pf}.q_pts", ipa="q_points"),
        *linear(f"{ipa}/kv_point_local", f"{ipa_of}.linear_kv_points.linear", f"{ipa_pf}.kv_pts", ipa="kv_points"),
        Param(f"{ipa}//trainable_point_weights", f"{ipa_of}.head_weights", f"{ipa_pf}.head_weights"),
        *linear(f"{ipa}/attention_2d", f"{ipa_of}.linear_b", f"{ipa_pf}.pair_bias"),
        *linear(f"{ipa}/output_projection", f"{ipa_of}.linear_out", f"{ipa_pf}.out", ipa="out"),
        *norm(f"{fi}/attention_layer_norm", f"{sm}.layer_norm_ipa", f"{sm}.ipa_norm"),
        *linear(f"{fi}/transition", f"{sm}.transition.layers.0.linear_1", f"{sm}.transition.layers.0"),
        *linear(f"{fi}/transition_1", f"{sm}.transition.layers.0.linear_2", f"{sm}.transition.layers.2"),
        *linear(f"{fi}/transition_2", f"{sm}.transition.layers.0.linear_3", f"{sm}.transition.layers.4"),
        *norm(f"{fi}/transition_layer_norm", f"{sm}.transition.layer_norm", f"{sm}.transition.norm"),
        *linear(f"{fi}/affine_update", f"{sm}.bb_update.linear", f"{sm}.backbone_update.linear"),
        *linear(f"{rs}/input_projection", f"{res_of}.linear_in", f"{res_pf}.linear_s"),
        *linear(f"{rs}/input_projection_1", f"{res_of}.linear_initial", f"{res_pf}.linear_initial"),
        *resnet,
        *linear(f"{rs}/unnormalized_angles", f"{res_of}.linear_out", f"{res_pf}.out"),
        *norm("predicted_lddt_head/input_layer_norm", "aux_heads.plddt.layer_norm", "heads.plddt.net.0"),
        *linear("predicted_lddt_head/act_0", "aux_heads.plddt.linear_1", "heads.plddt.net.1"),
        *linear("predicted_lddt_head/act_1", "aux_heads.plddt.linear_2", "heads.plddt.net.3"),
        *linear("predicted_lddt_head/logits", "aux_heads.plddt.linear_3", "heads.plddt.net.5"),
        *linear("distogram_head/half_logits", "aux_heads.distogram.linear", "heads.distogram.linear"),
        *linear("experimentally_resolved_head/logits", "aux_heads.experimentally_resolved.linear",
                "heads.experimentally_resolved.linear"),
        *linear("masked_msa_head/logits", "aux_heads.masked_msa.linear", "heads.masked_msa.linear"),
        *linear("predicted_aligned_error_head/logits", "aux_heads.tm.linear", "heads.predicted_aligned_error.linear"),
    ]


def n_blocks(param: Param, cfg: ModelConfig) -> int:
    return {None: 1, "evoformer": cfg.n_evoformer_blocks, "extra_msa": cfg.n_extra_msa_blocks}[param.stack]


def block_names(param: Param, count: int) -> list[str]:
    """protfold names of a parameter's `count` blocks (one name for an unstacked parameter)."""
    return [param.protfold.format(i=i) for i in range(count)] if param.stack else [param.protfold]


# ------------------------------------------------------------------------------------- the layout changes
def af2_to_torch(array: Tensor, layout: Layout) -> Tensor:
    """One block of an AF2 array -> OpenFold's layout (a view where one suffices)."""
    if layout == "vector" or layout == "heads_bias":
        return array.reshape(-1)
    if layout == "linear":
        return array.t()
    if layout == "heads_in":  # [c_in, H, C] -> [H*C, c_in]
        return array.reshape(array.shape[0], -1).t()
    return array.reshape(-1, array.shape[-1]).t()  # heads_out: [H, C, c_out] -> [c_out, H*C]


def torch_to_af2(tensor: Tensor, layout: Layout, heads: int) -> Tensor:
    """Inverse of `af2_to_torch` for one block; `heads` is H of the heads_* layouts."""
    if layout == "vector":
        return tensor
    if layout == "heads_bias":
        return tensor.reshape(heads, -1)
    if layout == "linear":
        return tensor.t()
    if layout == "heads_in":
        return tensor.t().reshape(tensor.shape[1], heads, -1)
    return tensor.t().reshape(heads, -1, tensor.shape[0])  # heads_out


def af2_shape(shape: tuple[int, ...], layout: Layout, heads: int) -> tuple[int, ...]:
    """The shape `torch_to_af2` gives a block of `shape` (plain arithmetic: shape checks need no tensors)."""
    if layout == "vector":
        return shape
    if layout == "heads_bias":
        return (heads, shape[0] // heads)
    if layout == "linear":
        return shape[::-1]
    if layout == "heads_in":
        return (shape[1], heads, shape[0] // heads)
    return (heads, shape[1] // heads, shape[0])  # heads_out


def ipa_permutation(kind: IPA, cfg: ModelConfig) -> Tensor:
    """Index p with protfold[k] = openfold[p[k]] along the permuted axis (rows; columns for `out`)."""
    h, c = cfg.ipa_heads, cfg.ipa_head_dim
    if kind == "kv":
        return torch.arange(h * 2 * c).reshape(h, 2, c).permute(1, 0, 2).reshape(-1)
    if kind in ("q_points", "kv_points"):
        p = cfg.ipa_qk_points if kind == "q_points" else cfg.ipa_qk_points + cfg.ipa_v_points
        return torch.arange(3 * h * p).reshape(3, h, p).permute(1, 2, 0).reshape(-1)
    points = torch.arange(3 * h * cfg.ipa_v_points).reshape(3, h, cfg.ipa_v_points).permute(1, 2, 0).reshape(-1)
    scalar = torch.arange(h * c)
    rest = torch.arange(h * c + points.numel(), h * (c + cfg.c_z + 4 * cfg.ipa_v_points))
    return torch.cat([scalar, h * c + points, rest])


def openfold_to_protfold(tensor: Tensor, param: Param, cfg: ModelConfig, *, inverse: bool = False) -> Tensor:
    """OpenFold's layout -> protfold's (the identity except for IPA); `inverse`: protfold's -> OpenFold's."""
    if param.ipa is None:
        return tensor
    index = ipa_permutation(param.ipa, cfg)
    if inverse:
        index = torch.argsort(index)
    dim = 1 if param.ipa == "out" and param.layout == "linear" else 0
    return tensor.index_select(dim, index.to(tensor.device))


def from_af2(block: Tensor, param: Param, cfg: ModelConfig) -> Tensor:
    """One block of an AF2 array (array[i] of a stacked one) -> protfold's tensor, contiguous (it shares
    memory with `block` only where no layout change is needed)."""
    return openfold_to_protfold(af2_to_torch(block, param.layout), param, cfg).contiguous()


def to_af2(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """protfold state dict -> AF2 arrays (full keys), stacked blocks on the leading axis. Parameters of heads
    the model lacks are left out."""
    out: dict[str, Tensor] = {}
    for param in parameter_table(cfg.n_resnet_blocks):
        names = block_names(param, n_blocks(param, cfg))
        if names[0] not in state_dict:
            continue
        heads = getattr(cfg, param.heads) if param.heads else 1
        parts = [torch_to_af2(openfold_to_protfold(state_dict[n], param, cfg, inverse=True), param.layout, heads)
                 for n in names]
        out[AF2_PREFIX + param.af2] = torch.stack(parts) if param.stack else parts[0].contiguous()
    return out


def af2_shapes(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The AF2 key -> shape that `to_af2` gives a state dict with these protfold `shapes`."""
    out = {}
    for param in parameter_table(cfg.n_resnet_blocks):
        names = block_names(param, n_blocks(param, cfg))
        if names[0] in shapes:
            block = af2_shape(tuple(shapes[names[0]]), param.layout, getattr(cfg, param.heads) if param.heads else 1)
            out[AF2_PREFIX + param.af2] = (len(names), *block) if param.stack else block
    return out


__all__ = ["AF2_PREFIX", "Param", "af2_shapes", "af2_to_torch", "block_names", "from_af2", "n_blocks",
           "openfold_to_protfold", "parameter_table", "to_af2"]
