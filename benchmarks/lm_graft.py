"""The lm-int4-eora weights inside onnxruntime-genai's own graph: how fast the exact source grid can decode when the
graph is the builder's (fused GroupQueryAttention, SkipSimplifiedLayerNormalization, packed QKV), not optimum's.

Used by ``benchmarks/lm.py`` as one more variant. Starting from the builder's int4 CPU model of smollm2, every decoder
MatMulNBits gets this tool's numbers for the same Linear (``compress.stages.grids.source_grid_weight``: the GGUF
Q4_1 codes and scales, asymmetric, block 32) plus the exact per-block offsets (``compress.stages.lowrank``:
block_offsets / offset_factors) as a branch: one block-sum MatMul per distinct input (the factor A, shared by the
projections that read the same tensor: q/k/v packed, gate and up) and an 8-bit MatMulNBits for B, added to the int4
output. The LM head and the embedding table hold the GGUF's Q8_0 grid exactly (8-bit MatMulNBits / 8-bit
GatherBlockQuantized, scale = max|w| / 127 per block of 32). Everything else is the builder's.

``offsets="kext"`` folds the offsets into the same 4-bit MatMulNBits instead of a branch: the input is concatenated
with its per-block sums (one indicator MatMul and one Concat per distinct input) and the offsets become extra K rows,
4-bit asymmetric in their own block(s) of 32 (``benchmarks/lm_offsets.py``: 0.54% relative weight error vs 8.23% for
the rounded zero point alone; K +5.6% for K = 576, +4.2% for 1536 after padding to a block). ``offsets="none"``: the
rounded zero point only. ``head="builder"`` keeps the builder's own LM head and embedding table instead of Q8_0;
``head="int4-asym-b32"`` / ``"int4-asym-b16"`` re-rounds the head asymmetrically (builder's embedding table kept).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

BLOCK = 32
# the LM head: the GGUF's Q8_0 exactly; the builder's own (int4 symmetric RTN, block 32); or int4 asymmetric RTN at
# block 32 / 16 (the builder's embedding table kept); or the builder's int4 head with the embedding table on Q8_0
# ("builder-q8emb": a lookup reads one row per token, so 8 bits there cost bytes, not speed)
HEADS = ("q8", "builder", "builder-q8emb", "int4-asym-b32", "int4-asym-b16")


def _q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's Q8_0 grid (d = max|w| / 127 per block, q in -127..127) as 8-bit MatMulNBits codes (zero point 128)."""
    b = w.reshape(w.shape[0], -1, BLOCK).astype(np.float64)
    d = np.abs(b).max(-1) / 127
    q = np.rint(b / np.where(d == 0, 1, d)[..., None])
    return (q + 128).astype(np.uint8), d.astype(np.float32)


