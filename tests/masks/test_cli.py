"""`monet masks` through typer's CliRunner, against a local store and a real Redis."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from masks.cli import masks_app
from masks.local_store import LocalMaskStore
from masks.redis_store import RedisMaskStore

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("cli") / "corpus.jsonl"
    with path.open("w") as f:
        for label, chars in (("abc", "abcdefg "), ("xyz", "tuvwxyz "), ("num", "0123456789 ")):
            for _ in range(5):
                text = "".join(rng.choice(chars) for _ in range(50))
                f.write(json.dumps({"text": text, "label": label, "toxicity": rng.random()})
                        + "\n")
    return path


def invoke(*args: str, ok: bool = True):
    result = runner.invoke(masks_app, [str(a) for a in args], env={"COLUMNS": "200"})
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_build_eval_list_show_diff_delete(tmp_path, corpus, tiny_checkpoint):
    store = tmp_path / "store"
    common = ["--store", store]
    out = invoke("build", "domain", corpus, "--model", tiny_checkpoint, "--name",
                 "no-{label}", "--push", "--stats", tmp_path / "stats.npz", *common)
    assert "no-abc" in out.output and "no-num" in out.output
    assert (tmp_path / "stats.npz").exists()
    local = LocalMaskStore(store)
    assert sorted(s.name for s in local.list()) == ["no-abc", "no-num", "no-xyz"]

    out = invoke("build", "domain", corpus, "--model", tiny_checkpoint, "--target", "xyz",
                 "--name", "wide-xyz", "--coverage", "0.5", "--factor", "1",
                 "--stats", tmp_path / "stats.npz", "--out", tmp_path / "wide.json")
    assert (tmp_path / "wide.json").exists() and "not stored" in out.output
    invoke("push", tmp_path / "wide.json", "--expected-version", "0", *common)
    conflict = invoke("push", tmp_path / "wide.json", "--expected-version", "0", *common,
                      ok=False)
    assert conflict.exit_code == 1 and "version 1" in conflict.output

    out = invoke("eval", "no-xyz", corpus, "--model", tiny_checkpoint, "--png",
                 tmp_path / "r.png", "--sweep", "0.2,0.6", "--stats", tmp_path / "stats.npz",
                 "--save", *common)
    assert "coverage sweep" in out.output and "saved as no-xyz@2" in out.output
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    evaluated = local.get("no-xyz")
    assert evaluated.evaluation.target == "xyz" and len(evaluated.evaluation.sweep) == 2

    out = invoke("list", *common)
    assert "no-xyz" in out.output and "wide-xyz" in out.output
    out = invoke("show", "no-xyz@1", *common)
    assert "specificity" in out.output and "experts removed per layer" in out.output
    data = json.loads(invoke("show", "no-xyz", "--json", *common).output)
    assert data["version"] == 2 and data["evaluation"]["target"] == "xyz"
    out = invoke("diff", "no-xyz", "wide-xyz", *common)
    assert "only no-xyz" in out.output and "jaccard" in out.output

    out = invoke("build", "composite", "--part", "no-abc", "--part", "no-num", "--name",
                 "no-abc-num", "--push", *common)
    parts = local.get("no-abc").experts | local.get("no-num").experts
    assert local.get("no-abc-num").experts == parts

    invoke("delete", "no-abc", "--yes", *common)
    missing = invoke("show", "no-abc", *common, ok=False)
    assert missing.exit_code == 1 and "not found" in missing.output
    stale = invoke("delete", "no-num", "--expected-version", "7", "--yes", *common, ok=False)
    assert "version 1" in stale.output


def test_build_toxicity_and_manual(tmp_path, corpus, tiny_checkpoint, redis_server, namespace):
    common = ["--store", redis_server.url, "--namespace", namespace]
    invoke("build", "toxicity", corpus, "--model", tiny_checkpoint, "--threshold", "0.05",
           "--push", *common)
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps({"layers": [{"layer": 1, "experts": [[2, 3]]}]}))
    invoke("build", "manual", experts, "--model", tiny_checkpoint, "--name", "hand", "--push",
           *common)
    store = RedisMaskStore.from_url(redis_server.url, namespace=namespace)
    assert {s.name: s.kind for s in store.list()} == {"detox-0.05": "toxicity", "hand": "manual"}
    assert store.get("hand").experts.to_dict() == json.loads(experts.read_text())
    bad = invoke("build", "manual", experts, "--name", "x", *common, ok=False)
    assert bad.exit_code == 1 and "--model" in bad.output
    store.close()


def test_unreachable_store_is_an_error(tmp_path):
    out = invoke("list", "--store", "redis://127.0.0.1:1/0", ok=False)
    assert out.exit_code == 1 and "error" in out.output


def test_cli_import_does_not_load_torch():
    """`monet --help` stays fast: the masks app imports torch only inside commands."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, masks, masks.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True)
    assert out.stdout.strip() == "False"


def test_build_by_attribution(tmp_path, corpus, tiny_checkpoint):
    stats = tmp_path / "stats.npz"
    invoke("build", "domain", corpus, "--model", tiny_checkpoint, "--target", "abc",
           "--name", "no-abc", "--stats", stats, "--out", tmp_path / "routing.json")
    # the routing statistics in the cache are not reused for the other criterion
    out = invoke("build", "domain", corpus, "--model", tiny_checkpoint, "--target", "abc",
                 "--criterion", "attribution", "--coverage", "0.5", "--name", "no-abc",
                 "--stats", stats, "--out", tmp_path / "attribution.json")
    assert "another model, corpus or criterion" in out.output
    profile = json.loads((tmp_path / "attribution.json").read_text())
    assert profile["provenance"]["criterion"] == "attribution"
    assert profile["provenance"]["thresholds"]["coverage"] == 0.5
    wrong = invoke("build", "domain", corpus, "--model", tiny_checkpoint, "--criterion", "x",
                   ok=False)
    assert wrong.exit_code != 0 and "--criterion" in wrong.output


def test_build_learned_one_per_label(tmp_path, corpus, tiny_checkpoint):
    invoke("build", "domain", corpus, "--model", tiny_checkpoint, "--criterion", "learned",
           "--steps", "40", "--store", tmp_path / "store", "--push")
    listed = invoke("list", "--store", tmp_path / "store").output
    assert all(f"no-{label}" in listed for label in ("abc", "num", "xyz"))
    profile = json.loads(invoke("show", "no-abc", "--json", "--store", tmp_path / "store").output)
    assert profile["provenance"]["criterion"] == "learned"
    assert profile["provenance"]["thresholds"]["steps"] == 40
    assert profile["provenance"]["target"] == "abc"
