// The elgs web page: pick an image, model, method and lambda (optionally paste the shipped sample patch);
// POST /defend/{method} and /saliency; show both top-5 lists, the saliency region, the attack score and verdict.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], defenses: [], estimators: [], patch: null };
const PATCH_MARGIN = 10; // the paper's test placement: top-right, 10 px from both edges (at the trained size)

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function fetchJSON(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  let body = null;
  try { body = await response.json(); } catch (error) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function fillSelect(select, items, describe) {
  select.replaceChildren(...items.map((item) => {
    const option = document.createElement("option");
    option.value = item.name;
    option.textContent = describe(item);
    return option;
  }));
}

function selectedModel() { return state.models.find((m) => m.name === $("model").value); }
function selectedDefense() { return state.defenses.find((d) => d.name === $("method").value); }

function syncLambda() {
  const defense = selectedDefense();
  const usesLambda = Boolean(defense && defense.parameters.lambda);
  $("lambda").disabled = !usesLambda;
  $("lambda-value").textContent = usesLambda ? $("lambda").value : "n/a";
}

// Saliency estimators as GET /defenses lists them (absent on servers without a choice: the select hides).
function fillEstimators(catalogue) {
  state.estimators = catalogue.saliency_estimators || catalogue.estimators || [];
  const keep = document.createElement("option");
  keep.value = "";
  keep.textContent = "model default";
  $("saliency").replaceChildren(keep, ...state.estimators.map((estimator) => {
    const option = document.createElement("option");
    option.value = estimator.name;
    option.textContent = estimator.summary ? `${estimator.name}: ${estimator.summary}` : estimator.name;
    return option;
  }));
  $("saliency").closest("label").hidden = state.estimators.length === 0;
}

async function loadCatalogue() {
  try {
    const [models, defenses] = await Promise.all([fetchJSON("models"), fetchJSON("defenses")]);
    state.models = models.models;
    state.defenses = defenses.defenses;
    fillSelect($("model"), state.models, (m) => `${m.name}${m.weights === "random" ? " (random weights)" : ""}`);
    $("model").value = models.default;
    fillSelect($("method"), state.defenses, (d) => `${d.name}: ${d.summary}`);
    $("method").value = state.defenses.some((d) => d.name === "auto") ? "auto" : state.defenses[0].name;
    fillEstimators(defenses);
    $("lambda").value = selectedModel().default_lambda;
    syncLambda();
    document.body.dataset.ready = "true";
    showStatus("Choose an image and press Defend.");
  } catch (error) {
    showStatus(`Cannot load the models: ${error.message}` +
               (error.message.startsWith("401") ? " (enter the API key)" : ""), true);
  }
}

function fillPredictions(list, predictions) {
  list.replaceChildren(...predictions.map((p) => {
    const item = document.createElement("li");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${(100 * p.score).toFixed(2)}%`;
    item.append(document.createTextNode(p.label), score);
    return item;
  }));
}

async function loadImage(source) {
  const image = new Image();
  image.src = source;
  await image.decode();
  return image;
}

async function samplePatch() {
  if (!state.patch) {
    const [meta, image] = await Promise.all([fetchJSON("static/sample-patch.json"),
                                             loadImage("static/sample-patch.png")]);
    state.patch = { meta, image };
    $("patch-info").textContent = `(${meta.patch_size} px ${meta.attack} -> ${meta.target_label}, ` +
      `trained on ${meta.model})`;
  }
  return state.patch;
}

// The image the service will see, resized here to the model's input size, with the sample patch pasted at
// the paper's test placement. The patch and its 10 px margin scale with the input size when it differs from
// the size the patch was trained at (224 for efficientnet_lite0: there it is pasted pixel for pixel).
async function withSamplePatch(file, size) {
  const { meta, image: patch } = await samplePatch();
  const url = URL.createObjectURL(file);
  let photo;
  try { photo = await loadImage(url); } finally { URL.revokeObjectURL(url); }
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  const context = canvas.getContext("2d");
  context.imageSmoothingQuality = "high";
  context.drawImage(photo, 0, 0, size, size);
  const scale = size / meta.image_size;
  const side = Math.max(1, Math.round(meta.patch_size * scale));
  const margin = Math.round(PATCH_MARGIN * scale);
  context.imageSmoothingEnabled = side !== patch.naturalWidth;
  context.drawImage(patch, size - margin - side, margin, side, side);
  return new Promise((resolve, reject) => canvas.toBlob(
    (blob) => (blob ? resolve(blob) : reject(new Error("the browser could not encode the pasted image"))),
    "image/png"));
}

// The saliency region (white inside) tinted red over the input, both at the model's input size.
async function drawSaliency(inputBlob, regionBase64, size) {
  const url = URL.createObjectURL(inputBlob);
  let input, region;
  try {
    [input, region] = await Promise.all([loadImage(url), loadImage(`data:image/png;base64,${regionBase64}`)]);
  } finally { URL.revokeObjectURL(url); }
  const tint = document.createElement("canvas");
  tint.width = tint.height = size;
  const tintContext = tint.getContext("2d");
  tintContext.drawImage(region, 0, 0, size, size);
  tintContext.globalCompositeOperation = "multiply"; // white -> red, black stays black
  tintContext.fillStyle = "#ff0000";
  tintContext.fillRect(0, 0, size, size);
  const view = $("saliency-view");
  view.width = view.height = size;
  const context = view.getContext("2d");
  context.drawImage(input, 0, 0, size, size);
  context.globalCompositeOperation = "screen"; // black adds nothing; red saturates the red channel
  context.globalAlpha = 0.75;
  context.drawImage(tint, 0, 0);
  context.globalCompositeOperation = "source-over";
  context.globalAlpha = 1;
  view.dataset.drawn = "true";
}

function showVerdict(answer) {
  if (typeof answer.attack_score !== "number") { $("verdict").hidden = true; return; }
  $("verdict").hidden = false;
  const threshold = typeof answer.attack_threshold === "number"
    ? ` (threshold ${answer.attack_threshold.toFixed(3)})` : " (no threshold calibrated for this model and method)";
  const path = answer.path
    ? `; ${answer.path === "screen" ? "answered by the LGS screen" : "flagged by the screen, decided by SLGS"}` : "";
  const removal = typeof answer.removal_score === "number"
    ? `; suspect removed: ${answer.removal_score.toFixed(3)}` +
      (typeof answer.removal_threshold === "number" ? ` (threshold ${answer.removal_threshold.toFixed(3)})` : "")
    : "";
  $("attack-score").textContent = `${answer.attack_score.toFixed(3)} of 2${threshold}${removal}${path}`;
  const verdict = answer.attacked === true ? "attacked" : answer.attacked === false ? "clean" : "undecided";
  $("attack-verdict").textContent = { attacked: "attacked", clean: "looks clean", undecided: "undecided" }[verdict];
  $("attack-verdict").className = `verdict ${verdict}`;
  const final = answer.final_predictions && answer.final_predictions[0];
  const source = verdict === "clean" ? "original image"
    : verdict === "attacked" && answer.removal_top1 ? "image with the suspected patch removed" : "defended image";
  $("final-answer").textContent = final ? `${final.label} (${(100 * final.score).toFixed(1)}%), from the ${source}` : "";
}

async function defend(event) {
  event.preventDefault();
  const file = $("image").files[0];
  if (!file) { showStatus("Choose an image first.", true); return; }
  const model = selectedModel();
  const defense = selectedDefense();
  const params = new URLSearchParams({ model: $("model").value });
  if (defense && defense.parameters.lambda) params.set("lambda", $("lambda").value);
  const saliencyParams = new URLSearchParams({ model: $("model").value });
  if ($("saliency").value) {
    saliencyParams.set("saliency", $("saliency").value);
    if (defense && (defense.needs_saliency || defense.cascade)) params.set("saliency", $("saliency").value);
  }
  $("run").disabled = true;
  document.body.dataset.state = "running";
  showStatus(`Running ${defense ? defense.name : ""}...`);
  try {
    const pasted = $("paste-patch").checked;
    const body = pasted ? await withSamplePatch(file, model.input_size) : file;
    $("original").src = URL.createObjectURL(body);
    $("input-note").textContent = pasted ? `(sample patch pasted, ${model.input_size} px)` : "";
    const form = () => { const data = new FormData(); data.append("image", body, pasted ? "pasted.png" : file.name); return data; };
    const [answer, saliency] = await Promise.all([
      fetchJSON(`defend/${encodeURIComponent($("method").value)}?${params}`, { method: "POST", body: form() }),
      fetchJSON(`saliency?${saliencyParams}`, { method: "POST", body: form() }),
    ]);
    $("mask").src = `data:image/png;base64,${answer.mask}`;
    $("defended").src = `data:image/png;base64,${answer.image}`;
    $("method-name").textContent = `(${answer.method}${answer.lambda === null ? "" : `, lambda ${answer.lambda}`})`;
    fillPredictions($("original-predictions"), answer.original_predictions);
    fillPredictions($("defended-predictions"), answer.predictions);
    showVerdict(answer);
    const estimator = saliency.saliency_method || $("saliency").value;
    $("saliency-note").textContent = `(red${estimator ? `, ${estimator.split(":")[0]}` : ""})`;
    $("saliency-note").title = estimator; // the full spec, e.g. smoothgrad:n=4,sigma=0.2,...
    await drawSaliency(body, saliency.region, model.input_size);
    $("meta").textContent = `${answer.model} (${answer.weights} weights), batch of ${answer.batch_size}, ` +
      `${answer.timing_ms.total.toFixed(0)} ms`;
    showStatus("Done.");
    document.body.dataset.state = "done";
  } catch (error) {
    showStatus(error.message, true);
    document.body.dataset.state = "error";
  } finally {
    $("run").disabled = false;
  }
}

$("controls").addEventListener("submit", defend);
$("method").addEventListener("change", syncLambda);
$("lambda").addEventListener("input", syncLambda);
$("model").addEventListener("change", () => {
  const model = selectedModel();
  if (model) { $("lambda").value = model.default_lambda; syncLambda(); }
});
$("paste-patch").addEventListener("change", () => {
  if ($("paste-patch").checked) samplePatch().catch((error) => showStatus(`No sample patch: ${error.message}`, true));
});
$("api-key").addEventListener("change", loadCatalogue);
loadCatalogue();
