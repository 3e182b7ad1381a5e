"""Train a small MONET: language-model loss plus MONET's routing losses, AdamW, warm-up and
cosine decay, Hugging Face checkpoints, resumable.

    L = L_LM + lambda * L_unif + lambda * L_amb          (spec: lambda = 1e-3)
    L_unif = -(1/(2HE)) sum_h sum_i log(mean_t g1[h,i])  + the same for g2
    L_amb  =  (1/(2H))  sum_h (1 - max_i g1[h,i]), mean over tokens, + the same for g2
averaged over routing layers. In training mode the routers' BatchNorm uses batch statistics
and updates its running ones. Batches are balanced over the corpus labels: each row is BOS and
a random window of one label's text, labels taken in turn.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from monet_runtime import MonetConfig, MonetForCausalLM, save_checkpoint
from monet_runtime.tokenizer import ByteTokenizer

__all__ = ["TrainConfig", "routing_losses", "train"]

# The default model: byte-level, 4 layers, 64 x 64 composite experts per layer.
DEFAULT_MODEL = dict(
    vocab_size=260, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=1024, moe_dim=16, moe_heads=4,
    moe_experts=64, moe_topk=4, moe_groups=2, moe_decompose="vertical",
)


@dataclass
class TrainConfig:
    corpus: str  # directory with train.jsonl / valid.jsonl (training.corpus)
    out: str  # checkpoint directory
    model: dict = field(default_factory=lambda: dict(DEFAULT_MODEL))
    steps: int = 3000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    routing_lambda: float = 1e-3
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 250
    save_every: int = 250
    threads: int | None = None


def routing_losses(router_probs: dict, heads: int, experts: int):
    """(L_unif, L_amb) averaged over routing layers; g [B, T, H, E]."""
    unif, amb = [], []
    for g1, g2 in router_probs.values():
        for g in (g1, g2):
            g = g.reshape(-1, heads, experts)
            usage = g.mean(0).clamp_min(1e-9)  # [H, E]
            unif.append(-usage.log().sum() / (2 * heads * experts))
            amb.append((1 - g.amax(-1)).sum(-1).mean() / (2 * heads))
    n = len(router_probs)
    return sum(unif) / n, sum(amb) / n


class LabelledStream:
    """Byte windows per label, labels in turn: rows are BOS + seq_len - 1 bytes."""

    def __init__(self, path: Path, tokenizer: ByteTokenizer, seq_len: int, seed: int):
        texts: dict[str, list[str]] = {}
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts.setdefault(row["label"], []).append(row["text"])
        self.labels = sorted(texts)
        self.data = {l: torch.tensor(tokenizer.encode("\n".join(t), add_bos=False))
                     for l, t in texts.items()}
        self.bos, self.seq_len = tokenizer.bos_id, seq_len
        self.rng = random.Random(seed)
        self.turn = 0

    def window(self, label: str) -> torch.Tensor:
        """BOS and a random window of the label's text, [seq_len]."""
        data = self.data[label]
        start = self.rng.randrange(0, max(1, len(data) - self.seq_len))
        row = torch.full((self.seq_len,), self.bos, dtype=torch.long)
        window = data[start:start + self.seq_len - 1]
        row[1:1 + len(window)] = window  # texts shorter than a window end in BOS padding
        return row

    def batch(self, rows: int) -> torch.Tensor:
        labels = [self.labels[(self.turn + r) % len(self.labels)] for r in range(rows)]
        self.turn += rows
        return torch.stack([self.window(label) for label in labels])


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _step_loss(model: MonetForCausalLM, ids: torch.Tensor, cfg: TrainConfig):
    c = model.config
    out = model(ids, output_router_probs=True)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, c.vocab_size), ids[:, 1:].reshape(-1))
    unif, amb = routing_losses(out.router_probs, c.moe_heads, c.moe_experts)
    return lm, unif, amb


@torch.no_grad()
def evaluate(model: MonetForCausalLM, stream: LabelledStream, rows_per_label: int = 8) -> dict:
    """Mean next-token loss per label on fixed windows of a held-out split (eval mode)."""
    was_training = model.training
    model.eval()
    saved_rng, stream.rng = stream.rng, random.Random(1234)
    losses = {}
    for label in stream.labels:
        ids = torch.stack([stream.window(label) for _ in range(rows_per_label)])
        logits = model(ids).logits
        losses[label] = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                              ids[:, 1:].reshape(-1)))
    stream.rng = saved_rng
    model.train(was_training)
    return losses


def train(cfg: TrainConfig, *, resume: bool = True, progress: bool = True,
          until: int | None = None) -> Path:
    """Train (or resume) and write a checkpoint to cfg.out; returns its path.

    until: stop (and save) at this step, to be resumed later with the same cfg."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    state_file = out / "trainer_state.pt"
    torch.manual_seed(cfg.seed)
    config = MonetConfig.from_dict(cfg.model)
    model = MonetForCausalLM(config).init_weights(std=0.02, seed=cfg.seed)
    tokenizer = ByteTokenizer(config.vocab_size, bos_id=config.bos_token_id,
                              eos_ids=config.eos_token_ids)
    stream = LabelledStream(Path(cfg.corpus) / "train.jsonl", tokenizer, cfg.seq_len, cfg.seed)
    held_out = LabelledStream(Path(cfg.corpus) / "valid.jsonl", tokenizer, cfg.seq_len, cfg.seed)
    model.train().requires_grad_(True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95))
    step = 0
    if resume and state_file.exists():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stream.rng.setstate(state["data_rng"])
        stream.turn, step = state["turn"], state["step"]
        torch.set_rng_state(state["torch_rng"])

    def save():
        model.eval()
        save_checkpoint(model, out)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "data_rng": stream.rng.getstate(), "turn": stream.turn, "step": step,
                    "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}, state_file)
        model.train()

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step")
    log = (out / "train_log.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    last = min(cfg.steps, until) if until is not None else cfg.steps
    while step < last:
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg)
        lm, unif, amb = _step_loss(model, stream.batch(cfg.batch_size), cfg)
        loss = lm + cfg.routing_lambda * (unif + amb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(lm=f"{lm.item():.3f}", unif=f"{unif.item():.2f}", amb=f"{amb.item():.2f}")
        record = {"step": step, "lm": lm.item(), "unif": unif.item(), "amb": amb.item(),
                  "lr": _lr(step - 1, cfg), "seconds": time.perf_counter() - start}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record["held_out"] = evaluate(model, held_out)
            bar.write(f"step {step}: held-out loss " + ", ".join(
                f"{k} {v:.3f}" for k, v in record["held_out"].items()))
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if step % cfg.save_every == 0 or step == last:
            save()
    bar.close()
    return out
