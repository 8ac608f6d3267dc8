"""The one batch type that travels between driver and workers.

Rows are sequences (a prompt and one sampled response). Prompts are left-padded to P and responses
right-padded to R, so the full sequence `cat(prompts, responses)` of shape (B, P+R) puts every
response at the same columns and per-token tensors over responses line up as (B, R).

Per-token fields (B, R), over response tokens:
    response_mask      1 on real response tokens
    rollout_log_probs  log π_rollout(a|s): the target's logprob from the rollout verify pass
    old_log_probs      log π_old(a|s): recomputed by the actor before the update
    ref_log_probs      log π_ref(a|s): reference policy (only with a KL term)
    token_level_rewards  reward per token (the sequence score on the last token, minus KL if in reward)
    advantages         A(s, a)
Per-sequence fields (B,):
    scores             final scalar reward of each sequence
Non-tensor per-sequence lists in `meta`: uid (the prompt a row was sampled from: the GRPO group),
    data_source, ground_truth, extra_info, acc, response_text, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

_TENSORS = ("prompts", "responses", "response_mask", "rollout_log_probs", "old_log_probs", "ref_log_probs",
            "token_level_rewards", "advantages", "scores")


@dataclass
class Batch:
    prompts: torch.Tensor  # (B, P) left-padded prompt ids
    responses: torch.Tensor  # (B, R) right-padded response ids
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    response_mask: torch.Tensor  # (B, R) 1 on real response tokens
    rollout_log_probs: torch.Tensor | None = None  # (B, R)
    old_log_probs: torch.Tensor | None = None  # (B, R)
    ref_log_probs: torch.Tensor | None = None  # (B, R)
    token_level_rewards: torch.Tensor | None = None  # (B, R)
    advantages: torch.Tensor | None = None  # (B, R)
    scores: torch.Tensor | None = None  # (B,)
    meta: dict[str, list] = field(default_factory=dict)  # per-row python values

    def __len__(self) -> int:
        return self.prompts.shape[0]

    # ---- derived views --------------------------------------------------------------------

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompts, self.responses], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def seq_lengths(self) -> list[int]:
        return self.attention_mask.sum(-1).tolist()

    # ---- slicing and joining --------------------------------------------------------------

    def _tensor_fields(self):
        return [f.name for f in fields(self) if f.name != "meta"]

    def select(self, index) -> "Batch":
        """Rows at `index` (list of ints or bool/long tensor)."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().squeeze(-1)
        rows = idx.tolist()
        out = {n: (None if (t := getattr(self, n)) is None else t[idx]) for n in self._tensor_fields()}
        return Batch(**out, meta={k: [v[i] for i in rows] for k, v in self.meta.items()})

    def split(self, parts: int) -> list["Batch"]:
        """Contiguous shards of near-equal size (data parallel)."""
        bounds = [len(self) * i // parts for i in range(parts + 1)]
        return [self.select(list(range(a, b))) for a, b in zip(bounds, bounds[1:])]

    @staticmethod
    def concat(batches: list["Batch"]) -> "Batch":
        """Join batches, re-padding prompts on the left and responses on the right."""
        p = max(b.prompts.shape[1] for b in batches)
        r = max(b.responses.shape[1] for b in batches)
        out = {}
        for name in batches[0]._tensor_fields():
            parts = [getattr(b, name) for b in batches]
            if any(t is None for t in parts):
                out[name] = None
                continue
            if name in ("prompts", "prompt_mask"):
                parts = [torch.nn.functional.pad(t, (p - t.shape[1], 0)) for t in parts]
            elif parts[0].dim() == 2:
                parts = [torch.nn.functional.pad(t, (0, r - t.shape[1])) for t in parts]
            out[name] = torch.cat(parts)
        keys = batches[0].meta.keys()
        return Batch(**out, meta={k: sum((b.meta[k] for b in batches), []) for k in keys})

    def with_(self, **changes) -> "Batch":
        return replace(self, **changes)

    def to(self, device) -> "Batch":
        return replace(self, **{n: (None if (t := getattr(self, n)) is None else t.to(device))
                                for n in self._tensor_fields()})


def from_samples(prompts: list[list[int]], responses: list[list[int]], logprobs: list[list[float]],
                 pad_id: int, meta: dict[str, list] | None = None) -> Batch:
    """Pad token lists into a Batch: prompts on the left, responses on the right."""
    b = len(prompts)
    p = max(map(len, prompts))
    r = max(1, max(map(len, responses)))
    prompt_ids = torch.full((b, p), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(b, p, dtype=torch.long)
    resp_ids = torch.full((b, r), pad_id, dtype=torch.long)
    resp_mask = torch.zeros(b, r, dtype=torch.long)
    lp = torch.zeros(b, r)
    for i, (pr, rs, l) in enumerate(zip(prompts, responses, logprobs)):
        prompt_ids[i, p - len(pr):] = torch.tensor(pr)
        prompt_mask[i, p - len(pr):] = 1
        if rs:
            resp_ids[i, : len(rs)] = torch.tensor(rs)
            resp_mask[i, : len(rs)] = 1
            lp[i, : len(rs)] = torch.tensor(l)
    return Batch(prompt_ids, resp_ids, prompt_mask, resp_mask, rollout_log_probs=lp, meta=dict(meta or {}))
