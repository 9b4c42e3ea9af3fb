"""A causal LM as onnxruntime-genai's model builder builds it, holding this tool's numbers.

Stands beside ``onnxruntime_genai.models.builder`` (run in a child process, ``-p int4 -e cpu``), which writes the
fused decoder graph (GroupQueryAttention over a shared KV buffer, SkipSimplifiedLayerNormalization, rotary embeddings,
packed QKV MatMulNBits, here also packed gate/up: ``fuse_gate_up``) and its ``genai_config.json``. The builder rounds
the float weights it is given itself; here every MatMulNBits then gets the tables the recipe chose for the same Linear
(``NBits``: codes, scales and zero points exactly as ORT packs them, so the recipe's grid is kept bit for bit), exact
block offsets (a GGUF Q4_1 source's) as extra K rows of the same MatMulNBits reading [x, block means of x], calibrated
low-rank factors (``y += (x A^T) B^T``) as one thin float MatMul per distinct (input, A) plus an 8-bit MatMulNBits for
B added to the output, and the LM head and token embedding table on the recipe's grid (or float). Everything else
(norms, rotary caches, attention) is the builder's. Measured on smollm2 (README, Language models): the same weights
decode ~1.8x faster in this graph than in optimum's.

The builder of onnxruntime-genai 0.18 is written against transformers 5; with transformers 4.5x two things differ and
the child process bridges them (``_SHIM``): it imports vision-language classes 4.5x lacks (placeholders; a text
decoder never uses them), and it reads rope settings from ``config.rope_parameters`` (set from 4.x's ``rope_theta``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.core.errors import CompressError
from compress.core.onnx_ops import sweep

_SHIM = r"""
import sys
import transformers
NAMES = ("Gemma3ForConditionalGeneration", "Lfm2VlForConditionalGeneration", "Mistral3ForConditionalGeneration",
         "Qwen2_5_VLForConditionalGeneration", "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
         "Qwen3VLForConditionalGeneration")
for name in NAMES:
    try:
        getattr(transformers, name)
    except (AttributeError, ImportError):
        pass
for name in NAMES:
    module = sys.modules["transformers"]
    if name not in module.__dict__:
        try:
            getattr(module, name)
        except Exception:
            module.__dict__[name] = type(name, (), {})
import os
import runpy
import onnxruntime_genai.models as models
sys.path.insert(0, os.path.dirname(models.__file__))
from builders import base
make_config_init = base.Model.make_config_init
def config_init(self, config):
    if getattr(config, "rope_scaling", 0) is None:
        config.rope_scaling = {}
    if not hasattr(config, "rope_parameters"):
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    return make_config_init(self, config)
base.Model.make_config_init = config_init
sys.argv = ["builder"] + sys.argv[1:]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""

BUILDER_TIMEOUT_S = 1800
# model_type values whose builder graph this module maps back to Hugging Face Linears (self_attn.{q,k,v,o}_proj packed
# as qkv_proj, mlp.{gate,up,down}_proj, lm_head); anything else is refused before any work
ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class NBits:
    """One weight as MatMulNBits holds it (``export.int4_pack.ort_quantize``): y = x W^T with W (N, K)."""

    packed: np.ndarray  # (N, blocks, block_size * bits / 8) uint8
    scales: np.ndarray  # (N, blocks) float32
    zero_points: np.ndarray | None  # packed (N, ...) uint8; None: symmetric
    bits: int
    block_size: int
    accuracy_level: int


@dataclass(frozen=True)
class Table:
    """A token embedding table on GatherBlockQuantized's grid (blocks along the hidden dim): ``export.int4_pack.
    gather_table``'s pieces."""

    packed: np.ndarray  # 4 bits: uint4 pairs (DefaultWeightOnlyQuantizer.quantize_ndarray); 8 bits: uint8 (V, H)
    scales: np.ndarray  # (V, H / block)
    zero_points: np.ndarray | None  # None: the op's implicit zero point (8 bits, symmetric)
    shape: tuple[int, int]
    block_size: int
    bits: int = 4


@dataclass(frozen=True)
class GenaiWeights:
    """What the recipe decided, keyed by Hugging Face module names (model.layers.0.self_attn.q_proj, lm_head)."""

    linears: dict[str, NBits]
    low_rank: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (A (r, in), B (out, r)), float
    head: NBits | np.ndarray  # float: (vocab, hidden)
    embeddings: Table | np.ndarray  # float: (vocab, hidden)


