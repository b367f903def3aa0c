"""A model with loralab adapters trains under the transformers Trainer (many users have Trainer scripts):
only the adapter (and modules_to_save) change, the frozen base stays bit-identical, and the trained
adapter saves and reloads through loralab's adapter files."""

import pytest
import torch

from loralab.core.adapter_io import load_adapter, save_adapter
from loralab.core.config import LoraConfig
from loralab.core.inject import inject_adapter

transformers = pytest.importorskip("transformers")


def _tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=97, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def test_hf_trainer_trains_only_the_adapter(tmp_path):
    model = inject_adapter(_tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                    modules_to_save=["classifier"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 97, (12,), generator=g), "labels": torch.tensor(i % 2)} for i in range(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=8,
                                          learning_rate=5e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=100, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable  # every trainable tensor moved, nothing else did
    assert any(".lora_B.default." in n for n in changed) and any("modules_to_save" in n for n in changed)
    assert all("lora_" in n or "modules_to_save" in n for n in changed)
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(_tiny_bert(), tmp_path / "adapter")
    ids = data[0]["input_ids"][None]
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
