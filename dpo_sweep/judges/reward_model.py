"""A reward model as judge: any `AutoModelForSequenceClassification` (a hub name or a local
folder, e.g. a Skywork or OpenAssistant reward model). Each (prompt, answer) is rendered with the
reward model's chat template when it has one (user: prompt, assistant: answer), else as prompt +
answer, and scored by the first logit, in batches."""

from __future__ import annotations

from typing import List, Sequence

import torch

from dpo_sweep.config import ConfigError


def check_reward_model(name_or_path: str) -> None:
    """A clear error, naming `judge.name_or_path`, unless it is a sequence-classification model."""
    from transformers import AutoConfig

    if not name_or_path:
        raise ConfigError("config key 'judge.name_or_path' = None: expected a reward model (a hub name or a "
                          "local folder of an AutoModelForSequenceClassification) with judge=reward_model")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'judge.name_or_path' = {name_or_path!r}: cannot load it ({e})") from e
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith(("ForSequenceClassification", "RewardModel")) for a in architectures):
        raise ConfigError(f"config key 'judge.name_or_path' = {name_or_path!r}: expected a reward model with a "
                          f"sequence-classification head, found {architectures or 'no architecture'}")


class RewardModelJudge:
    name = "reward_model"

    def __init__(self, name_or_path: str, device: torch.device, batch_size: int = 16, max_length: int = 1024):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_reward_model(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    def render(self, prompt: str, answer: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + answer

    @torch.no_grad()
    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> List[float]:
        texts = [self.render(p, a) for p, a in zip(prompts, answers)]
        scores: List[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores
