"""The tiny moderation classifier ("tiny-dam", spec/synthetic_world.md §3).

A small ``LlamaForSequenceClassification`` with beaver-dam-7b's interface: 14 BeaverTails labels,
``problem_type = multi_label_classification`` (sigmoid + binary cross-entropy), input
``moderation_text(prompt, response) + EOS``. It is trained on the world's labelled QA pairs (BeaverTails
``30k_train``) and reports its held-out accuracy of the flagged decision (any probability > 0.5 vs
``not is_safe``) on ``30k_test``; :class:`~nlsr_lib.evaluate.judges.ModerationJudge` loads it like beaver-dam.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..config import ModerationConfig
from ..data.schemas import HARM_CATEGORIES
from ..progress import bar
from ..evaluate.judges import ModerationJudge
from .loop import train_loop


def tiny_classifier(tokenizer, cfg: ModerationConfig):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=max(cfg.max_length, 256), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        num_labels=len(HARM_CATEGORIES), problem_type="multi_label_classification",
        id2label=dict(enumerate(HARM_CATEGORIES)), label2id={c: i for i, c in enumerate(HARM_CATEGORIES)},
    )
    return LlamaForSequenceClassification(config)


def train_tiny_moderation(tokenizer, train: Sequence[dict], heldout: Sequence[dict], cfg: ModerationConfig,
                          seed: int, out_dir: str | Path) -> dict:
    """Train on ``{text, labels}`` examples, save model + tokenizer to ``out_dir``, return held-out metrics."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = tiny_classifier(tokenizer, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=cfg.train_steps,
                                                pct_start=0.1)
    tokenizer.padding_side = "right"

    def batch() -> dict[str, torch.Tensor]:  # drawn when the loop asks for it: one draw per step, in order
        idx = torch.randint(len(train), (cfg.train_batch_size,), generator=gen).tolist()
        enc = tokenizer([train[i]["text"] + tokenizer.eos_token for i in idx], return_tensors="pt", padding=True,
                        truncation=True, max_length=cfg.max_length)
        return {**enc, "labels": torch.tensor([train[i]["labels"] for i in idx], dtype=torch.float32)}

    batches = (batch() for _ in bar(range(cfg.train_steps), desc="tiny moderation"))
    losses = train_loop(model, batches, opt, sched, "tiny moderation")
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return {"heldout_accuracy": heldout_accuracy(ModerationJudge(model, tokenizer, cfg.threshold, cfg.max_length,
                                                                 cfg.batch_size), heldout),
            "heldout_n": len(heldout), "final_train_loss": sum(losses[-20:]) / min(20, len(losses))}


def heldout_accuracy(judge: ModerationJudge, examples: Sequence[dict]) -> float:
    """Accuracy of the flagged decision against ``any(labels)`` on ``{text, labels}`` examples."""
    probs = judge.probabilities([e["text"] + (judge.tokenizer.eos_token or "") for e in examples])
    predicted = probs.max(dim=1).values > judge.threshold
    gold = torch.tensor([any(e["labels"]) for e in examples])
    return round(float((predicted == gold).float().mean()), 4)
