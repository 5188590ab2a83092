// The playground: streams chat completions with `return_token_origins` and colours each token by
// where it came from (data-depth 0: the target's own token; d >= 1: a draft token accepted at tree
// depth d). "compare" sends the same request twice at once, the second with `speculative: false`.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "specserve-api-key";
let modelName;

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "Content-Type": "application/json", Authorization: "Bearer " + key }
             : { "Content-Type": "application/json" };
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    $("model").textContent = "model: " + await errorMessage(response);
    return;
  }
  modelName = (await response.json()).data[0].id;
  $("model").textContent = "model: " + modelName;
}

function readImage() {
  const file = $("image").files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);  // a data: URL, which the API takes as image_url
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// One answer: its coloured tokens and live stats.
class Panel {
  constructor(section) {
    this.section = section;
    this.output = section.querySelector(".output");
    this.stats = section.querySelector(".stats");
  }

  start() {
    this.output.replaceChildren();
    this.tokens = 0;
    this.steps = 0;  // verify steps: every chunk after the first (prefill's one token)
    this.sent = performance.now();
    this.first = this.last = null;
    this.meanAccepted = null;
    this.section.dataset.state = "running";
    this.show();
  }

  receive(chunk) {
    for (const choice of chunk.choices) this.add(choice.token_origins || []);
    if (chunk.spec_decode) this.meanAccepted = chunk.spec_decode.mean_accepted_length;
    this.show();
  }

  add(origins) {
    this.last = performance.now();
    if (this.first === null) this.first = this.last;
    else this.steps += 1;
    this.tokens += origins.length;
    for (const origin of origins) {
      if (!origin.text) continue;  // EOS, or text that a later token releases
      const span = document.createElement("span");
      span.textContent = origin.text;
      span.dataset.depth = origin.depth;
      span.className = "d" + Math.min(origin.depth, 4);
      span.title = origin.depth ? `draft token accepted at depth ${origin.depth}` : "target token";
      this.output.append(span);
    }
  }

  show() {
    const parts = [`${this.tokens} tokens`];
    if (this.first !== null) {
      parts.push(`first token ${((this.first - this.sent) / 1000).toFixed(2)} s`);
      const seconds = (this.last - this.first) / 1000;
      if (seconds > 0) parts.push(`${((this.tokens - 1) / seconds).toFixed(1)} tok/s`);
    }
    const mean = this.meanAccepted ?? (this.steps ? (this.tokens - 1) / this.steps : null);
    if (mean !== null) parts.push(`mean accepted length ${mean.toFixed(2)}`);
    this.stats.textContent = parts.join(" · ");
  }

  fail(message) {
    const line = document.createElement("p");
    line.className = "error";
    line.textContent = message;
    this.output.append(line);
    this.section.dataset.state = "error";
  }
}

const panels = { on: new Panel($("panel-on")), off: new Panel($("panel-off")) };

// POST a streaming request and feed its chunks to `panel` (SSE: `data: {json}` events, `: ping`
// comments while the first token is awaited, `data: [DONE]` at the end).
async function run(panel, body) {
  panel.start();
  try {
    const response = await fetch("/v1/chat/completions",
                                 { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (let read = await reader.read(); !read.done; read = await reader.read()) {
      const events = (buffer + read.value).split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const chunk = JSON.parse(event.slice("data: ".length));
        if (chunk.error) throw new Error(chunk.error.message);
        panel.receive(chunk);
      }
    }
    panel.section.dataset.state = "done";
  } catch (error) {
    panel.fail(error.message);
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  const image = await readImage();
  if (!text && !image) return;
  const content = image ? [{ type: "image_url", image_url: { url: image } }] : [];
  if (text) content.push({ type: "text", text });
  const body = {
    model: modelName, messages: [{ role: "user", content }], max_tokens: Number($("max-tokens").value) || 128,
    temperature: 0, stream: true, return_token_origins: true,
  };
  const compare = $("compare").checked;
  $("panel-off").hidden = !compare;
  $("send").disabled = true;
  const runs = [run(panels.on, { ...body, speculative: true })];
  if (compare) runs.push(run(panels.off, { ...body, speculative: false }));
  await Promise.all(runs);
  $("send").disabled = false;
}

$("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  loadModel();
});
$("image").addEventListener("change", async () => {
  const url = await readImage();
  $("preview").src = url || "";
  $("preview").hidden = !url;
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("ask").requestSubmit();
});
$("ask").addEventListener("submit", send);
loadModel();