def _hf_weight(weights: dict, node_name: str) -> np.ndarray:
    """The HF (out, in) weight behind a builder node: /model/layers.{i}/{attn|mlp}/{proj}/MatMul_Q4."""
    parts = node_name.split("/")
    i, kind = parts[2].split(".")[1], parts[4]
    if kind == "qkv_proj":
        return np.concatenate(
            [weights[f"model.layers.{i}.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        )
    sub = "self_attn" if parts[3] == "attn" else "mlp"
    return weights[f"model.layers.{i}.{sub}.{kind}.weight"]


def graft(builder_dir: Path, hf: Path, out: Path, offsets: str = "branch", head: str = "q8") -> Path:
    import onnx
    import torch
    from onnx import helper, numpy_helper
    from safetensors.numpy import load_file

    from compress.stages.grids import ort_quantize, source_grid_weight
    from compress.stages.lowrank import block_offsets

    if offsets not in ("branch", "kext", "none") or head not in HEADS:
        raise ValueError(f"offsets={offsets!r} / head={head!r}")
    if (out / "model.onnx").is_file():
        return out
    weights = load_file(str(hf / "model.safetensors"))
    model = onnx.load(str(builder_dir / "model.onnx"))
    g = model.graph
    inits = {t.name: t for t in g.initializer}

    def put(name: str, arr: np.ndarray) -> str:
        t = numpy_helper.from_array(arr, name)
        if name in inits:
            inits[name].CopyFrom(t)
        else:
            g.initializer.append(t)
            inits[name] = g.initializer[-1]
        return name

    before: dict[str, list] = {}  # node name -> nodes to insert before it
    after: dict[str, list] = {}
    block_sum: dict[str, str] = {}  # input tensor -> its block sums
    for n in g.node:
        if n.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a for a in n.attribute}
        if n.name.startswith("/lm_head"):
            if head.startswith("builder"):
                continue
            w = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
            if head.startswith("int4-asym"):  # ORT's asymmetric RTN of the (Q8_0-valued) head, zero points kept
                bs = int(head.rpartition("-b")[2])
                packed, scales, zp = ort_quantize(w.T, bs, symmetric=False)
                # new initializers: the builder's GatherBlockQuantized reads the tied head's (embedding kept)
                n.input[1] = put(n.input[1] + "_asym", packed)
                n.input[2] = put(n.input[2] + "_asym", scales.reshape(-1))
                del n.input[3:]
                n.input.append(put(n.input[1] + "_zp", zp.reshape(-1)))
                attrs["block_size"].i = bs
                continue
            q, d = _q8_0(w)
            put(n.input[1], q)
            put(n.input[2], d.reshape(-1))
            attrs["bits"].i = 8
            continue
        w = _hf_weight(weights, n.name)
        source = source_grid_weight(torch.from_numpy(w), BLOCK)
        if source is None:
            raise ValueError(f"{n.name}: not on a 16-level grid per block of {BLOCK}: not a Q4_1 source")
        wq = source.double().numpy()
        packed, scales, zp = ort_quantize(wq.T, BLOCK, symmetric=False)  # lossless: wq is on MatMulNBits' grid
        off = block_offsets(w.astype(np.float64) - wq, BLOCK)
        if off is None:
            raise ValueError(f"{n.name}: the int4 error is not a constant per block")
        n_out, n_blocks = off.shape
        x = n.input[0]
        if offsets == "kext":  # [x, block sums of x] @ [W, R]^T: R's rows 4-bit in their own block(s)
            pad = -(-n_blocks // BLOCK) * BLOCK
            if n_blocks % 2:
                raise ValueError(f"{n.name}: an odd block count would split a zero-point byte")
            if x not in block_sum:
                e_name = f"graft_kext_indicator_{w.shape[1]}"
                if e_name not in inits:
                    e = np.zeros((w.shape[1], pad), np.float32)
                    e[np.arange(w.shape[1]), np.arange(w.shape[1]) // BLOCK] = 1
                    put(e_name, e)
                sums, block_sum[x] = f"{x}/graft_block_sums", f"{x}/graft_kext"
                before.setdefault(n.name, []).extend([
                    helper.make_node("MatMul", [x, e_name], [sums], name=f"{n.name}/graft_block_sums"),
                    helper.make_node("Concat", [x, sums], [block_sum[x]], name=f"{n.name}/graft_kext", axis=-1),
                ])  # fmt: skip
            r = np.zeros((n_out, pad), np.float32)
            r[:, :n_blocks] = off
            pk_r, sc_r, zp_r = ort_quantize(r.T, BLOCK, symmetric=False)
            packed, scales = np.concatenate([packed, pk_r], 1), np.concatenate([scales, sc_r], 1)
            zp = np.concatenate([zp, zp_r], 1)
            n.input[0] = block_sum[x]
            attrs["K"].i = w.shape[1] + pad
        put(n.input[1], packed)
        put(n.input[2], scales.reshape(-1))
        del n.input[3:]
        n.input.append(put(n.input[1].replace("_Q4", "_zp"), zp.reshape(-1)))
        if offsets != "branch":
            continue
        if x not in block_sum:
            e_name = f"graft_block_indicator_{w.shape[1]}"
            if e_name not in inits:
                put(e_name, np.repeat(np.eye(n_blocks, dtype=np.float32), BLOCK, axis=0))  # (in, blocks)
            block_sum[x] = f"{x}/graft_block_sum"
            before.setdefault(n.name, []).append(
                helper.make_node("MatMul", [x, e_name], [block_sum[x]], name=f"{n.name}/graft_block_sum")
            )
        # B (blocks -> out) as an 8-bit MatMulNBits over the block sums (one block of <= 64 sums per column)
        bs = 16 if n_blocks <= 16 else 32 if n_blocks <= 32 else 64
        padded = np.zeros((n_out, bs), np.float64)
        padded[:, :n_blocks] = off
        scale = np.abs(padded).max(-1) / 127
        q8 = np.rint(padded / np.where(scale == 0, 1, scale)[:, None]) + 128
        b_name = n.input[1].replace("_Q4", "_offsets")
        put(b_name, q8.astype(np.uint8).reshape(n_out, 1, bs))
        put(b_name + "_scales", scale.astype(np.float32))
        y = n.output[0]
        n.output[0] = f"{y}/graft_int4"
        after[n.name] = [
            helper.make_node(
                "MatMulNBits",
                [block_sum[x], b_name, b_name + "_scales"],
                [f"{y}/graft_offsets"],
                name=f"{n.name}/graft_offsets",
                domain="com.microsoft",
                K=n_blocks,
                N=n_out,
                bits=8,
                block_size=bs,
                accuracy_level=attrs["accuracy_level"].i,
            ),  # fmt: skip
            helper.make_node("Add", [f"{y}/graft_int4", f"{y}/graft_offsets"], [y], name=f"{n.name}/graft_add"),
        ]
    for n in g.node:
        if n.op_type == "GatherBlockQuantized" and head in ("q8", "builder-q8emb"):
            q, d = _q8_0(weights["model.embed_tokens.weight"])
            n.input[0] = put("graft_embed_q8", q.reshape(q.shape[0], -1))
            n.input[2] = put("graft_embed_scales", d)
            next(a for a in n.attribute if a.name == "bits").i = 8
    nodes = list(g.node)
    del g.node[:]
    for n in nodes:
        g.node.extend(before.get(n.name, []) + [n] + after.get(n.name, []))
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    live = [n for n in g.node if any(o in used for o in n.output)]
    del g.node[:]
    g.node.extend(live)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in builder_dir.iterdir():
        if not f.name.startswith("model.onnx"):
            shutil.copy(f, tmp / f.name)
    onnx.save(model, str(tmp / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
