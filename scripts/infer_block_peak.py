"""Per-op peak memory (above the inputs) of one af2 Evoformer block, no grad, bf16 autocast, in units of the bf16
pair tensor, on any device: python3 scripts/infer_block_peak.py N_RES N_ROWS (CPU: the ratio carries to CUDA)."""
import sys, torch
from protfold.config import MemoryConfig, model_preset
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
pair = z.numel() * 2
params = list(blk.parameters()) + [m, z, mm, pm]
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    for name, fn in [("msa_row", lambda: blk._msa_row_step(m, z, mm)),
                     ("opm", lambda: blk._opm_step(m, z, mm)),
                     ("tri_mul_out", lambda: blk._pair_step(blk.tri_mul_out, blk.pair_dropout_row, z, pm)),
                     ("tri_att_start", lambda: blk._pair_step(blk.tri_att_start, blk.pair_dropout_row, z, pm)),
                     ("tri_att_end", lambda: blk._pair_step(blk.tri_att_end, blk.pair_dropout_col, z, pm)),
                     ("pair_trans", lambda: blk._pair_step(blk.pair_trans, torch.nn.Identity(), z, pm)),
                     ("block", lambda: blk(m, z, mm, pm))]:
        print(f"{name:14s} {peak_new_bytes(fn, params) / pair:5.2f} x pair (bf16 {pair/2**20:.0f} MiB)", flush=True)
