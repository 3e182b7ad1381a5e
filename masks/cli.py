"""`monet masks`: build, evaluate and manage mask profiles.

    monet masks build domain corpus.jsonl --model ckpt --target python --name no-python --push
    monet masks eval no-python corpus.jsonl --model ckpt --png no-python.png --save
    monet masks list | show NAME[@VERSION] | diff A B | push FILE | delete NAME
A profile reference is NAME, NAME@VERSION (from the store) or a .json / .mprof file.
The store is --store: a redis:// URL or a directory (default ~/.local/share/monet/masks).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from masks.schema import MaskProfile
    from masks.store import MaskStore

# Only typer and rich at import: `monet --help` must not load torch (the rest is imported by
# the commands that need it).

__all__ = ["masks_app"]

DEFAULT_STORE = Path("~/.local/share/monet/masks").expanduser()

masks_app = typer.Typer(help="Build, evaluate and manage expert mask profiles.",
                        no_args_is_help=True, pretty_exceptions_show_locals=False)


class _Console:
    """rich Console made at use, so that it sees the terminal (and COLUMNS) of each call."""

    def __getattr__(self, name: str):
        return getattr(Console(), name)


console = _Console()

StoreOpt = Annotated[str | None, typer.Option(
    "--store", envvar=["MONET_REDIS_URL", "MONET_STORE_DIR"],  # the server's settings
    help="redis://host:port/db or a directory (default ~/.local/share/monet/masks)")]
NamespaceOpt = Annotated[str, typer.Option(help="Redis key namespace")]
ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="checkpoint directory")]


def _store(url: str | None, namespace: str) -> MaskStore:
    from masks.store import open_store

    return open_store(url, namespace=namespace, default_dir=DEFAULT_STORE)


@contextmanager
def _errors() -> Iterator[None]:
    """Expected failures become one red line and exit code 1."""
    from masks.corpus import CorpusError
    from masks.schema import MaskError
    from masks.store import StoreError

    try:
        yield
    except (StoreError, MaskError, CorpusError, FileNotFoundError, KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        console.print(f"[red]error:[/red] {message}")
        raise typer.Exit(1) from None


def _load_ref(ref: str, store: MaskStore | None) -> MaskProfile:
    from masks.schema import MaskProfile

    path = Path(ref)
    if path.suffix in (".json", ".mprof") and path.exists():
        data = path.read_bytes()
        return (MaskProfile.from_bytes(data) if data.startswith(b"MONETPRF")
                else MaskProfile.from_json(data))
    if store is None:
        raise FileNotFoundError(f"no profile file {ref}")
    name, _, version = ref.partition("@")
    return store.get(name, int(version) if version else None)


def _load_model(path: Path, device: str, dtype: str):
    import torch

    from monet_runtime import load_model

    with console.status(f"loading {path}"):
        return load_model(path, dtype=getattr(torch, dtype), device=device)


def _scorer(spec: str | None):
    if spec is None:
        return None
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError("--scorer must be module:function")
    return getattr(importlib.import_module(module), attr)


def _layers(spec: str | None) -> list[int] | None:
    return None if spec is None else [int(x) for x in spec.split(",") if x.strip()]


def _floats(spec: str) -> list[float]:
    return [float(x) for x in spec.split(",") if x.strip()]


# ---- build -------------------------------------------------------------------------------
@masks_app.command()
def build(
    kind: Annotated[str, typer.Argument(help="domain | language | toxicity | manual | composite")],
    source: Annotated[Path | None, typer.Argument(
        help="corpus (JSONL or one folder per label); for manual, the experts JSON")] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="checkpoint")] = None,
    name: Annotated[str, typer.Option(help="profile name; {label} is replaced per label")] = "",
    target: Annotated[str | None, typer.Option(help="label whose experts go (default: each)")]
    = None,
    criterion: Annotated[str | None, typer.Option(
        help="domain/language: specificity (the paper: routing weight) | attribution (loss "
             "increase; give --coverage) | learned (keep-gates optimised against the "
             "target). Default: learned for language (the one that meets the target on the "
             "shipped model), specificity for domain")] = None,
    factor: Annotated[float, typer.Option(
        help="target >= factor x the next label (routing weight, or loss increase for "
             "attribution; the paper: 2)")] = 2.0,
    floor: Annotated[float, typer.Option(help="min mean weight, x uniform H/E^2")] = 0.1,
    min_mass: Annotated[float, typer.Option(help="min total weight on the target")] = 1.0,
    coverage: Annotated[float | None, typer.Option(help="share of the target's mass")] = None,
    steps: Annotated[int, typer.Option(
        min=1, help="learned: optimisation steps (fewer: faster, a weaker mask)")] = 120,
    threshold: Annotated[float, typer.Option(help="toxicity: Pearson r above which")] = 0.1,
    score_field: Annotated[str, typer.Option(help="toxicity score field")] = "toxicity",
    scorer: Annotated[str | None, typer.Option(help="toxicity scorer module:function")] = None,
    text_field: str = "text",
    label_field: str = "label",
    part: Annotated[list[str] | None, typer.Option(help="composite: a part (repeat)")] = None,
    layers: Annotated[str | None, typer.Option(help="only these layers, e.g. 0,1,2")] = None,
    description: str = "",
    stats: Annotated[Path | None, typer.Option(help="statistics cache (.npz)")] = None,
    out: Annotated[Path | None, typer.Option(help="write the profile(s) here (.json)")] = None,
    push: Annotated[bool, typer.Option(help="put the profile(s) into the store")] = False,
    batch_tokens: int = 8192,
    max_length: Annotated[int, typer.Option(
        help="tokens per routed window (learned: always 256-token windows)")] = 512,
    device: str = "cpu",
    dtype: str = "float32",
    store: StoreOpt = None,
    namespace: NamespaceOpt = "monet:masks",
):
    """Build mask profiles from a corpus (or a list, or other profiles)."""
    with _errors():
        the_store = _store(store, namespace) if push or kind == "composite" else None
        if kind == "composite":
            profiles = [_build_composite(name, part or [], the_store, description)]
        else:
            if model is None:
                raise ValueError("--model is needed to route text and to identify the model")
            if source is None:
                raise ValueError(f"building a {kind} profile needs a SOURCE")
            loaded = _load_model(model, device, dtype)
            options = dict(name=name, description=description, layers=_layers(layers))
            route = dict(text_field=text_field, batch_tokens=batch_tokens, max_length=max_length)
            if kind in ("domain", "language"):
                from masks.criteria import DEFAULT_CRITERION

                criterion = criterion or DEFAULT_CRITERION[kind]
                profiles = _build_labelled(
                    loaded, source, kind, target, stats, options, route | dict(
                        label_field=label_field), criterion, factor=factor, floor=floor,
                    min_mass=min_mass, coverage=coverage, steps=steps)
            elif kind == "toxicity":
                profiles = [_build_toxicity(loaded, source, stats, options, route, threshold,
                                            score_field, _scorer(scorer))]
            elif kind == "manual":
                from masks.builders import manual_profile

                c = loaded.config
                profiles = [manual_profile(source, name=name, model_id=loaded.identity,
                                           num_layers=c.num_hidden_layers,
                                           num_experts=c.moe_experts, description=description)]
            else:
                raise ValueError(f"unknown kind '{kind}'")
        _emit(profiles, out=out, store=the_store if push else None)


def _build_labelled(model, source, kind, target, stats_path, options, route, criterion, *,
                    factor, floor, min_mass, coverage, steps):
    from masks import builders
    from masks.corpus import corpus_fingerprint, read_corpus
    from masks.schema import slug
    from masks.statistics import LabelStatistics

    name = options.pop("name") or "no-{label}"
    if criterion == "learned":  # no statistics: one search per target
        fields = dict(text_field=route["text_field"], label_field=route["label_field"])
        targets = [target] if target else sorted(
            {r.label for r in read_corpus(source, **fields) if r.label is not None})
        _check_name(name, targets)
        return [builders.learned_profile(
            model, source, t, name=slug(name.replace("{label}", t)), kind=kind, steps=steps,
            **fields, **options) for t in targets]
    quantity = builders.STATISTICS_CRITERIA.get(criterion)
    if quantity is None:
        raise ValueError("--criterion must be specificity, attribution or learned, "
                         f"got '{criterion}'")
    if criterion == "attribution":  # its own batch default: it keeps [T, E, E] per layer
        route = {k: v for k, v in route.items() if k != "batch_tokens"}
    stats = None
    if stats_path is not None and stats_path.exists():
        stats = LabelStatistics.load(stats_path)
        if (stats.model_id, stats.corpus_fingerprint, stats.quantity) != (
                model.identity, corpus_fingerprint(source), quantity):
            console.print(f"[yellow]{stats_path} is for another model, corpus or criterion: "
                          "rebuilding")
            stats = None
    if stats is None:
        stats = builders.collect_criterion_statistics(model, source, criterion, **route)
        if stats_path is not None:
            stats.save(stats_path)
    targets = [target] if target else stats.labels
    _check_name(name, targets)
    return [builders.criterion_profile(
        stats, t, criterion=criterion, name=slug(name.replace("{label}", t)), kind=kind,
        factor=factor, floor=floor, min_mass=min_mass, coverage=coverage, **options)
        for t in targets]


def _check_name(name: str, targets: list[str]) -> None:
    if len(targets) > 1 and "{label}" not in name:
        raise ValueError("--name must contain {label} when building one profile per label")


def _build_toxicity(model, source, stats_path, options, route, threshold, score_field, scorer):
    from masks.builders import collect_correlation_statistics, toxicity_profile
    from masks.schema import MaskError
    from masks.statistics import CorrelationStatistics

    if stats_path is not None and stats_path.exists():
        stats = CorrelationStatistics.load(stats_path)
    else:
        stats = collect_correlation_statistics(model, source, score_field=score_field,
                                               scorer=scorer, **route)
        if stats_path is not None:
            stats.save(stats_path)
    if stats.model_id != model.identity:
        raise MaskError(f"{stats_path} holds statistics of model {stats.model_id}")
    options["name"] = options["name"] or f"detox-{threshold:g}"
    return toxicity_profile(stats, threshold=threshold, **options)


def _build_composite(name, parts, store, description):
    from masks.builders import composite_profile

    if not parts:
        raise ValueError("a composite needs --part (repeat it)")
    return composite_profile([_load_ref(p, store) for p in parts], name=name or "composite",
                             description=description)


def _emit(profiles: list[MaskProfile], *, out: Path | None, store: MaskStore | None) -> None:
    table = Table(title="built profiles")
    for column in ("name", "kind", "target", "experts", "mean share", "version"):
        table.add_column(column)
    for profile in profiles:
        if store is not None:
            profile = store.put(profile)
        if out is not None:
            path = out if len(profiles) == 1 else out.with_name(f"{profile.name}{out.suffix}")
            path.write_text(profile.to_json())
        share = profile.removed_share()
        table.add_row(profile.name, profile.kind, profile.provenance.target or "-",
                      f"{profile.size:,}", f"{100 * sum(share) / len(share):.2f}%",
                      str(profile.version) if store is not None else "(not stored)")
    console.print(table)


# ---- eval --------------------------------------------------------------------------------
@masks_app.command("eval")
def evaluate(
    ref: Annotated[str, typer.Argument(help="NAME[@VERSION] or a profile file")],
    corpus: Annotated[Path, typer.Argument(help="labelled corpus")],
    model: ModelOpt,
    target: Annotated[str | None, typer.Option(help="target label (default: the profile's)")]
    = None,
    png: Annotated[Path | None, typer.Option(help="write the plot here")] = None,
    sweep: Annotated[str | None, typer.Option(help="coverages to sweep, e.g. 0.1,0.3,0.5")]
    = None,
    stats: Annotated[Path | None, typer.Option(help="statistics (.npz) for the sweep")] = None,
    save: Annotated[bool, typer.Option(help="store the report with the profile")] = False,
    markdown: Annotated[Path | None, typer.Option(help="write the tables here (.md)")] = None,
    samples: Annotated[int, typer.Option(
        help="continuations per prompt for the generation-level effects (0: loss only)")] = 5,
    prompts: Annotated[int, typer.Option(help="prompts per label (toxicity: in all)")] = 10,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per continuation")] = 64,
    seed: Annotated[int, typer.Option(help="seed of the first sample")] = 0,
    train_corpus: Annotated[Path | None, typer.Option(
        help="labelled texts the continuations' classifier learns from (default: train.jsonl "
             "beside CORPUS)")] = None,
    scorer: Annotated[str, typer.Option(
        help="toxicity masks: auto (Detoxify if its weights are here, else profanity-check) | "
             "profanity-check | detoxify | module:function (texts -> scores)")] = "auto",
    text_field: str = "text",
    label_field: str = "label",
    batch_tokens: int = 4096,
    max_length: int = 512,
    device: str = "cpu",
    dtype: str = "float32",
    store: StoreOpt = None,
    namespace: NamespaceOpt = "monet:masks",
):
    """Loss per label with and without a profile's mask, and what it does to generations:
    for a toxicity profile RealToxicityPrompts' figures over the corpus's texts as prompts,
    otherwise per label the share of continuations of held-out prompts in the prompt's label."""
    from masks.evaluate import evaluate_profile, plot_report, report_markdown

    from masks.continuations import Sampling

    with _errors():
        is_file = Path(ref).suffix in (".json", ".mprof") and Path(ref).exists()
        the_store = None if is_file and not save else _store(store, namespace)
        profile = _load_ref(ref, the_store)
        loaded = _load_model(model, device, dtype)
        fields = dict(text_field=text_field, label_field=label_field, batch_tokens=batch_tokens,
                      max_length=max_length)
        report = evaluate_profile(loaded, profile, corpus, target=target, **fields)
        if sweep:
            report = report.model_copy(update={"sweep": _sweep(
                loaded, profile, corpus, report.target, _floats(sweep), stats, fields)})
        if samples:
            report = report.model_copy(update={"generation": _generation(
                loaded, profile, corpus, train_corpus, scorer, prompts, fields, Sampling(
                    samples=samples, max_new_tokens=max_new_tokens, seed=seed))})
        _print_report(profile, report)
        if png is not None:
            console.print(f"plot: {plot_report(profile, png, report=report)}")
        if markdown is not None:
            markdown.write_text(report_markdown(profile, report))
            console.print(f"tables: {markdown}")
        if save:
            stored = the_store.put(profile.with_evaluation(report),
                                   expected_version=profile.version or None)
            console.print(f"saved as {stored.name}@{stored.version}")


