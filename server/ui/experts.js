// Experts: the atlas's summary and search (GET /experts, /experts/search), and an expert's
// page (GET /experts/{layer}/{i}/{j}) with "add to / remove from" the draft mask.
import { get } from "./api.js";
import { draft, errorBox, expertHref, field, fmt, h, loading, plural, replace, visible }
  from "./dom.js";

const NO_ATLAS = "No atlas is built for this model yet: run `monet atlas build CORPUS` or " +
  "POST /experts/build (admin key).";

function failed(box, error) {
  if (error.name === "AbortError") return;
  replace(box, errorBox(error), error.status === 404 && /atlas/i.test(error.message)
    ? h("p", { class: "muted" }, NO_ATLAS) : null);
}

function hits(result) {
  return h("table", { class: "grid" },
    h("caption", {}, `${result.total} experts with weight; ${result.offset + 1}\u2013` +
      `${result.offset + result.experts.length}`),
    h("thead", {}, h("tr", {}, ["expert", "layer", "specificity", "weight", "elsewhere"]
      .map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, result.experts.map((e) => h("tr", {},
      h("td", {}, h("a", { href: expertHref(e.layer, e.i, e.j) }, `(${e.i}, ${e.j})`)),
      h("td", {}, e.layer), h("td", {}, fmt(e.specificity, 2)), h("td", {}, fmt(e.weight, 4)),
      h("td", {}, fmt(e.weight_elsewhere, 4))))));
}

export function render(main, _params, signal) {
  const about = h("div", {}, loading("Loading the atlas"));
  const q = h("input", { type: "search", name: "q", placeholder: "a text" });
  const label = h("select", { name: "label" }, h("option", { value: "" }, "(by text)"));
  const results = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "card row", "aria-label": "Search experts" },
                 field("Text", q), field("or label", label),
                 h("button", { type: "submit" }, "Search"));
  replace(main, h("h2", {}, "Experts"), about, form, results);
  get("/experts", { signal }).then((s) => {
    replace(about, h("p", {}, `Atlas of ${s.model_id}: ${s.documents} documents, ${s.tokens} ` +
      `tokens, routing layers ${s.routing_layers.join(", ")}, ${s.num_experts}\u00b2 ` +
      `composite experts each, labels ${s.labels.join(", ") || "none"}.`));
    s.labels.forEach((l) => label.append(h("option", { value: l }, l)));
  }).catch((error) => failed(about, error));
  let offset = 0;
  const search = async () => {
    const params = new URLSearchParams({ offset, limit: 20 });
    if (label.value) params.set("label", label.value); else params.set("q", q.value);
    replace(results, loading("Searching"));
    try {
      const result = await get(`/experts/search?${params}`, { signal });
      const pager = h("div", { class: "row" },
        h("button", { type: "button", class: "secondary", disabled: offset === 0,
                      onclick: () => { offset = Math.max(0, offset - 20); search(); } },
          "Previous"),
        h("button", { type: "button", class: "secondary",
                      disabled: offset + result.experts.length >= result.total,
                      onclick: () => { offset += 20; search(); } }, "Next"));
      replace(results, hits(result), pager);
    } catch (error) { failed(results, error); }
  };
  form.addEventListener("submit", (event) => { event.preventDefault(); offset = 0; search(); });
}

function context(c) {
  const [start, end] = c.highlight;
  return h("li", {}, h("span", { class: "muted" }, `doc ${c.document}, token ${c.position}, ` +
    `weight ${fmt(c.weight)}: `),
    h("span", { class: "context" }, visible(c.text.slice(0, start)),
      h("mark", {}, visible(c.text.slice(start, end))), visible(c.text.slice(end))));
}

function bars(means) {
  const most = Math.max(...Object.values(means), 1e-12);
  return h("table", { class: "grid bars" }, h("caption", {}, "Mean weight per corpus label"),
    h("tbody", {}, Object.entries(means).map(([label, w]) => h("tr", {},
      h("th", { scope: "row" }, label),
      h("td", {}, h("span", { class: "bar", style: { width: `${(100 * w) / most}%` } })),
      h("td", {}, fmt(w, 5))))));
}

function draftButtons(e, layer) {
  const status = h("p", { role: "status", class: "muted" });
  const box = h("div", { class: "row" });
  const paint = () => {
    const d = draft.load();
    const inDraft = draft.has(d, layer, e.i, e.j);
    const name = d.name ? `draft "${d.name}"` : "the draft";
    const toggle = h("button", { type: "button", id: "draft-toggle",
                                 onclick: () => {
                                   draft.toggle(draft.load(), layer, e.i, e.j, !inDraft);
                                   paint();
                                 } },
                     inDraft ? "Remove from mask" : "Add to mask");
    status.textContent = `${inDraft ? "In" : "Not in"} ${name} (layer ${layer}; ` +
      `${plural(draft.size(draft.load()), "expert")} in the draft).`;
    replace(box, toggle, h("a", { href: "#/editor" }, "Open the mask editor"));
  };
  paint();
  return [box, status];
}

export function renderExpert(main, params, signal) {
  const [layer, i, j] = params.map(Number);
  const body = h("div", {}, loading("Loading the expert"));
  replace(main, h("h2", {}, `Expert (${i}, ${j}) of layer ${layer}`), body);
  if (![layer, i, j].every(Number.isInteger)) {
    replace(body, errorBox({ status: 0, message: "the address needs #/expert/LAYER/I/J" }));
    return;
  }
  get(`/experts/${layer}/${i}/${j}`, { signal }).then((e) => {
    replace(body,
      h("p", {}, `Composite expert #${e.expert}; routing group of layers `,
        e.layers.map((l, n) => [n ? ", " : "", l === layer ? h("strong", {}, l)
          : h("a", { href: expertHref(l, i, j) }, l)]),
        ` (routing layer ${e.routing_layer}); mean weight ${fmt(e.mean, 5)} per token.`),
      draftButtons(e, layer),
      h("div", { class: "columns" },
        h("section", { class: "card" }, h("h3", {}, "Top contexts"),
          e.contexts.length ? h("ol", { class: "contexts" }, e.contexts.map(context))
            : h("p", { class: "muted" }, "No context in the corpus.")),
        h("section", { class: "card" }, h("h3", {}, "Labels and tokens"), bars(e.label_means),
          h("table", { class: "grid" }, h("caption", {}, "Top tokens (summed weight)"),
            h("tbody", {}, e.tokens.map((t) => h("tr", {},
              h("th", { scope: "row" }, h("code", {}, visible(t.text) || "\u2205")),
              h("td", {}, fmt(t.weight))))))),
      ),
      h("section", { class: "card" }, h("h3", {}, "Removed by"),
        e.removed_by.length ? h("ul", {}, e.removed_by.map((r) => h("li", {},
          h("a", { href: "#/profiles" }, r.profile), ` in layers ${r.layers.join(", ")}`)))
          : h("p", { class: "muted" }, "No stored profile removes it.")));
  }).catch((error) => failed(body, error));
}
