// The job page: the slide in the deep-zoom viewer with its nuclei, the legend, the measurements
// of a clicked nucleus and the downloads.

import { api, apiJson, bindKeyField, download, formatNumber } from "./api.js";
import { NucleusOverlay } from "./overlay.js";
import { DeepZoomViewer, parseDzi } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const jobId = decodeURIComponent(window.location.pathname.split("/")[2] || "");
const jobUrl = `/v1/jobs/${encodeURIComponent(jobId)}`;
let pollTimer = null;
let started = false;

function say(text) { $("view-status").textContent = text; }

function legendRows(counts, classes) {
  // counts.json names the classes; the index numbers them for the overlay (0 = unclassified).
  const area = counts.tissue_area_mm2;
  const perMm2 = (n) => (area > 0 ? n / area : 0);
  const densities = counts.density_per_mm2 || {};
  const byName = new Map(classes.map((c) => [c.name, c]));
  const rows = Object.entries(counts.classes).map(([name, count]) => {
    const cls = byName.get(name);
    return { type: cls ? cls.type : -1, colour: cls ? cls.colour : [150, 150, 150], label: name,
             count, density: densities[name] ?? perMm2(count) };
  });
  const unclassified = counts.unclassified ?? 0;
  rows.push({ type: 0, colour: classes[0].colour, label: "Unclassified", count: unclassified,
              density: densities.unclassified ?? perMm2(unclassified) });
  return rows;
}

function buildLegend(counts, overlay) {
  const body = $("legend").tBodies[0];
  body.replaceChildren();
  for (const [i, row] of legendRows(counts, overlay.classes).entries()) {
    const tr = document.createElement("tr");
    tr.dataset.class = row.label;
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = true;
    box.id = `class-${i}`;
    box.disabled = row.type < 0;
    box.addEventListener("change", () => overlay.setClass(row.type, box.checked));
    const name = document.createElement("td");
    const label = document.createElement("label");
    label.htmlFor = box.id;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = `rgb(${row.colour.join(",")})`;
    label.append(box, swatch, document.createTextNode(row.label));
    name.append(label);
    const count = document.createElement("td");
    count.className = "count";
    count.dataset.value = String(row.count);
    count.textContent = formatNumber(row.count);
    const density = document.createElement("td");
    density.className = "density";
    density.textContent = formatNumber(row.density, 1);
    tr.append(name, count, density);
    body.append(tr);
  }
  $("total-count").textContent = formatNumber(counts.total);
  $("total-count").dataset.value = String(counts.total);
  $("total-density").textContent = formatNumber(counts.density_per_mm2.total, 1);
  $("tissue").textContent = `Tissue area: ${formatNumber(counts.tissue_area_mm2, 3)} mm²`;
}

function showDetails(feature) {
  const details = $("details");
  details.replaceChildren();
  if (!feature) {
    const p = document.createElement("p");
    p.className = "note";
    p.textContent = "No nucleus there. Zoom in and click inside an outline.";
    details.append(p);
    return;
  }
  const list = document.createElement("dl");
  const add = (term, value) => {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  };
  const cls = feature.properties.classification;
  add("Class", cls ? cls.name : "Unclassified");
  for (const [name, value] of Object.entries(feature.properties.measurements || {})) {
    add(name, formatNumber(value, 3));
  }
  add("Id", feature.id);
  details.append(list);
}

function buildDownloads(job) {
  const list = $("downloads");
  list.replaceChildren();
  for (const name of Object.keys(job.results)) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = name;
    button.setAttribute("aria-label", `Download ${name}`);
    button.addEventListener("click", () => {
      download(`${jobUrl}/results/${encodeURIComponent(name)}`, name)
        .catch((error) => say(`Download failed: ${error.message}`));
    });
    item.append(button);
    list.append(item);
  }
}

async function start(job) {
  started = true;
  const [dziText, counts, density] = await Promise.all([
    api(`${jobUrl}/slide.dzi`).then((r) => r.text()),
    apiJson(`${jobUrl}/results/counts.json`),
    apiJson(`${jobUrl}/nuclei/density`),
  ]);
  const element = $("viewer");
  const viewer = new DeepZoomViewer(element, $("tiles"), parseDzi(dziText), `${jobUrl}/slide_files`);
  const overlay = new NucleusOverlay(viewer, $("overlay"), jobUrl, density);
  overlay.onStatus(say);
  buildLegend(counts, overlay);
  buildDownloads(job);
  $("show-outlines").addEventListener("change", (e) => overlay.setVisible(e.target.checked));
  element.addEventListener("slideclick", (event) => showDetails(overlay.pick(...event.detail)));
  element.addEventListener("tileerror", (event) => say(`Tile unavailable: ${event.detail.message}`));
  $("zoom-in").addEventListener("click", () => viewer.zoom(1.5));
  $("zoom-out").addEventListener("click", () => viewer.zoom(1 / 1.5));
  $("zoom-fit").addEventListener("click", () => viewer.fit());
  document.body.dataset.ready = "true";
  overlay.update();
}

async function load() {
  clearTimeout(pollTimer);
  try {
    const job = await apiJson(jobUrl);
    $("title").textContent = `${job.slide.name} — ${job.model} — ${job.state}`;
    document.title = `HoVerServe — ${job.slide.name}`;
    if (job.state === "succeeded" && !job.expired) {
      if (!started) await start(job);
      return;
    }
    if (job.expired) say("This job's results expired and were deleted.");
    else if (job.state === "failed") say(`The job failed: ${job.error ? job.error.message : ""}`);
    else if (job.state === "cancelled") say("The job was cancelled.");
    else {
      say(`The job is ${job.state}: ${Math.round((job.progress.fraction || 0) * 100)} %`);
      pollTimer = setTimeout(load, 2000);
    }
  } catch (error) {
    say(error.status === 401 ? "Enter your API key above." : `Unavailable: ${error.message}`);
  }
}

bindKeyField($("api-key"), load);
load();
