"""Model FLOPs of a training step, counted from the configuration, and the bf16 peaks for MFU.

Only matrix multiplications are counted (2 FLOPs per multiply-add): linear layers, the attention
products Q·Kᵀ and P·V, the LoRA factors, the LM head. Norms, softmax, activations, the loss,
interpolation and rotary embeddings are elementwise work and left out, as FlopCounterMode and
the usual MFU accounting leave them out. A step is the forward and the backward that autograd
really runs:

- forward: F per matmul;
- backward: +F for the input gradient when the input needs one, +F for the weight gradient when
  the weight trains. So a trained linear layer inside the network costs 3F, a frozen one 2F (the
  LLM base: the gradient still flows through it to the visual tokens), the ViT's patch embedding
  2F (its input, the volume, needs no gradient), attention products 3F.

Attention is counted over the full L×L (no causal halving, as FlopCounterMode and the PaLM MFU
formula count it); activation checkpointing's recomputation is not counted (model FLOPs, not
hardware FLOPs). The LLM runs over the padded batch (the FLOPs the device really spends).
``tests/test_flops.py`` checks the count against ``torch.utils.flop_counter.FlopCounterMode`` on
the real forward + backward of tiny models.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from hilt_scale.model.config import VISION_INPUTS, ModelConfig, Size3, grid, stem_filters
from shards.schema import CLASSES

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, per device; the first name fragment found
# in torch.cuda.get_device_name() wins, so the more specific names come first. Vendor data sheets.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)
PEAK_ENV = "HILT_PEAK_TFLOPS"  # overrides the table (an unknown device, a clock-capped one)


def peak_bf16_flops(device_name: str | None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: ``$HILT_PEAK_TFLOPS``, else the table; None if unknown."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    for fragment, tflops in BF16_PEAK_TFLOPS if device_name else ():
        if fragment in device_name:
            return tflops * 1e12
    return None


@dataclass(frozen=True)
class LLMShape:
    """The numbers of a decoder-only LLM (Llama/Mistral layout) that its FLOPs depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    lora_r: int  # 0 = no LoRA
    lora_targets: tuple[str, ...]
    head_trains: bool  # lm_head trained (modules_to_save)


def llm_shape(hf_config: Any, cfg: ModelConfig) -> LLMShape:
    """LLMShape of a transformers config (the built model's ``llm.config``) and the run's LoRA setup."""
    heads = hf_config.num_attention_heads
    return LLMShape(
        hidden=hf_config.hidden_size,
        layers=hf_config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        intermediate=hf_config.intermediate_size,
        vocab=hf_config.vocab_size,
        lora_r=cfg.llm.lora_r if cfg.llm.lora else 0,
        lora_targets=tuple(cfg.llm.lora_targets),
        head_trains="lm_head" in cfg.llm.train_modules,
    )


def _linear(tokens: int, n_in: int, n_out: int) -> int:
    return 2 * tokens * n_in * n_out


def vit_pass(cfg: ModelConfig, n_tokens: int, patch_voxels: int) -> dict[str, int]:
    """Forward FLOPs of one ViT pass over ``n_tokens`` patches of one volume: ``stem`` (the conv
    stem's Conv3d 3x3x3 over every voxel; 0 for the paper's linear patch embedding), ``patch``
    (the token embedding) and ``blocks`` (qkv, attention, projection, MLP of every block)."""
    v = cfg.vision
    c, hidden = v.width, int(v.width * v.mlp_ratio)
    in_channels = VISION_INPUTS[v.input]
    per_block = (
        _linear(n_tokens, c, 3 * c)  # qkv
        + 2 * 2 * n_tokens * n_tokens * c  # Q·Kᵀ and P·V over all heads
        + _linear(n_tokens, c, c)  # proj
        + _linear(n_tokens, c, hidden)
        + _linear(n_tokens, hidden, c)
    )
    if v.stem == "conv":
        # One convolution over all input channels; the calcium filters' weights on the other
        # channels (and the others' on calcium) are zeros, but computed all the same.
        filters = sum(stem_filters(v))
        stem = 2 * n_tokens * patch_voxels * filters * in_channels * 27
        patch = _linear(n_tokens, filters, c)
    else:
        stem, patch = 0, _linear(n_tokens, in_channels * patch_voxels, c)
    return {"stem": stem, "patch": patch, "blocks": v.depth * per_block}


def vision_tokens(cfg: ModelConfig) -> dict[str, Any]:
    """The ViT's patch, the HR/LR token counts of the passes the connector needs, visual tokens."""
    res, conn = cfg.resolution, cfg.connector
    patch: Size3 = (res.hr_size[0], conn.patch_2d, conn.patch_2d) if conn.kind == "2d" else res.patch_size
    n_hr = math.prod(grid(res.hr_size, patch))
    n_lr = math.prod(grid(res.lr_size, patch))
    needs_hr = conn.kind != "lr-only"
    needs_lr = conn.kind in ("hilt", "lr-only")
    visual = {
        "hilt": n_lr,
        "lr-only": n_lr,
        "random-queries": conn.num_queries,
        "pooled": math.prod(conn.pool_grid),
        "all-tokens": n_hr,
        "2d": n_hr,
    }[conn.kind]
    return {
        "patch_voxels": math.prod(patch),
        "hr": n_hr if needs_hr else 0,
        "lr": n_lr if needs_lr else 0,
        "visual": visual,
    }


