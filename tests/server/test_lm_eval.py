"""EleutherAI's lm-eval drives the service: the `local-completions` model with
`tokenizer_backend=remote` (so /tokenize, /detokenize, /tokenizer_info and echo + logprobs
scoring), on a small loglikelihood task per language shipped in lm_eval_task/ (held-out
test-split texts of the default model's corpus: 200 characters of context, the next 80 to
score), once on the base model and once on a profile named through `model`.

The profile is the paper's Perl mask (specificity), built by `monet masks build` from this
machine's corpus (seconds at this size): its removal lowers the log-likelihood of Perl's
continuations most, the other languages' by less than two thirds of that."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_support import ROOT, ServerProcess

TASKS = Path(__file__).parent / "lm_eval_task"
LANGUAGES = ["c", "english", "javascript", "perl", "python"]
MODEL = "monet-default"


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """The default model on the runtime engine, a local store, no keys (localhost only)."""
    tmp = tmp_path_factory.mktemp("lm-eval")
    env = {k: "" for k in os.environ if k.startswith("MONET_")}
    env |= {"MONET_API_KEYS": "", "MONET_ADMIN_KEYS": "", "MONET_SERVED_MODEL_NAME": MODEL}
    proc = ServerProcess(tmp, args=["--store-dir", str(tmp / "masks")], env=env)
    yield proc.start()
    proc.stop()


@pytest.fixture(scope="module")
def no_perl(default_server, tmp_path_factory):
    from training.corpus import build_corpus

    corpus = tmp_path_factory.mktemp("lm-eval-corpus")
    if build_corpus(corpus, max_chars_per_label=60_000).missing:
        pytest.skip("this machine lacks the corpus sources")
    env = {**os.environ, "MONET_REDIS_URL": "",
           "MONET_STORE_DIR": str(Path(default_server.log_path).parent / "masks")}
    r = subprocess.run([sys.executable, "-m", "monet_cli.main", "masks", "build", "language",
                        str(corpus / "train.jsonl"), "--model",
                        str(ROOT / "monet_runtime" / "default_model"), "--target", "perl",
                        "--name", "no-perl", "--criterion", "specificity", "--push"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return "no-perl"


def _task_dir(tmp: Path) -> Path:
    """One lm-eval task per language, over the shipped files (absolute paths: lm-eval reads
    data_files from the working directory)."""
    for lang in LANGUAGES:
        (tmp / f"{lang}.yaml").write_text(json.dumps({
            "task": f"monet_lang_{lang}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(TASKS / f"{lang}.jsonl")}},
            "test_split": "test", "output_type": "loglikelihood",
            "doc_to_text": "{{context}}", "doc_to_target": "{{continuation}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                             "higher_is_better": False}]}))
    return tmp


def _evaluate(url: str, model: str, tasks: Path) -> dict[str, float]:
    """Mean log-likelihood of a continuation (nats), per language."""
    import math

    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=[f"monet_lang_{lang}" for lang in LANGUAGES],
        model_args={"base_url": f"{url}/v1/completions", "model": model,
                    "tokenizer_backend": "remote", "tokenized_requests": True,
                    "max_length": 1024, "num_concurrent": 1, "max_retries": 1},
        task_manager=TaskManager(include_path=str(tasks)), batch_size=1,
        log_samples=False, cache_requests=False)
    return {lang: -math.log(out["results"][f"monet_lang_{lang}"]["perplexity,none"])
            for lang in LANGUAGES}


@pytest.mark.slow
def test_lm_eval_scores_move_on_the_target_language_only(default_server, no_perl, tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    tasks = _task_dir(tmp_path)
    base = _evaluate(default_server.url, MODEL, tasks)
    masked = _evaluate(default_server.url, no_perl, tasks)
    drop = {lang: base[lang] - masked[lang] for lang in LANGUAGES}  # nats per continuation
    print("lm-eval, mean log-likelihood of an 80-character continuation (nats): "
          + ", ".join(f"{lang} {base[lang]:.1f} -> {masked[lang]:.1f}" for lang in LANGUAGES))
    # Measured (this corpus, greedy scoring, deterministic): Perl 2.6 nats, the others 0.5 to
    # 1.5. The paper's criterion from 40 texts a language is a weak mask on this small model;
    # the learned one is stronger but takes minutes to build.
    others = [abs(drop[lang]) for lang in LANGUAGES if lang != "perl"]
    assert drop["perl"] > 1.5 * max(others) and drop["perl"] > 2.0, drop
    # lm-eval's score through the service is the runtime model's own log-likelihood
    assert abs(base["perl"] - _reference("perl")) < 1e-3 * abs(base["perl"])


def _reference(lang: str) -> float:
    """The mean log-likelihood of the continuations, from the runtime's forward (no BOS: lm-eval's
    remote tokenizer encodes without special tokens)."""
    import torch

    from monet_runtime import load_model

    model = load_model(ROOT / "monet_runtime" / "default_model")
    docs = [json.loads(line) for line in (TASKS / f"{lang}.jsonl").read_text().splitlines()]
    total = 0.0
    for doc in docs:
        context = model.tokenizer.encode(doc["context"], add_bos=False)
        ids = context + model.tokenizer.encode(doc["continuation"], add_bos=False)
        with torch.inference_mode():
            lp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        total += sum(lp[t - 1, ids[t]].item() for t in range(len(context), len(ids)))
    return total / len(docs)
