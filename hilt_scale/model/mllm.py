"""LLaVA-style report model: 3D ViT + connector (HILT or an ablation) + any HF causal LM.

The visual tokens are spliced into the LLM's input embeddings where the image placeholder sits in
the instruction prompt. The prompt is split at the placeholder instead of adding a new token, so
the (possibly frozen or 4-bit) embedding table never needs resizing. The LLM base is frozen and
tuned with LoRA (peft), optionally over a bitsandbytes nf4 base (QLoRA).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hilt_scale.model.config import (
    LLMConfig,
    ModelConfig,
    grid,
    validate,
)
from hilt_scale.model.connectors import build_connector
from hilt_scale.model.findings import FindingHead, FindingTokens, finding_targets
from hilt_scale.model.tokenizer import train_report_tokenizer
from hilt_scale.model.visual import build_vision, encode_volumes, vision_features
from hilt_scale.model.vit3d import ViT3D
from shards.batch import stack_batch
from shards.schema import CLASSES

# Sentinel id marking the image position in collated input_ids (LLaVA uses the same value).


class _NoRemoteKernelProbe(logging.Filter):
    """bitsandbytes (imported by peft whenever it is installed), on CPUs with AVX512-BF16, asks
    Hugging Face's ``kernels`` package for a CPU gemm from the hub repository "kernels-community";
    the hub's remote code is refused here (untrusted, or offline) and bitsandbytes logs a warning
    on every run, 4-bit or not, then uses its own CPU path, which is what we want (no code from the
    hub at run time): drop that one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from kernels-community" not in str(record.msg)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoRemoteKernelProbe())

IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100


def prompt_token_parts(
    tokenizer: Any, prompt: str, placeholder: str = "<image>"
) -> tuple[list[int], list[int]]:
    """Token ids of the instruction before and after the image placeholder, chat template applied.

    With a chat template the text holds the template's own bos; without one, bos is prepended.
    """
    if prompt.count(placeholder) != 1:
        raise ValueError(
            f"prompt must contain the image placeholder {placeholder!r} exactly once: {prompt!r}"
        )
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        before, after = text.split(placeholder, 1)
        bos: list[int] = []
    else:
        before, after = prompt.split(placeholder, 1)
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pre = bos + tokenizer(before, add_special_tokens=False)["input_ids"]
    post = tokenizer(after, add_special_tokens=False)["input_ids"]
    return pre, post


class ReportCollator:
    """Adds ``input_ids``, ``attention_mask``, ``labels`` (prompt + report) to a loader batch.

    input_ids = prompt-before + [IMAGE_TOKEN_ID] + prompt-after + report + eos, right-padded.
    Labels are IGNORE_INDEX on the prompt, the image slot and padding. ``visual_tokens`` is how
    many tokens the image slot expands to, so prompt + image + report fit in ``max_length``;
    ``report_budget`` is the report's share (eos included). A longer report is cut to fit and
    counted, never silently: the batch's ``n_truncated`` and the running ``truncated`` / ``seen``
    (in the process that collates).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt: str,
        max_length: int,
        visual_tokens: int = 0,
        placeholder: str = "<image>",
    ) -> None:
        self.tokenizer = tokenizer
        self.pre, self.post = prompt_token_parts(tokenizer, prompt, placeholder)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        if self.eos is None:
            raise ValueError("ReportCollator: the tokenizer has no eos token")
        self.report_budget = max_length - max(visual_tokens, 1) - len(self.pre) - len(self.post)
        if self.report_budget < 2:
            raise ValueError(
                f"max_length={max_length} leaves no room for a report after {len(self.pre) + len(self.post)} "
                f"prompt tokens and {visual_tokens} visual tokens"
            )
        self.truncated = 0
        self.seen = 0

    def report_length(self, report: str) -> int:
        """Tokens the report takes in the sequence, eos included (the unit of ``report_budget``)."""
        return len(self.tokenizer(report, add_special_tokens=False)["input_ids"]) + 1

    def __call__(self, batch: dict | list[dict]) -> dict:
        if isinstance(batch, list):
            batch = stack_batch(batch)
        prompt = self.pre + [IMAGE_TOKEN_ID] + self.post
        rows, labels, cut = [], [], 0
        for report in batch["report"]:
            ids = self.tokenizer(report, add_special_tokens=False)["input_ids"]
            if len(ids) > self.report_budget - 1:
                ids, cut = ids[: self.report_budget - 1], cut + 1
            ids = ids + [self.eos]
            rows.append(prompt + ids)
            labels.append([IGNORE_INDEX] * len(prompt) + ids)
        width = max(len(r) for r in rows)
        out = dict(batch)
        out["input_ids"] = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        out["labels"] = torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels])
        out["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        out["finding_labels"], out["finding_known"] = finding_targets(batch.get("meta") or [{}] * len(rows))
        out["n_truncated"] = cut
        self.truncated += cut
        self.seen += len(rows)
        return out


def resolve_attn_implementation(requested: str = "auto") -> str:
    """flash_attention_2 when flash-attn is installed and CUDA is present, else SDPA."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def hf_config(cfg: LLMConfig, vocab_size: int | None = None, tokenizer: Any = None) -> Any:
    """A transformers config for a preset's architecture numbers (random init or meta builds)."""
    from transformers import AutoConfig  # noqa: PLC0415

    special = {}
    if tokenizer is not None:
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    return AutoConfig.for_model(
        cfg.model_type,
        vocab_size=vocab_size or cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        **special,
    )


