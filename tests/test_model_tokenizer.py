"""The report tokenizer trained for the random-init LLM: round trip, specials, save/load."""

import csv
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hilt_scale.model.tokenizer import train_report_tokenizer

CSV = Path(__file__).parents[2] / "shared" / "data" / "ctrate_text_labels" / "reports_labeled_800.csv"
SMALL = ["No pleural effusion. The heart is normal.", "Emphysema in both lungs; nodule 4 mm (right)."] * 5


def test_round_trip_specials_and_save_load(tmp_path):
    tok = train_report_tokenizer(SMALL, vocab_size=300)
    assert len(tok) <= 300
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    assert None not in specials and len(specials) == 4
    text = "Emphysema in both lungs; nodule 4 mm (right). Unseen wörd!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.chat_template == tok.chat_template and again.eos_token_id == tok.eos_token_id


def test_chat_template_keeps_the_image_placeholder_as_text():
    tok = train_report_tokenizer(SMALL, vocab_size=300)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nDescribe."}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith(tok.bos_token) and text.count("<image>") == 1
    assert text.endswith("<|assistant|>\n")


def test_empty_corpus_is_an_error():
    with pytest.raises(ValueError, match="no non-empty"):
        train_report_tokenizer(["", "  "])


def test_real_reports_compress():
    if not CSV.exists():
        pytest.skip(f"{CSV} is absent (shared CT-RATE report corpus)")
    with CSV.open(newline="") as f:
        reports = [row["report_text"] for row in csv.DictReader(f)]
    tok = train_report_tokenizer(reports[:700], vocab_size=2048)
    held_out = reports[700:]
    n_tokens = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in held_out)
    n_words = sum(len(r.split()) for r in held_out)
    # A tokenizer fit to this wording needs well under two tokens per word on unseen reports.
    assert n_tokens < 1.6 * n_words
    assert tok.decode(tok(held_out[0], add_special_tokens=False)["input_ids"]) == held_out[0]
