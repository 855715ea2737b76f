"""The multimodal model: collator masks, splicing, overfitting one batch, generation, export, QLoRA."""

import warnings

import pytest
import torch

from hilt_scale.model.config import model_config
from hilt_scale.model.export import load_export, load_vision, save_export, save_vision
from hilt_scale.model.mllm import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    ReportCollator,
    build_model,
    build_tokenizer,
    prompt_token_parts,
)
from hilt_scale.model.visual import to_unit_range

REPORTS = [
    "Findings: The heart is normal in size. No pleural effusion.",
    "Findings: Mild emphysema in both lungs. Small lung nodule in the right upper lobe.",
    "Findings: Bilateral pleural effusion with atelectasis. Cardiomegaly is present.",
]


def micro_cfg(**overrides):
    return model_config(llm="llm-micro", resolution="cpu-micro", overrides=overrides)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(micro_cfg(), texts=REPORTS * 10)


def loader_batch(n=2):
    hr = torch.zeros(n, 1, 16, 32, 32, dtype=torch.uint8)
    for i in range(n):
        hr[i, :, :, :, 8 * i : 8 * i + 8] = 200  # a bright slab in a different place per volume
    return {"key": [f"k{i}" for i in range(n)], "hr": hr, "report": REPORTS[:n], "meta": [{}] * n}


