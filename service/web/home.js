// The home page: submit a slide (drag-and-drop or file picker) and follow your jobs.

import { api, apiJson, bindKeyField, formatNumber, submitJob } from "./api.js";

const POLL_MS = 1500;
const $ = (id) => document.getElementById(id);

let chosenFile = null;
let pollTimer = null;

function choose(file) {
  chosenFile = file || null;
  $("chosen").textContent = chosenFile
    ? `${chosenFile.name} (${formatNumber(chosenFile.size / 1e6, 1)} MB)` : "No file chosen";
  $("submit").disabled = !chosenFile;
}

function setupDropZone() {
  const zone = $("drop-zone");
  const input = $("slide-file");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) choose(event.dataTransfer.files[0]);
  });
  input.addEventListener("change", () => choose(input.files[0]));
}

function options() {
  const result = { tissue_mask: $("tissue-mask").checked };
  if ($("model").value) result.model = $("model").value;
  if ($("mpp").value) result.mpp = Number($("mpp").value);
  const roi = ["roi-x", "roi-y", "roi-w", "roi-h"].map((id) => $(id).value);
  if (roi.some((v) => v !== "")) {
    if (roi.some((v) => v === "")) throw new Error("give all four ROI numbers, or none");
    result.roi = roi.map(Number);
  }
  return result;
}

async function onSubmit(event) {
  event.preventDefault();
  if (!chosenFile) return;
  const status = $("submit-status");
  const progress = $("upload-progress");
  let form;
  try {
    form = new FormData();
    form.append("options", JSON.stringify(options()));
    form.append("slide", chosenFile, chosenFile.name);
  } catch (error) {
    status.textContent = error.message;
    return;
  }
  $("submit").disabled = true;
  progress.value = 0;
  status.textContent = `Uploading ${chosenFile.name}…`;
  try {
    const job = await submitJob(form, (fraction) => { progress.value = fraction; });
    progress.value = 1;
    status.textContent = `Submitted: job ${job.id} is ${job.state}.`;
    await refreshJobs();
  } catch (error) {
    status.textContent = `Not submitted: ${error.message}`;
  } finally {
    $("submit").disabled = !chosenFile;
  }
}

async function loadModels() {
  const select = $("model");
  try {
    const { models } = await apiJson("/v1/models");
    const kept = select.value; // a reload (new key) keeps the user's choice when it still exists
    select.replaceChildren();
    for (const model of models) {
      const option = new Option(model.default ? `${model.name} (default)` : model.name, model.name);
      option.selected = kept ? model.name === kept : model.default;
      select.append(option);
    }
  } catch (error) {
    $("submit-status").textContent = `Models unavailable: ${error.message}`;
  }
}

function button(label, title, action) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.setAttribute("aria-label", title);
  element.addEventListener("click", async () => {
    element.disabled = true;
    try {
      await action();
    } catch (error) {
      $("jobs-status").textContent = `${label} failed: ${error.message}`;
    }
    await refreshJobs();
  });
  return element;
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.job = job.id;
  row.dataset.state = job.state;
  const name = document.createElement("td");
  if (job.state === "succeeded") {
    const link = document.createElement("a");
    link.href = `/jobs/${job.id}`;
    link.textContent = job.slide.name;
    link.className = "open";
    name.append(link);
  } else {
    name.textContent = job.slide.name;
  }
  const model = document.createElement("td");
  model.className = "model";
  model.textContent = job.model;
  const state = document.createElement("td");
  state.className = `state ${job.state}`;
  state.textContent = job.error ? `${job.state}: ${job.error.message}` : job.state;
  const progressCell = document.createElement("td");
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = job.progress.fraction || 0;
  const regions = job.progress.regions_total
    ? `${job.progress.regions_done} / ${job.progress.regions_total} regions` : "planning";
  bar.setAttribute("aria-label", `${job.slide.name}: ${regions}`);
  bar.title = regions;
  progressCell.append(bar);
  const nuclei = document.createElement("td");
  nuclei.textContent = formatNumber(job.progress.nuclei || 0);
  const when = document.createElement("td");
  when.textContent = new Date(job.created_at * 1000).toLocaleString();
  const actions = document.createElement("td");
  actions.className = "actions";
  const finished = ["succeeded", "failed", "cancelled"].includes(job.state);
  if (!finished) {
    actions.append(button("Cancel", `Cancel job ${job.slide.name}`,
      () => api(`/v1/jobs/${job.id}`, { method: "DELETE" })));
  }
  if (job.state === "failed" || job.state === "cancelled") {
    actions.append(button("Retry", `Retry job ${job.slide.name}`,
      () => api(`/v1/jobs/${job.id}/retry`, { method: "POST" })));
  }
  if (finished) {
    actions.append(button("Delete", `Delete job ${job.slide.name} and its results`,
      () => api(`/v1/jobs/${job.id}`, { method: "DELETE" })));
  }
  row.append(name, model, state, progressCell, nuclei, when, actions);
  return row;
}

async function refreshJobs() {
  clearTimeout(pollTimer);
  const status = $("jobs-status");
  let active = false;
  try {
    const list = await apiJson("/v1/jobs?limit=100");
    $("jobs").tBodies[0].replaceChildren(...list.items.map(jobRow));
    active = list.items.some((job) => job.state === "queued" || job.state === "running");
    status.textContent = list.total ? `${list.total} job(s)` : "No jobs yet.";
  } catch (error) {
    status.textContent = error.status === 401 ? "Enter your API key to see your jobs."
      : `Jobs unavailable: ${error.message}`;
  }
  pollTimer = setTimeout(refreshJobs, active ? POLL_MS : POLL_MS * 4);
}

bindKeyField($("api-key"), () => { loadModels(); refreshJobs(); });
setupDropZone();
$("submit-form").addEventListener("submit", onSubmit);
loadModels();
refreshJobs();
