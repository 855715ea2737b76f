"""Typed model configuration and its named presets (vision, connector, LLM, resolution).

Presets are plain dataclass instances keyed by name; ``model_config()`` assembles one from preset
names and ``apply_overrides()`` applies ``section.field=value`` strings, so the trainer's CLI can
change any field without this module knowing about argparse.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from shards.schema import HU_WINDOW  # the paper's window: what uint8 shards hold

Size3 = tuple[int, int, int]

CONNECTOR_KINDS = ("hilt", "random-queries", "all-tokens", "pooled", "2d", "lr-only")
ATTN_IMPLS = ("eager", "sdpa", "triton")
ATTN_SCALES = ("rsqrt", "paper", "learned")
ATTN_KEYS = ("global", "footprint")
FINDING_TOKENS = ("none", "predicted", "teacher")
FINDING_READOUTS = ("max+mean", "class-max")
# vision.input -> the ViT's input channels per voxel.
VISION_INPUTS = {"window": 1, "window+contrast": 2, "window+contrast+calcium": 3}
# HU range of the calcium channel (vision.input=window+contrast+calcium): from the Agatston
# threshold (130 HU, the usual definition of calcium in CT) to 1000 HU.
CALCIUM_WINDOW = (130.0, 1000.0)
# Conv-stem filters of their own for the calcium channel (they see it alone): a spot is then the
# patch maximum of those filters, so max pooling passes its gradient (docs/SWEEPS.md, round 7).
CALCIUM_STEM_CHANNELS = 4
# What the calcium channel holds (vision.calcium): "window" = the calcium window in [0, 1];
# "highpass" = that minus its local mean (the 3x5x5 neighbourhood of local_contrast), times
# CALCIUM_HIGHPASS_GAIN: bone's plateau is then no signal and a one-voxel spot is.
CALCIUM_MODES = ("window", "highpass")
# A lone 800 HU spot is 0.77 in the calcium window; x4 puts it near 3, beside the shared stem
# filters' largest outputs (~2.5 on the phantom, docs/SWEEPS.md round 9), where the calcium
# filters' were ~0.5: the embedding no longer starts by ignoring them.
CALCIUM_HIGHPASS_GAIN = 4.0
VISION_STEMS = ("patch", "conv")
LR_VIEWS = ("area", "trilinear")
QUANTIZATIONS = ("none", "nf4")
DTYPES = ("float32", "bfloat16", "float16")


def stem_filters(v: VisionConfig) -> tuple[int, int]:
    """The conv stem's filters: (shared, calcium-only); the calcium channel's own filters exist
    with the calcium input only."""
    return v.stem_channels, CALCIUM_STEM_CHANNELS if v.input == "window+contrast+calcium" else 0


def shard_dtype(v: VisionConfig) -> str:
    """The shard dtype an encoder needs: "int16" (HU) for the calcium channel or a HU window other
    than the paper's, since uint8 shards hold the paper's window only; else "uint8"."""
    needs_hu = v.input == "window+contrast+calcium" or tuple(v.hu_window) != HU_WINDOW
    return "int16" if needs_hu else "uint8"


@dataclass(kw_only=True)
class VisionConfig:
    """3D ViT encoder: width, depth, heads; patch size lives in ResolutionConfig."""

    name: str = "vit-micro"
    width: int = 64
    depth: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    grad_checkpointing: bool = False
    # What the ViT sees per voxel: "window" = the HU window in [-1, 1] (the paper); "window+contrast"
    # adds a second channel, the local contrast of the windowed volume (voxel minus the mean of its
    # 3x5x5 neighbourhood, over the neighbourhood's std + 0.05), computed on each view (HR, LR) alone;
    # "window+contrast+calcium" adds a third, the HU in CALCIUM_WINDOW in [0, 1], which the
    # paper's window clips away (needs HU input: int16 shards, which the trainer's phantom and
    # the sweep then write); with stem "conv" it has CALCIUM_STEM_CHANNELS filters of its own.
    input: str = "window"
    # The calcium channel's form (CALCIUM_MODES; with vision.input=window+contrast+calcium only).
    calcium: str = "window"
    # Token embedding: "patch" = a linear map of each flattened patch (the paper); "conv" = Conv3d
    # 3x3x3 (input channels -> stem_channels) + ReLU, max over each patch, then a linear map.
    stem: str = "patch"
    stem_channels: int = 16
    # HU window of int16 (HU) input, mapped to [-1, 1]; the paper's [-1000, 200] clips calcium
    # (800 HU) to 200. uint8 shards are windowed when written, so only the default applies to them.
    hu_window: tuple[float, float] = HU_WINDOW
    # LayerNorm after the last block (the paper's ViT); false leaves token norms unequal, so a
    # token holding a strong local finding stands out in HILT's softmax (see docs/MODEL.md).
    final_norm: bool = True


@dataclass(kw_only=True)
class ConnectorConfig:
    """How vision tokens become LLM tokens: HILT or one of the paper's ablations."""

    kind: str = "hilt"
    # HILT attention implementation; "triton" falls back to "sdpa" without CUDA/Triton.
    attn_impl: str = "sdpa"
    # "rsqrt" = softmax(QK^T / sqrt(C)) V (default, see docs/MODEL.md); "paper" = literal, scale 1;
    # "learned" = a trained scalar temperature exp(t), t starting at log(1/sqrt(C)).
    attn_scale: str = "rsqrt"
    # Attention heads of HILT / random-queries (channels split C/heads, scale 1/sqrt(C/heads)); paper: 1.
    heads: int = 1
    # HILT's keys: "global" = every HR token (the paper); "footprint" = only the HR tokens inside
    # the query's own LR patch (isotropic HR/LR factor; block-local, no fused kernel needed).
    # random-queries: global only; the connectors without attention ignore it.
    keys: str = "global"
    # random-queries: number of learned queries (BLIP-style ablation).
    num_queries: int = 64
    # pooled: output token grid (D, H, W) after adaptive average pooling of the HR tokens.
    pool_grid: Size3 = (4, 4, 4)
    # Linear layers of the MLP projector F (GELU between): 1-3, the paper's Fig. 8 ablation; 2 = LLaVA-1.5.
    projector_layers: int = 2
    # Hidden width of the MLP projector; 0 = the LLM width.
    projector_hidden: int = 0
    # LayerNorm on the projector's input: for encoders without a final LayerNorm (vision.final_norm
    # false), whose token norms grow with depth and training, the LLM then gets tokens of one scale.
    projector_norm: bool = False
    # 2d: side of the square 2D patch over the HR volume's H x W plane (all D slices are channels);
    # 16 gives the paper's 256 tokens at 256x256x128 and 1024 at 512x512x256.
    patch_2d: int = 16


