// Mask editor: the draft profile (sessionStorage) grouped by layer; load a stored profile into
// it, save it with If-Match (a conflict is shown, never overwritten), delete, build from
// labelled examples as a background job (progress from /jobs/{id}), and its evaluation card.
import { call, follow, get, post } from "./api.js";
import { draft, errorBox, expertHref, field, h, loading, plural, replace } from "./dom.js";
import { reportCard } from "./report.js";

const JOB = "monet.job";
const SHOWN_OPEN = 40;
const SHOWN = 400;

// The write's precondition: the version the draft was loaded from, or "create only".
const precondition = (d) => (d.base ? { "If-Match": `"${d.base}"` } : { "If-None-Match": "*" });

export async function loadIntoDraft(name) {
  const { data, response } = await call("GET", `/masks/${encodeURIComponent(name)}?compact=false`);
  const layers = {};
  for (const l of data.experts.layers) layers[l.layer] = l.experts;
  const version = Number((response.headers.get("ETag") || "").replace(/\D/g, "")) || data.version;
  const d = { name: data.name, description: data.description || "", base: version, layers };
  draft.save(d);
  return d;
}

// "label<TAB>text", "label: text", or a JSON object per line ({"text", "label", "score"}).
export function parseExamples(text, kind) {
  const records = [];
  text.split(/\r?\n/).forEach((line, n) => {
    if (!line.trim()) return;
    if (line.trim().startsWith("{")) {
      try { records.push(JSON.parse(line)); } catch {
        throw new Error(`line ${n + 1}: not valid JSON`);
      }
      return;
    }
    const m = line.match(/^([^\t:]+)[\t:]\s?(.*)$/);
    if (!m || !m[2]) throw new Error(`line ${n + 1}: write "label: text" (or a JSON object)`);
    const [, tag, body] = m;
    if (kind === "toxicity") {
      const score = Number(tag);
      if (!Number.isFinite(score)) throw new Error(`line ${n + 1}: a toxicity score first`);
      records.push({ text: body, score });
    } else records.push({ text: body, label: tag.trim() });
  });
  if (!records.length) throw new Error("no examples: one per line");
  return records;
}

function expertsList(d, repaint) {
  const layers = Object.keys(d.layers).map(Number).sort((a, b) => a - b);
  if (!layers.length) {
    return h("p", { class: "muted", id: "draft-empty" }, "The draft removes no expert yet: add " +
             "some from an expert's page (", h("a", { href: "#/routing" }, "routing view"),
             ", ", h("a", { href: "#/experts" }, "search"), ") or below.");
  }
  // Large drafts (a built profile may remove thousands of experts a layer): a layer's list is
  // folded past SHOWN_OPEN experts and shows at most SHOWN of them.
  return layers.map((layer) => h("details", { class: "layer", "data-layer": layer,
                                              open: d.layers[layer].length <= SHOWN_OPEN },
    h("summary", {}, `Layer ${layer}: ${plural(d.layers[layer].length, "expert")}`),
    d.layers[layer].length > SHOWN ? h("p", { class: "muted" }, `The first ${SHOWN} shown; ` +
      "all are saved.") : null,
    h("ul", { class: "chips" }, d.layers[layer].slice(0, SHOWN).map(([i, j]) => h("li", {},
      h("a", { href: expertHref(layer, i, j) }, `(${i}, ${j})`),
      h("button", { type: "button", class: "chip-x", "aria-label": `Remove (${i}, ${j}) of ` +
                    `layer ${layer}`, onclick: () => {
        draft.toggle(draft.load(), layer, i, j, false); repaint(); } }, "\u00d7"))))));
}

function addForm(repaint) {
  const nums = ["layer", "i", "j"].map((n) => h("input", { type: "number", min: 0, name: n,
                                                          required: true, class: "narrow" }));
  const form = h("form", { class: "row", "aria-label": "Add an expert" },
                 nums.map((input, n) => field(["Layer", "i", "j"][n], input)),
                 h("button", { type: "submit", class: "secondary" }, "Add expert"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const [l, i, j] = nums.map((x) => Number(x.value));
    draft.toggle(draft.load(), l, i, j, true);
    repaint();
  });
  return form;
}

