// The page: the token dialog, the two tabs, and what a 401 does (everything from the
// cluster leaves the page until a token the API takes is given).

import * as api from "./api.js";
import { $, h } from "./dom.js";
import { Operations } from "./operations.js";
import { Playground } from "./playground.js";

const dialog = $("#token-dialog");
const playground = new Playground(unauthorized);
const operations = new Operations(unauthorized, showLinks);
let tab = "playground";

function banner(text) {
  $("#banner").textContent = text ?? "";
  $("#banner").hidden = !text;
}

function askToken(message) {
  $("#token-error").textContent = message ?? "";
  $("#token-error").hidden = !message;
  $("#token-input").value = "";
  if (!dialog.open) dialog.showModal();
  $("#token-input").focus();
}

/** A data call answered 401: show nothing from the cluster, and ask for a token. */
function unauthorized(detail) {
  if (dialog.open && $("#main").hidden) return; // another call's 401 said it already
  const had = api.token();
  api.forgetToken();
  playground.clear();
  operations.clear();
  showLinks({});
  $("#main").hidden = true;
  const why = had ? "the API refused this token" : "this API needs a bearer token";
  const text = `401 Unauthorized: ${why}.${detail ? ` (${detail})` : ""}`;
  banner(text);
  askToken(text);
}

async function connect() {
  try {
    const models = await api.call("v1/models");
    banner(null);
    $("#main").hidden = false;
    await playground.start(models.data);
    select(tab);
  } catch (error) {
    if (error instanceof api.AuthError) unauthorized(error.message);
    else banner(`Cannot reach the API: ${error.message}`);
  }
}

function select(name) {
  tab = name;
  for (const button of document.querySelectorAll("[data-tab]")) {
    const chosen = button.dataset.tab === name;
    button.setAttribute("aria-selected", String(chosen));
    $(`#${button.dataset.tab}`).hidden = !chosen;
  }
  if (name === "operations" && !$("#main").hidden) operations.show();
  else operations.hide();
}

function showLinks(links) {
  const found = [
    ["Flower", links.flower],
    ["Grafana", links.grafana],
  ].filter(([, url]) => url);
  const link = ([name, url]) =>
    h("a", { href: url, target: "_blank", rel: "noopener noreferrer" }, name);
  $("#links").replaceChildren(...found.map(link));
}

$("#token-form").addEventListener("submit", (event) => {
  event.preventDefault(); // no form navigation: the CSP's form-action is 'none'
  api.setToken($("#token-input").value.trim());
  $("#token-input").value = "";
  dialog.close();
  connect();
});
// Escape: keep the token in use, or, before any, try without one (an API may need none).
dialog.addEventListener("cancel", (event) => {
  event.preventDefault();
  dialog.close();
  if (api.token() !== null && !$("#main").hidden) return;
  api.setToken("");
  connect();
});
$("#change-token").addEventListener("click", () => askToken(null));
for (const button of document.querySelectorAll("[data-tab]")) {
  button.addEventListener("click", () => select(button.dataset.tab));
}

if (api.token() === null) askToken(null);
else connect();