def _bnb_config(cfg: LLMConfig) -> Any:
    """nf4 with bf16 compute and bf16 storage, so ZeRO-3 can shard the packed weights."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def build_tokenizer(cfg: ModelConfig, texts: list[str] | None = None) -> Any:
    """Load the LLM's tokenizer (saved dir or model path), or train one on ``texts`` (llm-tiny)."""
    llm = cfg.llm
    if llm.tokenizer_path or llm.path:
        from transformers import AutoTokenizer  # noqa: PLC0415

        tokenizer = AutoTokenizer.from_pretrained(llm.tokenizer_path or llm.path)
    elif texts is not None:
        tokenizer = train_report_tokenizer(texts, vocab_size=llm.vocab_size)
    else:
        raise ValueError(
            f"llm {llm.name!r} has no path or tokenizer_path: pass the report texts to train one"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_llm(cfg: LLMConfig, tokenizer: Any) -> nn.Module:
    """The causal LM: random init (no path) or from_pretrained, optionally nf4, frozen, plus LoRA."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    dtype = getattr(torch, cfg.dtype)
    attn = resolve_attn_implementation(cfg.attn_implementation)
    quant = _bnb_config(cfg)
    if quant is not None:
        dtype = torch.bfloat16  # storage dtype and model dtype must agree for ZeRO-3
    if cfg.path is None:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            llm = AutoModelForCausalLM.from_config(
                hf_config(cfg, len(tokenizer), tokenizer), attn_implementation=attn, dtype=dtype
            )
        if quant is not None:
            # bitsandbytes quantises while loading weights: round-trip the random model via disk.
            # Not llm.save_pretrained: under torch.distributed it writes on rank 0 only.
            from safetensors.torch import save_model  # noqa: PLC0415

            with tempfile.TemporaryDirectory() as tmp:
                llm.config.save_pretrained(tmp)
                save_model(llm, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
                llm = AutoModelForCausalLM.from_pretrained(
                    tmp, quantization_config=quant, dtype=dtype, attn_implementation=attn
                )
    else:
        llm = AutoModelForCausalLM.from_pretrained(
            cfg.path, quantization_config=quant, dtype=dtype, attn_implementation=attn
        )
    if cfg.grad_checkpointing:
        enable_activation_checkpointing(llm)
    return add_lora(llm, cfg)


def enable_activation_checkpointing(llm: nn.Module) -> None:
    """Non-reentrant activation checkpointing of the LLM's layers, by either transformers API.

    transformers 5.2x renamed ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)``
    to ``activation_checkpointing_enable(activation_checkpointing_kwargs=...)`` (the old name
    warns and goes in v6); releases before the rename have only the old one.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def add_lora(llm: nn.Module, cfg: LLMConfig) -> nn.Module:
    """Freeze the LLM base and, when ``cfg.lora``, wrap it with peft LoRA (+ modules_to_save)."""
    llm.requires_grad_(False)
    if not cfg.lora:
        return llm
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        modules_to_save=list(cfg.train_modules) or None,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated alias `is_gradient_checkpointing` (5.2x warns)
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        return get_peft_model(llm, lora)


