// The explanation panel: when "Explain" is ticked, the same post goes to /v1/explain and the panel shows the
// word → region heat map (INFIG; the word × tag one over tags) and the attribution figure, what each modality adds,
// and the top words.
"use strict";

function explainPanel(container, prediction, context) {
  if (!document.getElementById("explain").checked || !context || !context.post) return;
  const panel = el("div", { class: "panel", id: "explanation" });
  const status = el("p", { class: "muted", id: "explain-status" }, "explaining…");
  panel.append(el("h2", {}, "Why"), status);
  container.append(panel);
  const figures = "word_regions,word_tags,attribution";  // those the model has come back
  mmsenti.api(`/v1/explain?figures=${figures}`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(context.post),
  }).then((answer) => {
    status.remove();
    const ex = answer.explanation;
    for (const name of figures.split(",")) {
      const src = (answer.figures || {})[name];
      if (src) panel.append(el("img", { class: "figure", id: `figure-${name}`, src, alt: name.replace("_", " ") }));
    }
    if (ex.modality) {
      const what = ex.modality.target !== null ? `p(${ex.modality.target})` : "the score";
      const list = el("ul", { id: "modality-effects" });
      for (const [m, v] of Object.entries(ex.modality.effects)) {
        const flip = ex.modality.changes_prediction[m] ? " — the label changes without it" : "";
        list.append(el("li", { "data-modality": m }, `${m}: ${v >= 0 ? "+" : ""}${v.toFixed(3)}${flip}`));
      }
      panel.append(el("p", {}, `Change of ${what} when each modality is replaced by a neutral one:`), list);
    }
    const scores = ex.word_importance || (ex.text_attribution && ex.text_attribution.word_scores.map(Math.abs));
    if (scores && ex.words.length) {
      const top = ex.words.map((w, i) => [w.text, scores[i]]).sort((a, b) => b[1] - a[1]).slice(0, 5);
      panel.append(el("p", { id: "top-words" }, "Words that weigh most: " + top.map(([w]) => w).join(", ")));
    }
    for (const note of ex.notes) panel.append(el("p", { class: "muted" }, note));
  }).catch((e) => {
    status.textContent = `explanation failed: ${e.message}`;
  });
}
mmsenti.registerPanel(explainPanel);
