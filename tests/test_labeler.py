"""The rule-based CT-RATE labeler: negation, synonyms, hand-label agreement, the command line."""

import csv
import json
from pathlib import Path

import pytest

from hilt_scale.evaluation import labeler
from shards.schema import CLASSES

DATA = Path(__file__).parents[2] / "shared" / "data" / "ctrate_text_labels" / "reports_labeled_800.csv"


def _positives(text: str) -> set[str]:
    return {name for name, v in labeler.label_report(text).items() if v}


def test_normal_report_has_no_findings() -> None:
    text = (
        "Trachea, both main bronchi are open. Mediastinal main vascular structures, heart contour, size are "
        "normal. Pericardial effusion-thickening was not observed. No enlarged lymph nodes were detected in "
        "prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary pathological dimensions. "
        "Aeration of both lung parenchyma is normal and no nodular or infiltrative lesion is detected in the "
        "lung parenchyma. Pleural effusion-thickening was not detected. No pleural or pericardial effusion was "
        'detected. " Thoracic CT examination within normal limits'
    )
    assert _positives(text) == set()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Minimal pericardial effusion is observed.", {"Pericardial effusion"}),
        (
            "Bilateral pleural effusion and atelectasis in the lower lobes.",
            {"Pleural effusion", "Atelectasis"},
        ),
        ("Cardiomegaly. Sliding type hiatal hernia was observed.", {"Cardiomegaly", "Hiatal hernia"}),
        (
            "Atheroma plaques are observed in the aorta and coronary arteries.",
            {
                "Arterial wall calcification",
                "Coronary artery wall calcification",
            },
        ),
        (
            "Calcific atheroma plaques are observed in the coronary arteries.",
            {"Coronary artery wall calcification"},
        ),
        ("A port catheter is observed in the superior vena cava.", {"Medical material"}),
        ("Paraseptal emphysematous changes in both lungs.", {"Emphysema"}),
        ("A 4 mm nodule in the right lung upper lobe.", {"Lung nodule"}),
        ("Ground-glass opacities in both lungs.", {"Lung opacity"}),
        ("Pleuroparenchymal sequelae fibrotic changes in both apices.", {"Pulmonary fibrotic sequela"}),
        ("Mosaic attenuation pattern in both lungs.", {"Mosaic attenuation pattern"}),
        ("There is a parenchymal band in the laterobasal segment.", {"Pulmonary fibrotic sequela"}),
        ("Peribronchial thickening in the lower lobes.", {"Peribronchial thickening"}),
        ("Consolidation in the left lower lobe.", {"Consolidation"}),
        ("Cylindrical bronchiectasis in the lower lobes.", {"Bronchiectasis"}),
        ("Interlobular septal thickening in both lungs.", {"Interlobular septal thickening"}),
        ("Mediastinal lymphadenopathy with a short axis of 15 mm.", {"Lymphadenopathy"}),
        ("The heart is larger than normal.", {"Cardiomegaly"}),
        ("Bilateral effusions measuring 28 mm on the right.", {"Pleural effusion"}),
        ("A large amount of effusion is observed in both hemithorax.", {"Pleural effusion"}),
        ("Left pericardial effusion is observed, both lungs are clear.", {"Pericardial effusion"}),
        # Uncertain mentions count, as in CT-RATE's hand labels.
        ("Atelectasis cannot be excluded.", {"Atelectasis"}),
        ("Infection could not be ruled out given ground glass density.", {"Lung opacity"}),
        ("Edematous mediastinal fat (mediastinitis?), consolidation?", {"Consolidation"}),
    ],
)
def test_each_class_is_found(text: str, expected: set[str]) -> None:
    assert _positives(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "No pleural effusion.",
        "Pleural effusion was not detected.",
        "Pleural effusion-thickening was not observed in both hemithorax.",
        "There is no consolidation or atelectasis in either lung.",
        "Without pericardial effusion.",
        "No mass nodule-infiltration was detected in both lung parenchyma.",
        "The nodule seen in the previous examination has disappeared.",
        "A nodule in the thyroid gland.",
        "Calcification is observed in the aortic valve.",
        "Renal sinus lipomatosis consistent with chronic sequelae changes in both kidneys.",
        "No pleural effusion, pneumothorax, consolidation or atelectasis was detected.",
        "There is no evidence of pleural effusion.",
        "Pleural effusion: none.",
        "Heart size is not increased.",
        "Pneumonia was ruled out; the nodule seen before was excluded.",
        "Follow-up is recommended to rule out consolidation.",
    ],
)
def test_negated_or_off_target_mentions_are_not_findings(text: str) -> None:
    assert _positives(text) == set()


def test_negation_stays_inside_its_clause() -> None:
    text = "No pleural effusion was detected, but atelectasis is observed in the left lower lobe."
    assert _positives(text) == {"Atelectasis"}
    # A negation cue's scope ends at a verb: the sutures are asserted.
    text = "No wall thickening was observed at the anastomosis line, and there are metallic sutures."
    assert _positives(text) == {"Medical material"}
    # "not observed in the previous examination" describes a new finding, not an absent one.
    assert _positives("A 5 mm nodule, not observed in the previous examination, is seen.") == {"Lung nodule"}