function buildForm(state) {
  const kind = h("select", { name: "kind" }, ["domain", "language", "toxicity"].map((k) =>
    h("option", { value: k }, k)));
  const target = h("input", { name: "target", placeholder: "e.g. code" });
  const criterion = h("select", { name: "criterion" }, ["", "specificity", "attribution",
    "learned"].map((c) => h("option", { value: c }, c || "(the kind's default)")));
  const examples = h("textarea", { name: "examples", rows: 6, placeholder:
    "code: def f(x): return x\nprose: The cat sat on the mat.\n" +
    "{\"text\": \"...\", \"label\": \"code\"}" });
  const upload = h("input", { type: "file", name: "file", accept: ".jsonl,.txt,.json,.tsv" });
  const evaluate = h("input", { type: "checkbox", name: "evaluate", checked: true });
  const form = h("form", { class: "card stack", "aria-label": "Build from labelled examples" },
    h("h3", {}, "Build from labelled examples"),
    h("div", { class: "row" }, field("Kind", kind), field("Target label", target),
      field("Criterion", criterion)),
    field("Examples, one per line", examples, "label: text, or a JSON object per line " +
          "(toxicity: score: text)"),
    field("or upload a file", upload),
    h("label", { class: "check" }, evaluate, " evaluate (per-label loss with the mask)"),
    h("button", { type: "submit" }, "Build"));
  upload.addEventListener("change", async () => {
    if (upload.files[0]) examples.value = await upload.files[0].text();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const d = draft.load();
    if (!d.name) { state.say(errorBox({ status: 0, message: "name the draft first" })); return; }
    let records;
    try { records = parseExamples(examples.value, kind.value); } catch (e) {
      state.say(errorBox({ status: 0, message: `examples: ${e.message}` }));
      return;
    }
    const body = { kind: kind.value, records, evaluate: evaluate.checked,
                   description: d.description || `built in the web page (${kind.value})` };
    if (kind.value !== "toxicity") body.target = target.value;
    if (criterion.value) body.criterion = criterion.value;
    try {
      const { data } = await call("POST", `/masks/${encodeURIComponent(d.name)}/build`,
                                  { body, headers: precondition(d) });
      sessionStorage.setItem(JOB, JSON.stringify({ id: data.id, name: d.name }));
      state.follow(data.id, d.name);
    } catch (error) { state.say(errorBox(error)); }
  });
  return form;
}

