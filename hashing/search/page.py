"""The search page of hashing/search/server.py: one HTML document with its style and script, which calls the JSON API
(/api/run, /api/search) and shows the thumbnails it serves by index. Text from the server is inserted as text
(textContent), never as markup. The address reproduces what the page shows: /?query_index=N&k=K searches query N
on load (query 0 without one), and each search by index puts its own N and K into the address."""
from hashing.search.exact import MAX_K

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>hyp2-retrieval: search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.4em; margin: 0 0 .3em; }
  #run { color: #444; margin-bottom: .6em; }
  #figures img { height: 120px; margin-right: .5em; border: 1px solid #ccc; }
  form { display: inline-block; margin: .4em 1.5em .4em 0; }
  input[type=number] { width: 5em; }
  #query { display: flex; gap: 1em; align-items: center; margin: 1em 0 .5em; min-height: 2em; }
  #query img { width: 128px; image-rendering: pixelated; border: 2px solid #555; }
  #status { margin: .3em 0 .8em; font-weight: 600; }
  #status.error { color: #b00020; }
  #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: .8em; }
  .result { border: 3px solid #ddd; padding: .3em; border-radius: 6px; font-size: .85em; }
  .result img { width: 100%; image-rendering: pixelated; display: block; }
  .result.relevant { border-color: #2e7d32; }
  .result.irrelevant { border-color: #c62828; }
  .rank { float: right; color: #777; }
  .mark { font-weight: 700; }
</style>
</head>
<body>
<h1>Hamming search</h1>
<div id="run">loading the run ...</div>
<div id="figures"></div>
<form id="by-index">
  <label>query # <input id="query-index" type="number" min="0" value="0"></label>
  <label>k <input id="k" type="number" min="1" max="__MAX_K__" value="10"></label>
  <button id="search-index" type="submit">Search</button>
  <button id="random" type="button">Random query</button>
</form>
<form id="by-upload">
  <input id="upload" type="file" accept="image/*">
  <button id="search-upload" type="submit">Search with this image</button>
</form>
<div id="query"></div>
<div id="status"></div>
<div id="grid"></div>
<script>
"use strict";
let queries = 0;

function element(tag, properties, children) {
  const node = document.createElement(tag);
  Object.assign(node, properties || {});
  for (const child of children || []) node.append(child);
  return node;
}

function status(text, isError) {
  const node = document.getElementById("status");
  node.textContent = text;
  node.className = isError ? "error" : "";
}

async function call(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({error: "the server's answer is not JSON"}));
  if (!response.ok) throw new Error(body.error || ("HTTP " + response.status));
  return body;
}

function clearResults() {
  document.getElementById("query").replaceChildren();
  document.getElementById("grid").replaceChildren();
}

function show(answer, uploadedImage) {
  const query = document.getElementById("query");
  query.replaceChildren();
  const image = answer.query.image || uploadedImage;
  if (image) query.append(element("img", {src: image, alt: "query"}));
  const about = answer.query.index === null ? "uploaded image" : "query #" + answer.query.index;
  query.append(element("div", {}, [about + (answer.query.labels.length ? ": " + answer.query.labels.join(", ") : "")]));
  const precision = answer.precision_at_k === null ? "" :
    "  precision@" + answer.k + " " + answer.precision_at_k.toFixed(3);
  status(answer.k + " nearest of the database (" + answer.hash_bit + " bits)" + precision);
  const grid = document.getElementById("grid");
  grid.replaceChildren();
  answer.results.forEach((result, rank) => {
    const kind = result.relevant === null ? "" : (result.relevant ? " relevant" : " irrelevant");
    const mark = result.relevant === null ? "" : (result.relevant ? "\u2713 relevant" : "\u2717 not relevant");
    const card = element("div", {className: "result" + kind}, [
      element("span", {className: "rank"}, ["#" + (rank + 1)]),
      element("img", {src: result.image, alt: "database item " + result.id}),
      element("div", {className: "distance"}, ["distance " + result.distance]),
      element("div", {className: "labels"}, [result.labels.join(", ") || "(no label)"]),
      element("div", {className: "mark"}, [mark]),
      element("div", {className: "id"}, ["id " + result.id])]);
    card.dataset.id = result.id;
    card.dataset.distance = result.distance;
    grid.append(card);
  });
}

async function searchIndex(index, addressed) {
  const k = document.getElementById("k").value;
  const params = "?query_index=" + encodeURIComponent(index) + "&k=" + encodeURIComponent(k);
  if (!addressed && location.search !== params) history.pushState(null, "", params);
  status("searching ...");
  try { show(await call("/api/search" + params)); }
  catch (error) { clearResults(); status(error.message, true); }
}

function searchAddressed() {
  const params = new URLSearchParams(location.search);
  if (params.get("k")) document.getElementById("k").value = params.get("k");
  const index = params.get("query_index") || "0";
  document.getElementById("query-index").value = index;
  searchIndex(index, true);
}

document.getElementById("by-index").addEventListener("submit", event => {
  event.preventDefault();
  searchIndex(document.getElementById("query-index").value);
});
document.getElementById("random").addEventListener("click", () => {
  const index = Math.floor(Math.random() * Math.max(queries, 1));
  document.getElementById("query-index").value = index;
  searchIndex(index);
});
document.getElementById("by-upload").addEventListener("submit", async event => {
  event.preventDefault();
  const file = document.getElementById("upload").files[0];
  if (!file) { status("choose an image file first", true); return; }
  const form = new FormData();
  form.append("image", file);
  form.append("k", document.getElementById("k").value);
  status("searching ...");
  try {
    const answer = await call("/api/search", {method: "POST", body: form});
    history.pushState(null, "", location.pathname);  // an upload has no address
    show(answer, URL.createObjectURL(file));
  }
  catch (error) { clearResults(); status(error.message, true); }
});
window.addEventListener("popstate", searchAddressed);
searchAddressed();

call("/api/run").then(run => {
  queries = run.queries;
  document.getElementById("query-index").max = run.queries - 1;
  const score = run.map === null ? "no metrics file" : run.map_name + " " + run.map.toFixed(4) +
    (run.convention && run.convention.normalize ? " (AP over " + run.convention.normalize + ", zero_hit " +
     run.convention.zero_hit + ", ties " + run.convention.ties + ")" : "");
  document.getElementById("run").textContent = [run.dataset, run.backbone, run.hash_bit + " bits", run.loss, score,
    run.queries + " queries, " + run.database + " database items",
    run.exact_index ? "exact search" : "approximate search"].filter(Boolean).join("  \u00b7  ");
  const figures = document.getElementById("figures");
  for (const kind of run.figures) {
    const thumbnail = element("img", {src: "/figures/" + kind, alt: kind});
    figures.append(element("a", {href: "/figures/" + kind, title: kind}, [thumbnail]));
  }
}).catch(error => status(error.message, true));
</script>
</body>
</html>
""".replace("__MAX_K__", str(MAX_K))
