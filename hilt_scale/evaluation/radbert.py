"""CT-CLIP's RadBERT text classifier (18 CT-RATE abnormalities), loaded from local files only.

The clinical number of the CT-RATE report-generation papers (CT2Rep, Reg2RG, CT-GRAPH, ...) comes
from this classifier. Facts taken from the CT-CLIP repository (``text_classifier/``, commit
a2a155c), re-implemented here:

- architecture: ``RadBertClassifier`` = ``AutoModel`` of RadBERT (``zzxslp/RadBERT-RoBERTa-4m``,
  a RoBERTa-base) as attribute ``model``, then ``classifier = nn.Linear(hidden, 18)`` on the
  pooler output; ``torch.save(model.state_dict())`` gives keys ``model.*`` and ``classifier.*``;
- tokenisation: the base model's tokenizer (``do_lower_case=True`` passed), ``max_length=512``,
  ``truncation=True``; an empty text becomes ``" "``;
- decision: ``sigmoid(logit) >= 0.5`` per class;
- output order: ``LABELS`` below (``infer.py``'s ``label_cols``).

Expected layout of the directory given as ``--ce-model DIR`` (the base model's snapshot with the
classifier checkpoint dropped in; ``DIR/RadBertClassifier.pth`` itself may be given instead)::

    DIR/RadBertClassifier.pth   the classifier's state dict (CT-CLIP's trainer saves one)
    DIR/config.json             the base model's transformers config (RadBERT-RoBERTa-4m)
    DIR/tokenizer.json          or vocab.json + merges.txt (RoBERTa) or vocab.txt (BERT), and
                                tokenizer_config.json / special_tokens_map.json when present

The base model's own weights are not read: the classifier's state dict holds all of them. The
checkpoint is read with ``torch.load(weights_only=True)``: a pickled module (not a state dict) is
refused, never unpickled (convert it once where you trust it, see docs/EVALUATION.md).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shards.schema import CLASSES

CHECKPOINT = "RadBertClassifier.pth"
MAX_LENGTH = 512
THRESHOLD = 0.5
# The classifier's output order: CT-CLIP's text_classifier/infer.py lists its label columns in
# CT-RATE's own order (tests/test_radbert.py holds infer.py's list and checks the two agree).
LABELS: tuple[str, ...] = CLASSES
# Buffers older transformers saved in the state dict and newer ones no longer register.
_OPTIONAL_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


class RadBertHead(nn.Module):
    """The classifier's module layout: ``model`` (the base encoder) + ``classifier`` (Linear)."""

    def __init__(self, base: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.model = base
        self.classifier = nn.Linear(base.config.hidden_size, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return self.classifier(out.pooler_output)


def classifier_files(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint file, base directory) of ``path``; ValueError naming every missing file."""
    path = Path(path)
    if path.is_file():
        ckpt, base = path, path.parent
    else:
        ckpt, base = path / CHECKPOINT, path
    missing = [str(p) for p in (ckpt, base / "config.json") if not p.is_file()]
    if (base / "vocab.json").is_file() and not (base / "tokenizer.json").is_file():
        if not (base / "merges.txt").is_file():
            missing.append(str(base / "merges.txt"))
    elif not any((base / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        missing.append(f"{base}/tokenizer.json (or vocab.json + merges.txt, or vocab.txt)")
    if missing:
        raise ValueError(
            f"--ce-model {path}: missing {', '.join(missing)} (expected layout: docs/EVALUATION.md, "
            f"'{CHECKPOINT}' beside the base model's config.json and tokenizer files)"
        )
    return ckpt, base


def read_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, loaded weights-only; ``module.`` prefixes removed."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{ckpt}: not a plain state dict (a pickled module or other objects; never unpickled "
            f"here). Convert it once where you trust the file: torch.save(torch.load(p, "
            f"weights_only=False).state_dict(), '{CHECKPOINT}'). Loader said: {str(exc)[:300]}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{ckpt}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


class RadBertClassifier:
    """CT-CLIP's classifier ready to label reports: ``predict(texts) -> [{class: 0/1}]``."""

    def __init__(self, head: RadBertHead, tokenizer: Any, source: str, device: str | torch.device = "cpu"):
        self.head = head.eval().to(device)
        self.tokenizer = tokenizer
        self.source = source
        self.device = torch.device(device)

    @torch.no_grad()
    def logits(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """[len(texts), 18] logits in ``LABELS`` order (float32, on the CPU)."""
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = [t if t else " " for t in texts[i : i + batch_size]]
            # Padding to the longest text of the batch, not to 512 as CT-CLIP does: padded
            # positions are masked out, so the logits are the same at a fraction of the cost.
            enc = self.tokenizer(
                chunk, max_length=MAX_LENGTH, truncation=True, padding=True, return_tensors="pt"
            )
            ids = enc["input_ids"].to(self.device)
            mask = enc["attention_mask"].to(self.device)
            out.append(self.head(ids, mask).float().cpu())
        return torch.cat(out) if out else torch.zeros((0, len(LABELS)))

    def predict(self, texts: Sequence[str], batch_size: int = 16) -> list[dict[str, int]]:
        """One {class name: 0/1} per text: sigmoid(logit) >= THRESHOLD."""
        positive = torch.sigmoid(self.logits(texts, batch_size)) >= THRESHOLD
        return [{name: int(row[i]) for i, name in enumerate(LABELS)} for row in positive.tolist()]


def load_classifier(path: str | Path, device: str | torch.device | None = None) -> RadBertClassifier:
    """Load the classifier from local files (layout: module docstring); nothing is downloaded."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: PLC0415

    ckpt, base_dir = classifier_files(path)
    state = read_state_dict(ckpt)
    if "classifier.weight" not in state:
        raise ValueError(f"{ckpt}: no 'classifier.weight': not a RadBertClassifier state dict")
    n_classes = state["classifier.weight"].shape[0]
    if n_classes != len(LABELS):
        raise ValueError(f"{ckpt}: the head has {n_classes} outputs, CT-CLIP's classifier has {len(LABELS)}")
    config = AutoConfig.from_pretrained(base_dir, local_files_only=True)
    head = RadBertHead(AutoModel.from_config(config), n_classes)
    own = head.state_dict()
    optional = {f"model.{b}" for b in _OPTIONAL_BUFFERS}
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own) - optional)
    if missing or unexpected:
        raise ValueError(
            f"{ckpt} does not fit the base model of {base_dir / 'config.json'}: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    head.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True, do_lower_case=True)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return RadBertClassifier(head, tokenizer, str(ckpt), device)
