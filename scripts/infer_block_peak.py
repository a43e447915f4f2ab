"""Peak memory of one af2 Evoformer block, no grad, bf16 inputs and bf16 autocast, in units of the bf16 pair tensor,
on any device: python3 scripts/infer_block_peak.py N_RES N_ROWS (CPU: the ratios carry to CUDA).

Per op: peak above the inputs. Block: peak above the inputs, and the total with the inputs (m, z, masks; not the
weights), for a block that owns z (`inplace=True`, every block of a stack after the first) and for a user-facing
call (the caller's z is kept, so the block copies it once). Two columns: CPU autocast as it is (LayerNorm of a bf16
tensor stays bf16), and CUDA autocast emulated (LayerNorm up-cast to fp32, as CUDA autocast does; the prediction).
"""
import sys, torch
from torch import nn
from protfold.config import MemoryConfig, model_preset
from protfold.model import evoformer
from protfold.model.evoformer import EvoformerBlock
from protfold.model.memory import peak_new_bytes
torch.manual_seed(0)
n, s = int(sys.argv[1]), int(sys.argv[2])
cap = 512 * (n / 4096) ** 2
mem = MemoryConfig(attention_chunk_mb=cap, pair_chunk=max(1, n // 32), low_memory_triangle=True)
cfg = model_preset("af2")
blk = EvoformerBlock.from_config(cfg, mem=mem).eval()
m = torch.randn(1, s, n, cfg.c_m).bfloat16(); z = torch.randn(1, n, n, cfg.c_z).bfloat16()
mm = torch.ones(1, s, n).bfloat16(); pm = torch.ones(1, n, n).bfloat16()
inputs = [m, z, mm, pm]
pair = z.numel() * 2
in_bytes = sum(t.numel() * t.element_size() for t in inputs)
params = list(blk.parameters()) + inputs
new = hasattr(blk.opm, "add_into")  # False: the code before the in-place inference path (for the "before" column)
if new:
    add = evoformer._AddInto
    ops = [("msa_row", lambda: blk._msa_row_step(m, z, mm)),
           ("opm", lambda: blk.opm.add_into(m, mm, add(z, nn.Identity()))),
           ("tri_mul_out", lambda: blk.tri_mul_out.add_into(z, pm, add(z, nn.Identity()))),
           ("tri_mul_in", lambda: blk.tri_mul_in.add_into(z, pm, add(z, nn.Identity()))),
           ("tri_att_start", lambda: blk.tri_att_start.add_into(z, pm, add(z, nn.Identity()))),
           ("tri_att_end", lambda: blk.tri_att_end.add_into(z, pm, add(z, nn.Identity()))),
           ("pair_trans", lambda: blk.pair_trans.add_into(z, pm, add(z, nn.Identity()))),
           ("block (owns z)", lambda: blk(m, z, mm, pm, inplace=True)),
           ("block (caller's z)", lambda: blk(m, z, mm, pm))]
else:
    ops = [("msa_row", lambda: blk._msa_row_step(m, z, mm)),
           ("opm", lambda: blk._opm_step(m, z, mm)),
           ("tri_mul_out", lambda: blk._pair_step(blk.tri_mul_out, blk.pair_dropout_row, z, pm)),
           ("tri_mul_in", lambda: blk._pair_step(blk.tri_mul_in, blk.pair_dropout_row, z, pm)),
           ("tri_att_start", lambda: blk._pair_step(blk.tri_att_start, blk.pair_dropout_row, z, pm)),
           ("tri_att_end", lambda: blk._pair_step(blk.tri_att_end, blk.pair_dropout_col, z, pm)),
           ("pair_trans", lambda: blk._pair_step(blk.pair_trans, nn.Identity(), z, pm)),
           ("block (caller's z)", lambda: blk(m, z, mm, pm))]
print(f"N={n} rows={s}: bf16 pair tensor {pair / 2**20:.1f} MiB, inputs {in_bytes / pair:.3f} x pair")
print(f"{'op':20s} {'CPU autocast':>22s} {'CUDA autocast (emulated)':>26s}")
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    for name, fn in ops:
        cpu, cuda = (peak_new_bytes(fn, params, cuda_autocast=c) / pair for c in (False, True))
        if name.startswith("block"):
            tot = in_bytes / pair
            print(f"{name:20s} {cpu:5.2f} (total {cpu + tot:4.2f}) x  {cuda:10.2f} (total {cuda + tot:4.2f}) x",
                  flush=True)
        else:
            print(f"{name:20s} {cpu:11.2f} x {cuda:20.2f} x", flush=True)
