"""CT-CLIP's RadBERT classifier (--ce-model): loading from local files, label order, threshold,
truncation, refusals, and the agreement numbers against hand counts.

A tiny randomly initialised model of the same architecture (a RoBERTa encoder with its pooler +
Linear(hidden, 18), built here the way CT-CLIP's ``text_classifier/classifier.py`` builds it) and
a word-level tokenizer trained on a few reports stand in for the real 500 MB checkpoint.
"""

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hilt_scale import score
from hilt_scale.evaluation import radbert, scoring

DATA = Path(__file__).parents[2] / "shared" / "data" / "ctrate_text_labels" / "reports_labeled_800.csv"
# CT-CLIP text_classifier/infer.py, label_cols, copied as written there (commit a2a155c).
CTCLIP_LABEL_COLS = ['Medical material','Arterial wall calcification', 'Cardiomegaly', 'Pericardial effusion','Coronary artery wall calcification', 'Hiatal hernia','Lymphadenopathy', 'Emphysema', 'Atelectasis', 'Lung nodule','Lung opacity', 'Pulmonary fibrotic sequela', 'Pleural effusion', 'Mosaic attenuation pattern','Peribronchial thickening', 'Consolidation', 'Bronchiectasis','Interlobular septal thickening']  # fmt: skip  # noqa: E501
FALLBACK_REPORTS = [
    "Trachea and both main bronchi are open. Heart size increased. Pericardial effusion was not observed.",
    "Bilateral pleural effusion is observed. There are atelectatic changes in the lower lobes.",
    "A 4 mm nodule in the right lung upper lobe. Emphysematous changes in both lungs.",
    "Calcific atheroma plaques in the aorta and coronary arteries. No lymphadenopathy.",
]


def _reports(n: int = 20) -> list[str]:
    if not DATA.exists():
        return FALLBACK_REPORTS
    with DATA.open(encoding="utf-8", newline="") as f:
        return [row["report_text"] for _, row in zip(range(n), csv.DictReader(f))]


class CtClipStyleClassifier(nn.Module):
    """CT-CLIP's RadBertClassifier, from a local config instead of the hub."""

    def __init__(self, config, n_classes: int = 18):
        super().__init__()
        from transformers import AutoModel

        self.model = AutoModel.from_config(config)
        self.classifier = nn.Linear(self.model.config.hidden_size, n_classes)

    def forward(self, input_ids, attn_mask):
        return self.classifier(self.model(input_ids=input_ids, attention_mask=attn_mask).pooler_output)