def _generation(model, profile, corpus, train_corpus, scorer, prompts, fields, sampling):
    """The generation-level effects; None (with a note) when a labelled profile has no
    training split to learn the classifier from."""
    from masks import continuations
    from masks.corpus import read_corpus

    read = dict(text_field=fields["text_field"], label_field=fields["label_field"])
    mask = profile.mask_for(model.identity)
    if profile.kind == "toxicity":
        texts = continuations.spread([r.text for r in read_corpus(corpus, **read)], prompts)
        with console.status(f"continuing {len(texts)} prompts x {sampling.samples}"):
            return continuations.generation_report(
                model, mask, sampling=sampling, toxicity_prompts=texts,
                scorer=continuations.open_scorer(scorer))
    train = train_corpus or corpus.with_name("train.jsonl")
    if not train.exists() or train.resolve() == corpus.resolve():
        console.print("[yellow]no generation-level effects: give --train-corpus, the labelled "
                      "texts the continuations' classifier learns from")
        return None
    with console.status(f"training the classifier on {train}"):
        classifier = continuations.LabelClassifier.train(read_corpus(train, **read),
                                                         held_out=read_corpus(corpus, **read))
    held_out = continuations.held_out_prompts(read_corpus(corpus, **read), per_label=prompts)
    with console.status(f"continuing {sum(map(len, held_out.values()))} prompts x "
                        f"{sampling.samples}, with and without the mask"):
        return continuations.generation_report(model, mask, sampling=sampling, prompts=held_out,
                                               classifier=classifier)


