"""Training integration: the HF Trainer, PEFT LoRA, and loading saved folders as remote code."""

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from tests.modeling.helpers import tiny_model


@pytest.mark.parametrize("layout", ["fwp", "lolcats"])
def test_trainer_overfits_a_tiny_batch(tmp_path, layout):
    model = tiny_model(layout=layout, seed=1)
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (4, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # one left-padded row: padding must not break training
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=60, learning_rate=1e-2, per_device_train_batch_size=4,
                             report_to=[], logging_steps=10, save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    with torch.no_grad():
        before = model(ids, attention_mask=mask, labels=ids).loss.item()
    trainer.train()
    model.eval()
    with torch.no_grad():
        after = model(ids, attention_mask=mask, labels=ids).loss.item()
    assert after < 0.2 * before, (before, after)


def test_peft_lora_trains_and_merges_to_the_same_logits():
    peft = pytest.importorskip("peft")
    model = tiny_model(layout="lolcats", feature_map="t2r", seed=2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "b_proj", "a_proj", "g_proj"]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    wrapped = {n.split(".lora_A")[0].split(".")[-1] for n, _ in lora.named_parameters() if ".lora_A." in n}
    assert wrapped == set(targets)
    ids = torch.randint(3, 64, (2, 20))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for _ in range(5):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    lora.eval()
    with torch.no_grad():
        unmerged = lora(input_ids=ids).logits
        merged_model = lora.merge_and_unload()
        merged = merged_model(ids).logits
    base = tiny_model(layout="lolcats", feature_map="t2r", seed=2)
    with torch.no_grad():
        assert (base(ids).logits - merged).abs().max() > 1e-4  # LoRA actually changed the model
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
