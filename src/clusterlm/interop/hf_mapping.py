"""Where each clusterlm parameter lives in a Hugging Face checkpoint, and how it is laid out there.

Every HF tensor is described in the orientation of ``nn.Linear`` ([out, in]); GPT-2 stores its
projections as ``Conv1D`` ([in, out]), so those are transposed (``conv1d``). GPT-2 fuses the query,
key and value projections into one ``c_attn`` tensor; each of ours is a band of its rows
(``row_offset``). clusterlm's rotary embedding turns interleaved pairs (x[2i], x[2i+1]) of every
head, HF Llama's turns halves (x[i], x[i + d/2]); the query and key rows are therefore permuted
within each head (``rope_head_dim``), which moves no value across heads, so a slice of whole heads
reads only those heads. BERT (``BertForMaskedLM``) keeps separate query, key and value tensors,
and its masked-LM head's projection is the token table, with its own bias. mBART
(``MBartForConditionalGeneration``) reads its position tables two rows in: ours are its rows from
2 (``row_offset``), the two before them written as zeros and never read.

A mixture of experts is ``MixtralForCausalLM``: its router is ``block_sparse_moe.gate`` and each
expert's SwiGLU projections are tensors of their own, ``block_sparse_moe.experts.{e}.w1`` (gate),
``w3`` (up) and ``w2`` (down), each [out, in]. Ours stack them: ``experts.w1`` [E, d, h] holds
expert ``e``'s ``w1`` transposed at ``[e]`` (``experts``), so a slice of experts reads only theirs.
This is the layout of every Mixtral on the Hub and the one ``transformers`` saves (it fuses the
experts in memory only).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from clusterlm.models import ModelArgs, create_model

GPT2_PREFIX, LLAMA_PREFIX, BERT_PREFIX = "transformer.", "model.", "bert."
EXPERT = "{expert}"  # where an expert's index goes in the name of its HF tensor
# The output projections that are the token table in a tied model (decoders; the encoder's MLM
# head).
TIED_OUTPUTS = {"output.weight", "head.output.weight"}


@dataclass(frozen=True)
class Link:
    """clusterlm parameter == rows [row_offset, row_offset + rows) of the HF tensor ``key`` (read
    as [out, in]), rows permuted per head when ``rope_head_dim``; with ``experts``, the stack of
    the ``experts`` HF tensors ``key`` names (``{expert}`` filled in), each transposed."""

    key: str
    conv1d: bool = False
    row_offset: int = 0
    rope_head_dim: int = 0
    experts: int = 0

    def expert_key(self, expert: int) -> str:
        """The HF tensor of one stacked expert."""
        return self.key.replace(EXPERT, str(expert))


def _gpt2_links(args: ModelArgs) -> list[tuple[str, Link]]:
    d = args.n_embd
    links = [
        (r"tok_embeddings\.weight", Link("wte.weight")),
        (r"pos_embeddings\.weight", Link("wpe.weight")),
        (r"norm\.(weight|bias)", Link(r"ln_f.\1")),
        (r"layers\.(\d+)\.attn_norm\.(weight|bias)", Link(r"h.\1.ln_1.\2")),
        (r"layers\.(\d+)\.mlp_norm\.(weight|bias)", Link(r"h.\1.ln_2.\2")),
        (r"layers\.(\d+)\.attn\.wo\.weight", Link(r"h.\1.attn.c_proj.weight", conv1d=True)),
        (r"layers\.(\d+)\.attn\.wo\.bias", Link(r"h.\1.attn.c_proj.bias")),
        (r"layers\.(\d+)\.mlp\.w1\.weight", Link(r"h.\1.mlp.c_fc.weight", conv1d=True)),
        (r"layers\.(\d+)\.mlp\.w1\.bias", Link(r"h.\1.mlp.c_fc.bias")),
        (r"layers\.(\d+)\.mlp\.w2\.weight", Link(r"h.\1.mlp.c_proj.weight", conv1d=True)),
        (r"layers\.(\d+)\.mlp\.w2\.bias", Link(r"h.\1.mlp.c_proj.bias")),
    ]
    for band, proj in enumerate("qkv"):
        links.append(
            (
                rf"layers\.(\d+)\.attn\.w{proj}\.weight",
                Link(r"h.\1.attn.c_attn.weight", conv1d=True, row_offset=band * d),
            )
        )
        links.append(
            (
                rf"layers\.(\d+)\.attn\.w{proj}\.bias",
                Link(r"h.\1.attn.c_attn.bias", row_offset=band * d),
            )
        )
    return [
        (pattern, Link(GPT2_PREFIX + link.key, link.conv1d, link.row_offset))
        for pattern, link in links
    ]


def _llama_links(args: ModelArgs) -> list[tuple[str, Link]]:
    layer = r"layers\.(\d+)\."
    links = [
        (r"tok_embeddings\.weight", Link("embed_tokens.weight")),
        (r"norm\.weight", Link("norm.weight")),
        (layer + r"attn_norm\.weight", Link(r"layers.\1.input_layernorm.weight")),
        (layer + r"mlp_norm\.weight", Link(r"layers.\1.post_attention_layernorm.weight")),
        (
            layer + r"attn\.wq\.weight",
            Link(r"layers.\1.self_attn.q_proj.weight", rope_head_dim=args.head_dim),
        ),
        (
            layer + r"attn\.wk\.weight",
            Link(r"layers.\1.self_attn.k_proj.weight", rope_head_dim=args.head_dim),
        ),
        (layer + r"attn\.wv\.weight", Link(r"layers.\1.self_attn.v_proj.weight")),
        (layer + r"attn\.wo\.weight", Link(r"layers.\1.self_attn.o_proj.weight")),
        (layer + r"mlp\.w1\.weight", Link(r"layers.\1.mlp.gate_proj.weight")),
        (layer + r"mlp\.w3\.weight", Link(r"layers.\1.mlp.up_proj.weight")),
        (layer + r"mlp\.w2\.weight", Link(r"layers.\1.mlp.down_proj.weight")),
        (layer + r"mlp\.router\.gate\.weight", Link(r"layers.\1.block_sparse_moe.gate.weight")),
        (
            layer + r"mlp\.experts\.w([123])",
            Link(
                rf"layers.\1.block_sparse_moe.experts.{EXPERT}.w\2.weight",
                experts=args.moe_experts,
            ),
        ),
    ]
    links = [
        (pattern, dataclasses.replace(link, key=LLAMA_PREFIX + link.key)) for pattern, link in links
    ]
    return links + [(r"output\.weight", Link("lm_head.weight"))]


def _bert_links(args: ModelArgs) -> list[tuple[str, Link]]:
    layer, hf_layer = r"layers\.(\d+)\.", r"encoder.layer.\1."
    links = [
        (r"tok_embeddings\.weight", Link("embeddings.word_embeddings.weight")),
        (r"pos_embeddings\.weight", Link("embeddings.position_embeddings.weight")),
        (r"type_embeddings\.weight", Link("embeddings.token_type_embeddings.weight")),
        (r"emb_norm\.(weight|bias)", Link(r"embeddings.LayerNorm.\1")),
        (layer + r"attn\.wq\.(weight|bias)", Link(hf_layer + r"attention.self.query.\2")),
        (layer + r"attn\.wk\.(weight|bias)", Link(hf_layer + r"attention.self.key.\2")),
        (layer + r"attn\.wv\.(weight|bias)", Link(hf_layer + r"attention.self.value.\2")),
        (layer + r"attn\.wo\.(weight|bias)", Link(hf_layer + r"attention.output.dense.\2")),
        (layer + r"attn_norm\.(weight|bias)", Link(hf_layer + r"attention.output.LayerNorm.\2")),
        (layer + r"mlp\.w1\.(weight|bias)", Link(hf_layer + r"intermediate.dense.\2")),
        (layer + r"mlp\.w2\.(weight|bias)", Link(hf_layer + r"output.dense.\2")),
        (layer + r"mlp_norm\.(weight|bias)", Link(hf_layer + r"output.LayerNorm.\2")),
    ]
    links = [(pattern, Link(BERT_PREFIX + link.key)) for pattern, link in links]
    return links + [
        (r"head\.dense\.(weight|bias)", Link(r"cls.predictions.transform.dense.\1")),
        (r"head\.norm\.(weight|bias)", Link(r"cls.predictions.transform.LayerNorm.\1")),
        (r"head\.output\.bias", Link("cls.predictions.bias")),
    ]


def _mbart_links(args: ModelArgs) -> list[tuple[str, Link]]:
    """The encoder's blocks ``layers.enc<i>``, the decoder's ``layers.dec<i>``."""
    parts = {"attn_norm": "self_attn_layer_norm", "cross_norm": "encoder_attn_layer_norm",
             "mlp_norm": "final_layer_norm", "mlp.w1": "fc1", "mlp.w2": "fc2"}  # fmt: skip
    for which, hf_name in (("attn", "self_attn"), ("cross", "encoder_attn")):
        for proj, hf_proj in (
            ("wq", "q_proj"),
            ("wk", "k_proj"),
            ("wv", "v_proj"),
            ("wo", "out_proj"),
        ):
            parts[f"{which}.{proj}"] = f"{hf_name}.{hf_proj}"
    links = [(r"tok_embeddings\.weight", Link("model.shared.weight"))]
    for side, short in (("encoder", "enc"), ("decoder", "dec")):
        hf_side = f"model.{side}."
        links += [
            (rf"{short}_positions\.weight", Link(hf_side + "embed_positions.weight", row_offset=2)),
            (rf"{short}_emb_norm\.(weight|bias)", Link(hf_side + r"layernorm_embedding.\1")),
            (rf"{short}_norm\.(weight|bias)", Link(hf_side + r"layer_norm.\1")),
        ]
        links += [
            (rf"layers\.{short}(\d+)\.{re.escape(ours)}\.(weight|bias)",
             Link(hf_side + rf"layers.\1.{theirs}.\2"))
            for ours, theirs in parts.items()
        ]  # fmt: skip
    return links


_LINKS = {"gpt2": _gpt2_links, "llama": _llama_links, "bert": _bert_links, "mbart": _mbart_links}


def stored_name(args: ModelArgs, name: str) -> str:
    """The name under which a whole model stores parameter ``name``: a tied output projection is
    the token table."""
    return "tok_embeddings.weight" if args.tie_embeddings and name in TIED_OUTPUTS else name


def link_for(args: ModelArgs, name: str) -> Link:
    """The HF home of clusterlm parameter ``name`` (a tied output is the token table)."""
    name = stored_name(args, name)
    for pattern, link in _LINKS[args.flavour](args):
        match = re.fullmatch(pattern, name)
        if match:
            return dataclasses.replace(link, key=match.expand(link.key))
    raise KeyError(f"no Hugging Face name for clusterlm parameter {name!r}")


def parameter_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every unique parameter of the model and its shape (tied ones once).

    The model is built on the meta device.
    """
    with torch.device("meta"):
        model = create_model(args)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def rope_rows(head_dim: int) -> torch.Tensor:
    """``ours[r] = hf[rope_rows[r]]`` within one head: our pair (2i, 2i+1) is HF's (i, i + d/2)."""
    half = torch.arange(head_dim // 2)
    return torch.stack((half, half + head_dim // 2), dim=1).flatten()


def to_hf_rows(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Our per-head row order -> HF's (the inverse of reading through ``rope_rows``)."""
    heads = tensor.unflatten(0, (-1, head_dim))
    return heads[:, torch.argsort(rope_rows(head_dim))].flatten(0, 1)


def hf_tensors(args: ModelArgs) -> dict[str, list[str]]:
    """Each HF tensor to write and the clusterlm parameters that make it up, in row order."""
    pieces: dict[str, list[tuple[int, str]]] = {}
    for name in parameter_shapes(args):
        link = link_for(args, name)
        keys = [link.expert_key(e) for e in range(link.experts)] if link.experts else [link.key]
        for key in keys:
            pieces.setdefault(key, []).append((link.row_offset, name))
    return {key: [name for _, name in sorted(parts)] for key, parts in pieces.items()}


def hf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Each HF tensor's shape as HF stores it."""
    shapes = parameter_shapes(args)
    out = {}
    for key, names in hf_tensors(args).items():
        link = link_for(args, names[0])
        if link.experts:
            out[key] = shapes[names[0]][1:][::-1]
            continue
        # rows before row_offset: zeros (mBART's positions)
        shape = (link.row_offset + sum(shapes[name][0] for name in names), *shapes[names[0]][1:])
        out[key] = shape[::-1] if link.conv1d else shape
    return out


def expert_of(link: Link, key: str) -> int:
    """Which of ``link``'s stacked experts the HF tensor ``key`` is."""
    prefix, _, suffix = link.key.partition(EXPERT)
    return int(key.removeprefix(prefix).removesuffix(suffix))


def assemble(args: ModelArgs, key: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The HF tensor ``key`` from its clusterlm parameters (full tensors), as HF stores it."""
    links = {name: link_for(args, name) for name in parts}
    stacked = next(iter(links.values()))
    if stacked.experts:
        return next(iter(parts.values()))[expert_of(stacked, key)].t().contiguous()
    rows = []
    for name, tensor in parts.items():
        link = links[name]
        rows.append(to_hf_rows(tensor, link.rope_head_dim) if link.rope_head_dim else tensor)
    first = next(iter(links.values())).row_offset
    if first:
        rows.insert(0, rows[0].new_zeros((first, *rows[0].shape[1:])))
    whole = torch.cat(rows) if len(rows) > 1 else rows[0]
    return (whole.t() if next(iter(links.values())).conv1d else whole).contiguous()