def _sweep(model, profile, corpus, target, coverages, stats_path, fields):
    from masks.builders import collect_label_statistics
    from masks.evaluate import coverage_sweep
    from masks.statistics import LabelStatistics

    if target is None:
        raise ValueError("a sweep needs a target label (--target)")
    if stats_path is not None and stats_path.exists():
        stats = LabelStatistics.load(stats_path)
    else:
        stats = collect_label_statistics(model, corpus, **fields)
    thresholds = profile.provenance.thresholds
    return coverage_sweep(model, stats, corpus, target, coverages,
                          floor=float(thresholds.get("floor") or 0.1),
                          min_mass=float(thresholds.get("min_mass") or 1.0), **fields)


def _print_report(profile: MaskProfile, report) -> None:
    table = Table(title=f"{profile.name}: loss per label (nats/token)")
    for column in ("label", "tokens", "loss", "masked", "delta"):
        table.add_column(column, justify="right" if column != "label" else "left")
    for row in report.labels:
        style = "bold red" if row.label == report.target else None
        table.add_row(row.label, f"{row.tokens:,}", f"{row.loss:.4f}", f"{row.masked_loss:.4f}",
                      f"{row.delta:+.4f}", style=style)
    console.print(table)
    if report.target_delta is not None:
        console.print(f"target {report.target}: {report.target_delta:+.4f}   collateral "
                      f"(token-weighted): {report.collateral_delta or 0:+.4f}   worst other: "
                      f"{report.max_collateral_delta or 0:+.4f}")
    if report.sweep:
        sweep = Table(title="coverage sweep")
        for column in ("coverage", "experts", "target delta", "collateral delta"):
            sweep.add_column(column, justify="right")
        for p in report.sweep:
            sweep.add_row(f"{p.coverage:g}", f"{p.removed:,}", f"{p.target_delta:+.4f}",
                          f"{p.collateral_delta:+.4f}")
        console.print(sweep)
    if report.generation is not None:
        _print_generation(profile, report.generation)


