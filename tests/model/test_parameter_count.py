"""The `af2` preset's parameter count against AlphaFold2 without templates."""

from __future__ import annotations

import torch

from protfold.config import model_preset
from protfold.model.alphafold import AlphaFold, parameter_count

# OpenFold reports 93,229,082 parameters for the AF2 monomer model with templates (its documentation). Its template
# modules, with OpenFold's template config (c_t 64, 2 pair-stack blocks, triangle attention 4 x 16, triangle
# multiplication hidden 64, pair transition x2, pointwise attention 4 x 16, angle features 57 -> 256), hold:
TEMPLATE_PARAMS = {
    "template angle embedder: Linear(57, 256) + Linear(256, 256)": 57 * 256 + 256 + 256 * 256 + 256,
    "template pair embedder: Linear(88, 64)": 88 * 64 + 64,
    # per block: 2 triangle attentions (LN 128, bias 64x4, q/k/v 3x64x64, gate 64x64+64, out 64x64+64),
    # 2 triangle multiplications (4 x (64x64+64), gate and out 2 x (64x64+64), 2 LN of 128), transition x2
    "template pair stack: 2 blocks + final LayerNorm": 2 * (2 * 20_992 + 2 * 25_216 + 16_704) + 128,
    "template pointwise attention: q 128->64, k/v 64->64, out 64->128 + bias": 8192 + 4096 + 4096 + 8320,
}
AF2_WITH_TEMPLATES = 93_229_082
AF2_WITHOUT_TEMPLATES = AF2_WITH_TEMPLATES - sum(TEMPLATE_PARAMS.values())  # 92,899,674


def test_af2_parameter_count_matches_alphafold2_without_templates() -> None:
    with torch.device("meta"):
        model = AlphaFold(cfg=model_preset("af2"))
    n = parameter_count(model)
    assert abs(n - AF2_WITHOUT_TEMPLATES) / AF2_WITHOUT_TEMPLATES < 0.02, (n, AF2_WITHOUT_TEMPLATES)
    assert n == 92_899_674  # measured; equal to the count derived above
