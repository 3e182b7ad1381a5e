// DOM helpers (elements from data, never from HTML strings), loading and error states, and
// the draft mask profile kept in sessionStorage.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2).toLowerCase(), value);
    else if (name === "class") el.className = value;
    else if (name === "style" && typeof value === "object") Object.assign(el.style, value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// Control characters made visible (the small model's byte tokens include them).
export function visible(text) {
  return String(text).replace(/[\u0000-\u001f\u007f]/g, (c) =>
    c === "\n" ? "\u23ce\n" : c === "\t" ? "\u21e5" :
    c === "\u007f" ? "\u2421" : String.fromCharCode(0x2400 + c.charCodeAt(0)));
}

export const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

export const fmt = (x, digits = 3) =>
  x === null || x === undefined ? "\u2013" : Number(x).toFixed(digits);

export const loading = (what = "Loading") =>
  h("p", { class: "loading", role: "status" }, `${what}\u2026`);

// An API error's message, and what to do about it.
export function errorBox(error) {
  const hint = error.status === 401 ? " Enter an API key above."
    : error.status === 403 ? " This needs an admin key." : "";
  return h("p", { class: "error", role: "alert" },
           h("strong", {}, error.status ? `Error ${error.status}: ` : "Error: "),
           error.message, hint);
}

export function field(label, control, help) {
  const id = control.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  control.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, label), control,
           help ? h("small", { class: "muted" }, help) : null);
}

// The draft profile: {name, description, base (stored version it was loaded from, or 0),
// layers: {"<layer>": [[i, j], ...]}}.
const DRAFT = "monet.draft";

export const draft = {
  load() {
    try {
      const d = JSON.parse(sessionStorage.getItem(DRAFT));
      if (d && typeof d === "object" && d.layers) return d;
    } catch { /* a damaged draft starts again */ }
    return { name: "", description: "", base: 0, layers: {} };
  },
  save(d) { sessionStorage.setItem(DRAFT, JSON.stringify(d)); },
  has(d, layer, i, j) {
    return (d.layers[layer] || []).some(([a, b]) => a === i && b === j);
  },
  toggle(d, layer, i, j, on) {
    const list = (d.layers[layer] || []).filter(([a, b]) => !(a === i && b === j));
    if (on) list.push([i, j]);
    list.sort((x, y) => x[0] - y[0] || x[1] - y[1]);
    if (list.length) d.layers[layer] = list; else delete d.layers[layer];
    draft.save(d);
  },
  size: (d) => Object.values(d.layers).reduce((n, l) => n + l.length, 0),
  body(d) {
    return Object.keys(d.layers).map(Number).sort((a, b) => a - b)
      .map((layer) => ({ layer, experts: d.layers[layer] }));
  },
};

export const expertHref = (layer, i, j) => `#/expert/${layer}/${i}/${j}`;