def _print_generation(profile: MaskProfile, generation) -> None:
    console.print(f"generation: {generation.samples} continuations per prompt of up to "
                  f"{generation.max_new_tokens} tokens, judged by {generation.judge}")
    if generation.labels:
        table = Table(title=f"{profile.name}: continuations in the prompt's label")
        for column in ("prompts", "n", "no mask", "mask", "kept", "masked: classified as"):
            table.add_column(column, justify="left" if column in ("prompts", "masked: "
                                                                   "classified as") else "right")
        for r in generation.labels:
            where = ", ".join(f"{k} {v:.0%}" for k, v in sorted(r.masked.items(),
                                                                key=lambda kv: -kv[1]))
            table.add_row(r.label, f"{r.prompts}x{r.samples}", f"{r.share:.0%}",
                          f"{r.masked_share:.0%}", "-" if r.kept is None else f"{r.kept:.0%}",
                          where)
        console.print(table)
    if generation.toxicity is not None:
        t = generation.toxicity
        console.print(f"toxicity over {t.prompts} prompts x {t.samples}: expected max "
                      f"{t.expected_max_toxicity:.3f} -> {t.masked_expected_max_toxicity:.3f}, "
                      f"P(at least one toxic) {t.toxic_probability:.3f} -> "
                      f"{t.masked_toxic_probability:.3f}")