def _write_base(directory: Path) -> object:
    """A word-level tokenizer (RoBERTa's special tokens) and a tiny RoBERTa config in ``directory``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, RobertaConfig

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_reports(), trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>",
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    config = RobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=514, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    config.save_pretrained(directory)
    return config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, CtClipStyleClassifier]:
    directory = tmp_path_factory.mktemp("radbert")
    config = _write_base(directory)
    torch.manual_seed(0)
    reference = CtClipStyleClassifier(config).eval()
    torch.save(reference.state_dict(), directory / radbert.CHECKPOINT)
    return directory, reference


def test_ctclip_label_order_is_ct_rates() -> None:
    from shards.schema import CLASSES

    assert list(radbert.LABELS) == CTCLIP_LABEL_COLS == list(CLASSES)


def test_loads_the_state_dict_and_gives_ctclips_logits(tiny) -> None:
    """Same logits as the CT-CLIP-style module fed as CT-CLIP feeds it (padding to 512)."""
    from transformers import AutoTokenizer

    directory, reference = tiny
    texts = _reports()[:5]
    loaded = radbert.load_classifier(directory, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    expected = []
    for text in texts:
        enc = tokenizer(text, return_tensors="pt", max_length=512, padding="max_length", truncation=True)
        with torch.no_grad():
            expected.append(reference(enc["input_ids"], enc["attention_mask"]))
    got = loaded.logits(texts, batch_size=2)
    assert got.shape == (len(texts), 18)
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-4)
    # Also given as the checkpoint file itself; a module-prefixed (DataParallel) state dict loads too.
    prefixed = directory.parent / "prefixed"
    prefixed.mkdir(exist_ok=True)
    for f in directory.iterdir():
        (prefixed / f.name).write_bytes(f.read_bytes())
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, prefixed / radbert.CHECKPOINT)
    again = radbert.load_classifier(prefixed / radbert.CHECKPOINT, device="cpu")
    torch.testing.assert_close(again.logits(texts[:2]), got[:2])


def test_label_order_and_threshold_of_the_head(tmp_path) -> None:
    """Logit k > 0 names LABELS[k]; a logit of exactly 0 (sigmoid 0.5) is positive (>= 0.5)."""
    config = _write_base(tmp_path)
    model = CtClipStyleClassifier(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(-3.0)
        model.classifier.bias[2] = 3.0  # Cardiomegaly in CT-CLIP's order
        model.classifier.bias[12] = 0.0  # Pleural effusion, on the threshold
        model.classifier.bias[13] = -1e-4  # Mosaic attenuation pattern, just below
    torch.save(model.state_dict(), tmp_path / radbert.CHECKPOINT)
    rows = radbert.load_classifier(tmp_path, device="cpu").predict(["heart size increased", ""])
    for row in rows:
        assert {name for name, v in row.items() if v} == {"Cardiomegaly", "Pleural effusion"}
        assert list(row) == CTCLIP_LABEL_COLS


def test_long_reports_are_cut_at_512_tokens(tiny) -> None:
    directory, _ = tiny
    loaded = radbert.load_classifier(directory, device="cpu")
    words = " ".join(_reports()).split()
    long_text = " ".join((words * 3)[:700])  # 700 word-level tokens + <s> </s>
    cut = " ".join(long_text.split()[:510])  # 510 + <s> </s> = 512
    assert len(loaded.tokenizer(long_text)["input_ids"]) > 512
    torch.testing.assert_close(loaded.logits([long_text]), loaded.logits([cut]))


def test_missing_files_are_named(tmp_path) -> None:
    with pytest.raises(ValueError) as err:
        radbert.load_classifier(tmp_path)
    for name in ("RadBertClassifier.pth", "config.json", "tokenizer.json"):
        assert name in str(err.value)
    pred = tmp_path / "pred.jsonl"
    pred.write_text(
        json.dumps({"key": "a", "reference": "Cardiomegaly.", "generated": "Cardiomegaly."}) + "\n"
    )
    with pytest.raises(SystemExit) as exit_err:
        score.main([str(pred), "--ce-model", str(tmp_path / "nowhere")])
    assert "RadBertClassifier.pth" in str(exit_err.value) and "nowhere" in str(exit_err.value)


def test_pickled_module_is_refused_not_unpickled(tiny, tmp_path) -> None:
    directory, reference = tiny
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    torch.save(reference, tmp_path / radbert.CHECKPOINT)  # the whole module, as pickle
    with pytest.raises(ValueError, match="not a plain state dict"):
        radbert.load_classifier(tmp_path)


def test_a_checkpoint_of_another_base_is_refused_by_name(tiny, tmp_path) -> None:
    directory, _ = tiny
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    state = torch.load(directory / radbert.CHECKPOINT, weights_only=True)
    del state["model.pooler.dense.weight"]
    torch.save(state, tmp_path / radbert.CHECKPOINT)
    with pytest.raises(ValueError, match="model.pooler.dense.weight"):
        radbert.load_classifier(tmp_path)


# ---------------------------------------------------------------- agreement, by hand


class _Lookup:
    """A stand-in classifier with fixed answers per text (the agreement arithmetic alone)."""

    source = "lookup"

    def __init__(self, answers: dict[str, set[str]]):
        self.answers = answers

    def predict(self, texts):
        return [{c: int(c in self.answers[t]) for c in radbert.LABELS} for t in texts]


def _labels(*names: str) -> dict[str, int]:
    return {c: int(c in names) for c in radbert.LABELS}


def test_agreement_against_both_ground_truths_by_hand(monkeypatch) -> None:
    card, pe, emph = "Cardiomegaly", "Pleural effusion", "Emphysema"
    answers = {
        "r0": {card, pe}, "r1": {emph}, "r2": set(), "r3": {pe},  # classifier on the references
        "g0": {card}, "g1": {emph, pe}, "g2": {emph}, "g3": {pe},  # classifier on the generated
    }  # fmt: skip
    dataset = [_labels(card), _labels(emph), _labels(emph), _labels()]
    monkeypatch.setattr(radbert, "load_classifier", lambda path: _Lookup(answers))
    records = [
        {"key": f"k{i}", "reference": f"r{i}", "generated": f"g{i}", "labels": dataset[i]} for i in range(4)
    ]
    out = scoring.evaluate_records(records, tokenizer="python", ce_model="unused")
    assert out["radbert"]["ground_truths"] == {
        "classifier on references": "radbert_ref",
        "dataset labels": "radbert_labels",
    }
    # vs classifier on references: cardiomegaly tp 1; effusion tp 1 (k3) fp 1 (k1) fn 1 (k0);
    # emphysema tp 1 (k1) fp 1 (k2). Micro: tp 3, fp 2, fn 1.
    assert out["radbert_ref_micro_precision"] == pytest.approx(3 / 5)
    assert out["radbert_ref_micro_recall"] == pytest.approx(3 / 4)
    assert out["radbert_ref_micro_f1"] == pytest.approx(2 / 3)
    assert out["radbert_ref_macro_precision"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 18)
    assert out["radbert_ref_macro_recall"] == pytest.approx((1 + 1 / 2 + 1) / 18)
    assert out["radbert_ref_macro_f1"] == pytest.approx((1 + 1 / 2 + 2 / 3) / 18)
    # Weighted by support (CT-CLIP eval.py's "Weighted Average"): supports 1, 2, 1.
    assert out["radbert_ref_weighted_precision"] == pytest.approx((1 + 2 * 0.5 + 0.5) / 4)
    assert out["radbert_ref_weighted_recall"] == pytest.approx((1 + 2 * 0.5 + 1) / 4)
    assert out["radbert_ref_weighted_f1"] == pytest.approx((1 + 2 * 0.5 + 2 / 3) / 4)
    per = out["radbert_per_class"]["classifier on references"]
    assert per[emph] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    # vs dataset labels: cardiomegaly tp 1; effusion fp 2; emphysema tp 2. Micro: tp 3, fp 2, fn 0.
    assert out["radbert_labels_micro_precision"] == pytest.approx(3 / 5)
    assert out["radbert_labels_micro_recall"] == pytest.approx(1.0)
    assert out["radbert_labels_micro_f1"] == pytest.approx(3 / 4)
    assert out["radbert_labels_macro_f1"] == pytest.approx(2 / 18)
    assert out["radbert_per_class"]["dataset labels"][pe] == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0,
    }  # fmt: skip
    assert out["ce_ground_truth"] == "labeler on references" and "ce_labels_micro_f1" in out
    text = scoring.format_report(out)
    assert "| CT-CLIP RadBERT | classifier on references | 0.600 | 0.750 | 0.667 | 0.111 |" in text
    assert "| CT-CLIP RadBERT | dataset labels | 0.600 | 1.000 | 0.750 |" in text


def test_without_dataset_labels_only_the_reference_truth_is_reported(tiny) -> None:
    directory, _ = tiny
    reports = _reports()[:6]
    records = [
        {"key": str(i), "reference": r, "generated": reports[(i + 1) % 6]} for i, r in enumerate(reports)
    ]
    out = scoring.evaluate_records(records, tokenizer="python", ce_model=directory)
    assert list(out["radbert"]["ground_truths"]) == ["classifier on references"]
    assert "radbert_labels_micro_f1" not in out and "ce_labels_micro_f1" not in out
    # The numbers are those of the classifier's own rows, counted here.
    clf = radbert.load_classifier(directory, device="cpu")
    truth, pred = clf.predict(reports), clf.predict([reports[(i + 1) % 6] for i in range(6)])
    tp = sum(t[c] and p[c] for t, p in zip(truth, pred) for c in radbert.LABELS)
    fp = sum(p[c] and not t[c] for t, p in zip(truth, pred) for c in radbert.LABELS)
    assert out["radbert_ref_micro_precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)


def test_bad_dataset_labels_are_named() -> None:
    records = [{"key": "a", "reference": "x y", "generated": "x", "labels": {"Cardiomegaly": 1}}]
    with pytest.raises(ValueError, match="records:1: 'labels'"):
        scoring.evaluate_records(records, tokenizer="python")


def test_trainer_flag_and_sample_labels() -> None:
    from hilt_scale.training.config import parse_args
    from hilt_scale.training.loop import dataset_labels

    assert parse_args(["--ce-model", "/models/radbert"]).ce_model == "/models/radbert"
    assert parse_args([]).ce_model is None
    full = {c: int(c == "Emphysema") for c in radbert.LABELS}
    assert dataset_labels({"labels": {**full, "VolumeName": "v.nii.gz"}}) == {"labels": full}
    assert dataset_labels({"labels": None}) == {} and dataset_labels({}) == {}