@dataclass(kw_only=True)
class LLMConfig:
    """A causal LM: architecture numbers (for meta-device builds) and where weights live."""

    name: str = "llm-tiny"
    # Local directory or hub id; None = random init from the numbers below (llm-tiny).
    path: str | None = None
    # A saved tokenizer directory (save_pretrained); used before training a new one.
    tokenizer_path: str | None = None
    model_type: str = "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 688
    vocab_size: int = 2048
    max_position: int = 1024
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dtype: str = "float32"
    quantization: str = "none"
    lora: bool = True
    lora_r: int = 128
    lora_alpha: int = 64
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    # Extra LLM modules trained in full (peft modules_to_save), e.g. lm_head of a random-init LLM.
    train_modules: tuple[str, ...] = ()
    # Activation checkpointing inside the LLM (trades compute for memory on long sequences).
    grad_checkpointing: bool = False
    # "auto" = flash_attention_2 when installed and on CUDA, else sdpa.
    attn_implementation: str = "auto"
    seed: int = 0


@dataclass(kw_only=True)
class ResolutionConfig:
    """HR and LR volume sizes and the ViT patch, all (D, H, W) in voxels."""

    name: str = "cpu-small"
    hr_size: Size3 = (32, 128, 128)
    lr_size: Size3 = (16, 64, 64)
    patch_size: Size3 = (4, 16, 16)
    # How the LR view is made from the HR volume: "area" = average pooling (anti-aliased; equal to
    # trilinear at an integer factor of 2), "trilinear" = the paper's F.interpolate (align_corners
    # False), which at factor 4 samples 2 of every 4 voxels per axis.
    lr_view: str = "area"


