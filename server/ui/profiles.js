// Profiles: every stored profile (GET /masks) with version, kind and size; each one's
// evaluation card (GET /masks/{name}/report), and shortcuts to the editor and the playground.
import { get } from "./api.js";
import { errorBox, fmt, h, loading, replace } from "./dom.js";
import { loadIntoDraft } from "./editor.js";
import { reportCard } from "./report.js";
import { CHOSEN } from "./playground.js";

function row(p, card, signal) {
  const show = h("button", { type: "button", class: "secondary", "aria-expanded": "false" },
                 "Evaluation card");
  show.addEventListener("click", async () => {
    if (show.getAttribute("aria-expanded") === "true") {
      show.setAttribute("aria-expanded", "false");
      replace(card);
      return;
    }
    show.setAttribute("aria-expanded", "true");
    replace(card, loading("Loading the report"));
    try { replace(card, reportCard(await get(`/masks/${encodeURIComponent(p.name)}/report`,
                                             { signal }))); }
    catch (error) { if (error.name !== "AbortError") replace(card, errorBox(error)); }
  });
  const edit = h("button", { type: "button", class: "secondary", onclick: async () => {
    try { await loadIntoDraft(p.name); location.hash = "#/editor"; }
    catch (error) { replace(card, errorBox(error)); } } }, "Edit in draft");
  const tryIt = h("button", { type: "button", class: "secondary", onclick: () => {
    sessionStorage.setItem(CHOSEN, JSON.stringify([p.name]));
    location.hash = "#/playground"; } }, "Try");
  return h("tr", { "data-name": p.name },
    h("th", { scope: "row" }, p.name), h("td", { class: "version" }, p.version),
    h("td", {}, p.kind), h("td", { class: "size" }, p.size),
    h("td", {}, fmt(p.target_delta)), h("td", {}, fmt(p.collateral_delta)),
    h("td", { class: "muted" }, (p.created_at || "").slice(0, 19).replace("T", " ")),
    h("td", { class: "actions" }, show, edit, tryIt));
}

export function render(main, _params, signal) {
  const body = h("div", {}, loading("Loading profiles"));
  const card = h("div", { id: "card", "aria-live": "polite" });
  replace(main, h("h2", {}, "Profiles"), body, card);
  get("/masks", { signal }).then((list) => {
    if (!list.length) {
      replace(body, h("p", { class: "muted" }, "No profile stored yet: make one in the ",
                      h("a", { href: "#/editor" }, "mask editor"), "."));
      return;
    }
    list.sort((a, b) => a.name.localeCompare(b.name));
    replace(body, h("div", { class: "scroll" }, h("table", { class: "grid profiles" },
      h("caption", {}, `${list.length} stored profiles`),
      h("thead", {}, h("tr", {}, ["name", "version", "kind", "size", "target \u0394",
        "collateral \u0394", "created", ""].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, list.map((p) => row(p, card, signal))))));
  }).catch((error) => error.name !== "AbortError" && replace(body, errorBox(error)));
}
