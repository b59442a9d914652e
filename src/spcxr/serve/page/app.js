// spcxr serve page: uploads films to /v1/predict and shows the answers. No external code.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function figure(src, caption, cls) {
  return el("figure", { class: cls }, el("img", { src: src, alt: caption }), el("figcaption", {}, caption));
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    const data = await response.json();
    const names = data.models.map((m) => `${m.name} (${m.task}, ${m.arch}, ${m.img_size} px)`);
    $("models").textContent = "Models: " + names.join("; ");
    if (data.models.length) $("notice").textContent = data.models[0].notice;
    for (const model of data.models) {
      $("cards").append(el("h3", {}, model.card_title), el("pre", {}, model.card || "(no model card)"));
    }
  } catch (err) {
    $("models").textContent = "Could not list the models: " + err;
  }
}

function showAnswer(box, entry) {
  box.querySelector(".busy")?.remove();
  if (entry.status !== "ok") {
    box.classList.add("error");
    box.append(el("p", { class: "error-text" }, "Error: " + entry.error));
    return;
  }
  const pictures = el("div", { class: "pictures" });
  if (entry.film) pictures.append(figure(entry.film, "film", "film-image"));
  for (const [name, result] of Object.entries(entry.models)) {
    const answer = el("div", { class: "answer", "data-model": name });
    if (result.task === "classification") {
      const table = el("table", { class: "probabilities" });
      const ranked = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
      for (const [label, p] of ranked) {
        const bar = el("span", { class: "bar" });
        bar.style.width = Math.round(p * 120) + "px";
        table.append(el("tr", {}, el("td", {}, label), el("td", { class: "probability" }, (100 * p).toFixed(1) + " %"), el("td", {}, bar)));
      }
      answer.append(el("p", {}, `${name}: `, el("span", { class: "predicted" }, result.predicted || "no finding")), table);
      if (result.heatmap) pictures.append(figure(result.heatmap, `heatmap (${name}: ${result.predicted})`, "heatmap-image"));
    } else {
      const pct = (100 * result.lung_area_fraction).toFixed(1);
      answer.append(el("p", { class: "lung-area" }, `${name}: lung area ${pct} % of the film (${result.lung_area_px} px)`));
      if (result.overlay) pictures.append(figure(result.overlay, `lung overlay (${name})`, "overlay-image"));
    }
    box.append(answer);
  }
  box.append(pictures);
}

async function predictOne(file) {
  const box = el("article", { class: "film" }, el("h2", {}, file.name), el("p", { class: "busy" }, "predicting\u2026"));
  $("results").prepend(box);
  const form = new FormData();
  form.append("files", file, file.name);
  const query = $("heatmap").checked ? "?heatmap=1" : "";
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      const response = await fetch("/v1/predict" + query, { method: "POST", body: form });
      if (response.status === 503) {
        const wait = Number(response.headers.get("Retry-After") || "1");
        await new Promise((resolve) => setTimeout(resolve, 1000 * wait));
        continue;
      }
      const data = await response.json();
      if (!response.ok) {
        showAnswer(box, { status: "error", error: data.error || response.statusText });
      } else {
        showAnswer(box, data.results[0]);
      }
      return;
    } catch (err) {
      showAnswer(box, { status: "error", error: String(err) });
      return;
    }
  }
  showAnswer(box, { status: "error", error: "the server stayed busy; try again" });
}

function predictAll(files) {
  for (const file of files) predictOne(file);
}

$("files").addEventListener("change", (event) => {
  predictAll(Array.from(event.target.files));
  event.target.value = "";
});
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  predictAll(Array.from(event.dataTransfer.files));
});
loadModels();
