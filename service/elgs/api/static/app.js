// The elgs web page: pick an image, model, method and lambda; POST /defend/{method}; show the answer.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], defenses: [] };

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

async function loadCatalogue() {
  try {
    const [models, defenses] = await Promise.all([fetchJSON("models"), fetchJSON("defenses")]);
    state.models = models.models;
    state.defenses = defenses.defenses;
    fillSelect($("model"), state.models, (m) => `${m.name}${m.weights === "random" ? " (random weights)" : ""}`);
    $("model").value = models.default;
    fillSelect($("method"), state.defenses, (d) => `${d.name}: ${d.summary}`);
    $("method").value = state.defenses.some((d) => d.name === "slgs") ? "slgs" : state.defenses[0].name;
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

async function defend(event) {
  event.preventDefault();
  const file = $("image").files[0];
  if (!file) { showStatus("Choose an image first.", true); return; }
  const defense = selectedDefense();
  const params = new URLSearchParams({ model: $("model").value });
  if (defense && defense.parameters.lambda) params.set("lambda", $("lambda").value);
  const form = new FormData();
  form.append("image", file);
  $("original").src = URL.createObjectURL(file);
  $("run").disabled = true;
  document.body.dataset.state = "running";
  showStatus(`Running ${defense ? defense.name : ""}...`);
  try {
    const answer = await fetchJSON(`defend/${encodeURIComponent($("method").value)}?${params}`,
                                   { method: "POST", body: form });
    $("mask").src = `data:image/png;base64,${answer.mask}`;
    $("defended").src = `data:image/png;base64,${answer.image}`;
    $("method-name").textContent = `(${answer.method}${answer.lambda === null ? "" : `, lambda ${answer.lambda}`})`;
    fillPredictions($("original-predictions"), answer.original_predictions);
    fillPredictions($("defended-predictions"), answer.predictions);
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
$("api-key").addEventListener("change", loadCatalogue);
loadCatalogue();
