"""Evaluate mask profiles: next-token loss per label with and without the mask.

One pass over a labelled corpus runs the unmasked model once per batch and the model under
each candidate mask, summing per label the token losses (nats). A profile's report gives the
loss increase on its target label against the token-weighted increase on the others
(collateral damage); a coverage sweep evaluates several masks of one target in the same pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from masks.builders import next_token_losses, open_corpus, specificity_profile
from masks.corpus import Record, batches
from masks.schema import EvaluationReport, LabelLoss, MaskProfile, ModelMismatch, SweepPoint
from masks.statistics import LabelStatistics
from monet_runtime.expert_mask import ExpertMask

__all__ = [
    "LossTable",
    "coverage_sweep",
    "evaluate_masks",
    "evaluate_profile",
    "plot_report",
    "report_markdown",
]

UNLABELLED = "all"


@dataclass
class LossTable:
    """Summed token losses per label: base (no mask) and per candidate mask."""

    tokens: dict[str, int] = field(default_factory=dict)
    base: dict[str, float] = field(default_factory=dict)
    masked: dict[str, dict[str, float]] = field(default_factory=dict)  # mask key -> label -> sum

    def rows(self, key: str) -> list[LabelLoss]:
        return [LabelLoss(label=label, tokens=n, loss=self.base[label] / n,
                          masked_loss=self.masked[key][label] / n)
                for label, n in sorted(self.tokens.items()) if n]


def _token_losses(model, ids, attention, mask) -> torch.Tensor:
    """Loss of each next-token prediction [B, T-1] (0 where the target is padding)."""
    logits = model(ids, mask=mask, attention_mask=attention).logits  # [B, T, V]
    return next_token_losses(logits, ids, attention).double()


def evaluate_masks(
    model,
    records: Iterable[Record],
    masks: Mapping[str, ExpertMask],
    *,
    batch_tokens: int = 4096,
    max_length: int = 512,
    progress: bool | str = True,
) -> LossTable:
    """Per-label summed losses without a mask and with each of `masks`, in one corpus pass."""
    table = LossTable(masked={key: {} for key in masks})
    device = model.device
    bar = tqdm(desc=progress if isinstance(progress, str) else "evaluating", unit="tok",
               unit_scale=True, disable=not progress)
    try:
        for batch in batches(records, model.tokenizer, batch_tokens=batch_tokens,
                             max_length=max_length):
            ids = batch.input_ids.to(device)
            attention = batch.attention_mask.to(device)
            labels = [label or UNLABELLED for label in batch.labels]
            with torch.inference_mode():
                runs = {None: _token_losses(model, ids, attention, None)}
                for key, mask in masks.items():
                    runs[key] = _token_losses(model, ids, attention, mask)
            counts = attention[:, 1:].sum(1).tolist()
            sums = {key: losses.sum(1).tolist() for key, losses in runs.items()}
            for row, label in enumerate(labels):
                table.tokens[label] = table.tokens.get(label, 0) + counts[row]
                table.base[label] = table.base.get(label, 0.0) + sums[None][row]
                for key in masks:
                    table.masked[key][label] = table.masked[key].get(label, 0.0) + sums[key][row]
            bar.update(batch.tokens * (1 + len(masks)))
    finally:
        bar.close()
    return table


def evaluate_profile(
    model,
    profile: MaskProfile,
    corpus: str | Path | Iterable[Record],
    *,
    target: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    batch_tokens: int = 4096,
    max_length: int = 512,
    progress: bool = True,
) -> EvaluationReport:
    """Loss per label with and without the profile's mask (refuses another model's profile).
    `target` defaults to the label the profile was built for."""
    mask = profile.mask_for(model.identity)
    records, fingerprint = open_corpus(corpus, text_field=text_field, label_field=label_field)
    table = evaluate_masks(model, records, {"profile": mask}, batch_tokens=batch_tokens,
                           max_length=max_length, progress=progress)
    return EvaluationReport(
        model_id=model.identity, corpus_fingerprint=fingerprint,
        target=target if target is not None else profile.provenance.target,
        labels=table.rows("profile"), removed_share=profile.removed_share(),
    )


def coverage_sweep(
    model,
    stats: LabelStatistics,
    corpus: str | Path | Iterable[Record],
    target: str,
    coverages: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    *,
    factor: float | None = None,
    floor: float = 0.1,
    min_mass: float = 1.0,
    text_field: str = "text",
    label_field: str = "label",
    batch_tokens: int = 4096,
    max_length: int = 512,
    progress: bool = True,
) -> list[SweepPoint]:
    """Target delta against collateral delta for masks removing growing shares of the
    target's routing mass, all evaluated in one corpus pass."""
    if stats.model_id and stats.model_id != model.identity:
        raise ModelMismatch("(coverage sweep)", stats.model_id, model.identity)
    profiles = {
        f"{c:g}": specificity_profile(stats, target, name="sweep", factor=factor, floor=floor,
                                      min_mass=min_mass, coverage=c)
        for c in coverages
    }
    records, _ = open_corpus(corpus, text_field=text_field, label_field=label_field)
    table = evaluate_masks(model, records, {k: p.experts for k, p in profiles.items()},
                           batch_tokens=batch_tokens, max_length=max_length, progress=progress)
    points = []
    for c in coverages:
        key = f"{c:g}"
        rows = table.rows(key)
        others = [r for r in rows if r.label != target]
        tokens = sum(r.tokens for r in others)
        own = [r.delta for r in rows if r.label == target]
        points.append(SweepPoint(
            coverage=c, removed=profiles[key].size, target_delta=own[0] if own else 0.0,
            collateral_delta=sum(r.delta * r.tokens for r in others) / tokens if tokens else 0.0))
    return points


