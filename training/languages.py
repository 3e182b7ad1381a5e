"""The paper's section 5.2 at this scale: one mask per language, built from training texts,
chosen on validation texts and evaluated on held-out test texts.

For each language L, candidate "no-L" profiles come from three criteria:
  specificity (the paper): composite experts whose mean routing weight on L is at least
    `factor` times that on the second label;
  attribution: experts whose removal raises L's loss (first order) at least `factor` times
    more than any other language's, taking the most specific until they carry `coverage` of
    L's total increase, over a grid of factors and coverages (identical masks count once);
  learned: keep-gates optimised against the goal itself (raise L's loss, not the others'
    on average).
The candidate with the best margin on the valid split (against the target: a loss increase of
at least 0.1 nats/byte and 5x the mean increase on the others) is reported on the test split,
next to the paper's criterion. A coverage sweep of the paper's criterion shows the trade-off.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from masks.builders import (
    attribution_profile,
    collect_attribution_statistics,
    collect_label_statistics,
    learned_profile,
    specificity_profile,
)
from masks.corpus import Record, read_corpus
from masks.evaluate import LossTable, coverage_sweep, evaluate_masks

__all__ = ["LanguageResult", "language_masks", "sample_records", "write_report"]

MIN_DELTA, MIN_RATIO = 0.1, 5.0  # the target
PAPER, LEARNED = "specificity", "learned"


@dataclass
class LanguageResult:
    language: str
    criterion: str  # "specificity" (the paper's), "attribution <factor>x <coverage>", "learned"
    chosen: bool  # the candidate chosen on the valid split
    removed: int  # composite experts removed over all layers
    removed_share: float  # of all composite experts
    target_delta: float  # loss increase on the language (nats/byte), test split
    others_mean_delta: float  # mean increase over the other languages
    deltas: dict[str, float]  # per label
    sweep: list[dict]  # coverage, removed, target_delta, collateral_delta

    @property
    def ratio(self) -> float:
        return self.target_delta / max(self.others_mean_delta, 1e-6)

    @property
    def ratio_text(self) -> str:
        return f"{self.ratio:.1f}x" if self.others_mean_delta > 0 else "others gain"

    @property
    def margin(self) -> float:
        return _margin(self.deltas, self.language)

    def passes(self) -> bool:
        return self.margin >= 1


def sample_records(path: Path, per_label: int) -> list[Record]:
    """`per_label` texts of each label, evenly spaced over the file (deterministic). The first
    N in file order would come from a handful of source files."""
    by_label: dict[str, list[Record]] = {}
    for record in read_corpus(path):
        by_label.setdefault(record.label, []).append(record)
    sample = []
    for label in sorted(by_label):
        texts = by_label[label]
        n = min(per_label, len(texts))
        sample += [texts[i * len(texts) // n] for i in range(n)]
    return sample


def _deltas(table: LossTable, key: str) -> dict[str, float]:
    return {row.label: row.delta for row in table.rows(key)}


def _margin(deltas: dict[str, float], target: str) -> float:
    """How far a mask is past the target (>= 1 passes): the weaker of its two tests."""
    others = [d for label, d in deltas.items() if label != target]
    mean = max(sum(others) / len(others), 1e-6)
    own = deltas[target]
    return min(own / MIN_DELTA, own / (MIN_RATIO * mean))


def language_masks(model, corpus: Path, *, build_texts: int = 100, eval_texts: int = 30,
                   factor: float = 2.0, attribution_factors=(1.25, 1.5, 2.0),
                   attribution_coverages=(0.3, 0.4, 0.5),
                   learned_steps: int = 120, coverages=(0.1, 0.3, 0.5),
                   max_length: int = 512, progress: bool = True) -> list[LanguageResult]:
    """Per label of the corpus: the paper's mask and the candidate chosen on the valid split,
    both evaluated on the test split (two results per language, the chosen one may be the
    paper's)."""
    corpus = Path(corpus)
    build = sample_records(corpus / "train.jsonl", build_texts)
    valid = sample_records(corpus / "valid.jsonl", eval_texts)
    held_out = sample_records(corpus / "test.jsonl", eval_texts)
    routing = collect_label_statistics(model, build, max_length=max_length, progress=progress)
    attribution = collect_attribution_statistics(model, build, max_length=max_length,
                                                 progress=progress) if attribution_coverages \
        else None
    languages = list(routing.labels)
    candidates = {}  # (language, criterion) -> profile
    for lang in languages:
        candidates[lang, PAPER] = specificity_profile(routing, lang, name=f"no-{lang}",
                                                      kind="language", factor=factor)
        seen = {candidates[lang, PAPER].experts}
        for f in attribution_factors:
            for c in attribution_coverages:
                profile = attribution_profile(attribution, lang, name=f"no-{lang}",
                                              kind="language", factor=f, coverage=c)
                if profile.experts not in seen:  # a coverage past what the factor admits
                    seen.add(profile.experts)
                    candidates[lang, f"attribution {f:g}x {c:g}"] = profile
        if learned_steps:
            candidates[lang, LEARNED] = learned_profile(
                model, build, lang, name=f"no-{lang}", kind="language", steps=learned_steps,
                progress=progress)
    keys = {f"{lang}|{crit}": (lang, crit) for lang, crit in candidates}
    chosen = {}
    if len(candidates) > len(languages):
        table = evaluate_masks(model, valid, {k: candidates[v].experts for k, v in keys.items()},
                               max_length=max_length, progress=progress)
        for lang in languages:
            mine = [k for k, v in keys.items() if v[0] == lang]
            best = max(mine, key=lambda k: _margin(_deltas(table, k), lang))
            chosen[lang] = keys[best][1]
    else:
        chosen = {lang: PAPER for lang in languages}
    reported = {f"{lang}|{crit}": (lang, crit) for lang in languages
                for crit in dict.fromkeys((PAPER, chosen[lang]))}
    table = evaluate_masks(model, held_out,
                           {k: candidates[v].experts for k, v in reported.items()},
                           max_length=max_length, progress=progress)
    total = model.config.num_hidden_layers * model.config.moe_experts**2
    results = []
    for key, (lang, crit) in reported.items():
        deltas = _deltas(table, key)
        others = [d for label, d in deltas.items() if label != lang]
        sweep = coverage_sweep(model, routing, held_out, lang, coverages, factor=None,
                               max_length=max_length, progress=False) \
            if coverages and crit == PAPER else []
        size = candidates[lang, crit].size
        results.append(LanguageResult(
            language=lang, criterion=crit, chosen=crit == chosen[lang], removed=size,
            removed_share=size / total, target_delta=deltas[lang],
            others_mean_delta=sum(others) / len(others), deltas=deltas,
            sweep=[p.model_dump() for p in sweep]))
    return results


def write_report(results: list[LanguageResult], out: Path, *, title: str) -> Path:
    """docs-style Markdown table plus two PNGs (per-language deltas, trade-off curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    labels = sorted(results[0].deltas)
    chosen = [r for r in results if r.chosen]
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 3.4), sharey=True)
    for ax, r in zip(axes, chosen):
        ax.bar(labels, [r.deltas[l] for l in labels],
               color=["tab:red" if l == r.language else "tab:blue" for l in labels])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"no-{r.language}\n({r.criterion})", fontsize=9)
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

    rows = ["| mask | criterion | chosen on valid | experts removed | target delta | "
            "mean delta, other languages | ratio | target met | " + " | ".join(labels) + " |",
            "|---|---|---|---|---|---|---|---|" + "---|" * len(labels)]
    for r in results:
        rows.append(f"| no-{r.language} | {r.criterion} | {'yes' if r.chosen else ''} | "
                    f"{r.removed} ({r.removed_share:.1%}) | "
                    f"{r.target_delta:.3f} | {r.others_mean_delta:.3f} | {r.ratio_text} | "
                    f"{'yes' if r.passes() else 'no'} | "
                    + " | ".join(f"{r.deltas[l]:+.3f}" for l in labels) + " |")
    sweep_rows = ["| language | coverage | experts removed | target delta | collateral delta |",
                  "|---|---|---|---|---|"]
    for r in results:
        for p in r.sweep:
            sweep_rows.append(f"| {r.language} | {p['coverage']:g} | {p['removed']} | "
                              f"{p['target_delta']:.3f} | {p['collateral_delta']:.3f} |")
    intro = ("Loss increase (nats/byte) on held-out test texts. For each language: the "
             "paper's criterion (routing specificity, factor 2) and the candidate chosen on the "
             "valid split among it, the attribution masks (\"attribution Fx C\": "
             "factor F, coverage C) and the learned mask (keep-gates optimised against the "
             f"target). The target: at least {MIN_DELTA:g} nats on the language and "
             f"{MIN_RATIO:g}x the mean on the others. "
             "Regenerate with `monet languages` (README).")
    text = "\n".join([f"# {title}", "", intro, "", *rows, "", "![deltas](language-masks-deltas.png)", "",
                      "## Coverage trade-off", "", *sweep_rows, "",
                      "![trade-off](language-masks-tradeoff.png)", ""])
    (out / "language-masks.md").write_text(text)
    (out / "language-masks.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    return out / "language-masks.md"
