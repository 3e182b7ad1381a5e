// Routing view: the prompt's tokens (POST /inspect) coloured by the chosen routing layer's
// top composite-expert weight; hovering or focusing a token lists its top experts, with links
// to each expert's atlas entry.
import { post } from "./api.js";
import { errorBox, expertHref, field, fmt, h, loading, replace, visible } from "./dom.js";
import { PROMPT } from "./playground.js";

function experts(token, layer) {
  return token.experts.filter((e) => e.layer === layer).sort((a, b) => b.weight - a.weight);
}

function detail(token, layer) {
  if (!token) return h("p", { class: "muted" }, "Hover, focus or click a token.");
  const list = experts(token, layer);
  return [
    h("h3", {}, `Token ${token.position}: `, h("code", {}, visible(token.text) || "(empty)"),
      h("span", { class: "muted" }, ` id ${token.token_id}, routing layer ${layer}`)),
    h("ol", { class: "experts" }, list.map((e) => h("li", {},
      h("a", { href: expertHref(e.layer, e.i, e.j), class: "expert-link" },
        `expert (${e.i}, ${e.j})`),
      ` #${e.expert}, weight ${fmt(e.weight)}`,
      h("span", { class: "muted" }, `, layers ${e.layers.join(", ")}`),
      e.removed_by.length
        ? h("span", { class: "removed" }, ` removed by ${e.removed_by.join(", ")}`) : null))),
  ];
}

function show(result, { picker, tokensBox, panel }) {
  const layers = [...new Set(result.tokens.flatMap((t) => t.experts.map((e) => e.layer)))]
    .sort((a, b) => a - b);
  const select = h("select", { name: "layer" },
                   layers.map((l) => h("option", { value: l }, `routing layer ${l}`)));
  replace(picker, field("Colour by", select));
  let pinned = null;
  const paint = () => {
    const layer = Number(select.value);
    const top = result.tokens.map((t) => experts(t, layer)[0]?.weight || 0);
    const most = Math.max(...top, 1e-9);
    const buttons = result.tokens.map((t, n) => {
      const share = top[n] / most;
      const b = h("button", {
        type: "button", class: "token", "data-position": t.position,
        "aria-pressed": String(pinned === t.position),
        "aria-label": `token ${t.position} ${JSON.stringify(t.text)}, top weight ${fmt(top[n])}`,
        style: { background: `hsl(210 90% ${Math.round(96 - 50 * share)}%)`,
                 color: share > 0.7 ? "#fff" : "#111" },
        title: experts(t, layer).slice(0, 3).map((e) => `(${e.i}, ${e.j}) ${fmt(e.weight)}`)
          .join("\n"),
      }, visible(t.text) || "\u2205");
      const look = () => replace(panel, detail(t, layer));
      b.addEventListener("mouseenter", look);
      b.addEventListener("focus", look);
      b.addEventListener("mouseleave", () => replace(panel, detail(result.tokens[pinned], layer)));
      b.addEventListener("click", () => {
        pinned = t.position;
        tokensBox.querySelectorAll(".token").forEach((x) =>
          x.setAttribute("aria-pressed", String(Number(x.dataset.position) === pinned)));
        look();
      });
      return b;
    });
    replace(tokensBox, buttons);
    replace(panel, detail(result.tokens[pinned], layer));
  };
  select.addEventListener("change", paint);
  paint();
}

export function render(main, _params, signal) {
  const text = h("textarea", { name: "text", rows: 3, required: true },
                 sessionStorage.getItem(PROMPT) || "The cat sat on the");
  const topK = h("input", { type: "number", name: "top_k", min: 1, max: 64, value: 5 });
  const form = h("form", { class: "card stack", "aria-label": "Text to inspect" },
                 field("Text", text), h("div", { class: "row" }, field("Experts per layer", topK),
                   h("button", { type: "submit" }, "Show routing")));
  const picker = h("div", {});
  const tokensBox = h("div", { class: "tokens", role: "group", "aria-label": "Tokens" });
  const panel = h("div", { class: "card detail", "aria-live": "polite" });
  const status = h("div", {});
  replace(main, h("h2", {}, "Routing"),
          h("p", { class: "muted" }, "Each token shaded by the weight of its top composite " +
            "expert in the chosen routing layer. Click a token to keep its experts listed."),
          form, status, picker, tokensBox, panel);
  let latest = null; // a new inspection cancels the one before: only the latest is shown
  signal.addEventListener("abort", () => latest?.abort());
  const inspect = async () => {
    latest?.abort();
    const mine = latest = new AbortController();
    sessionStorage.setItem(PROMPT, text.value);
    tokensBox.dataset.state = "loading";
    replace(status, loading("Routing the text"));
    try {
      const result = await post("/inspect", { text: text.value, top_k: Number(topK.value) || 5 },
                                { signal: mine.signal });
      replace(status);
      show(result, { picker, tokensBox, panel });
      tokensBox.dataset.state = "ready";
    } catch (error) {
      if (error.name !== "AbortError") replace(status, errorBox(error));
    }
  };
  form.addEventListener("submit", (event) => { event.preventDefault(); inspect(); });
  if (text.value) inspect();
}
