// The search page: results as you type (debounced), photo search by upload or drop,
// category chips from the answer's facets, "more like this" on every result, and "Show
// more" for the next page. The address holds the search (?q=...&category=...&similar=ID,
// or &photo=ID for a photo kept in this tab's session storage): opening or reloading it
// runs that search, and back and forward move between searches. The page shows what it
// searched: the box holds the query (empty for a photo or "more like this"), the photo is
// shown, and the count says how many of how many listings.
"use strict";

const query = document.getElementById("q");
const photo = document.getElementById("photo");
const drop = document.getElementById("drop");
const statusLine = document.getElementById("status");
const list = document.getElementById("results");
const facets = document.getElementById("facets");
const back = document.getElementById("back");
const release = document.getElementById("release");
const moreButton = document.getElementById("more");
const queryPhoto = document.getElementById("query-photo");
const K = 24; // results per page
let maxK = 100; // the service's serve.max_k (from /version)
let latest = 0; // answers to older requests are dropped
let shownRelease = null;
// the search on screen: {q, category: [...], similar, photo: {id, file}, k}
let state = { q: "", category: [], similar: null, photo: null, k: K };

function showRelease() {
  fetch("/version").then((r) => r.json()).then((v) => {
    if (!v.release) return;
    shownRelease = v.release;
    if (v.max_k) maxK = v.max_k;
    release.textContent = "release: " + v.release + " · model v" + v.model.version;
  }).catch(() => {});
}

function address(s) {
  const params = new URLSearchParams();
  if (s.similar) params.set("similar", s.similar);
  else if (s.photo) params.set("photo", s.photo.id);
  else if (s.q) params.set("q", s.q);
  for (const c of s.category) params.append("category", c);
  const text = params.toString();
  return text ? "/?" + text : "/";
}

function fromAddress() {
  const params = new URLSearchParams(location.search);
  const id = params.get("photo");
  return {
    q: params.get("q") || "",
    category: params.getAll("category"),
    similar: params.get("similar"),
    photo: id ? { id, file: keptPhoto(id) } : null,
    k: K,
  };
}

// A photo searched by is kept in this tab's session storage, so that reloading its address
// (or going back to it) searches it again; a photo too large to keep is searched all the
// same, and its address then says it cannot be reopened.
function keepPhoto(file) {
  const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 6);
  const reader = new FileReader();
  reader.onload = () => {
    try { sessionStorage.setItem("photo:" + id, JSON.stringify({ name: file.name, data: reader.result })); } catch (err) { /* full */ }
  };
  reader.readAsDataURL(file);
  return { id, file };
}

function keptPhoto(id) {
  const kept = sessionStorage.getItem("photo:" + id);
  if (!kept) return null;
  const { name, data } = JSON.parse(kept);
  const [head, body] = data.split(",");
  const bytes = Uint8Array.from(atob(body), (c) => c.charCodeAt(0));
  return new File([bytes], name, { type: head.slice(5).split(";")[0] });
}

function chip(label, pressed, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "chip";
  button.setAttribute("aria-pressed", pressed ? "true" : "false");
  button.textContent = label;
  button.addEventListener("click", onClick);
  return button;
}

function showFacets(answer) {
  facets.replaceChildren();
  for (const name of state.category) {
    facets.append(chip(name + " ×", true, () => go({ ...state, category: state.category.filter((c) => c !== name), k: K })));
  }
  const best = Object.values(answer.facets || {}).reduce((a, b) => a + b, 0);
  for (const [name, count] of Object.entries(answer.facets || {})) {
    if (state.category.includes(name)) continue;
    const button = chip(name + " (" + count + ")", false, () => go({ ...state, category: [...state.category, name], k: K }));
    button.title = count + " of the " + best + " best matches are in " + name;
    button.dataset.category = name;
    facets.append(button);
  }
}

