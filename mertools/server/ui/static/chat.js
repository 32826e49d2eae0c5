// The chat: the conversation so far goes to /v1/chat/completions (the server applies the model's chat template),
// the reply streams in token by token; Stop aborts the request, which the server sees as a disconnect and ends
// the generation at the next token. Errors are shown in the reply's place, in words.

import { ApiError, events, request } from "./api.js";

function number(input, lo, hi, integer = false) {
  const v = Number(input.value);
  if (input.value === "" || !Number.isFinite(v) || v < lo || v > hi || (integer && !Number.isInteger(v))) {
    throw new ApiError(`${input.closest("label").textContent.trim()} must be ${integer ? "a whole number" : "a number"} ` +
      `from ${lo} to ${hi === Infinity ? "∞" : hi}`);
  }
  return v;
}

export class Chat {
  constructor(els, model, onAuthError, onModelGone) {
    this.els = els;
    this.model = model; // () => the model id /v1/models named
    this.onAuthError = onAuthError;
    this.onModelGone = onModelGone; // () => the id the server serves now (a reload may rename or replace the model)
    this.messages = [];
    this.controller = null;
    els.form.addEventListener("submit", (ev) => { ev.preventDefault(); this.send(); });
    els.prompt.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); this.send(); }
    });
    els.stop.addEventListener("click", () => this.stop());
    els.clear.addEventListener("click", () => this.clear());
  }

  bubble(role, text) {
    this.els.hint.hidden = true;
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    div.append(body);
    this.els.messages.append(div);
    this.scroll();
    return div;
  }

  scroll() {
    const m = this.els.messages;
    m.scrollTop = m.scrollHeight;
  }

  setBusy(busy) {
    this.els.send.disabled = busy;
    this.els.stop.disabled = !busy;
    this.els.clear.disabled = busy;
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  clear() {
    this.messages = [];
    this.els.messages.querySelectorAll(".msg").forEach((m) => m.remove());
    this.els.hint.hidden = false;
  }

  async send() {
    const text = this.els.prompt.value.trim();
    if (!text || this.controller) return;
    if (!this.model()) {
      return this.fail(this.bubble("assistant", ""), new ApiError("not connected to the model yet: see the status above"));
    }
    let settings;
    try {
      settings = {
        temperature: number(this.els.temperature, 0, 2),
        top_p: number(this.els.topP, 0, 1),
        max_tokens: number(this.els.maxTokens, 1, Infinity, true),
      };
    } catch (e) {
      return this.fail(this.bubble("assistant", ""), e);
    }
    this.bubble("user", text);
    this.messages.push({ role: "user", content: text });
    this.els.prompt.value = "";
    const div = this.bubble("assistant", "");
    const body = div.querySelector(".text");
    div.dataset.state = "streaming";
    this.controller = new AbortController();
    this.setBusy(true);
    const started = performance.now();
    let content = "", reasoning = "", first = null, pieces = 0, finish = null, usage = null, reasoningEl = null;
    try {
      const resp = await request("/v1/chat/completions", {
        method: "POST", signal: this.controller.signal, headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: this.model(), messages: this.messages, stream: true,
          stream_options: { include_usage: true }, ...settings }),
      });
      for await (const ev of events(resp)) {
        if (ev.error) throw new ApiError(`the server stopped the reply: ${ev.error.message}`, 500);
        if (ev.usage) usage = ev.usage;
        const choice = ev.choices && ev.choices[0];
        if (!choice) continue;
        const d = choice.delta || {};
        if (d.reasoning_content) {
          if (!reasoningEl) {
            reasoningEl = document.createElement("div");
            reasoningEl.className = "reasoning";
            div.prepend(reasoningEl);
          }
          reasoning += d.reasoning_content;
          reasoningEl.textContent = reasoning;
        }
        if (d.content) {
          if (first === null) first = performance.now();
          content += d.content;
          pieces++;
          body.textContent = content;
          div.dataset.pieces = pieces;
          this.scroll();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      div.dataset.state = "done";
      div.dataset.finish = finish || "";
      this.messages.push({ role: "assistant", content });
      this.meta(div, started, first, usage, pieces, finish);
    } catch (e) {
      if (e.name === "AbortError") {
        div.dataset.state = "stopped";
        this.messages.push({ role: "assistant", content });
        this.meta(div, started, first, usage, pieces, "stopped by you");
      } else {
        this.messages.pop(); // the question stays on screen; send it again after fixing what the error says
        if (e.status === 404 && this.onModelGone) {
          try {
            const now = await this.onModelGone();
            if (now) e.message += ` — the server now serves "${now}": send again`;
          } catch { /* the original error says enough */ }
        }
        this.fail(div, e);
      }
    } finally {
      this.controller = null;
      this.setBusy(false);
      this.scroll();
    }
  }

  meta(div, started, first, usage, pieces, finish) {
    const el = document.createElement("div");
    el.className = "meta";
    const total = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : pieces;
    const parts = [`${tokens} tokens in ${total.toFixed(2)} s`];
    if (first !== null) parts.push(`first after ${((first - started) / 1000).toFixed(2)} s`);
    if (first !== null && tokens > 1) {
      const after = (performance.now() - first) / 1000;
      if (after > 0) parts.push(`${((tokens - 1) / after).toFixed(1)} tok/s`);
    }
    if (finish) parts.push(finish === "length" ? "stopped at max tokens" : finish === "stop" ? "finished" : finish);
    el.textContent = parts.join(" · ");
    div.append(el);
  }

  fail(div, e) {
    div.classList.add("error");
    div.dataset.state = "error";
    const el = document.createElement("div"); // below whatever had streamed in before the error
    el.className = "error-text";
    el.textContent = e.message || String(e);
    div.append(el);
    if (e.status === 401) this.onAuthError(e.message);
  }
}