export function render(main, _params, signal) {
  const d0 = draft.load();
  const name = h("input", { name: "name", value: d0.name, pattern: "[a-z0-9][a-z0-9._-]*",
                            placeholder: "e.g. no-code", spellcheck: "false" });
  const description = h("input", { name: "description", value: d0.description });
  const base = h("p", { class: "muted", id: "draft-base" });
  const list = h("div", { id: "draft-experts" });
  const message = h("div", { id: "editor-message", "aria-live": "polite" });
  const progress = h("div", { id: "job", "aria-live": "polite" });
  const report = h("div", { id: "report" });
  const stored = h("select", { name: "stored" }, h("option", { value: "" }, "(choose)"));
  const say = (...nodes) => replace(message, ...nodes);
  const repaint = () => {
    const d = draft.load();
    base.textContent = d.base ? `Loaded from ${d.name}@${d.base}: saving needs that version ` +
      "to be the stored one." : "A new profile: saving will not replace an existing one.";
    replace(list, h("p", {}, `${plural(draft.size(d), "expert")} in the draft.`),
            expertsList(d, repaint));
  };
  const edit = () => {
    const d = draft.load();
    d.name = name.value.trim();
    d.description = description.value;
    draft.save(d);
  };
  name.addEventListener("input", edit);
  description.addEventListener("input", edit);

  const showReport = async (n) => {
    replace(report, loading("Loading the report"));
    try {
      replace(report, reportCard(await get(`/masks/${encodeURIComponent(n)}/report`, { signal })));
    }
    catch (error) { if (error.name !== "AbortError") replace(report, errorBox(error)); }
  };
  const load = async (n) => {
    try {
      const d = await loadIntoDraft(n);
      name.value = d.name;
      description.value = d.description;
      repaint();
      say(h("p", { class: "ok" }, `Loaded ${d.name}@${d.base} into the draft.`));
    } catch (error) { say(errorBox(error)); }
  };
  const save = async () => {
    edit();
    const d = draft.load();
    if (!d.name) { say(errorBox({ status: 0, message: "name: give the draft a name" })); return; }
    say(loading("Saving"));
    try {
      const { data } = await call("PUT", `/masks/${encodeURIComponent(d.name)}`, {
        body: { description: d.description, kind: "manual", layers: draft.body(d) },
        headers: precondition(d) });
      d.base = data.version;
      draft.save(d);
      repaint();
      say(h("p", { class: "ok", id: "saved" }, `Saved ${data.name}@${data.version} ` +
            `(${plural(data.size, "expert")}).`));
    } catch (error) {
      if (error.status !== 409 || error.param !== "If-Match") { say(errorBox(error)); return; }
      say(h("div", { class: "conflict", role: "alert" },
        h("p", {}, h("strong", {}, "Conflict: not saved. "), error.message),
        h("p", {}, d.base ? `The draft was loaded from version ${d.base}; someone has saved ` +
          "since. Your draft is kept here; the stored profile was not changed."
          : "A profile of this name exists already; load it first, or choose another name."),
        h("button", { type: "button", class: "secondary", onclick: () => load(d.name) },
          "Load the stored version (replaces the draft)")));
    }
  };
  let armed = false;
  const remove = async (button) => {
    const d = draft.load();
    if (!d.name) return;
    if (!armed) {
      armed = true;
      button.textContent = `Really delete ${d.name}?`;
      return;
    }
    armed = false;
    button.textContent = "Delete";
    try {
      const headers = d.base ? { "If-Match": `"${d.base}"` } : {};
      const { data } = await call("DELETE", `/masks/${encodeURIComponent(d.name)}`, { headers });
      d.base = 0;
      draft.save(d);
      repaint();
      say(h("p", { class: "ok" },
            `Deleted ${data.name}@${data.deleted_version}; the draft is kept.`));
    } catch (error) { say(errorBox(error)); }
  };
  const followJob = async (id, n) => {
    const bar = h("progress", { max: 1, value: 0, "aria-label": "Build progress" });
    const line = h("span", { role: "status" }, "Queued\u2026");
    replace(progress, h("div", { class: "card row" }, h("strong", {}, `Building ${n}`), bar, line));
    try {
      const job = await follow(id, (j) => {
        bar.value = j.progress;
        line.textContent = `${j.status}: ${Math.round(100 * j.progress)}% ${j.message || ""}`;
      }, { signal }); // leaving the editor stops polling; coming back resumes it
      sessionStorage.removeItem(JOB);
      if (job.status === "failed") {
        replace(progress, errorBox({ status: 0, message: job.error }));
        return;
      }
      line.textContent = `Built ${job.result.name}@${job.result.version}: ` +
        `${plural(job.result.size, "expert")}.`;
      progress.dataset.done = "true";
      if (draft.load().name === n) await load(n);
      showReport(n);
    } catch (error) {
      if (error.name === "AbortError") return;
      if (error.status === 404) sessionStorage.removeItem(JOB); // gone (another replica?)
      replace(progress, errorBox(error));
    }
  };

  const del = h("button", { type: "button", class: "danger", onclick: (e) => remove(e.target) },
                "Delete");
  replace(main, h("h2", {}, "Mask editor"),
    h("form", { class: "card stack", "aria-label": "Draft profile",
                onsubmit: (e) => { e.preventDefault(); save(); } },
      h("div", { class: "row" }, field("Name", name, "a-z, 0-9, . _ -"),
        field("Description", description)), base, list,
      h("div", { class: "row" }, h("button", { type: "submit", id: "save" }, "Save"),
        h("button", { type: "button", class: "secondary", onclick: () => showReport(name.value) },
          "Evaluation report"), del,
        h("button", { type: "button", class: "secondary", onclick: () => {
          draft.save({ name: "", description: "", base: 0, layers: {} });
          name.value = ""; description.value = ""; repaint(); say(); } }, "New draft"))),
    message, progress, report,
    h("div", { class: "columns" }, buildForm({ say, follow: followJob }),
      h("div", {},
        h("div", { class: "card" }, h("h3", {}, "Add by hand"), addForm(repaint)),
        h("form", { class: "card row", "aria-label": "Load a stored profile",
                    onsubmit: (e) => {
                      e.preventDefault();
                      if (stored.value) load(stored.value);
                    } },
          field("Load a stored profile", stored),
          h("button", { type: "submit", class: "secondary" }, "Load into the draft")))));
  repaint();
  get("/masks", { signal }).then((l) => l.forEach((p) =>
    stored.append(h("option", { value: p.name }, `${p.name} (v${p.version})`))))
    .catch(() => {});
  const pending = JSON.parse(sessionStorage.getItem(JOB) || "null");
  if (pending) followJob(pending.id, pending.name);
}
