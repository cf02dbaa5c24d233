// mmsenti web page: plain JS, no build step. It reads the model card (/v1/model), sends one post to
// /v1/predict and renders the answer with the registered panels. A later feature (e.g. the explanation heat map)
// adds a panel with mmsenti.registerPanel(fn): fn(container, prediction, context) appends its own element.
"use strict";

const mmsenti = {
  card: null,
  panels: [],
  registerPanel(fn) { this.panels.push(fn); },
  headers() {
    const key = document.getElementById("api-key").value.trim();
    return key ? { "X-API-Key": key } : {};
  },
  async api(path, options = {}) {
    const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...this.headers() } });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const err = body.error || {};
      throw new Error(`${response.status}${err.field ? " " + err.field : ""}: ${err.message || response.statusText}`);
    }
    return body;
  },
};
window.mmsenti = mmsenti;

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, v));
  if (text) node.textContent = text;
  return node;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// The label (or score) and one bar per class.
function labelPanel(container, prediction) {
  const panel = el("div", { class: "panel", id: "prediction" });
  if (prediction.label !== undefined) {
    panel.append(el("div", { class: "label", id: "label" }, prediction.label));
    const bars = el("div", { id: "probabilities" });
    for (const [name, p] of Object.entries(prediction.probabilities)) {
      const row = el("div", { class: "bar", "data-label": name });
      const track = el("div");
      const fill = el("div", { class: "fill" });
      fill.style.width = `${(100 * p).toFixed(1)}%`;
      track.append(fill);
      row.append(el("span", {}, name), track, el("span", {}, p.toFixed(3)));
      bars.append(row);
    }
    panel.append(bars);
  } else {
    panel.append(el("div", { class: "label", id: "label" }, `score ${prediction.score.toFixed(3)}`));
  }
  panel.append(el("p", { class: "muted", id: "used" }, `read: ${prediction.modalities.join(" + ")}`));
  container.append(panel);
}
mmsenti.registerPanel(labelPanel);

function renderPrediction(prediction, context) {
  const container = document.getElementById("result");
  container.replaceChildren();
  for (const panel of mmsenti.panels) panel(container, prediction, context);
}
mmsenti.renderPrediction = renderPrediction;

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function loadCard() {
  try {
    const card = await mmsenti.api("/v1/model");
    mmsenti.card = card;
    document.getElementById("model-name").textContent = `${card.name} (${card.version})`;
    document.getElementById("model-summary").textContent =
      `${card.model} · reads ${card.modalities.join(" + ")} · trained on ${card.dataset}` +
      (card.labels ? ` · labels: ${card.labels.join(", ")}` : "");
    document.getElementById("text-field").hidden = !card.modalities.includes("text");
    document.getElementById("image-field").hidden = !card.modalities.includes("image");
    showError("");
  } catch (e) {
    document.getElementById("model-summary").textContent = "model card unavailable";
    if (e.message.startsWith("401")) document.getElementById("key-field").open = true;
    showError(e.message);
  }
}

document.getElementById("image").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  const preview = document.getElementById("preview");
  preview.hidden = !file;
  if (file) preview.src = await readAsDataURL(file);
});

document.getElementById("api-key").addEventListener("change", loadCard);

document.getElementById("post-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = document.getElementById("submit");
  button.disabled = true;
  showError("");
  try {
    const post = {};
    const text = document.getElementById("text").value;
    if (text) post.text = text;
    const file = document.getElementById("image").files[0];
    if (file) post.image = await readAsDataURL(file);
    const answer = await mmsenti.api("/v1/predict", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(post),
    });
    renderPrediction(answer.predictions[0], { post, model: answer.model });
  } catch (e) {
    document.getElementById("result").replaceChildren();
    showError(e.message);
  } finally {
    button.disabled = false;
  }
});

loadCard();
