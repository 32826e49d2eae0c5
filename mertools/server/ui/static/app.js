// The page's start: the server's state (/health, no key needed), the model's id (/v1/models: asks for the API key
// when the server wants one), then the chat and the live panel. The key dialog opens once on a 401 and whenever
// the header's button is pressed.

import { apiKey, getJSON, keyProblem, setApiKey } from "./api.js";
import { Chat } from "./chat.js";
import { LivePanel } from "./live.js";

const $ = (id) => document.getElementById(id);
let model = null;

function banner(text) {
  const el = $("banner");
  el.textContent = text || "";
  el.hidden = !text;
}

function status(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
}

// The dialog asking for the key; `why` says what the server answered.
function askKey(why) {
  const dialog = $("key-dialog");
  $("key-message").textContent = why || "The key this page sends as 'Authorization: Bearer KEY'.";
  $("key-error").hidden = true;
  $("key-input").value = apiKey();
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

function setupKeyDialog(onKey) {
  const dialog = $("key-dialog");
  $("key-button").addEventListener("click", () => askKey());
  $("key-cancel").addEventListener("click", () => dialog.close());
  $("key-forget").addEventListener("click", () => { setApiKey(""); $("key-input").value = ""; dialog.close(); onKey(); });
  $("key-form").addEventListener("submit", (ev) => {
    const key = $("key-input").value.trim();
    const problem = keyProblem(key);
    if (problem) {
      ev.preventDefault();
      $("key-error").textContent = problem;
      $("key-error").hidden = false;
      return;
    }
    setApiKey(key);
    onKey();
  });
}

async function health() {
  try {
    const resp = await fetch("/health");
    const body = await resp.json().catch(() => ({}));
    if (resp.ok) { status("ok", "ready"); return "ready"; }
    if (body.status === "loading") { status("loading", "loading the model…"); return "loading"; }
    status("error", "error");
    banner(`the server cannot serve: ${body.message || "HTTP " + resp.status}`);
    return "error";
  } catch (e) {
    status("error", "unreachable");
    banner(`cannot reach the server (${e.message || e})`);
    return "unreachable";
  }
}

async function connect(live) {
  const state = await health();
  if (state !== "ready") {
    setTimeout(() => connect(live), state === "loading" ? 1000 : 3000); // the model loads, or the server returns
    return;
  }
  try {
    const models = await getJSON("/v1/models");
    model = models.data[0].id;
    $("model").textContent = model;
    const ctx = models.data[0].max_model_len;
    $("model").title = ctx ? `context ${ctx} tokens` : "";
    banner("");
    live.start();
  } catch (e) {
    if (e.status === 401) {
      banner(e.message);
      askKey(`${e.message[0].toUpperCase()}${e.message.slice(1)}.`);
    } else {
      banner(`cannot read the model list: ${e.message}`);
      setTimeout(() => connect(live), 3000);
    }
  }
}

function main() {
  const live = new LivePanel({
    tokS: $("tok-s"), ttft: $("ttft"), requests: $("requests"), hitRate: $("hit-rate"), disk: $("disk"),
    totals: $("totals"), sparkline: $("sparkline"), heatmap: $("heatmap"), heatTip: $("heat-tip"),
    heatSummary: $("heat-summary"), note: $("live-note"),
  }, (message) => { live.stop(); banner(message); askKey(`${message}.`); });
  const chat = new Chat({
    form: $("composer"), prompt: $("prompt"), messages: $("messages"), hint: $("hint"), send: $("send"),
    stop: $("stop"), clear: $("clear"), temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
  }, () => model, (message) => askKey(`${message}.`), async () => {
    const models = await getJSON("/v1/models"); // after a reload that renamed or replaced the model
    model = models.data[0].id;
    $("model").textContent = model;
    return model;
  });
  setupKeyDialog(() => { live.stop(); connect(live); });
  window.mertools = { live, chat }; // for the console (and the browser test)
  connect(live);
}

main();