def llm_image_tokens(cfg: ModelConfig) -> int:
    """Tokens the image placeholder becomes in the LLM sequence: the visual tokens, and the 18
    finding tokens with ``finding_tokens``."""
    return vision_tokens(cfg)["visual"] + (len(CLASSES) if cfg.finding_tokens != "none" else 0)


def connector_pass(cfg: ModelConfig, llm_hidden: int) -> dict[str, int]:
    """Forward FLOPs of the connector for one volume: ``attention`` (HILT / random queries:
    queries against the HR tokens, no projections) and ``projector`` (the MLP F; its first layer
    alone: ``projector_first``)."""
    tok = vision_tokens(cfg)
    c, conn = cfg.vision.width, cfg.connector
    attention = 0
    if conn.kind in ("hilt", "random-queries"):
        # Q·Kᵀ and P·V (heads split C); footprint keys: each HR token is a key of one query.
        keys_per_query = tok["hr"] // tok["visual"] if conn.keys == "footprint" else tok["hr"]
        attention = 2 * 2 * tok["visual"] * keys_per_query * c
    hidden = conn.projector_hidden or llm_hidden
    widths = [c] + [hidden] * (conn.projector_layers - 1) + [llm_hidden]
    projector = sum(_linear(tok["visual"], a, b) for a, b in zip(widths, widths[1:]))
    return {"attention": attention, "projector": projector, "projector_first": _linear(tok["visual"], c, widths[1])}


def llm_pass(shape: LLMShape, batch: int, seq: int) -> dict[str, int]:
    """Forward FLOPs of the LLM over ``batch`` sequences of ``seq`` tokens: ``base`` (frozen
    linear layers), ``attention`` (Q·Kᵀ, P·V), ``lora`` (the A and B factors), ``head`` (lm_head)."""
    t, d, hd = batch * seq, shape.hidden, shape.head_dim
    q, kv = shape.heads * hd, shape.kv_heads * hd
    linears = {  # name -> (in, out) of each projection in one decoder layer
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, shape.intermediate),
        "up_proj": (d, shape.intermediate),
        "down_proj": (shape.intermediate, d),
    }
    base = sum(_linear(t, a, b) for a, b in linears.values())
    lora = 0
    if shape.lora_r:
        r = shape.lora_r
        lora = sum(
            _linear(t, a, r) + _linear(t, r, b) for n, (a, b) in linears.items() if n in shape.lora_targets
        )
    attention = 2 * 2 * batch * shape.heads * seq * seq * hd
    return {
        "base": shape.layers * base,
        "attention": shape.layers * attention,
        "lora": shape.layers * lora,
        "head": _linear(t, d, shape.vocab),
    }


def step_flops(cfg: ModelConfig, shape: LLMShape, micro_batches: list[tuple[int, int]]) -> dict[str, int]:
    """Model FLOPs (forward + backward) of one optimizer step on one rank.

    ``micro_batches``: (volumes, padded text length of the collated ``input_ids``, image
    placeholder included) per micro-batch. Returns FLOPs per part (``vit_hr``, ``vit_lr``,
    ``connector``, ``finding_head``, ``llm``) and ``total``.
    """
    tok = vision_tokens(cfg)
    none = {"stem": 0, "patch": 0, "blocks": 0}
    hr = vit_pass(cfg, tok["hr"], tok["patch_voxels"]) if tok["hr"] else none
    lr = vit_pass(cfg, tok["lr"], tok["patch_voxels"]) if tok["lr"] else none
    conn = connector_pass(cfg, shape.hidden)
    out = {"vit_hr": 0, "vit_lr": 0, "connector": 0, "finding_head": 0, "llm": 0}
    head = 0
    if cfg.findings_loss > 0:  # class-max scores every visual token with the max half of the weight
        max_rows = vision_tokens(cfg)["visual"] if cfg.finding_readout == "class-max" else 1
        head = _linear(max_rows, shape.hidden, len(CLASSES)) + _linear(1, shape.hidden, len(CLASSES))
    if cfg.encoder_findings_loss > 0:  # the encoder head scores the ViT tokens the connector reads
        tok = vision_tokens(cfg)
        rows = (tok["hr"] or tok["lr"]) if cfg.finding_readout == "class-max" else 1
        head += _linear(rows, cfg.vision.width, len(CLASSES)) + _linear(1, cfg.vision.width, len(CLASSES))
    for volumes, text_len in micro_batches:
        # Trained parts: forward + input gradient + weight gradient (3F). Inputs that need no
        # gradient: the volume (the conv stem, or the linear patch embedding without one: 2F).
        for part, vit in (("vit_hr", hr), ("vit_lr", lr)):
            embed = 3 * vit["patch"] if vit["stem"] else 2 * vit["patch"]
            out[part] += volumes * (2 * vit["stem"] + embed + 3 * vit["blocks"])
        out["connector"] += volumes * 3 * (conn["attention"] + conn["projector"])
        if not cfg.vision_lm_grad:
            # The LLM's second pass on the detached ViT features: the attention forward only; the
            # projector 3F but for its first layer's input gradient (a learned attn_scale's
            # gradient is not counted).
            out["connector"] += volumes * (conn["attention"] + 3 * conn["projector"] - conn["projector_first"])
        out["finding_head"] += volumes * 3 * head
        seq = text_len - 1 + llm_image_tokens(cfg)  # the placeholder becomes the visual tokens
        llm = llm_pass(shape, volumes, seq)
        out["llm"] += (
            2 * llm["base"]
            + 3 * llm["attention"]
            + 3 * llm["lora"]
            + (3 if shape.head_trains else 2) * llm["head"]
        )
    out["total"] = sum(out.values())
    return out