class HiltReportModel(nn.Module):
    """Vision encoder + connector + causal LM; ``forward(batch) -> loss``, ``generate(hr) -> texts``."""

    def __init__(self, cfg: ModelConfig, vision: ViT3D, connector: nn.Module, llm: nn.Module, tokenizer: Any):
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        # The auxiliary finding head (ModelConfig.findings_loss): max + mean of the visual tokens
        # -> 18 logits. Its last loss is kept for the training log. With finding_tokens its
        # probabilities also become LLM tokens (present / absent embeddings), and it is exported.
        self.finding_head = self.finding_embed = None
        width = llm.get_input_embeddings().weight.shape[1]
        if cfg.findings_loss > 0 or cfg.finding_tokens != "none":
            self.finding_head = FindingHead(width, len(CLASSES), cfg.finding_readout)
        if cfg.finding_tokens != "none":
            self.finding_embed = FindingTokens(len(CLASSES), width)
        # The encoder's own finding head (ModelConfig.encoder_findings_loss): training only.
        self.encoder_head = None
        if cfg.encoder_findings_loss > 0:
            self.encoder_head = FindingHead(vision.width, len(CLASSES), cfg.finding_readout)
        self.last_findings_loss: torch.Tensor | None = None

    @property
    def num_visual_tokens(self) -> int:
        """Tokens one volume of the configured HR size contributes to the LLM sequence."""
        res, patch = self.cfg.resolution, self.vision.patch_size
        return self.connector.num_tokens(grid(res.hr_size, patch), grid(res.lr_size, patch))

    @property
    def num_image_tokens(self) -> int:
        """Tokens the image placeholder becomes in the LLM sequence: the visual tokens, then the
        18 finding tokens with ``finding_tokens``."""
        return self.num_visual_tokens + (len(CLASSES) if self.cfg.finding_tokens != "none" else 0)

    def collator(self, max_length: int | None = None, prompt: str | None = None) -> ReportCollator:
        """A ReportCollator sized for this model's prompt, visual token count and sequence budget."""
        return ReportCollator(
            self.tokenizer,
            prompt or self.cfg.prompt,
            max_length or self.cfg.max_length,
            visual_tokens=self.num_image_tokens,
            placeholder=self.cfg.image_placeholder,
        )

    def visual_tokens(self, hr: torch.Tensor) -> torch.Tensor:
        """[B, 1, D, H, W] uint8/int16/float volume -> the connector's tokens [B, N_vis, LLM width]."""
        res = self.cfg.resolution
        return encode_volumes(self.vision, self.connector, res.lr_size, hr, res.lr_view)

    def encode_images(self, hr: torch.Tensor) -> torch.Tensor:
        """[B, 1, D, H, W] volume -> the LLM's image tokens: visual tokens (+ the finding tokens)."""
        tokens = self.visual_tokens(hr).to(self.llm.get_input_embeddings().weight.dtype)
        if self.cfg.finding_tokens == "none":
            return tokens
        return self.with_finding_tokens(tokens, torch.sigmoid(self.finding_logits(tokens)))

    @torch.no_grad()
    def finding_probabilities(self, hr: torch.Tensor) -> torch.Tensor:
        """[B, 18] probabilities of the finding head (needs one) for [B, 1, D, H, W] volumes."""
        return torch.sigmoid(self.finding_logits(self.visual_tokens(hr)))

    def finding_logits(self, visual: torch.Tensor) -> torch.Tensor:
        """[B, 18] float logits of the finding head on [B, N, C] visual tokens (``finding_readout``)."""
        return self.finding_head(visual).float()

    def with_finding_tokens(self, visual: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """``visual`` followed by the 18 finding tokens of [B, 18] probabilities ``prob``."""
        return torch.cat([visual, self.finding_embed(prob).to(visual.dtype)], dim=1)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        visual: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace each row's IMAGE_TOKEN_ID with the visual tokens; returns embeds, mask, labels."""
        is_image = input_ids == IMAGE_TOKEN_ID
        if not bool((is_image.sum(1) == 1).all()):
            raise ValueError("each input_ids row must hold exactly one IMAGE_TOKEN_ID (use ReportCollator)")
        where = is_image.float().argmax(1).tolist()
        embeds = self._embed(input_ids.masked_fill(is_image, 0))
        n = visual.shape[1]
        ones = attention_mask.new_ones(n)
        ignore = None if labels is None else labels.new_full((n,), IGNORE_INDEX)
        out_e, out_m, out_l = [], [], []
        for b, i in enumerate(where):
            out_e.append(torch.cat([embeds[b, :i], visual[b], embeds[b, i + 1 :]]))
            out_m.append(torch.cat([attention_mask[b, :i], ones, attention_mask[b, i + 1 :]]))
            if labels is not None:
                out_l.append(torch.cat([labels[b, :i], ignore, labels[b, i + 1 :]]))
        return torch.stack(out_e), torch.stack(out_m), (torch.stack(out_l) if labels is not None else None)

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over report tokens (+ ``findings_loss`` x the auxiliary
        finding loss when the config asks for it)."""
        device = self.vision.patch_embed.weight.device
        res = self.cfg.resolution
        z_hr, z_lr, hr_grid = vision_features(self.vision, self.connector, batch["hr"], res.lr_size, res.lr_view)
        dtype = self.llm.get_input_embeddings().weight.dtype
        visual = self.connector(z_hr, z_lr, hr_grid).to(dtype)
        lm_visual = visual
        if not self.cfg.vision_lm_grad:  # the report loss stops at the connector's input
            detach = lambda z: None if z is None else z.detach()  # noqa: E731
            lm_visual = self.connector(detach(z_hr), detach(z_lr), hr_grid).to(dtype)
        logits = self.finding_logits(visual) if self.finding_head is not None else None
        if self.cfg.finding_tokens != "none":
            p = torch.sigmoid(logits.detach())
            if self.cfg.finding_tokens == "teacher" and self.training:  # the labels where known
                known = batch["finding_known"].to(p.device)[:, None]
                p = torch.where(known, batch["finding_labels"].to(p), p)
            lm_visual = self.with_finding_tokens(lm_visual, p)
        embeds, mask, labels = self.splice(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["labels"].to(device),
            lm_visual,
        )
        loss = self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss
        if not self.cfg.findings_loss > 0:
            return loss
        return loss + self.cfg.findings_loss * self.vision_loss(logits, z_hr, z_lr, batch)

    def vision_loss(
        self, logits: torch.Tensor, z_hr: torch.Tensor | None, z_lr: torch.Tensor | None, batch: dict
    ) -> torch.Tensor:
        """The vision path's objective in units of the finding loss: the finding head's loss on the
        visual tokens' ``logits`` (kept in ``last_findings_loss``), plus encoder_findings_loss /
        findings_loss x the encoder head's on the ViT tokens the connector read (HR, else LR)."""
        aux = self.finding_head_loss(logits, batch)
        self.last_findings_loss = aux.detach()
        if self.encoder_head is None:
            return aux
        encoder = self.finding_head_loss(self.encoder_head(z_hr if z_hr is not None else z_lr).float(), batch)
        return aux + self.cfg.encoder_findings_loss / self.cfg.findings_loss * encoder

    def finding_head_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Binary cross-entropy of the finding head's [B, 18] logits over the samples that have
        labels (0 if none), targets from the collated batch (``ReportCollator``:
        ``finding_labels``, ``finding_known``).

        Computed for every batch, labelled or not, so every rank uses the head in every step."""
        targets, known = batch["finding_labels"].to(logits.device), batch["finding_known"].to(logits.device)
        per = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        weight = known.float()[:, None]
        return (per * weight).sum() / (weight.sum() * per.shape[1]).clamp(min=1.0)

    @torch.no_grad()
    def image_dependence(self, batch: dict) -> dict[str, float]:
        """Loss with each sample's own volume vs with the batch's volumes rolled by one.

        A model that reads the image has ``shuffled`` clearly above ``real``; equal values mean the
        LLM writes the report from its language prior alone. Needs a batch of at least 2.
        """
        if batch["hr"].shape[0] < 2:
            raise ValueError("image_dependence needs a batch of at least 2 volumes")
        was_training = self.training
        self.eval()
        try:
            real = self(batch).item()
            shuffled = self({**batch, "hr": batch["hr"].roll(1, dims=0)}).item()
        finally:
            self.train(was_training)
        return {"real": real, "shuffled": shuffled, "gap": shuffled - real}

    @torch.no_grad()
    def generate(
        self,
        hr: torch.Tensor,
        prompt: str | None = None,
        max_new_tokens: int = 128,
        num_beams: int = 1,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Greedy (num_beams=1) or beam-search reports for a batch of volumes."""
        was_training = self.training
        self.eval()
        try:
            device = self.vision.patch_embed.weight.device
            pre, post = prompt_token_parts(
                self.tokenizer, prompt or self.cfg.prompt, self.cfg.image_placeholder
            )
            visual = self.encode_images(hr)
            b = visual.shape[0]
            ids = torch.tensor([pre + [IMAGE_TOKEN_ID] + post], device=device).expand(b, -1)
            embeds, mask, _ = self.splice(ids, torch.ones_like(ids), None, visual)
            out = self.llm.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                **generate_kwargs,
            )
        finally:
            self.train(was_training)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs that train: ViT, connector, LoRA (and any modules_to_save)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def param_counts(self) -> dict[str, int]:
        """Trainable and total parameter counts (4-bit weights counted as stored elements x2).

        Under ZeRO-3 a partitioned parameter has numel 0 locally; its full size is ``ds_numel``.
        """
        total = trainable = 0
        for p in self.parameters():
            numel = getattr(p, "ds_numel", None) or p.numel()
            n = numel * (2 if p.dtype == torch.uint8 or type(p).__name__ == "Params4bit" else 1)
            total += n
            trainable += n if p.requires_grad else 0
        return {"trainable": trainable, "total": total}

    def vision_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict of the non-LLM part saved beside the peft adapter: ViT + connector, and with
        finding_tokens the finding head and its token embeddings (inference needs them)."""
        parts = ("vision.", "connector.")
        if self.cfg.finding_tokens != "none":
            parts += ("finding_head.", "finding_embed.")
        return {k: v for k, v in self.state_dict().items() if k.startswith(parts)}

    def load_vision_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load ViT + connector weights saved by ``vision_state_dict``; names missing keys when strict."""
        own = self.vision_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise KeyError(f"vision state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def build_model(cfg: ModelConfig, tokenizer: Any = None, texts: list[str] | None = None) -> HiltReportModel:
    """Build the full model; ``tokenizer`` defaults to ``build_tokenizer(cfg, texts)``."""
    validate(cfg)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, texts)
    llm = build_llm(cfg.llm, tokenizer)
    llm_width = llm.get_input_embeddings().weight.shape[1]
    vision = build_vision(cfg)
    connector = build_connector(cfg.connector, cfg.vision.width, llm_width)
    return HiltReportModel(cfg, vision, connector, llm, tokenizer)
