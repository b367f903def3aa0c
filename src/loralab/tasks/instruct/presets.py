"""Presets of the instruction-tuning experiment (its ``presets``)."""

from __future__ import annotations

QLORA_PAPER = {
    # Dettmers et al. 2023: NF4 + double quantization, bf16 compute, LoRA on every linear layer but the
    # head, r=64, alpha=16, dropout 0.1 (<= 13B; 0.05 for 33B/65B), lr 2e-4 (1e-4 for 33B/65B), constant
    # schedule after 3% warmup, grad-norm clip 0.3, paged AdamW, batch 16, gradient checkpointing,
    # length-grouped batches, loss on the response only. Frozen non-quantized parts (embeddings,
    # norms, head) are stored in bf16 too (model.compute_dtype), the LoRA weights and their Adam state in fp32.
    "experiment": "instruct", "name": "qlora-gsm8k", "model.name": "smollm2-135m",
    "model.quantize": "nf4", "model.double_quant": True, "model.compute_dtype": "bfloat16",
    "model.gradient_checkpointing": True,
    "lora.r": 64, "lora.lora_alpha": 16.0, "lora.lora_dropout": 0.1, "lora.target_modules": "all-linear",
    "lora.exclude_modules": ["lm_head"],
    "train.lr": 2e-4, "train.schedule": "constant", "train.warmup_ratio": 0.03, "train.max_grad_norm": 0.3,
    "train.optimizer": "paged_adamw", "train.batch_size": 16, "train.weight_decay": 0.0,
    "train.betas": [0.9, 0.999], "train.epochs": 3.0, "train.length_grouped": True,
    "train.eval_every": 50, "data.task": "gsm8k", "data.max_length": 512, "data.loss_on": "assistant",
    "generate.num_beams": 1, "generate.no_repeat_ngram_size": 0, "generate.max_new_tokens": 256,
    "generate.batch_size": 32,
}
QLORA_LARGE = {**QLORA_PAPER, "name": "qlora-large-gsm8k", "lora.lora_dropout": 0.05, "train.lr": 1e-4}
QLORA_GUANACO = {  # the paper's Guanaco run: OASST1, best-ranked paths, 1875 steps of 16 (needs network)
    **QLORA_PAPER, "name": "qlora-guanaco", "data.task": "oasst_best",
    "data.train_file": "OpenAssistant/oasst1:train", "data.eval_file": "OpenAssistant/oasst1:validation",
    "train.max_steps": 1875, "train.eval_every": 200,
}
INSTRUCT_CPU = {
    # SmolLM2-135M-Instruct on GSM8K, fp32 on CPU. Measured on this 2-core box (shared, load ~8):
    # one step of 4 x 128 tokens costs ~20 CPU-s and 4 x 256 ~40 CPU-s, i.e. ~10 s / ~20 s wall on 2 free
    # cores. 24 steps of 4 x <=192 tokens is therefore ~4-6 minutes of training; the evaluation
    # (held-out loss, 16 GSM8K problems and 4 prompts decoded for base and fine-tuned) adds ~2 minutes.
    "experiment": "instruct", "name": "instruct-cpu-gsm8k", "model.name": "smollm2-135m",
    "model.quantize": "none", "model.compute_dtype": "float32",
    "lora.r": 16, "lora.lora_alpha": 32.0, "lora.lora_dropout": 0.05, "lora.target_modules": "all-linear",
    "lora.exclude_modules": ["lm_head"],
    "train.lr": 1e-3, "train.schedule": "constant", "train.warmup_ratio": 0.03, "train.max_grad_norm": 0.3,
    "train.optimizer": "adamw", "train.batch_size": 4, "train.max_steps": 24, "train.eval_every": 0,
    "train.length_grouped": False, "train.log_every": 4,
    "data.task": "gsm8k", "data.max_length": 192, "data.eval_samples": 16, "data.loss_on": "assistant",
    "generate.num_beams": 1, "generate.no_repeat_ngram_size": 0, "generate.max_new_tokens": 128,
    "generate.batch_size": 8,
}
INSTRUCT_CPU_NF4 = {  # the same run as QLoRA on CPU: NF4 + double quant base, float32 compute
    **INSTRUCT_CPU, "name": "instruct-cpu-nf4-gsm8k", "model.quantize": "nf4", "model.double_quant": True,
}


