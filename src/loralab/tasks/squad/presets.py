"""SQuAD presets (``loralab train --preset NAME``), the SQuAD experiment's ``presets``.

Training questions come from part-a of the shared v1.1 dev set, evaluation questions from part-b (split
by article, so no paragraph is in both); pass ``data.train_file=.../train-v1.1.json`` to train on the
official training set instead.

squad-cpu-gen
    Minutes on 2 idle CPU cores: SmolLM2-135M, LoRA r=8 on q_proj, v_proj, answer-only loss in the seed's
    format ``<Q> question <C> context <A> answer<eos>``, 120 part-a questions (30 steps of 4), 100 part-b
    questions, greedy decoding of at most 24 tokens. Measured (seed 0, 2 cores shared ~4x): F1 5.09 ->
    27.01, EM 0.00 -> 19.00 (margin 4.4), no answer cut by the 384-token window; training 1,009 s,
    decoding 781 s before (the un-adapted model rarely stops early) and 273 s after.
squad-cpu-span
    Minutes on 2 CPU cores: MiniLM-L6, LoRA r=8 on every linear layer (query, key, value, dense) plus the
    fresh ``qa_outputs`` start/end head (trained and saved with the adapter), windows of 384 tokens with
    stride 128, 2,000 part-a questions, one epoch (129 steps of 16 windows), lr 2e-3, 300 part-b
    questions. Measured (seed 0, 2 cores, partly shared with tests): F1 7.45 -> 34.05, EM 0.67 -> 22.67
    (margin 3.0: learned), no answer cut by the window; 436 s wall, evaluation 12 s. The earlier recipe
    (400 questions, 2 epochs = 54 steps, LoRA on query and value only) reached F1 10.2, inside the margin:
    a fresh span head needs more steps, and W_q, W_v alone carry too little of the change.
squad-paper-gen
    GPU scale: GPT-2 Medium with the paper's E2E LoRA recipe (r=4, alpha=32, q and v slices of c_attn,
    lr 2e-4, dropout 0.1) on all part-a questions, every part-b question scored.
squad-paper-span
    GPU scale: RoBERTa-base with the paper's GLUE LoRA recipe (r=alpha=8 on W_q, W_v, lr 5e-4, 6% warmup,
    linear decay) plus the qa_outputs head, windows of 384 / stride 128, every part-b question scored.
"""

from __future__ import annotations

GREEDY = {"generate.num_beams": 1, "generate.do_sample": False, "generate.no_repeat_ngram_size": 0}


def all_presets() -> dict[str, dict]:
    cpu_gen = {
        "_doc": "SmolLM2-135M LoRA q,v, generative (<Q> <C> <A>), part-a subset -> part-b subset, minutes on a CPU",
        "experiment": "squad", "name": "squad-cpu-gen", "model.name": "smollm2-135m",
        "data.mode": "generative", "data.max_length": 384, "data.train_samples": 120, "data.eval_samples": 100,
        "lora.method": "lora", "lora.r": 8, "lora.lora_alpha": 16.0, "lora.target_modules": ["q_proj", "v_proj"],
        "train.lr": 1e-3, "train.batch_size": 4, "train.epochs": 1.0, "train.warmup_ratio": 0.06,
        "train.schedule": "linear", "train.length_grouped": True, "train.keep_best": False, "train.log_every": 5,
        **GREEDY, "generate.max_new_tokens": 24, "generate.batch_size": 16,
    }
    cpu_span = {
        "_doc": "MiniLM-L6 LoRA on every linear + qa_outputs head, span extraction, part-a subset -> part-b subset, minutes on a CPU",
        "experiment": "squad", "name": "squad-cpu-span", "model.name": "minilm-l6",
        "data.mode": "span", "data.max_length": 384, "data.doc_stride": 128, "data.train_samples": 2000,
        "data.eval_samples": 300, "lora.method": "lora", "lora.r": 8, "lora.lora_alpha": 8.0,
        "lora.target_modules": ["query", "key", "value", "dense"], "lora.modules_to_save": ["qa_outputs"],
        "train.lr": 2e-3, "train.max_grad_norm": 1.0, "train.batch_size": 16, "train.epochs": 1.0,
        "train.warmup_ratio": 0.06,
        "train.schedule": "linear", "train.length_grouped": True, "train.keep_best": False, "train.log_every": 10,
    }
    paper_gen = {
        "_doc": "GPT-2 Medium, the paper's E2E LoRA recipe on generative SQuAD, all part-a -> all part-b (GPU scale)",
        "experiment": "squad", "name": "squad-paper-gen", "model.name": "gpt2-medium",
        "data.mode": "generative", "data.max_length": 512,
        "lora.method": "lora", "lora.r": 4, "lora.lora_alpha": 32.0, "lora.lora_dropout": 0.1,
        "lora.fused_qkv": {"c_attn": [True, False, True]},
        "train.optimizer": "adamw", "train.lr": 2e-4, "train.weight_decay": 0.01, "train.batch_size": 8,
        "train.epochs": 3.0, "train.warmup_ratio": 0.06, "train.schedule": "linear", "train.keep_best": False,
        **GREEDY, "generate.max_new_tokens": 32, "generate.batch_size": 32,
    }
    paper_span = {
        "_doc": "RoBERTa-base, the paper's GLUE LoRA recipe + qa_outputs head, span SQuAD, all part-a -> all part-b (GPU scale)",
        "experiment": "squad", "name": "squad-paper-span", "model.name": "roberta-base",
        "data.mode": "span", "data.max_length": 384, "data.doc_stride": 128,
        "lora.method": "lora", "lora.r": 8, "lora.lora_alpha": 8.0, "lora.target_modules": ["query", "value"],
        "lora.modules_to_save": ["qa_outputs"],
        "train.optimizer": "adamw", "train.lr": 5e-4, "train.batch_size": 16, "train.epochs": 10.0,
        "train.warmup_ratio": 0.06, "train.schedule": "linear", "train.keep_best": False,
    }
    return {p["name"]: p for p in (cpu_gen, cpu_span, paper_gen, paper_span)}