def plot_report(profile: MaskProfile, path: str | Path,
                report: EvaluationReport | None = None) -> Path:
    """PNG: per-label loss deltas, share of experts removed per layer and, when the report
    has a sweep, the trade-off curve (target delta against collateral delta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    report = report or profile.evaluation
    generation = report.generation if report is not None else None
    panels = 1 + (report is not None) + bool(report is not None and report.sweep) \
        + bool(generation and generation.labels) + bool(generation and generation.toxicity)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if report is not None:
        ax = axes.pop(0)
        labels = [r.label for r in report.labels]
        colours = ["tab:red" if l == report.target else "tab:blue" for l in labels]
        ax.bar(labels, [r.delta for r in report.labels], color=colours)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("loss increase (nats/token)")
        ax.set_title(f"{profile.name}: per-label loss delta")
        ax.tick_params(axis="x", rotation=45)
    ax = axes.pop(0)
    share = report.removed_share if report is not None else profile.removed_share()
    ax.bar(range(len(share)), [100 * s for s in share], color="tab:gray")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("composite experts removed (%)")
    ax.set_title(f"{profile.size} experts removed")
    if report is not None and report.sweep:
        ax = axes.pop(0)
        xs = [p.collateral_delta for p in report.sweep]
        ys = [p.target_delta for p in report.sweep]
        ax.plot(xs, ys, marker="o")
        for p in report.sweep:
            ax.annotate(f"{p.coverage:g}", (p.collateral_delta, p.target_delta),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("collateral loss delta (other labels)")
        ax.set_ylabel(f"target loss delta ({report.target})")
        ax.set_title("coverage trade-off")
    if generation is not None:
        _plot_generation(axes, generation, profile.name)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_generation(axes, generation, name: str) -> None:
    """Bars without and with the mask: per label the share of its prompts' continuations
    classified as it; for toxicity RealToxicityPrompts' two figures."""
    import numpy as np

    def pairs(ax, names, base, masked, ylabel, title):
        x = np.arange(len(names))
        ax.bar(x - 0.2, base, 0.4, label="no mask", color="tab:gray")
        ax.bar(x + 0.2, masked, 0.4, label=name, color="tab:red")
        ax.set_xticks(x, names, rotation=45)
        ax.set_ylim(0, 1)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)

    if generation.labels:
        rows = generation.labels
        pairs(axes.pop(0), [r.label for r in rows], [r.share for r in rows],
              [r.masked_share for r in rows], "continuations in the prompt's label",
              f"generation, k={generation.samples}")
    if generation.toxicity:
        t = generation.toxicity
        pairs(axes.pop(0), ["expected max toxicity", "P(toxic >= 1 of k)"],
              [t.expected_max_toxicity, t.toxic_probability],
              [t.masked_expected_max_toxicity, t.masked_toxic_probability], "",
              f"toxicity, k={t.samples}")


def report_markdown(profile: MaskProfile, report: EvaluationReport) -> str:
    """The report as Markdown tables: loss per label, then the generation-level effects."""
    lines = [f"## {profile.name}: loss per label (nats/token)", "",
             "| label | tokens | loss | masked | delta |", "|---|---|---|---|---|"]
    lines += [f"| {r.label} | {r.tokens:,} | {r.loss:.4f} | {r.masked_loss:.4f} | "
              f"{r.delta:+.4f} |" for r in report.labels]
    generation = report.generation
    if generation is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"## {profile.name}: generation", "",
              f"{generation.samples} continuations per prompt of up to "
              f"{generation.max_new_tokens} tokens (temperature {generation.temperature:g}, "
              f"top-p {generation.top_p:g}, seed {generation.seed}), judged by "
              f"{generation.judge}.", ""]
    if generation.labels:
        lines += ["| prompts | n | in their label, no mask | with the mask | kept | "
                  "masked continuations classified as |", "|---|---|---|---|---|---|"]
        for r in generation.labels:
            kept = "-" if r.kept is None else f"{r.kept:.0%}"
            where = ", ".join(f"{k} {v:.0%}" for k, v in sorted(
                r.masked.items(), key=lambda kv: -kv[1]))
            lines.append(f"| {r.label} | {r.prompts} x {r.samples} | {r.share:.0%} | "
                         f"{r.masked_share:.0%} | {kept} | {where} |")
    if generation.toxicity:
        t = generation.toxicity
        lines += ["", "| prompts | expected max toxicity (no mask / mask) | "
                  "P(at least one toxic) (no mask / mask) |", "|---|---|---|",
                  f"| {t.prompts} x {t.samples} | {t.expected_max_toxicity:.3f} / "
                  f"{t.masked_expected_max_toxicity:.3f} | {t.toxic_probability:.3f} / "
                  f"{t.masked_toxic_probability:.3f} |"]
    return "\n".join(lines) + "\n"
