// The evaluation card of a profile (GET /masks/{name}/report): size and removed share per
// layer, provenance, per-label loss deltas, and the generation-level table when measured.
import { fmt, h } from "./dom.js";

function shareBars(shares) {
  const most = Math.max(...shares, 1e-12);
  return h("table", { class: "grid bars" }, h("caption", {}, "Removed share per layer"),
    h("tbody", {}, shares.map((s, layer) => h("tr", {}, h("th", { scope: "row" }, `layer ${layer}`),
      h("td", {}, h("span", { class: "bar", style: { width: `${(100 * s) / most}%` } })),
      h("td", {}, `${fmt(100 * s, 2)}%`)))));
}

function losses(ev) {
  const most = Math.max(...ev.labels.map((l) => Math.abs(l.delta)), 1e-12);
  return h("table", { class: "grid bars losses" },
    h("caption", {}, `Loss per label (nats/token)${ev.target ? `; target ${ev.target}` : ""}`),
    h("thead", {}, h("tr", {}, ["label", "tokens", "loss", "masked", "\u0394", ""]
      .map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, ev.labels.map((l) => h("tr", { class: l.label === ev.target ? "target" : "" },
      h("th", { scope: "row" }, l.label), h("td", {}, l.tokens), h("td", {}, fmt(l.loss)),
      h("td", {}, fmt(l.masked_loss)), h("td", {}, fmt(l.delta)),
      h("td", {}, h("span", { class: "bar",
                              style: { width: `${(100 * Math.abs(l.delta)) / most}%` } }))))));
}

function generation(g) {
  const rows = g.labels.map((l) => h("tr", {}, h("th", { scope: "row" }, l.label),
    h("td", {}, `${l.prompts} \u00d7 ${l.samples}`), h("td", {}, fmt(l.share, 2)),
    h("td", {}, fmt(l.masked_share, 2)), h("td", {}, fmt(l.kept, 2))));
  const tox = g.toxicity;
  return [
    g.labels.length ? h("table", { class: "grid generation" },
      h("caption", {}, `Generations judged by ${g.judge} (${g.max_new_tokens} tokens, ` +
        `temperature ${g.temperature}, seed ${g.seed})`),
      h("thead", {}, h("tr", {}, ["label", "prompts \u00d7 samples", "own share", "masked",
        "kept"].map((c) => h("th", { scope: "col" }, c)))), h("tbody", {}, rows)) : null,
    tox ? h("table", { class: "grid" }, h("caption", {}, "Toxicity"),
      h("thead", {}, h("tr", {}, ["", "without", "with the mask"].map((c) =>
        h("th", { scope: "col" }, c)))),
      h("tbody", {},
        h("tr", {}, h("th", { scope: "row" }, "expected max toxicity"),
          h("td", {}, fmt(tox.expected_max_toxicity)),
          h("td", {}, fmt(tox.masked_expected_max_toxicity))),
        h("tr", {}, h("th", { scope: "row" }, "toxic probability"),
          h("td", {}, fmt(tox.toxic_probability)),
          h("td", {}, fmt(tox.masked_toxic_probability))))) : null,
  ];
}

export function reportCard(r) {
  const p = r.provenance || {};
  const ev = r.evaluation;
  return h("section", { class: "card report", "aria-label": `Evaluation of ${r.name}` },
    h("h3", {}, `${r.name}@${r.version}`, h("span", { class: "muted" }, ` ${r.kind}`)),
    r.description ? h("p", {}, r.description) : null,
    h("p", {}, `${r.size} composite experts removed; ${fmt(100 * r.removed_share_mean, 2)}% ` +
      `of each layer on average. Built by ${p.builder || "?"}` +
      `${p.criterion ? ` (${p.criterion})` : ""}${p.target ? `, target ${p.target}` : ""}` +
      `${p.created_by ? `, by ${p.created_by}` : ""}.`),
    shareBars(r.removed_share),
    ev ? [h("p", {}, `Target \u0394 ${fmt(ev.target_delta)}, collateral \u0394 ` +
            `${fmt(ev.collateral_delta)} nats/token.`), losses(ev),
          ev.generation ? generation(ev.generation)
            : h("p", { class: "muted" }, "No generation-level figures (`monet masks eval " +
                "NAME CORPUS --save` measures them).")]
      : h("p", { class: "muted" }, "Not evaluated: build with \u201cevaluate\u201d or run " +
          "`monet masks eval NAME CORPUS --save`."));
}