@dataclass(kw_only=True)
class ModelConfig:
    """Everything needed to build a HiltReportModel."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    prompt: str = "<image>\nWrite the findings of this chest CT report."
    image_placeholder: str = "<image>"
    # LLM sequence budget: prompt + visual tokens + report.
    max_length: int = 512
    # Weight of an auxiliary loss beside the report's cross-entropy: a linear head on the visual
    # tokens (max and mean over tokens) predicts the sample's 18 CT-RATE finding labels (binary
    # cross-entropy; samples without labels add nothing). 0 = the paper's objective, the report
    # loss alone. The head is a training aid: it is not exported.
    findings_loss: float = 0.0
    # How that head reads the visual tokens (model/findings.py, FindingHead): "max+mean" = a linear
    # map of their per-feature max and mean; "class-max" = each class's score on every token, its
    # max over tokens, plus the linear map of the mean (a one-voxel finding is read from the token
    # it lifts, in whatever direction the encoder put it).
    finding_readout: str = "max+mean"
    # Weight of a second finding loss, from a head of its own (same readout) on the ViT tokens the
    # connector reads: the HR tokens, or the LR tokens where the connector reads those alone
    # (lr-only). Deep supervision: the encoder is taught to make a finding stand out in the token
    # it lifts before the connector has learned to pass that token on. Without it, a one-voxel
    # nodule reached the finding head on some seeds and not others (HILT averages it with the
    # other keys under its query, so its gradient back to the encoder starts weak); with it, on
    # such a seed, the vision probe read small nodules at AUC 0.99 within 300 steps (SWEEPS.md,
    # round 11). A training aid: needs findings_loss > 0, not exported. 0 = the paper.
    encoder_findings_loss: float = 0.0
    # False: the report loss trains the connector, the LLM and its adapters but stops at the ViT's
    # output; the ViT then learns from the finding loss alone (needs findings_loss > 0), as a
    # separately trained vision tower would. True = the paper: the report loss trains everything.
    vision_lm_grad: bool = True
    # "predicted" / "teacher": the finding head's 18 probabilities enter the LLM as 18 tokens after
    # the visual tokens, token k = p_k * present_k + (1 - p_k) * absent_k with learned embeddings
    # (label-guided report generation, as RaDialog and PromptMRG put a classifier's findings in
    # the prompt). The head reads the connector's visual tokens, so what it knows is what the
    # connector kept; p is detached (the head learns from the finding loss only: needs
    # findings_loss > 0). "teacher": in training, p = the sample's own labels where it has them
    # (the LLM learns to write what the tokens say); generation always uses the head's p.
    # The head and the embeddings are then exported. "none" = the paper.
    finding_tokens: str = "none"


VISION_PRESETS: dict[str, VisionConfig] = {
    "vit-micro": VisionConfig(name="vit-micro", width=64, depth=2, heads=2),
    # vit-micro that sees one-voxel findings (the vision probe's default, docs/SWEEPS.md; the main
    # job's with findings_loss, docs/TRAINING.md): local-contrast input channel, conv stem, no
    # final LayerNorm.
    "vit-micro-conv": VisionConfig(
        name="vit-micro-conv",
        width=64,
        depth=2,
        heads=2,
        input="window+contrast",
        stem="conv",
        final_norm=False,
    ),  # fmt: skip
    "vit-tiny": VisionConfig(name="vit-tiny", width=192, depth=12, heads=3),
    "vit-small": VisionConfig(name="vit-small", width=384, depth=12, heads=6),
    "vit-base": VisionConfig(name="vit-base", width=768, depth=12, heads=12),
}

_LLAMA3_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LLM_PRESETS: dict[str, LLMConfig] = {
    # Random-init Llama-style model for CPU runs and tests; vocab comes from the trained tokenizer.
    # LoRA r 32 / alpha 64 / dropout 0.05 (not the paper's r 128 / 0.1): the base is random, so the
    # adapter is most of what learns, and the main job's table was measured with these numbers.
    "llm-tiny": LLMConfig(
        name="llm-tiny", lora_r=32, lora_alpha=64, lora_dropout=0.05, train_modules=("lm_head",)
    ),
    # A smaller one for unit tests.
    "llm-micro": LLMConfig(
        name="llm-micro",
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=512,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
    ),  # fmt: skip
    "llama3-8b": LLMConfig(
        name="llama3-8b",
        path="meta-llama/Meta-Llama-3-8B-Instruct",
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position=8192,
        rope_theta=500000.0,
        dtype="bfloat16",
        lora_targets=_LLAMA3_TARGETS,
    ),  # fmt: skip
    "llama3-70b": LLMConfig(
        name="llama3-70b",
        path="meta-llama/Meta-Llama-3-70B-Instruct",
        hidden_size=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        max_position=8192,
        rope_theta=500000.0,
        dtype="bfloat16",
        quantization="nf4",
        lora_targets=_LLAMA3_TARGETS,
    ),  # fmt: skip
    "llama2-7b": LLMConfig(
        name="llama2-7b",
        path="meta-llama/Llama-2-7b-chat-hf",
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_position=4096,
        rope_theta=10000.0,
        dtype="bfloat16",
        lora_targets=_LLAMA3_TARGETS,
    ),  # fmt: skip
    "mistral-7b": LLMConfig(
        name="mistral-7b",
        path="mistralai/Mistral-7B-Instruct-v0.2",
        model_type="mistral",
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
        max_position=32768,
        rope_theta=1000000.0,
        dtype="bfloat16",
        lora_targets=_LLAMA3_TARGETS,
    ),  # fmt: skip
}

RESOLUTION_PRESETS: dict[str, ResolutionConfig] = {
    # The paper: HR 512x512x256 (H x W x D) -> 4096 tokens, LR 128x128x64 -> 64 tokens.
    "paper": ResolutionConfig(
        name="paper", hr_size=(256, 512, 512), lr_size=(64, 128, 128), patch_size=(16, 32, 32)
    ),
    # Normal resolution: HR 256x256x128 -> 512 tokens, same LR view.
    "normal": ResolutionConfig(
        name="normal", hr_size=(128, 256, 256), lr_size=(64, 128, 128), patch_size=(16, 32, 32)
    ),
    # CPU-sized, 64 LR tokens like the paper: HR 32x128x128 -> 8*8*8 = 512 tokens, LR 16x64x64 -> 64.
    "cpu-small": ResolutionConfig(
        name="cpu-small", hr_size=(32, 128, 128), lr_size=(16, 64, 64), patch_size=(4, 16, 16)
    ),
    # Faster CPU preset: HR 32x64x64 -> 512 tokens, LR 16x32x32 -> 64 tokens.
    "cpu-tiny": ResolutionConfig(
        name="cpu-tiny", hr_size=(32, 64, 64), lr_size=(16, 32, 32), patch_size=(4, 8, 8)
    ),
    # Unit tests: HR 16x32x32 -> 64 tokens, LR 8x16x16 -> 8 tokens.
    "cpu-micro": ResolutionConfig(
        name="cpu-micro", hr_size=(16, 32, 32), lr_size=(8, 16, 16), patch_size=(4, 8, 8)
    ),
}

_SECTION_PRESETS: dict[str, dict[str, Any]] = {
    "vision": VISION_PRESETS,
    "llm": LLM_PRESETS,
    "resolution": RESOLUTION_PRESETS,
}


def preset(section: str, name: str) -> Any:
    """Return a fresh copy of a named preset of ``section`` (vision, llm, resolution)."""
    table = _SECTION_PRESETS.get(section)
    if table is None:
        raise KeyError(f"unknown config section {section!r}; expected one of {sorted(_SECTION_PRESETS)}")
    if section == "llm" and name not in table:
        # Not a preset: a local directory or hub id whose numbers come from its own config.json.
        return dataclasses.replace(LLMConfig(), name=name, path=name, dtype="bfloat16", train_modules=())
    if name not in table:
        raise KeyError(f"unknown {section} preset {name!r}; expected one of {sorted(table)}")
    return dataclasses.replace(table[name])


def model_config(
    vision: str = "vit-micro",
    connector: str = "hilt",
    llm: str = "llm-tiny",
    resolution: str = "cpu-small",
    overrides: dict[str, str] | list[str] | None = None,
) -> ModelConfig:
    """Assemble a ModelConfig from preset names, then apply ``section.field=value`` overrides."""
    if connector not in CONNECTOR_KINDS:
        raise ValueError(f"unknown connector {connector!r}; expected one of {CONNECTOR_KINDS}")
    cfg = ModelConfig(
        vision=preset("vision", vision),
        connector=ConnectorConfig(kind=connector),
        llm=preset("llm", llm),
        resolution=preset("resolution", resolution),
    )
    return apply_overrides(cfg, overrides or {})


def _parse_value(tp: Any, text: str, where: str) -> Any:
    """Convert CLI text to the annotated field type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            return None
        return _parse_value(next(a for a in args if a is not type(None)), text, where)
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected a boolean, got {text!r}")
    if origin is tuple:
        items = [t for t in text.replace("x", ",").split(",") if t] if args[0] is int else text.split(",")
        items = [t.strip() for t in items if t.strip()]
        return tuple(_parse_value(args[0], t, where) for t in items)
    try:
        return tp(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot parse {text!r} as {getattr(tp, '__name__', tp)}") from exc


def apply_overrides(cfg: ModelConfig, overrides: dict[str, Any] | list[str]) -> ModelConfig:
    """Return a copy of ``cfg`` with ``{"llm.lora_r": "16"}`` or ``["llm.lora_r=16"]`` applied.

    Values may be strings (parsed by the field's type) or already-typed values.
    """
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like section.field=value")
            key, value = item.split("=", 1)
            pairs[key] = value
        overrides = pairs
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    top: dict[str, Any] = {}
    changes: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        target = sections.get(section) if section else cfg
        if target is None or not dataclasses.is_dataclass(target):
            raise KeyError(
                f"override {key!r}: unknown section {section!r}; expected one of {sorted(sections)}"
            )
        hints = typing.get_type_hints(type(target))
        if name not in hints or (not section and dataclasses.is_dataclass(sections.get(name))):
            raise KeyError(f"override {key!r}: {type(target).__name__} has no field {name!r}")
        if isinstance(value, str):
            value = _parse_value(hints[name], value, key)
        (changes.setdefault(section, {}) if section else top)[name] = value
    new = {s: dataclasses.replace(sections[s], **changes.get(s, {})) for s in sections if s in changes}
    cfg = dataclasses.replace(cfg, **new, **top)
    validate(cfg)
    return cfg


def validate(cfg: ModelConfig) -> None:
    """Raise ValueError naming the field when the config cannot build a model."""
    c, r, v, m = cfg.connector, cfg.resolution, cfg.vision, cfg.llm
    if c.kind not in CONNECTOR_KINDS:
        raise ValueError(f"connector.kind={c.kind!r}; expected one of {CONNECTOR_KINDS}")
    if c.attn_impl not in ATTN_IMPLS:
        raise ValueError(f"connector.attn_impl={c.attn_impl!r}; expected one of {ATTN_IMPLS}")
    if c.attn_scale not in ATTN_SCALES:
        raise ValueError(f"connector.attn_scale={c.attn_scale!r}; expected one of {ATTN_SCALES}")
    if c.keys not in ATTN_KEYS:
        raise ValueError(f"connector.keys={c.keys!r}; expected one of {ATTN_KEYS}")
    if c.keys == "footprint" and c.kind == "random-queries":  # the others have no keys: unused there
        raise ValueError(
            "connector.keys=footprint needs LR queries (connector.kind=hilt); learned random queries "
            "have no footprint: set connector.keys=global"
        )
    if v.input not in VISION_INPUTS:
        raise ValueError(f"vision.input={v.input!r}; expected one of {tuple(VISION_INPUTS)}")
    if v.calcium not in CALCIUM_MODES:
        raise ValueError(f"vision.calcium={v.calcium!r}; expected one of {CALCIUM_MODES}")
    if v.stem not in VISION_STEMS:
        raise ValueError(f"vision.stem={v.stem!r}; expected one of {VISION_STEMS}")
    if len(v.hu_window) != 2 or not v.hu_window[0] < v.hu_window[1]:
        raise ValueError(f"vision.hu_window={v.hu_window}; expected two HU values, low < high")
    if r.lr_view not in LR_VIEWS:
        raise ValueError(f"resolution.lr_view={r.lr_view!r}; expected one of {LR_VIEWS}")
    if m.quantization not in QUANTIZATIONS:
        raise ValueError(f"llm.quantization={m.quantization!r}; expected one of {QUANTIZATIONS}")
    if m.dtype not in DTYPES:
        raise ValueError(f"llm.dtype={m.dtype!r}; expected one of {DTYPES}")
    if not 1 <= c.projector_layers <= 3:
        raise ValueError(f"connector.projector_layers={c.projector_layers}; expected 1, 2 or 3")
    if c.kind == "2d" and (c.patch_2d < 1 or r.hr_size[1] % c.patch_2d or r.hr_size[2] % c.patch_2d):
        raise ValueError(
            f"connector.patch_2d={c.patch_2d} must divide the H and W of resolution.hr_size={r.hr_size}"
        )
    if v.width % v.heads:
        raise ValueError(f"vision.width={v.width} is not divisible by vision.heads={v.heads}")
    for name in ("hr_size", "lr_size"):
        size = getattr(r, name)
        bad = [s % p for s, p in zip(size, r.patch_size)]
        if any(bad):
            raise ValueError(
                f"resolution.{name}={size} is not a multiple of resolution.patch_size={r.patch_size}"
            )
    if not 0.0 <= cfg.findings_loss < float("inf"):
        raise ValueError(f"findings_loss={cfg.findings_loss}; expected a finite weight >= 0")
    if not cfg.vision_lm_grad and not cfg.findings_loss > 0:
        raise ValueError("vision_lm_grad=false needs findings_loss > 0: the ViT would learn from nothing")
    if not 0.0 <= cfg.encoder_findings_loss < float("inf"):
        raise ValueError(f"encoder_findings_loss={cfg.encoder_findings_loss}; expected a finite weight >= 0")
    if cfg.encoder_findings_loss > 0 and not cfg.findings_loss > 0:
        raise ValueError("encoder_findings_loss > 0 needs findings_loss > 0: it supports the finding head's loss")
    if cfg.finding_readout not in FINDING_READOUTS:
        raise ValueError(f"finding_readout={cfg.finding_readout!r}; expected one of {FINDING_READOUTS}")
    if cfg.finding_tokens not in FINDING_TOKENS:
        raise ValueError(f"finding_tokens={cfg.finding_tokens!r}; expected one of {FINDING_TOKENS}")
    if cfg.finding_tokens != "none" and not cfg.findings_loss > 0:
        raise ValueError(
            f"finding_tokens={cfg.finding_tokens} needs findings_loss > 0: the head that fills them learns from it"
        )
    if cfg.image_placeholder not in cfg.prompt:
        raise ValueError(f"prompt {cfg.prompt!r} lacks the image placeholder {cfg.image_placeholder!r}")


def grid(size: Size3, patch: Size3) -> Size3:
    """Token grid (D, H, W) of a volume of ``size`` cut into ``patch``-sized patches."""
    return tuple(s // p for s, p in zip(size, patch))  # type: ignore[return-value]


def lr_factor(res: ResolutionConfig, hr_size: Size3 | None = None) -> int:
    """The HR/LR ratio of a resolution (or of ``hr_size`` against its LR size), one integer for all
    three axes: the factor of the phantom's physics labels. ValueError when it is not one."""
    hr = tuple(hr_size or res.hr_size)
    ratios = {h / lo for h, lo in zip(hr, res.lr_size)}
    if len(ratios) != 1 or not next(iter(ratios)).is_integer():
        raise ValueError(f"HR size {hr} / LR size {tuple(res.lr_size)} is not one integer factor per axis")
    return int(next(iter(ratios)))


def to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """JSON-ready dict of a ModelConfig (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig from ``to_dict`` output (e.g. an export's config.json)."""
    kinds = {
        "vision": VisionConfig,
        "connector": ConnectorConfig,
        "llm": LLMConfig,
        "resolution": ResolutionConfig,
    }
    parts: dict[str, Any] = {}
    for key, value in data.items():
        if key in kinds:
            hints = typing.get_type_hints(kinds[key])
            fixed = {
                k: tuple(x) if isinstance(x, list) and typing.get_origin(hints.get(k)) is tuple else x
                for k, x in value.items()
            }
            if key == "resolution":
                fixed.setdefault("lr_view", "trilinear")  # configs written before lr_view existed
            unknown = set(fixed) - set(hints)
            if unknown:
                raise KeyError(f"model config section {key!r} has unknown keys {sorted(unknown)}")
            parts[key] = kinds[key](**fixed)
        else:
            parts[key] = value
    cfg = ModelConfig(**parts)
    validate(cfg)
    return cfg
