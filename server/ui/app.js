// The page: hash routes to views, the key form, and the banner for a missing or wrong key.
import { key, onAuthError } from "./api.js";
import { replace } from "./dom.js";
import * as editor from "./editor.js";
import * as experts from "./experts.js";
import * as playground from "./playground.js";
import * as profiles from "./profiles.js";
import * as routing from "./routing.js";

const VIEWS = {
  playground: { view: playground, title: "Playground" },
  routing: { view: routing, title: "Routing" },
  experts: { view: experts, title: "Experts" },
  expert: { view: { render: experts.renderExpert }, title: "Expert", tab: "experts" },
  editor: { view: editor, title: "Mask editor" },
  profiles: { view: profiles, title: "Profiles" },
};

const main = document.getElementById("main");
const banner = document.getElementById("banner");
let current = null; // {abort: AbortController}

function showBanner(text) {
  banner.textContent = text;
  banner.hidden = !text;
}

function keyState() {
  document.getElementById("key-state").textContent = key.get() ? "key set" : "no key";
}

function route() {
  const [name = "playground", ...params] = location.hash.replace(/^#\/?/, "").split("/");
  const entry = VIEWS[name] || VIEWS.playground;
  if (current) current.abort();
  current = new AbortController();
  document.querySelectorAll(".tabs a").forEach((a) => {
    if (a.dataset.view === (entry.tab || name)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  document.title = `${entry.title} \u2013 monet-serve`;
  replace(main);
  main.dataset.view = name;
  entry.view.render(main, params.map(decodeURIComponent), current.signal);
  const heading = main.querySelector("h2");
  if (heading && document.activeElement !== document.getElementById("api-key")) {
    heading.setAttribute("tabindex", "-1");
    heading.focus({ preventScroll: true });
  }
}

onAuthError((error) => {
  if (error.status === 401) {
    showBanner("This server needs an API key: enter it above (it stays in this tab).");
    document.getElementById("api-key").focus();
  }
});

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("api-key");
  key.set(input.value.trim());
  input.value = "";
  keyState();
  showBanner("");
  route(); // reload the view's data with the new key
});
document.getElementById("key-forget").addEventListener("click", () => {
  key.set("");
  keyState();
  route();
});

window.addEventListener("hashchange", route);
keyState();
route();