QUICKSTART_SYSTEM_PROMPT = "Solve the math problem step by step."
QUICKSTART = {
    # `loralab quickstart`: QLoRA of SmolLM2-135M-Instruct on the shipped GSM8K problems.
    # NF4 + double-quantized frozen base decoded to bf16 where the CPU multiplies bf16 fast
    # (model.compute_dtype=auto: frozen weights bf16, LoRA and Adam state fp32, loss fp32), fp32 elsewhere.
    # 60 steps of 4 x <=320 tokens: twice the tokens of the fp32 version (30 steps, 155 s of training on
    # an idle 2-core box); with bf16 on that box (AVX512-BF16, no AMX) the 60 steps took 231 s.
    # Chosen by measurement (1 thread, the other core busy): 60 steps at lr 1e-3 give held-out loss
    # 1.81 -> 0.86, answers ending in '#### <n>' 0/24 -> 9/24, looping outputs 22/24 -> 15/24.
    # Gradient checkpointing is off: it costs ~30% more compute, and the fused head + loss
    # (tasks/common/linear_ce.py) already removed the logits, the largest activation.
    # LoRA on every linear layer but the head, lr 1e-3 (alpha/r = 2), clipping at 0.3.
    # A one-line system prompt instead of SmolLM's default saves ~15 tokens per example; at
    # max_length 320 about 7% of the GSM8K conversations lose their final "#### N" line.
    "experiment": "instruct", "name": "quickstart-qlora-gsm8k", "model.name": "smollm2-135m",
    "model.quantize": "nf4", "model.double_quant": True, "model.compute_dtype": "auto",
    "model.gradient_checkpointing": False,
    "lora.r": 16, "lora.lora_alpha": 32.0, "lora.lora_dropout": 0.05, "lora.target_modules": "all-linear",
    "lora.exclude_modules": ["lm_head"],
    "train.lr": 1e-3, "train.schedule": "constant", "train.warmup_steps": 2, "train.max_grad_norm": 0.3,
    "train.optimizer": "adamw", "train.batch_size": 4, "train.max_steps": 60, "train.eval_every": 0,
    "train.length_grouped": True, "train.log_every": 10,
    "data.task": "gsm8k", "data.system_prompt": QUICKSTART_SYSTEM_PROMPT, "data.max_length": 320,
    "data.eval_samples": 24, "data.loss_on": "assistant",
    "generate.num_beams": 1, "generate.no_repeat_ngram_size": 0, "generate.max_new_tokens": 192,
    "generate.batch_size": 24,
}
"""Held-out: 24 examples for the loss and the same 24 for greedy exact match (one decoding batch)."""


DOCS = {"qlora": "the QLoRA paper's recipe (NF4 + DQ, r=64, all linear) on GSM8K",
        "qlora-large": "QLoRA for 33B/65B models (dropout 0.05, lr 1e-4)",
        "qlora-guanaco": "the Guanaco run on OASST1 (needs network)",
        "instruct-cpu": "fp32 LoRA on SmolLM2-135M, GSM8K, minutes on a CPU",
        "instruct-cpu-nf4": "the same as QLoRA (NF4 + DQ base)",
        "quickstart": "`loralab quickstart`: QLoRA of SmolLM2-135M on GSM8K, ~6 minutes on a CPU"}


def all_presets() -> dict[str, dict]:
    presets = {"qlora": QLORA_PAPER, "qlora-large": QLORA_LARGE, "qlora-guanaco": QLORA_GUANACO,
               "instruct-cpu": INSTRUCT_CPU, "instruct-cpu-nf4": INSTRUCT_CPU_NF4, "quickstart": QUICKSTART}
    return {name: {"_doc": DOCS[name], **p} for name, p in presets.items()}



