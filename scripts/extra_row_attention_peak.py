"""Peak live bytes (MiB, above inputs and weights) of one extra MSA block's row attention with pair bias,
forward + backward, af2 widths, bf16 autocast with CUDA autocast dtypes emulated on the CPU, per
attention_chunk_mb: OMP_NUM_THREADS=1 python3 scripts/extra_row_attention_peak.py [N_RES E_ROWS CAP ...]"""
import sys

import torch

sys.path.insert(0, "scripts")
import train_step_peak as tsp  # noqa: E402
from protfold.config import MemoryConfig, model_preset  # noqa: E402
from protfold.model.evoformer import EvoformerBlock  # noqa: E402

torch.set_num_threads(1)
n, e = int(sys.argv[1]), int(sys.argv[2])
caps = [float(c) for c in sys.argv[3:]] or [512.0, 256.0, 128.0, 64.0]
cfg = model_preset("af2")
tsp.emulate_cuda_dtypes_in_recompute()
for cap in caps:
    torch.manual_seed(0)
    mem = MemoryConfig(blocks_per_checkpoint=1, recompute_inside_block=True, attention_chunk_mb=cap, pair_chunk=128,
                       low_memory_triangle=True)
    blk = EvoformerBlock.from_config(cfg, extra=True, mem=mem).train()
    m = torch.randn(1, e, n, cfg.c_e, requires_grad=True)
    z = torch.randn(1, n, n, cfg.c_z, requires_grad=True)
    mm, pm = torch.ones(1, e, n), torch.ones(1, n, n)
    for p in blk.parameters():
        p.grad = torch.zeros_like(p)
    m.grad, z.grad = torch.zeros_like(m), torch.zeros_like(z)
    existing = [*blk.parameters(), *(p.grad for p in blk.parameters()), m, z, mm, pm, m.grad, z.grad]
    tracker = tsp.Tracker({t.untyped_storage().data_ptr() for t in existing})
    with tracker, tsp.CudaAutocastDtypes(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tsp.memory.recompute(blk._msa_row_step, m, z, mm)
        tracker.set_label("backward")
        out.float().sum().backward()
        del out
    print(f"cap {cap:5.0f} MiB: peak {tracker.peak / 2**20:6.0f} MiB (backward phase {tracker.phases['backward'][1] / 2**20:.0f})",
          flush=True)
