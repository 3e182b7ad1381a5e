// Playground: one prompt, continued without and with the chosen profiles, both streamed
// (POST /generate, stream=true) side by side, with the profiles the server applied.
import { get, stream } from "./api.js";
import { errorBox, field, h, loading, plural, replace, visible } from "./dom.js";

export const PROMPT = "monet.prompt";
export const CHOSEN = "monet.profiles";

function column(title, id) {
  const out = h("pre", { class: "continuation", id: `${id}-text`, "aria-live": "polite",
                         "aria-busy": "false", "aria-labelledby": `${id}-title` });
  const status = h("p", { class: "muted", id: `${id}-status`, role: "status" }, "Not run yet.");
  const applied = h("p", { class: "applied", id: `${id}-applied` });
  const box = h("section", { class: "card column", id },
                h("h3", { id: `${id}-title` }, title), applied, out, status);
  return { box, out, status, applied, text: "", tokens: [] };
}

function profilePicker(list, chosen) {
  if (!list.length) {
    return h("p", { class: "muted" }, "No profiles stored yet: build or save one in the ",
             h("a", { href: "#/editor" }, "mask editor"), ".");
  }
  return h("fieldset", { class: "profiles-pick" }, h("legend", {}, "Mask profiles (their union)"),
           list.map((p) => h("label", { class: "check" },
             h("input", { type: "checkbox", name: "profile", value: p.name,
                          checked: chosen.includes(p.name) }),
             ` ${p.name}`,
             h("span", { class: "muted" }, ` v${p.version}, ${plural(p.size, "expert")}`))));
}

async function run(cols, body, profiles, signal) {
  const sides = [[cols.base, null], [cols.masked, profiles]];
  const one = async ([col, names]) => {
    col.text = "";
    col.tokens = [];
    replace(col.out);
    replace(col.applied);
    col.box.querySelector(".error")?.remove();
    col.out.setAttribute("aria-busy", "true");
    col.status.textContent = "Streaming\u2026";
    const request = { ...body, stream: true, ...(names ? { mask_profile: names } : {}) };
    try {
      await stream("/generate", request, {
        signal,
        onOpen: (response) => {
          const header = response.headers.get("X-Monet-Mask-Profiles");
          col.applied.textContent = header ? `Applied: ${header}` : "Applied: no profile";
          col.applied.dataset.header = header || "";
        },
        onChunk: (chunk) => {
          col.text += chunk.text;
          col.tokens.push(...chunk.token_ids);
          col.out.textContent = visible(col.text);
          if (chunk.finish_reason) {
            col.status.textContent =
              `Done: ${chunk.usage.completion_tokens} tokens (${chunk.finish_reason}).`;
          }
        },
      });
      col.out.dataset.tokens = JSON.stringify(col.tokens);
      col.box.dataset.done = "true";
    } catch (error) {
      if (error.name === "AbortError") return;
      col.status.textContent = "Failed.";
      col.box.append(errorBox(error));
    } finally {
      col.out.setAttribute("aria-busy", "false");
    }
  };
  await Promise.all(sides.map(one));
}

function compare(cols, note) {
  const a = cols.base.tokens, b = cols.masked.tokens;
  if (!cols.base.box.dataset.done || !cols.masked.box.dataset.done) return;
  let n = 0;
  while (n < a.length && n < b.length && a[n] === b[n]) n += 1;
  note.dataset.differ = String(n < Math.max(a.length, b.length));
  note.textContent = n < Math.max(a.length, b.length)
    ? `The continuations differ from token ${n + 1}.` : "The continuations are the same.";
}

export async function render(main, _params, signal) {
  const prompt = h("textarea", { name: "prompt", rows: 4, required: true },
                   sessionStorage.getItem(PROMPT) || "The cat sat on the");
  const maxTokens = h("input", { type: "number", name: "max_tokens", min: 1, max: 1024,
                                 value: 32 });
  const temperature = h("input", { type: "number", name: "temperature", min: 0, max: 2,
                                   step: 0.1, value: 0 });
  const picker = h("div", {}, loading("Loading profiles"));
  const runButton = h("button", { type: "submit" }, "Generate");
  const stop = h("button", { type: "button", class: "secondary", disabled: true }, "Stop");
  const note = h("p", { class: "compare", role: "status" });
  const cols = { base: column("Without a mask", "unmasked"), masked: column("With the profiles",
                                                                           "masked") };
  const form = h("form", { class: "card stack", "aria-label": "Prompt" },
                 field("Prompt", prompt),
                 h("div", { class: "row" }, field("Max tokens", maxTokens),
                   field("Temperature", temperature, "0: greedy")),
                 picker, h("div", { class: "row" }, runButton, stop,
                   h("a", { href: "#/routing" }, "See the prompt's routing")));
  replace(main, h("h2", {}, "Playground"),
          h("p", { class: "muted" }, "The same prompt continued without a mask and with the " +
            "chosen profiles, streamed side by side."),
          form, note, h("div", { class: "columns" }, cols.base.box, cols.masked.box));

  const chosen = JSON.parse(sessionStorage.getItem(CHOSEN) || "[]");
  get("/masks", { signal }).then((list) => replace(picker, profilePicker(list, chosen)))
    .catch((error) => error.name !== "AbortError" && replace(picker, errorBox(error)));

  let running = null;
  stop.addEventListener("click", () => running?.abort());
  signal.addEventListener("abort", () => running?.abort());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const names = [...form.querySelectorAll("input[name=profile]:checked")].map((i) => i.value);
    sessionStorage.setItem(PROMPT, prompt.value);
    sessionStorage.setItem(CHOSEN, JSON.stringify(names));
    if (!names.length) {
      note.textContent = "Choose at least one profile for the right-hand side.";
      return;
    }
    running = new AbortController();
    delete cols.base.box.dataset.done;
    delete cols.masked.box.dataset.done;
    delete note.dataset.differ;
    note.textContent = "";
    cols.masked.box.querySelector("h3").textContent = `With ${names.join(" + ")}`;
    runButton.disabled = true;
    stop.disabled = false;
    const body = { prompt: prompt.value, max_tokens: Number(maxTokens.value) || 32,
                   temperature: Number(temperature.value) || 0 };
    await run(cols, body, names, running.signal);
    runButton.disabled = false;
    stop.disabled = true;
    compare(cols, note);
  });
}