def build(hf_dir: Path, out_dir: Path, block_size: int, accuracy_level: int, cache_dir: Path,
          precision: str = "int4", fuse_gate_up: bool = False) -> Path:  # fmt: skip
    """onnxruntime-genai's model builder on a Hugging Face folder (CPU graph, MatMulNBits of ``precision`` bits,
    its own round-to-nearest); its log beside ``out_dir``. ``fuse_gate_up``: the builder's ``fuse_mlp_gate_up``
    option (one MatMulNBits for gate and up + a Split: the same numbers, one activation quantization and one kernel
    call instead of two per block; smollm2 decodes ~5% faster with it, README, Language models)."""
    cmd = [sys.executable, "-c", _SHIM, "-i", str(hf_dir), "-o", str(out_dir), "-p", precision, "-e", "cpu",
           "-c", str(cache_dir), "--extra_options", f"block_size={block_size}",
           f"accuracy_level={accuracy_level or 4}"] + (["fuse_mlp_gate_up=true"] if fuse_gate_up else [])  # fmt: skip
    log = out_dir.with_name(out_dir.name + ".log")
    with log.open("w") as f:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # a local folder: nothing downloaded
        try:
            code = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, timeout=BUILDER_TIMEOUT_S, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            raise CompressError(
                f"onnxruntime-genai's model builder ran past {BUILDER_TIMEOUT_S} s on {hf_dir} (log: {log}): "
                'use a recipe without export = "genai" for a model this size'
            ) from None
    if code or not (out_dir / "model.onnx").is_file():
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        raise CompressError(
            f"onnxruntime-genai's model builder failed ({tail[0][:300]}): it supports the architectures listed in "
            'onnxruntime_genai/models/builder.py; use a recipe without export = "genai" for this model'
        )
    return out_dir