function show(answer, what) {
  list.replaceChildren();
  if (answer.release !== shownRelease) showRelease(); // a new release was swapped in
  if (answer.title) what = "more like " + answer.title; // a shared address names only the id
  const filtered = state.category.length ? " in " + state.category.join(", ") : "";
  const n = answer.results.length;
  const of = answer.searched === undefined ? "" : " of " + answer.searched.toLocaleString("en") + " listings" + filtered;
  statusLine.textContent = (n ? "best " + n : "no results") + of + " for " + what;
  moreButton.hidden = !(n === state.k && state.k < maxK && n < (answer.searched || 0));
  back.hidden = !state.similar;
  showFacets(answer);
  for (const hit of answer.results) {
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.listingId = hit.listing_id;
    if (hit.photo_url) {
      const img = document.createElement("img");
      img.src = hit.photo_url;
      img.alt = hit.title || hit.listing_id;
      img.loading = "lazy";
      item.append(img);
    }
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = hit.title || hit.listing_id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const more = document.createElement("button");
    more.type = "button";
    more.className = "more";
    more.textContent = "More like this";
    more.addEventListener("click", () => go({ q: "", category: state.category, similar: hit.listing_id, photo: null, k: K }));
    item.append(title, score, more);
    list.append(item);
  }
}

async function run(request, what) {
  const mine = ++latest;
  statusLine.textContent = "searching…";
  try {
    const response = await fetch(request.url, request.init);
    const body = await response.json();
    if (mine !== latest) return;
    if (!response.ok) {
      statusLine.textContent = "error: " + (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
      return;
    }
    show(body, what);
  } catch (err) {
    if (mine === latest) statusLine.textContent = "error: " + err;
  }
}

function filters(s) {
  return s.category.map((c) => "&category=" + encodeURIComponent(c)).join("");
}

function showQueryPhoto(file) {
  if (queryPhoto.src) URL.revokeObjectURL(queryPhoto.src);
  queryPhoto.hidden = !file;
  if (file) {
    queryPhoto.src = URL.createObjectURL(file);
    queryPhoto.alt = "your photo: " + file.name;
  } else {
    queryPhoto.removeAttribute("src");
  }
}

function clear(message) {
  latest++;
  list.replaceChildren();
  facets.replaceChildren();
  statusLine.textContent = message;
  back.hidden = true;
  moreButton.hidden = true;
}

// Runs the search of `s` (nothing pushed to the history)
function search(s) {
  state = s;
  const typed = s.similar || s.photo ? "" : s.q; // what the box says (left as typed)
  if (query.value.trim() !== typed) query.value = typed;
  showQueryPhoto(s.photo && s.photo.file);
  const k = "?k=" + s.k + "&facets=true"; // the chips
  if (s.similar) {
    const url = "/listings/" + encodeURIComponent(s.similar) + "/similar" + k + filters(s);
    run({ url, init: {} }, "more like this listing");
  } else if (s.photo && s.photo.file) {
    const form = new FormData();
    form.append("photo", s.photo.file);
    run({ url: "/search/image" + k + filters(s), init: { method: "POST", body: form } }, "your photo " + s.photo.file.name);
  } else if (s.photo) {
    clear("This photo search cannot be reopened here (the photo stays in the tab that searched it): choose the photo again.");
  } else if (s.q) {
    run({ url: "/search" + k + "&q=" + encodeURIComponent(s.q) + filters(s), init: {} }, '"' + s.q + '"');
  } else {
    clear("");
  }
}

// A new search: runs it and records it in the history; `depth` counts the searches made
// on this page since it was opened, so Back never leaves the site
function go(s) {
  const to = address(s);
  const depth = (history.state && history.state.depth) || 0;
  if (to !== location.pathname + location.search) history.pushState({ depth: depth + 1 }, "", to);
  search(s);
}

let timer = null;
query.addEventListener("input", () => {
  clearTimeout(timer);
  timer = setTimeout(() => go({ q: query.value.trim(), category: state.category, similar: null, photo: null, k: K }), 250);
});

function searchPhoto(file) {
  if (file) go({ q: "", category: state.category, similar: null, photo: keepPhoto(file), k: K });
}

photo.addEventListener("change", () => searchPhoto(photo.files[0]));
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  searchPhoto(event.dataTransfer.files[0]);
});
// Back to the search before: the previous entry when this page made one, else (an address
// opened directly) the search this one came from, without "more like this"
back.addEventListener("click", () => {
  if (history.state && history.state.depth > 0) history.back();
  else go({ ...state, similar: null, k: K });
});
moreButton.addEventListener("click", () => search({ ...state, k: Math.min(maxK, state.k + K) }));

function open() {
  search(fromAddress());
}

window.addEventListener("popstate", open);
showRelease();
open();