# ---- store management --------------------------------------------------------------------
@masks_app.command()
def push(
    file: Annotated[Path, typer.Argument(help="profile file (.json or .mprof)")],
    expected_version: Annotated[int | None, typer.Option(
        help="compare-and-set: the stored version this replaces (0: must not exist)")] = None,
    store: StoreOpt = None,
    namespace: NamespaceOpt = "monet:masks",
):
    """Put a profile file into the store."""
    with _errors():
        profile = _load_ref(str(file), None)
        stored = _store(store, namespace).put(profile, expected_version=expected_version)
        console.print(f"stored {stored.name}@{stored.version} ({stored.size:,} experts)")


@masks_app.command("list")
def list_profiles(store: StoreOpt = None, namespace: NamespaceOpt = "monet:masks"):
    """List the stored profiles."""
    with _errors():
        summaries = _store(store, namespace).list()
    models = sorted({s.model_id for s in summaries})
    one_model = len(models) == 1
    title = f"{len(summaries)} mask profiles" + (f" for {models[0]}" if one_model else "")
    table = Table(title=title)
    columns = ["name", "v", "kind", "experts", "target Δ", "other Δ", "created", "description"]
    if not one_model:
        columns.insert(4, "model")
    for column in columns:
        table.add_column(column, justify="right" if column in ("v", "experts") else "left",
                         min_width=None if column == "description" else len(column),
                         no_wrap=column != "description")
    table.columns[0].min_width = max([4, *(len(s.name) for s in summaries)])
    fmt = lambda x: "-" if x is None else f"{x:+.3f}"  # noqa: E731
    for s in summaries:
        row = [s.name, str(s.version), s.kind, f"{s.size:,}", fmt(s.target_delta),
               fmt(s.collateral_delta), s.created_at.strftime("%Y-%m-%d"), s.description]
        if not one_model:
            row.insert(4, s.model_id)
        table.add_row(*row)
    console.print(table)