def _hf_names(node_name: str) -> list[str]:
    """The Hugging Face Linear(s) behind a builder MatMulNBits: /model/layers.{i}/{attn|mlp}/{proj}/MatMul_Q4."""
    parts = node_name.split("/")
    if parts[1] == "lm_head":
        return ["lm_head"]
    i, proj = parts[2].split(".")[1], parts[4]
    sub = "self_attn" if parts[3] == "attn" else "mlp"
    if proj == "qkv_proj":
        return [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"]
    if proj == "gate_up_proj":
        return [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")]
    return [f"model.layers.{i}.{sub}.{proj}"]


def _concat(tables: list[NBits], name: str) -> NBits:
    first = tables[0]
    if any((t.bits, t.block_size, t.zero_points is None) != (first.bits, first.block_size,
           first.zero_points is None) for t in tables):  # fmt: skip
        raise CompressError(f"{name}: the Linears packed into one MatMulNBits have different grids: give them one")
    zp = None if first.zero_points is None else np.concatenate([t.zero_points for t in tables])
    return NBits(np.concatenate([t.packed for t in tables]), np.concatenate([t.scales for t in tables]), zp,
                 first.bits, first.block_size, first.accuracy_level)  # fmt: skip


def _branch(factors: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The packed Linears' (A, B) as one branch: A stacked (in, sum r) unless all are equal (shared), B block-diagonal
    (sum r, N): the sum of each Linear's x A_i^T B_i^T over its own output columns."""
    if all(np.array_equal(a, factors[0][0]) for a, _ in factors):
        return factors[0][0].T, np.concatenate([b for _, b in factors]).T
    a = np.concatenate([a for a, _ in factors]).T
    b = np.zeros((a.shape[1], sum(b.shape[0] for _, b in factors)), np.float32)
    r = n = 0
    for fa, fb in factors:
        b[r : r + fa.shape[0], n : n + fb.shape[0]] = fb.T
        r, n = r + fa.shape[0], n + fb.shape[0]
    return a, b


def _offset_rows(a: np.ndarray, b: np.ndarray, table: NBits) -> NBits | None:
    """Exact block offsets (A sums each block of ``table.block_size`` inputs: a GGUF Q4_1 source's per-block float
    offsets, ``lowrank.offset_factors``) as extra K rows of the same table, read against the input's block means: B's
    k / block rows times the block size, as one more (partial) block on the table's own 4-bit grid (smollm2: ~0.5%
    relative error on the offsets). None when A is anything else or the
    table's zero points would not align."""
    from export.int4_pack import ort_quantize

    bs, (k, r) = table.block_size, a.shape
    n_blocks = table.scales.shape[1]
    if table.bits != 4 or k % bs or r != k // bs or not np.array_equal(a, np.repeat(np.eye(r), bs, axis=0)):
        return None
    if table.zero_points is not None and n_blocks % 2:
        return None  # the extra blocks' zero points would start mid-byte
    # r rows, x block size: they multiply block means (ReduceMean); MatMulNBits pads the last block itself
    rows = np.asarray(b, np.float32) * bs
    packed, scales, zp = ort_quantize(rows, bs, table.zero_points is None, 4)
    return NBits(np.concatenate([table.packed, packed], 1), np.concatenate([table.scales, scales], 1),
                 None if table.zero_points is None else np.concatenate([table.zero_points, zp], 1), 4, bs,
                 table.accuracy_level)  # fmt: skip


class _Graft:
    """One pass over the builder's graph: its MatMulNBits / embedding nodes re-pointed at new initializers, nodes to
    insert before / after a node, and the tensors shared between nodes that read the same input."""

    def __init__(self, model) -> None:
        self.g = model.graph
        self.before: dict[str, list] = {}
        self.after: dict[str, list] = {}
        self.shared: dict[tuple, str] = {}  # (input tensor, what is computed from it) -> its output tensor
        self.consts: set[str] = set()  # constant initializers put once, read by many nodes
        self.counts = {"matmulnbits": 0, "low_rank_branches": 0, "offsets_as_extra_k": 0}

    def put(self, name: str, arr) -> str:
        from onnx import TensorProto, numpy_helper

        t = arr if isinstance(arr, TensorProto) else numpy_helper.from_array(np.ascontiguousarray(arr), name)
        self.g.initializer.append(t)
        return name

    def const(self, name: str, arr: np.ndarray) -> str:
        if name not in self.consts:
            self.consts.add(self.put(name, arr))
        return name

    def _once(self, node, key: tuple, make) -> str:
        """The output of ``make()`` (nodes inserted before ``node``) computed once per key."""
        if key not in self.shared:
            out, nodes = make()
            self.before.setdefault(node.name, []).extend(nodes)
            self.shared[key] = out
        return self.shared[key]

    def matmul(self, n, weights: GenaiWeights) -> None:
        from onnx import helper

        names = _hf_names(n.name)
        prefix = f"genai_graft/{names[0]}"
        if names == ["lm_head"] and isinstance(weights.head, np.ndarray):
            w = self.put(prefix + ".weight_T", weights.head.T.astype(np.float32))
            n.CopyFrom(helper.make_node("MatMul", [n.input[0], w], list(n.output), name=n.name))
            return
        missing = [m for m in names if m not in weights.linears and m != "lm_head"]
        if missing:
            raise CompressError(
                f"export genai: {missing[0]} is not on an int4/int8 grid: put every decoder Linear through "
                "quant.int4 (its default layers) before exporting to onnxruntime-genai's graph"
            )
        table = weights.head if names == ["lm_head"] else _concat([weights.linears[m] for m in names], n.name)
        assert isinstance(table, NBits)
        factors = [weights.low_rank[m] for m in names if m in weights.low_rank]
        if factors and len(factors) != len(names):
            raise CompressError(f"export genai: {n.name} packs Linears with and without low-rank branches")
        a, b = _branch(factors) if factors else (None, None)  # a (K, r), b (r, N)
        extended = _offset_rows(a, b, table) if factors else None
        if extended is not None:  # [x, block means] @ [W; block x offsets]: two small nodes per distinct input, shared
            k, bs = a.shape[0], table.block_size
            width = k + a.shape[1]
            n.input[0] = self._once(n, (n.input[0], "block_means", width), lambda: self._block_means(n, k, bs))
            next(at for at in n.attribute if at.name == "K").i = width
            table, factors = extended, []
            self.counts["offsets_as_extra_k"] += 1
        del n.input[1:]
        n.input.extend([self.put(prefix + ".packed", table.packed),
                        self.put(prefix + ".scales", table.scales.reshape(-1))])  # fmt: skip
        if table.zero_points is not None:
            n.input.append(self.put(prefix + ".zero_points", table.zero_points.reshape(-1)))
        attrs = {at.name: at for at in n.attribute}
        attrs["bits"].i, attrs["block_size"].i = table.bits, table.block_size
        attrs["accuracy_level"].i = table.accuracy_level
        self.counts["matmulnbits"] += 1
        if factors:
            self._branch(n, a, b, table.accuracy_level, prefix)

    def _block_means(self, n, k: int, block: int) -> tuple[str, list]:
        """[x, its block means]: x viewed as (..., k / block, block) (a Reshape, no copy), a ReduceMean over the last
        axis and a Concat; the offsets rows carry the block size (``_offset_rows``). Of the forms tried on smollm2
        (an indicator MatMul, AveragePool, this), this one decodes fastest and costs the least time to first token
        (AveragePool over a 32-token prompt: ~50 µs per node; README, Language models)."""
        from onnx import helper

        x, name = n.input[0], f"genai_graft/{n.name.strip('/').replace('/', '.')}"
        blocks, means, joined = (f"{name}/{s}/output_0" for s in ("block_view", "block_means", "with_block_means"))
        shape = self.const(
            f"genai_graft/block_view_{k // block}x{block}", np.array([0, 0, k // block, block], np.int64)
        )
        axis = self.const("genai_graft/last_axis", np.array([-1], np.int64))  # axes as an input: the builder's opset 22
        return joined, [
            helper.make_node("Reshape", [x, shape], [blocks], name=f"{name}/block_view"),
            helper.make_node("ReduceMean", [blocks, axis], [means], name=f"{name}/block_means", keepdims=0),
            helper.make_node("Concat", [x, means], [joined], name=f"{name}/with_block_means", axis=-1),
        ]  # fmt: skip

    def _branch(self, n, a: np.ndarray, b: np.ndarray, accuracy_level: int, prefix: str) -> None:
        """y += (x A) B: a float MatMul per distinct (input, A), B as an 8-bit MatMulNBits, an Add."""
        from onnx import helper

        from export.int4_pack import ort_quantize

        r = a.shape[1]
        bs = 16 if r <= 16 else 32
        pad = -(-r // bs) * bs
        a = np.pad(a, ((0, 0), (0, pad - r))).astype(np.float32)
        b = np.pad(b, ((0, pad - r), (0, 0)))
        x = n.input[0]
        xa = self._once(n, (x, a.tobytes()), lambda: (f"{prefix}/lowrank_A/output_0", [helper.make_node(
            "MatMul", [x, self.put(prefix + ".lowrank_A", a)], [f"{prefix}/lowrank_A/output_0"],
            name=f"{prefix}/lowrank_A")]))  # fmt: skip
        packed, scales, _ = ort_quantize(b, bs, symmetric=True, bits=8)
        y = n.output[0]
        n.output[0] = f"{y}/base"
        self.after[n.name] = [
            helper.make_node("MatMulNBits", [xa, self.put(prefix + ".lowrank_B", packed),
                             self.put(prefix + ".lowrank_B_scales", scales.reshape(-1))], [f"{y}/lowrank"],
                             name=f"{prefix}/lowrank_B", domain="com.microsoft", K=pad, N=b.shape[1], bits=8,
                             block_size=bs, accuracy_level=accuracy_level),
            helper.make_node("Add", [f"{y}/base", f"{y}/lowrank"], [y], name=f"{prefix}/lowrank_add"),
        ]  # fmt: skip
        self.counts["low_rank_branches"] += 1

    def embeddings(self, n, emb: Table | np.ndarray):
        from onnx import helper

        from export.int4_pack import gather_node

        ids = next(t for t in n.input if t == "input_ids")
        if isinstance(emb, np.ndarray):
            return helper.make_node("Gather", [self.put("genai_graft/embed_tokens", emb.astype(np.float32)), ids],
                                    list(n.output), name=n.name, axis=0)  # fmt: skip
        node, inits = gather_node(emb.packed, emb.scales, emb.zero_points, emb.shape, emb.block_size, emb.bits, ids,
                                  n.output[0], n.name, "genai_graft/embed_tokens")  # fmt: skip
        for t in inits:
            self.put(t.name, t)
        return node


def graft(builder_dir: Path, weights: GenaiWeights, out: Path) -> dict:
    """The builder's graph with ``weights`` in it, saved to ``out`` (model.onnx + genai_config.json + the builder's
    tokenizer files). Returns counts."""
    import onnx

    model = onnx.load(str(builder_dir / "model.onnx"))
    gr = _Graft(model)
    g = model.graph
    seen: set[str] = set()
    for n in list(g.node):
        if n.op_type == "MatMulNBits":
            seen.update(_hf_names(n.name))
            gr.matmul(n, weights)
    unused = sorted(set(weights.linears) - seen)
    if unused:
        raise CompressError(
            f"export genai: the builder's graph has no MatMul for {unused[0]} (architecture not mapped)"
        )
    for n in g.node:
        if n.op_type in ("GatherBlockQuantized", "Gather") and "embed_tokens" in n.name:
            n.CopyFrom(gr.embeddings(n, weights.embeddings))
            gr.counts["embeddings"] = n.op_type
    nodes = list(g.node)
    del g.node[:]
    for n in nodes:
        g.node.extend(gr.before.get(n.name, []) + [n] + gr.after.get(n.name, []))
    sweep(g)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in builder_dir.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, tmp / f.name)
    onnx.save(model, str(tmp / "model.onnx"))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return gr.counts