def test_clinical_efficacy_counts_by_hand() -> None:
    zero = dict.fromkeys(CLASSES, 0)
    truth = [{**zero, "Emphysema": 1}, {**zero, "Emphysema": 1, "Atelectasis": 1}]
    pred = [{**zero, "Emphysema": 1, "Cardiomegaly": 1}, dict(zero)]
    s = labeler.clinical_efficacy(truth, pred)
    # micro: tp 1, fp 1, fn 2 -> P 1/2, R 1/3, F1 0.4
    assert s["ce_micro_precision"] == pytest.approx(0.5)
    assert s["ce_micro_recall"] == pytest.approx(1 / 3)
    assert s["ce_micro_f1"] == pytest.approx(0.4)
    assert s["per_class"]["Emphysema"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }
    assert s["ce_macro_f1"] == pytest.approx((2 / 3) / 18)


@pytest.mark.parametrize(("rows", "name"), [(slice(0, 400), "dev half"), (slice(400, 800), "held-out half")])
def test_hand_labelled_targets(rows: slice, name: str) -> None:
    if not DATA.exists():
        pytest.skip(f"shared hand-labelled CT-RATE reports absent: {DATA}")
    truth = labeler.read_truth(DATA)
    _, _, texts = labeler.read_reports(DATA)
    scores = labeler.clinical_efficacy(truth[rows], labeler.label_reports(texts[rows]))
    assert scores["ce_micro_f1"] >= 0.90, name
    assert scores["ce_macro_f1"] >= 0.85, name


def test_cli_writes_ctrate_columns_and_keeps_ids(tmp_path: Path) -> None:
    src = tmp_path / "reports.csv"
    with src.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", "report_text"])
        w.writerow(["valid_1_a_1.nii.gz", "Bilateral pleural effusion."])
        w.writerow(["valid_2_a_1.nii.gz", "No pleural effusion."])
    out = tmp_path / "sub" / "labels.csv"
    labeler.main([str(src), "--out", str(out)])
    with out.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["VolumeName", *CLASSES]
    assert [r["VolumeName"] for r in rows] == ["valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz"]
    assert [r["Pleural effusion"] for r in rows] == ["1", "0"]


def test_cli_jsonl_input_and_clear_errors(tmp_path: Path) -> None:
    src = tmp_path / "reports.jsonl"
    src.write_text(json.dumps({"key": "a", "text": "Cardiomegaly."}) + "\n", encoding="utf-8")
    out = tmp_path / "labels.csv"
    labeler.main([str(src), "--out", str(out)])
    assert "a,0,0,1" in out.read_text(encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": "a", "report": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: missing key 'text'"):
        labeler.main([str(bad), "--out", str(out)])
    no_col = tmp_path / "no_col.csv"
    no_col.write_text("id,findings\n1,x\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="no 'report_text' column"):
        labeler.main([str(no_col), "--out", str(out)])


@pytest.mark.parametrize("field", ["Findings_EN", "Impressions_EN"])
def test_phantom_reports_get_their_true_labels(tmp_path: Path, field: str) -> None:
    phantom = pytest.importorskip(
        "shards.phantom", reason="phantom generator (shards/phantom.py) not present"
    )
    phantom.generate_phantom(tmp_path, 60, size=(8, 16, 16), seed=7, prevalence=0.35)
    checked = 0
    for split in ("train", "valid"):
        with (tmp_path / "radiology_text_reports" / f"{split}_reports.csv").open(encoding="utf-8") as f:
            reports = {r["VolumeName"]: r[field] for r in csv.DictReader(f)}
        with (tmp_path / "multi_abnormality_labels" / f"{split}_predicted_labels.csv").open(
            encoding="utf-8"
        ) as f:
            for row in csv.DictReader(f):
                got = labeler.label_report(reports[row["VolumeName"]])
                want = {name: int(row[name]) for name in CLASSES}
                assert got == want, reports[row["VolumeName"]]
                checked += 1
    assert checked == 60


def test_cli_score_prints_per_class_table(tmp_path: Path, capsys) -> None:
    src = tmp_path / "labelled.csv"
    zero = dict.fromkeys(CLASSES, "0")
    rows = [
        {"AccessionNo": "a", "report_text": "Bilateral pleural effusion.", **zero, "Pleural effusion": "1"},
        {
            "AccessionNo": "b",
            "report_text": "No pleural effusion. Cardiomegaly.",
            **zero,
            "Pleural effusion": "1",
        },
    ]
    with src.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["AccessionNo", "report_text", *CLASSES])
        writer.writeheader()
        writer.writerows(rows)
    labeler.main([str(src), "--score"])
    out = capsys.readouterr().out
    # Pleural effusion: tp 1, fn 1 -> P 1, R 0.5; cardiomegaly: fp 1.
    assert "| Pleural effusion | 1.000 | 0.500 | 0.667 | 2 |" in out
    assert "| Cardiomegaly | 0.000 | 0.000 | 0.000 | 0 |" in out
    assert json.loads(out.strip().splitlines()[-1])["ce_micro_f1"] == pytest.approx(0.5)
    rows[0]["Emphysema"] = "yes"
    with src.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["AccessionNo", "report_text", *CLASSES])
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(SystemExit, match="labelled.csv: line 2: a class column is not 0/1"):
        labeler.main([str(src), "--score"])