def test_collator_masks_prompt_image_and_padding(tokenizer):
    cfg = micro_cfg()
    collate = ReportCollator(tokenizer, cfg.prompt, max_length=256, visual_tokens=8)
    out = collate(loader_batch(2))
    assert out["key"] == ["k0", "k1"] and out["hr"].dtype == torch.uint8
    ids, labels, mask = out["input_ids"], out["labels"], out["attention_mask"]
    assert (ids == IMAGE_TOKEN_ID).sum(1).tolist() == [1, 1]
    for row in range(2):
        supervised = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert supervised[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(supervised[:-1]) == REPORTS[row]
        # Every supervised label sits at a real (unmasked) position after the image slot.
        positions = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        assert positions.min() > (ids[row] == IMAGE_TOKEN_ID).nonzero().item()
        assert mask[row, positions].all()
    # The shorter report is right-padded with masked, unsupervised positions.
    assert mask[0, -1] == 0 and labels[0, -1] == IGNORE_INDEX


def test_collator_truncates_to_the_sequence_budget(tokenizer):
    cfg = micro_cfg()
    pre, post = prompt_token_parts(tokenizer, cfg.prompt)
    max_length = len(pre) + len(post) + 1 + 8 + 6
    out = ReportCollator(tokenizer, cfg.prompt, max_length=max_length, visual_tokens=8)(loader_batch(2))
    assert out["input_ids"].shape[1] - 1 + 8 == max_length
    assert (out["labels"][:, -1] == tokenizer.eos_token_id).all()
    with pytest.raises(ValueError, match="max_length"):
        ReportCollator(tokenizer, cfg.prompt, max_length=10, visual_tokens=8)


def test_collator_accepts_a_list_of_samples(tokenizer):
    samples = [
        {"key": "a", "hr": torch.zeros(16, 32, 32, dtype=torch.uint8), "report": REPORTS[0], "meta": {}}
    ]
    out = ReportCollator(tokenizer, micro_cfg().prompt, 128)(samples)
    assert out["hr"].shape == (1, 1, 16, 32, 32) and out["input_ids"].shape[0] == 1


def test_prompt_needs_exactly_one_placeholder(tokenizer):
    with pytest.raises(ValueError, match="placeholder"):
        prompt_token_parts(tokenizer, "no image here")


def test_to_unit_range():
    assert to_unit_range(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [0.0, 1.0]
    hu = torch.tensor([-2000, -1000, -400, 200, 3000], dtype=torch.int16)
    assert to_unit_range(hu).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_splice_puts_visual_tokens_at_the_placeholder(tokenizer):
    torch.manual_seed(0)
    model = build_model(micro_cfg(), tokenizer)
    batch = model.collator()(loader_batch(2))
    visual = torch.randn(2, 8, 64)
    embeds, mask, labels = model.splice(batch["input_ids"], batch["attention_mask"], batch["labels"], visual)
    at = (batch["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().item()
    assert embeds.shape[1] == batch["input_ids"].shape[1] - 1 + 8
    torch.testing.assert_close(embeds[:, at : at + 8], visual)
    assert (labels[:, at : at + 8] == IGNORE_INDEX).all() and mask[:, at : at + 8].all()
    # The token after the image is the one that followed the placeholder.
    after = model.llm.get_input_embeddings()(batch["input_ids"][:, at + 1])
    torch.testing.assert_close(embeds[:, at + 8], after)


def test_encode_images_shapes_and_errors(tokenizer):
    model = build_model(micro_cfg(), tokenizer)
    hr = loader_batch(2)["hr"]
    assert model.encode_images(hr).shape == (2, 8, 64)
    assert model.encode_images(hr[:, 0]).shape == (2, 8, 64)  # channel axis may be left out
    # A larger HR volume still gives the LR token count (position embeddings are resized).
    assert model.encode_images(torch.zeros(1, 1, 32, 64, 64, dtype=torch.uint8)).shape == (1, 8, 64)
    with pytest.raises(ValueError, match="B, 1, D, H, W"):
        model.encode_images(torch.zeros(1, 2, 16, 32, 32, dtype=torch.uint8))


def test_overfit_one_batch_gradients_generation_and_export(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_model(micro_cfg(**{"llm.train_modules": "lm_head"}), tokenizer)
    batch = model.collator()(loader_batch(2))
    params = [p for _, p in model.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for step in range(60):
        loss = model(batch)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            named = dict(model.named_parameters())
            grads = {n: p.grad for n, p in named.items()}
            assert grads["vision.patch_embed.weight"].abs().sum() > 0
            assert grads["connector.projector.fc1.weight"].abs().sum() > 0
            lora = [n for n in named if "lora_B" in n]
            assert lora and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in lora)
            frozen = [n for n, p in named.items() if "base_layer" in n or "embed_tokens" in n]
            assert frozen and all(grads[n] is None and not named[n].requires_grad for n in frozen)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    greedy = model.generate(batch["hr"], max_new_tokens=40)
    beam = model.generate(batch["hr"], max_new_tokens=40, num_beams=3)
    assert len(greedy) == 2 and all(isinstance(t, str) and t for t in greedy)
    assert greedy == beam
    assert greedy == REPORTS[:2]
    # One volume at a time writes what the batch wrote (--eval-batch changes the speed only).
    assert [model.generate(batch["hr"][i : i + 1], max_new_tokens=40, num_beams=3)[0] for i in range(2)] == beam
    assert model.training  # generate restores the mode
    # The overfit model reads the image: swapping the two volumes makes its reports unlikely.
    dep = model.image_dependence(batch)
    assert model.training  # image_dependence restores the mode too
    model.eval()
    assert dep["real"] == pytest.approx(model(batch).item(), rel=1e-5)
    assert dep["shuffled"] > 1.5 * dep["real"] and dep["gap"] == pytest.approx(dep["shuffled"] - dep["real"])
    # The export rebuilds the same model: random-init base, LoRA + lm_head adapter, ViT + connector.
    save_export(model, tmp_path / "export")
    again = load_export(tmp_path / "export")
    assert again.generate(batch["hr"], max_new_tokens=40) == greedy
    model.eval()
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(batch), model(batch))


def test_vision_weights_round_trip(tokenizer, tmp_path):
    torch.manual_seed(0)
    a = build_model(micro_cfg(), tokenizer)
    torch.manual_seed(1)
    b = build_model(micro_cfg(), tokenizer)
    assert not torch.equal(a.vision.pos_embed, b.vision.pos_embed)
    save_vision(a, tmp_path / "vision.safetensors")
    load_vision(b, tmp_path / "vision.safetensors")
    for k, v in a.vision_state_dict().items():
        torch.testing.assert_close(b.vision_state_dict()[k], v)
    assert all(k.startswith(("vision.", "connector.")) for k in a.vision_state_dict())
    with pytest.raises(KeyError, match="missing"):
        b.load_vision_state_dict({})


@pytest.mark.parametrize("connector", ["random-queries", "all-tokens", "pooled", "2d"])
def test_ablation_variants_train_one_step(tokenizer, connector):
    torch.manual_seed(0)
    model = build_model(micro_cfg(**{"connector.kind": connector, "connector.pool_grid": "1,2,2"}), tokenizer)
    batch = model.collator()(loader_batch(2))
    loss = model(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.vision.patch_embed.weight.grad is not None


def test_qlora_builds_and_trains_one_step(tokenizer):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = build_model(micro_cfg(**{"llm.quantization": "nf4"}), tokenizer)
    four_bit = [m for m in model.llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and four_bit[0].weight.dtype == torch.bfloat16  # quant storage dtype
    batch = model.collator()(loader_batch(2))
    params = [p for _, p in model.trainable_parameters()]
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    before = lora_b.detach().clone()
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss = model(batch)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, lora_b.detach())


def test_llm_checkpointing_keeps_the_loss(tokenizer):
    batch = ReportCollator(tokenizer, micro_cfg().prompt, 128, visual_tokens=8)(loader_batch(2))
    losses = []
    for ckpt in ("false", "true"):
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = build_model(micro_cfg(**{"llm.grad_checkpointing": ckpt}), tokenizer)
        # the current API, not the deprecated alias (transformers 5.2x warns on the old name)
        assert not [w for w in caught if "checkpointing_enable" in str(w.message)]
        flags = [
            m.gradient_checkpointing for m in model.llm.modules() if hasattr(m, "gradient_checkpointing")
        ]
        assert any(flags) == (ckpt == "true")
        loss = model(batch)
        loss.backward()
        losses.append((loss.item(), model.vision.pos_embed.grad.clone()))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    torch.testing.assert_close(losses[0][1], losses[1][1])


def test_load_export_names_a_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_export(tmp_path)


def test_random_init_llm_is_reproducible_from_its_seed(tokenizer):
    # An export without the base weights rebuilds llm-tiny/micro from llm.seed: it must not depend
    # on the global RNG state at build time.
    torch.manual_seed(123)
    a = build_model(micro_cfg(), tokenizer).llm.get_base_model().model.embed_tokens.weight
    torch.manual_seed(456)
    b = build_model(micro_cfg(), tokenizer).llm.get_base_model().model.embed_tokens.weight
    c = build_model(micro_cfg(**{"llm.seed": "1"}), tokenizer).llm.get_base_model().model.embed_tokens.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def labelled_batch(n: int, positive: list[int], known: list[int]) -> dict:
    """Loader batch whose 'Lung nodule' label is 1 for ``positive`` rows (a bright cube there), with
    CT-RATE labels in the metadata only for ``known`` rows."""
    from shards.schema import CLASSES

    hr = torch.full((n, 1, 16, 32, 32), 40, dtype=torch.uint8)
    meta = []
    for i in range(n):
        if i in positive:
            hr[i, :, 4:8, 8:14, 8:14] = 220
        labels = {c: int(c == "Lung nodule" and i in positive) for c in CLASSES}
        meta.append({"labels": labels} if i in known else {})
    return {"key": [f"k{i}" for i in range(n)], "hr": hr, "report": (REPORTS * n)[:n], "meta": meta}


def test_finding_targets_follow_the_ct_rate_class_order(tokenizer):
    from hilt_scale.model.findings import finding_targets
    from shards.schema import CLASSES

    labels = {c: 0 for c in CLASSES} | {"Emphysema": 1, "Lung nodule": 1}
    targets, known = finding_targets([{"labels": labels}, {}, {"labels": {"Emphysema": 1}}])
    assert known.tolist() == [True, False, False]  # a partial label row is not a label row
    assert targets[0].nonzero().flatten().tolist() == sorted([CLASSES.index("Emphysema"), CLASSES.index("Lung nodule")])
    assert targets[1:].sum() == 0
    batch = ReportCollator(tokenizer, micro_cfg().prompt, 256, visual_tokens=8)(labelled_batch(3, [0], [0, 2]))
    assert batch["finding_known"].tolist() == [True, False, True]
    assert batch["finding_labels"][0, CLASSES.index("Lung nodule")] == 1


def test_findings_loss_trains_the_visual_path_and_is_not_exported(tokenizer, tmp_path):
    """The auxiliary finding loss: 0 keeps the paper's loss exactly; > 0 adds the head's BCE over
    labelled samples only, teaches the visual path a finding, and leaves the export unchanged."""
    torch.manual_seed(0)
    plain = build_model(micro_cfg(), tokenizer)
    torch.manual_seed(0)
    aux = build_model(micro_cfg(findings_loss="1.0"), tokenizer)
    assert plain.finding_head is None and aux.finding_head is not None
    batch = aux.collator()(labelled_batch(4, positive=[0, 2], known=[0, 1, 2, 3]))
    with torch.no_grad():
        lm, total = plain(batch).item(), aux(batch).item()
    assert total == pytest.approx(lm + aux.last_findings_loss.item(), rel=1e-5)
    assert aux.last_findings_loss.item() == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=0.2)
    # An unlabelled sample adds nothing: flipping its (unknown) targets leaves the loss as it is.
    part = aux.collator()(labelled_batch(4, positive=[0, 2], known=[0, 2]))
    with torch.no_grad():
        before = aux(part).item()
        part["finding_labels"][1] = 1 - part["finding_labels"][1]
        assert aux(part).item() == pytest.approx(before, rel=1e-6)
    # Only the visual path and the head learn: the nodule label is read from the volume.
    opt = torch.optim.AdamW(
        [p for n, p in aux.named_parameters() if n.startswith(("vision.", "connector.", "finding_head."))], lr=3e-3
    )
    from shards.schema import CLASSES

    col = CLASSES.index("Lung nodule")
    for _ in range(80):
        loss = aux.finding_head_loss(aux.finding_logits(aux.encode_images(batch["hr"])), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        visual = aux.encode_images(batch["hr"])
        logits = aux.finding_logits(visual)[:, col]
    assert loss.item() < 0.1
    assert logits[[0, 2]].min() > logits[[1, 3]].max()
    # The export carries no head and rebuilds the inference model (LM loss alone), also from a
    # run whose report loss stopped at the ViT (the recipe's setting).
    save_export(aux, tmp_path / "export")
    again = load_export(tmp_path / "export")
    assert again.finding_head is None
    aux.cfg.vision_lm_grad = False
    save_export(aux, tmp_path / "export2")
    again = load_export(tmp_path / "export2")
    assert again.finding_head is None and again.cfg.vision_lm_grad
    assert again.generate(batch["hr"], max_new_tokens=5) == aux.generate(batch["hr"], max_new_tokens=5)
    assert not any(k.startswith("finding_head") for k in aux.vision_state_dict())


def test_encoder_findings_loss_adds_a_head_on_the_vit_tokens_the_connector_reads(tokenizer, tmp_path):
    """encoder_findings_loss: a second head's BCE on the HR tokens (the LR ones for lr-only), added
    to the loss with its weight; it needs the finding loss, trains, and is not exported."""
    import torch.nn.functional as F

    from hilt_scale.model.visual import vision_features

    with pytest.raises(ValueError, match="encoder_findings_loss > 0 needs findings_loss > 0"):
        build_model(micro_cfg(encoder_findings_loss="1.0"), tokenizer)
    for kind, side in (("hilt", 0), ("lr-only", 1)):
        torch.manual_seed(0)
        overrides = {"findings_loss": "2.0", "encoder_findings_loss": "0.5"}
        model = build_model(model_config("vit-micro", kind, "llm-micro", "cpu-micro", overrides), tokenizer)
        torch.manual_seed(0)
        alone = build_model(model_config("vit-micro", kind, "llm-micro", "cpu-micro", {"findings_loss": "2.0"}), tokenizer)
        batch = model.collator()(labelled_batch(4, positive=[0, 2], known=[0, 1, 2]))
        res = model.cfg.resolution
        with torch.no_grad():
            total, without = model(batch).item(), alone(batch).item()
            z = vision_features(model.vision, model.connector, batch["hr"], res.lr_size, res.lr_view)[side]
            w = model.encoder_head.weight
            logits = torch.cat([z.amax(1), z.mean(1)], -1) @ w.T + model.encoder_head.bias  # max+mean
            per = F.binary_cross_entropy_with_logits(logits, batch["finding_labels"], reduction="none")[:3]
        assert w.shape[1] == 2 * model.cfg.vision.width
        assert total == pytest.approx(without + 0.5 * per.mean().item(), rel=1e-5)
        model(batch).backward()
        assert model.encoder_head.weight.grad.abs().sum() > 0
    save_export(model, tmp_path / "export")
    again = load_export(tmp_path / "export")
    assert again.encoder_head is None and again.cfg.encoder_findings_loss == 0.0
    assert not any(k.startswith("encoder_head") for k in model.vision_state_dict())


def test_finding_tokens_carry_the_head_probabilities_into_the_llm_and_are_exported(tokenizer, tmp_path):
    """finding_tokens: 18 tokens after the visual ones, token k = p_k present_k + (1 - p_k) absent_k
    with p the head's probability; the report loss trains the embeddings, not the head (detached);
    the export keeps head and embeddings, and the loaded model writes the same reports."""
    from shards.schema import CLASSES

    with pytest.raises(ValueError, match="finding_tokens=predicted needs findings_loss"):
        build_model(micro_cfg(finding_tokens="predicted"), tokenizer)
    with pytest.raises(ValueError, match="finding_tokens='yes'; expected one of"):
        build_model(micro_cfg(findings_loss="1.0", finding_tokens="yes"), tokenizer)
    torch.manual_seed(0)
    plain = build_model(micro_cfg(findings_loss="1.0"), tokenizer)
    torch.manual_seed(0)
    model = build_model(micro_cfg(findings_loss="1.0", finding_tokens="predicted"), tokenizer)
    assert model.num_visual_tokens == plain.num_visual_tokens  # the connector's, as in the paper
    assert model.num_image_tokens == plain.num_image_tokens + len(CLASSES) == plain.num_visual_tokens + 18
    batch = model.collator()(labelled_batch(2, positive=[0], known=[]))  # no labels: report loss only
    assert model.collator().report_budget == plain.collator().report_budget - 18  # the sequence budget
    hr = batch["hr"]
    k = CLASSES.index("Lung nodule")
    with torch.no_grad():
        tokens = model.encode_images(hr)
        assert tokens.shape[1] == model.num_image_tokens
        torch.testing.assert_close(tokens[:, : plain.num_visual_tokens], plain.encode_images(hr))
        for bias, want in ((30.0, model.finding_embed.present[k]), (-30.0, model.finding_embed.absent[k])):
            model.finding_head.bias[k] = bias
            row = model.encode_images(hr)[:, plain.num_visual_tokens + k]
            torch.testing.assert_close(row, want.expand_as(row))
        model.finding_head.bias[k] = 0.0
    model.zero_grad()
    model(batch).backward()
    assert model.finding_head.weight.grad is None or model.finding_head.weight.grad.abs().max() == 0
    assert model.finding_embed.present.grad.abs().max() > 0 and model.finding_embed.absent.grad.abs().max() > 0
    names = set(model.vision_state_dict())
    assert {"finding_head.weight", "finding_embed.present", "finding_embed.absent"} <= names
    save_export(model, tmp_path / "export")
    again = load_export(tmp_path / "export")
    assert again.cfg.finding_tokens == "predicted" and again.finding_head is not None
    assert again.generate(hr, max_new_tokens=5) == model.generate(hr, max_new_tokens=5)


def test_teacher_finding_tokens_hold_the_labels_in_training_and_the_head_in_generation(tokenizer):
    """finding_tokens=teacher: a training forward builds the tokens from the sample's labels where
    it has them (the head cannot change its report loss), from the head where it has none; an
    eval forward and generation always use the head."""
    torch.manual_seed(0)
    model = build_model(micro_cfg(findings_loss="1.0", finding_tokens="teacher"), tokenizer)
    k = 0

    def report_loss(batch, bias, train):
        with torch.no_grad():
            model.finding_head.bias[k] = bias
            model.train(train)
            torch.manual_seed(1)  # the same LoRA dropout masks in every call
            total = model(batch).item()
            return total - model.last_findings_loss.item()

    labelled = model.collator()(labelled_batch(2, positive=[0], known=[0, 1]))
    unlabelled = model.collator()(labelled_batch(2, positive=[0], known=[]))
    assert report_loss(labelled, 20.0, True) == pytest.approx(report_loss(labelled, -20.0, True), abs=1e-6)
    assert report_loss(unlabelled, 20.0, True) != pytest.approx(report_loss(unlabelled, -20.0, True), abs=1e-4)
    assert report_loss(labelled, 20.0, False) != pytest.approx(report_loss(labelled, -20.0, False), abs=1e-4)
    with torch.no_grad():
        model.finding_head.bias[k] = 20.0
        row = model.encode_images(labelled["hr"])[:, -18 + k]
    torch.testing.assert_close(row, model.finding_embed.present[k].detach().expand_as(row))


def test_vision_lm_grad_false_stops_the_report_loss_at_the_vit(tokenizer):
    """vision_lm_grad=false: the report loss trains the connector and the LLM, not the ViT; the
    finding loss still trains the ViT. Refused without a finding loss (the ViT would never learn)."""
    with pytest.raises(ValueError, match="vision_lm_grad=false needs findings_loss"):
        build_model(micro_cfg(vision_lm_grad="false"), tokenizer)
    batch_in = labelled_batch(2, positive=[0], known=[0, 1])
    grads = {}
    for flag in ("true", "false"):
        torch.manual_seed(0)
        model = build_model(micro_cfg(findings_loss="1.0", vision_lm_grad=flag), tokenizer)
        batch = model.collator()(batch_in)
        model.zero_grad()
        model.cfg.findings_loss = 0.0  # the head still runs, weighted 0: the report loss alone
        model(batch).backward()
        named = dict(model.named_parameters())
        grads[flag] = {n: named[n].grad for n in ("vision.patch_embed.weight", "connector.projector.fc1.weight")}
        model.zero_grad()
        model.finding_head_loss(model.finding_logits(model.encode_images(batch["hr"])), batch).backward()
        assert named["vision.patch_embed.weight"].grad.abs().sum() > 0  # the finding loss reaches the ViT
    assert grads["true"]["vision.patch_embed.weight"].abs().sum() > 0
    assert grads["false"]["vision.patch_embed.weight"] is None or not grads["false"]["vision.patch_embed.weight"].any()
    assert grads["false"]["connector.projector.fc1.weight"].abs().sum() > 0