@masks_app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME[@VERSION] or a profile file")],
    as_json: Annotated[bool, typer.Option("--json", help="print the profile as JSON")] = False,
    compact: Annotated[bool | None, typer.Option(help="compact experts in --json")] = None,
    store: StoreOpt = None,
    namespace: NamespaceOpt = "monet:masks",
):
    """Show one profile: metadata, provenance, experts per layer, evaluation."""
    with _errors():
        is_file = Path(ref).suffix in (".json", ".mprof") and Path(ref).exists()
        profile = _load_ref(ref, None if is_file else _store(store, namespace))
    if as_json:
        print(profile.to_json(compact=compact, indent=2))
        return
    info = Table(show_header=False, title=f"{profile.name}@{profile.version}")
    p = profile.provenance
    rows: list[tuple[str, Any]] = [
        ("kind", profile.kind), ("description", profile.description), ("model", profile.model_id),
        ("shape", f"{profile.num_layers} layers x {profile.num_experts}^2 experts"),
        ("removed", f"{profile.size:,}"), ("builder", p.builder), ("criterion", p.criterion),
        ("thresholds", ", ".join(f"{k}={v}" for k, v in p.thresholds.items() if v is not None)),
        ("target", p.target), ("corpus", p.corpus_fingerprint), ("tokens", p.tokens),
        ("sources", ", ".join(p.sources)), ("created", f"{p.created_at:%Y-%m-%d %H:%M} by "
                                                      f"{p.created_by}")]
    for key, value in rows:
        if value not in (None, ""):
            info.add_row(key, str(value))
    console.print(info)
    per_layer = Table(title="experts removed per layer")
    per_layer.add_column("layer")
    per_layer.add_column("experts", justify="right")
    per_layer.add_column("share", justify="right")
    for layer, share in enumerate(profile.removed_share()):
        per_layer.add_row(str(layer), f"{len(profile.experts.experts(layer)):,}",
                          f"{100 * share:.2f}%")
    console.print(per_layer)
    if profile.evaluation is not None:
        _print_report(profile, profile.evaluation)


@masks_app.command()
def delete(
    name: str,
    expected_version: Annotated[int | None, typer.Option(help="only if at this version")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    store: StoreOpt = None,
    namespace: NamespaceOpt = "monet:masks",
):
    """Delete a profile (every kept version)."""
    with _errors():
        the_store = _store(store, namespace)
        if not yes:
            typer.confirm(f"delete mask profile '{name}'?", abort=True)
        version = the_store.delete(name, expected_version=expected_version)
        console.print(f"deleted {name} (was version {version})")


@masks_app.command()
def diff(
    a: Annotated[str, typer.Argument(help="NAME[@VERSION] or file")],
    b: Annotated[str, typer.Argument(help="NAME[@VERSION] or file")],
    store: StoreOpt = None,
    namespace: NamespaceOpt = "monet:masks",
):
    """Compare the experts of two profiles, layer by layer."""
    with _errors():
        needs_store = any(not (Path(r).suffix in (".json", ".mprof") and Path(r).exists())
                          for r in (a, b))
        the_store = _store(store, namespace) if needs_store else None
        left, right = _load_ref(a, the_store), _load_ref(b, the_store)
    if left.model_id != right.model_id:
        console.print(f"[yellow]different models: {left.model_id} vs {right.model_id}")
    table = Table(title=f"{a} vs {b}")
    for column in ("layer", f"only {a}", f"only {b}", "both", "jaccard"):
        table.add_column(column, justify="right")
    only_a, only_b, both = left.experts - right.experts, right.experts - left.experts, \
        left.experts & right.experts
    for layer in sorted(set(left.experts.layers) | set(right.experts.layers)):
        n_a, n_b, n_ab = (len(m.experts(layer)) for m in (only_a, only_b, both))
        union = n_a + n_b + n_ab
        table.add_row(str(layer), f"{n_a:,}", f"{n_b:,}", f"{n_ab:,}",
                      f"{n_ab / union:.3f}" if union else "-")
    table.add_row("all", f"{len(only_a):,}", f"{len(only_b):,}", f"{len(both):,}", "",
                  style="bold")
    console.print(table)
