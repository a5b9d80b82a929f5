"""The web page served at `/`: pick a gallery image or upload one, type the change, see the ranked grid."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cirlab search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem 0; }
  .sub { color: #666; margin: 0 0 1rem 0; }
  form { display: flex; gap: .8rem; align-items: flex-end; flex-wrap: wrap; margin-bottom: 1rem; }
  label { display: flex; flex-direction: column; font-size: .85rem; color: #555; gap: .2rem; }
  input[type=text] { width: 26rem; padding: .45rem; font-size: 1rem; }
  button { padding: .5rem 1.1rem; font-size: 1rem; cursor: pointer; }
  #reference { width: 128px; height: 128px; object-fit: contain; border: 2px dashed #aaa; background: #fff; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(128px, 1fr)); gap: .6rem; }
  .cell { background: #fff; border: 1px solid #ddd; padding: .3rem; font-size: .75rem; text-align: center;
          cursor: pointer; overflow-wrap: anywhere; }
  .cell img { width: 100%; aspect-ratio: 1; object-fit: contain; display: block; }
  .cell.chosen { outline: 3px solid #1f6feb; }
  #error { color: #b00020; min-height: 1.2rem; }
  h2 { font-size: 1.05rem; margin: 1.2rem 0 .5rem 0; }
</style>
</head>
<body>
<h1>cirlab: composed image search</h1>
<p class="sub">Choose a reference image (click one in the gallery below, or upload your own), say what to change,
and search. <span id="count"></span></p>
<form id="query">
  <img id="reference" alt="reference image">
  <label>or upload an image <input id="file" name="image" type="file" accept="image/*"></label>
  <label>what to change <input id="text" name="text" type="text" maxlength="512"
         placeholder="make the circle red"></label>
  <label>results <input id="k" name="k" type="number" min="1" max="100" value="10" style="width:4rem"></label>
  <button id="search" type="submit">Search</button>
</form>
<div id="error"></div>
<h2 id="results-title" hidden>Results <span id="took"></span></h2>
<div id="results" class="grid"></div>
<h2>Gallery</h2>
<div id="gallery" class="grid"></div>
<p><button id="more" type="button">More</button></p>
<script>
const state = {imageId: null, offset: 0};
const $ = (id) => document.getElementById(id);

function cell(item, label, onclick) {
  const div = document.createElement("div");
  div.className = "cell";
  div.dataset.id = item.id;
  const img = document.createElement("img");
  img.src = item.url; img.alt = item.id; img.loading = "lazy";
  const cap = document.createElement("div");
  cap.textContent = label;
  div.append(img, cap);
  if (onclick) div.addEventListener("click", () => onclick(div, item));
  return div;
}

function choose(div, item) {
  document.querySelectorAll(".cell.chosen").forEach((c) => c.classList.remove("chosen"));
  div.classList.add("chosen");
  state.imageId = item.id;
  $("file").value = "";
  $("reference").src = item.url;
}

async function loadGallery() {
  const r = await fetch(`/items?offset=${state.offset}&limit=60`);
  const body = await r.json();
  if (!r.ok) { $("error").textContent = body.error; return; }
  body.items.forEach((it) => $("gallery").append(cell(it, it.id, choose)));
  state.offset += body.items.length;
  $("count").textContent = `${body.total} images indexed.`;
  $("more").hidden = state.offset >= body.total;
}

$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  if (!f) return;
  state.imageId = null;
  document.querySelectorAll(".cell.chosen").forEach((c) => c.classList.remove("chosen"));
  $("reference").src = URL.createObjectURL(f);
});

$("query").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("error").textContent = "";
  const form = new FormData();
  form.append("text", $("text").value);
  form.append("k", $("k").value);
  const f = $("file").files[0];
  if (f) form.append("image", f);
  else if (state.imageId) form.append("image_id", state.imageId);
  else { $("error").textContent = "Choose a gallery image or upload one first."; return; }
  const r = await fetch("/search", {method: "POST", body: form});
  const body = await r.json();
  if (!r.ok) { $("error").textContent = body.error; return; }
  $("results").replaceChildren(...body.hits.map((h, i) =>
    cell(h, `${i + 1}. ${h.id} (${h.score.toFixed(3)})`, choose)));
  $("results").dataset.count = body.hits.length;
  $("took").textContent = `(${body.took_ms} ms)`;
  $("results-title").hidden = false;
});

$("more").addEventListener("click", loadGallery);
loadGallery();
</script>
</body>
</html>
"""
