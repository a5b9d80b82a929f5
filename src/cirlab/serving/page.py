"""The web page served at `/`: a conversation of turns over the index.

Pick a gallery image or upload one, type the change, search; then pick any result and refine it with the next
text: each search is a turn of one session (POST /sessions/{id}/turns), shown as a strip above the results. Filters
are built from the items' metadata keys (GET /metadata), thumbs up and down on a result feed the next search
(more like / less like), and "New session" starts over. Everything is reachable from the keyboard (cards are
focusable; Enter or Space chooses), errors and result counts are announced (aria-live), and the layout has no
horizontal scroll down to a 390-pixel-wide phone.
"""

FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
           'fill="#1f6feb"/><circle cx="6" cy="8" r="3" fill="#fff"/><rect x="9" y="5" width="5" height="6" '
           'fill="#ffd33d"/></svg>')

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cirlab search</title>
<link rel="icon" href="/favicon.svg" type="image/svg+xml">
<style>
  * { box-sizing: border-box; }
  body { font-family: system-ui, sans-serif; margin: 1rem; color: #222; background: #fafafa; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem 0; }
  .sub { color: #555; margin: 0 0 1rem 0; }
  form { display: flex; gap: .8rem; align-items: flex-end; flex-wrap: wrap; margin-bottom: .6rem; }
  label { display: flex; flex-direction: column; font-size: .85rem; color: #444; gap: .2rem; min-width: 0;
          max-width: 100%; }
  input[type=text] { width: 26rem; max-width: 100%; padding: .45rem; font-size: 1rem; }
  input[type=file] { max-width: 100%; }
  button { padding: .5rem 1.1rem; font-size: 1rem; cursor: pointer; }
  #reference-box { width: 128px; height: 128px; border: 2px dashed #aaa; background: #fff; display: flex;
                   align-items: center; justify-content: center; font-size: .75rem; color: #666; text-align: center; }
  #reference { width: 100%; height: 100%; object-fit: contain; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(112px, 1fr)); gap: .6rem; }
  .cell { background: #fff; border: 1px solid #ddd; padding: .3rem; font-size: .75rem; text-align: center;
          cursor: pointer; overflow-wrap: anywhere; }
  .cell:focus-visible, button:focus-visible { outline: 3px solid #1f6feb; outline-offset: 2px; }
  .cell img { width: 100%; aspect-ratio: 1; object-fit: contain; display: block; }
  .cell.chosen { outline: 3px solid #1f6feb; }
  .cell .votes { display: flex; justify-content: center; gap: .3rem; margin-top: .2rem; }
  .cell .votes button { padding: .1rem .4rem; font-size: .8rem; }
  .cell .votes button[aria-pressed=true] { background: #1f6feb; color: #fff; }
  #error { color: #b00020; min-height: 1.2rem; }
  #turns { display: flex; gap: .5rem; flex-wrap: wrap; margin: .4rem 0; padding: 0; list-style: none; }
  #turns li { background: #fff; border: 1px solid #ccc; padding: .25rem .5rem; font-size: .8rem; max-width: 100%;
              overflow-wrap: anywhere; }
  #filters { display: flex; gap: .6rem; flex-wrap: wrap; }
  h2 { font-size: 1.05rem; margin: 1.2rem 0 .5rem 0; }
</style>
</head>
<body>
<h1>cirlab: composed image search</h1>
<p class="sub">Choose a reference image (a gallery image below, or upload your own), say what to change, and
search; then choose any result and say what to change next. <span id="count"></span></p>
<form id="query">
  <div id="reference-box"><span id="no-reference">no reference yet</span>
    <img id="reference" alt="the reference image" hidden></div>
  <label>or upload an image <input id="file" name="image" type="file" accept="image/*"></label>
  <label>what to change <input id="text" name="text" type="text" maxlength="512"
         placeholder="make the circle red"></label>
  <label>results <input id="k" name="k" type="number" min="1" max="100" value="10" style="width:4rem"></label>
  <div id="filters"></div>
  <button id="search" type="submit">Search</button>
  <button id="new-session" type="button">New session</button>
</form>
<div id="error" role="alert" aria-live="assertive"></div>
<div id="status" aria-live="polite"></div>
<ol id="turns" aria-label="turns of this session"></ol>
<h2 id="results-title" hidden>Results <span id="took"></span></h2>
<div id="results" class="grid"></div>
<h2>Gallery</h2>
<div id="gallery" class="grid"></div>
<p><button id="more" type="button">More</button></p>
<script>
const state = {imageId: null, fromResult: null, offset: 0, session: null, more: new Set(), less: new Set()};
const $ = (id) => document.getElementById(id);

function activate(el, fn) {
  el.tabIndex = 0;
  el.setAttribute("role", "button");
  el.addEventListener("click", fn);
  el.addEventListener("keydown", (ev) => {
    if (ev.target === el && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); fn(); }
  });
}

function cell(item, label, onchoose, votes) {
  const div = document.createElement("div");
  div.className = "cell";
  div.dataset.id = item.id;
  const img = document.createElement("img");
  img.src = item.url; img.alt = item.id; img.loading = "lazy";
  const cap = document.createElement("div");
  cap.textContent = label;
  div.append(img, cap);
  div.setAttribute("aria-label", `${label}: choose as the reference`);
  activate(div, () => onchoose(div, item));
  if (votes) {
    const row = document.createElement("div");
    row.className = "votes";
    for (const [name, sign, other] of [["more", "\\u{1F44D}", "less"], ["less", "\\u{1F44E}", "more"]]) {
      const b = document.createElement("button");
      b.type = "button"; b.textContent = sign; b.className = name;
      b.setAttribute("aria-label", `${name} like ${item.id}`);
      b.setAttribute("aria-pressed", String(state[name].has(item.id)));
      b.addEventListener("click", (ev) => {
        ev.stopPropagation();
        const on = !state[name].has(item.id);
        state[other].delete(item.id);
        if (on) state[name].add(item.id); else state[name].delete(item.id);
        row.querySelectorAll("button").forEach((x) =>
          x.setAttribute("aria-pressed", String(state[x.className].has(item.id))));
      });
      b.addEventListener("keydown", (ev) => ev.stopPropagation());
      row.append(b);
    }
    div.append(row);
  }
  return div;
}

function showReference(url) {
  $("reference").src = url; $("reference").hidden = false; $("no-reference").hidden = true;
}

function choose(div, item) {
  document.querySelectorAll(".cell.chosen").forEach((c) => c.classList.remove("chosen"));
  div.classList.add("chosen");
  const inResults = div.parentElement === $("results");
  state.fromResult = inResults ? item.id : null;
  state.imageId = inResults ? null : item.id;
  $("file").value = "";
  showReference(item.url);
  $("status").textContent = `${item.id} is the reference.`;
}

async function loadGallery() {
  const r = await fetch(`/items?offset=${state.offset}&limit=60`);
  const body = await r.json();
  if (!r.ok) { $("error").textContent = body.error; return; }
  body.items.forEach((it) => $("gallery").append(cell(it, it.id, choose, false)));
  state.offset += body.items.length;
  $("count").textContent = `${body.total} images indexed.`;
  $("more").hidden = state.offset >= body.total;
}

async function loadFilters() {
  const r = await fetch("/metadata");
  if (!r.ok) return;
  const body = await r.json();
  for (const [key, values] of Object.entries(body.keys)) {
    const label = document.createElement("label");
    label.textContent = key;
    const select = document.createElement("select");
    select.dataset.key = key; select.id = `filter-${key}`;
    select.append(new Option("any", ""));
    values.forEach((v) => select.append(new Option(String(v), JSON.stringify(v))));
    label.append(select);
    $("filters").append(label);
  }
}

function newSession() {
  state.session = null; state.fromResult = null; state.more.clear(); state.less.clear();
  $("turns").replaceChildren();
  $("status").textContent = "A new session.";
}

$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  if (!f) return;
  state.imageId = null; state.fromResult = null;
  document.querySelectorAll(".cell.chosen").forEach((c) => c.classList.remove("chosen"));
  showReference(URL.createObjectURL(f));
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
  else if (state.fromResult && state.session) form.append("choose", state.fromResult);
  else if (!state.session || !$("turns").children.length) {  // later turns default to the last top result
    $("error").textContent = "Choose a gallery image or upload one first."; return;
  }
  const filter = {};
  document.querySelectorAll("#filters select").forEach((s) => { if (s.value) filter[s.dataset.key] =
    JSON.parse(s.value); });
  if (Object.keys(filter).length) form.append("filter", JSON.stringify(filter));
  if (state.more.size) form.append("more", [...state.more].join(","));
  if (state.less.size) form.append("less", [...state.less].join(","));
  if (!state.session) {
    const s = await fetch("/sessions", {method: "POST"});
    state.session = (await s.json()).id;
  }
  const r = await fetch(`/sessions/${state.session}/turns`, {method: "POST", body: form});
  const body = await r.json();
  if (!r.ok) { $("error").textContent = body.error; return; }
  state.imageId = null; state.fromResult = null; $("file").value = "";
  const li = document.createElement("li");
  li.textContent = `${body.turn}. from ${body.reference}: ${$("text").value}`;
  $("turns").append(li);
  $("results").replaceChildren(...body.hits.map((h, i) =>
    cell(h, `${i + 1}. ${h.id} (${h.score.toFixed(3)})`, choose, true)));
  $("results").dataset.count = body.hits.length;
  $("results-title").hidden = false;
  $("status").textContent = `Turn ${body.turn}: ${body.hits.length} results. Choose one to refine it.`;
});

$("new-session").addEventListener("click", newSession);
$("more").addEventListener("click", loadGallery);
loadGallery();
loadFilters();
</script>
</body>
</html>
"""
