"""The paper's section 5.2 at this scale: one mask per language, built by the specificity
criterion from routing statistics on training texts and evaluated on held-out texts.

For each language L: the profile "no-L" removes the composite experts whose mean routing
weight on L is at least `factor` times that on the second label; its effect is the loss
increase (nats per byte) on L against the mean increase on the other languages. A coverage
sweep trades strength against collateral damage. Results go to a Markdown table and PNGs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

from masks.builders import collect_label_statistics, specificity_profile
from masks.corpus import Record, read_corpus
from masks.evaluate import coverage_sweep, evaluate_masks

__all__ = ["LanguageResult", "language_masks", "sample_records", "write_report"]


@dataclass
class LanguageResult:
    language: str
    removed: int  # composite experts removed over all layers
    removed_share: float  # of all composite experts
    target_delta: float  # loss increase on the language (nats/byte)
    others_mean_delta: float  # mean increase over the other languages
    deltas: dict[str, float]  # per label
    sweep: list[dict]  # coverage, removed, target_delta, collateral_delta

    @property
    def ratio(self) -> float:
        return self.target_delta / max(self.others_mean_delta, 1e-6)

    def passes(self, *, min_delta: float = 0.1, min_ratio: float = 5.0) -> bool:
        return self.target_delta >= min_delta and (
            self.target_delta >= min_ratio * max(self.others_mean_delta, 0.0))


def sample_records(path: Path, per_label: int) -> list[Record]:
    """The first `per_label` texts of each label (file order: deterministic)."""
    by_label: dict[str, list[Record]] = {}
    for record in read_corpus(path):
        bucket = by_label.setdefault(record.label, [])
        if len(bucket) < per_label:
            bucket.append(record)
    return [r for label in sorted(by_label) for r in by_label[label]]


def language_masks(model, corpus: Path, *, build_texts: int = 300, eval_texts: int = 60,
                   factor: float = 2.0, coverages=(0.1, 0.2, 0.3, 0.5, 0.7),
                   max_length: int = 512, progress: bool = True) -> list[LanguageResult]:
    """Build and evaluate one language mask per label of the corpus (train / test splits)."""
    build = sample_records(Path(corpus) / "train.jsonl", build_texts)
    held_out = sample_records(Path(corpus) / "test.jsonl", eval_texts)
    stats = collect_label_statistics(model, build, max_length=max_length, progress=progress)
    languages = list(stats.labels)
    profiles = {lang: specificity_profile(stats, lang, name=f"no-{lang}", kind="language",
                                          factor=factor) for lang in languages}
    table = evaluate_masks(model, held_out, {l: p.experts for l, p in profiles.items()},
                           max_length=max_length, progress=progress)
    total = model.config.num_hidden_layers * model.config.moe_experts**2
    results = []
    for lang in languages:
        deltas = {row.label: row.delta for row in table.rows(lang)}
        others = [d for label, d in deltas.items() if label != lang]
        sweep = coverage_sweep(model, stats, held_out, lang, coverages, factor=None,
                               max_length=max_length, progress=False) if coverages else []
        results.append(LanguageResult(
            language=lang, removed=profiles[lang].size, removed_share=profiles[lang].size / total,
            target_delta=deltas[lang], others_mean_delta=sum(others) / len(others),
            deltas=deltas, sweep=[p.model_dump() for p in sweep]))
    return results


def write_report(results: list[LanguageResult], out: Path, *, title: str) -> Path:
    """docs-style Markdown table plus two PNGs (per-language deltas, trade-off curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    labels = sorted(results[0].deltas)
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.2), sharey=True)
    for ax, r in zip(axes, results):
        ax.bar(labels, [r.deltas[l] for l in labels],
               color=["tab:red" if l == r.language else "tab:blue" for l in labels])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"no-{r.language}")
        ax.tick_params(axis="x", rotation=60)
    axes[0].set_ylabel("loss increase (nats/byte)")
    fig.tight_layout()
    fig.savefig(out / "language-masks-deltas.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in results:
        if r.sweep:
            ax.plot([p["collateral_delta"] for p in r.sweep], [p["target_delta"] for p in r.sweep],
                    marker="o", label=r.language)
    ax.set_xlabel("collateral loss increase (other languages, nats/byte)")
    ax.set_ylabel("target loss increase (nats/byte)")
    ax.set_title("coverage trade-off")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "language-masks-tradeoff.png", dpi=100)
    plt.close(fig)

    rows = ["| mask | experts removed | target delta | mean delta, other languages | ratio | "
            + " | ".join(labels) + " |",
            "|---|---|---|---|---|" + "---|" * len(labels)]
    for r in results:
        rows.append(f"| no-{r.language} | {r.removed} ({r.removed_share:.1%}) | "
                    f"{r.target_delta:.3f} | {r.others_mean_delta:.3f} | {r.ratio:.1f}x | "
                    + " | ".join(f"{r.deltas[l]:+.3f}" for l in labels) + " |")
    sweep_rows = ["| language | coverage | experts removed | target delta | collateral delta |",
                  "|---|---|---|---|---|"]
    for r in results:
        for p in r.sweep:
            sweep_rows.append(f"| {r.language} | {p['coverage']:g} | {p['removed']} | "
                              f"{p['target_delta']:.3f} | {p['collateral_delta']:.3f} |")
    text = "\n".join([f"# {title}", "", *rows, "", "![deltas](language-masks-deltas.png)", "",
                      "## Coverage trade-off", "", *sweep_rows, "",
                      "![trade-off](language-masks-tradeoff.png)", ""])
    (out / "language-masks.md").write_text(text)
    (out / "language-masks.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    return out / "language-masks.md"
