// The search page: results as you type (debounced), photo search by upload or drop,
// category chips from the answer's facets, "more like this" on every result. The address
// holds what can be said in it (?q=...&category=...&similar=ID): opening it runs that
// search, and back and forward move between searches.
"use strict";

const query = document.getElementById("q");
const photo = document.getElementById("photo");
const drop = document.getElementById("drop");
const statusLine = document.getElementById("status");
const list = document.getElementById("results");
const facets = document.getElementById("facets");
const back = document.getElementById("back");
const release = document.getElementById("release");
const K = 24;
let latest = 0; // answers to older requests are dropped
let shownRelease = null;
// the search on screen: {q, category: [...], similar, photo (a File, never in the address)}
let state = { q: "", category: [], similar: null, photo: null };

function showRelease() {
  fetch("/version").then((r) => r.json()).then((v) => {
    if (!v.release) return;
    shownRelease = v.release;
    release.textContent = "release: " + v.release + " · model v" + v.model.version;
  }).catch(() => {});
}

function address(s) {
  const params = new URLSearchParams();
  if (s.similar) params.set("similar", s.similar);
  else if (s.q) params.set("q", s.q);
  for (const c of s.category) params.append("category", c);
  const text = params.toString();
  return text ? "/?" + text : "/";
}

function fromAddress() {
  const params = new URLSearchParams(location.search);
  return {
    q: params.get("q") || "",
    category: params.getAll("category"),
    similar: params.get("similar"),
    photo: null,
  };
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
    facets.append(chip(name + " ×", true, () => go({ ...state, category: state.category.filter((c) => c !== name) })));
  }
  for (const [name, count] of Object.entries(answer.facets || {})) {
    if (state.category.includes(name)) continue;
    const button = chip(name + " (" + count + ")", false, () => go({ ...state, category: [...state.category, name] }));
    button.dataset.category = name;
    facets.append(button);
  }
}

function show(answer, what) {
  list.replaceChildren();
  if (answer.release !== shownRelease) showRelease(); // a new release was swapped in
  const filtered = state.category.length ? " in " + state.category.join(", ") : "";
  statusLine.textContent = answer.results.length + " results for " + what + filtered;
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
    more.addEventListener("click", () => go({ q: state.q, category: state.category, similar: hit.listing_id, photo: null, title: hit.title }));
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

// Runs the search of `s` (nothing pushed to the history)
function search(s) {
  state = s;
  if (s.similar) {
    const url = "/listings/" + encodeURIComponent(s.similar) + "/similar?k=" + K + filters(s);
    run({ url, init: {} }, "more like " + (s.title || s.similar));
  } else if (s.photo) {
    const form = new FormData();
    form.append("photo", s.photo);
    run({ url: "/search/image?k=" + K + filters(s), init: { method: "POST", body: form } }, "photo " + s.photo.name);
  } else if (s.q) {
    run({ url: "/search?k=" + K + "&q=" + encodeURIComponent(s.q) + filters(s), init: {} }, '"' + s.q + '"');
  } else {
    latest++;
    list.replaceChildren();
    facets.replaceChildren();
    statusLine.textContent = "";
    back.hidden = true;
  }
}

// A new search: runs it and records it in the history (the address, when it says it all)
function go(s) {
  const to = address(s);
  if (to !== location.pathname + location.search) history.pushState({ title: s.title || null }, "", to);
  search(s);
}

let timer = null;
query.addEventListener("input", () => {
  clearTimeout(timer);
  timer = setTimeout(() => go({ q: query.value.trim(), category: state.category, similar: null, photo: null }), 250);
});

function searchPhoto(file) {
  if (file) go({ q: "", category: state.category, similar: null, photo: file });
}

photo.addEventListener("change", () => searchPhoto(photo.files[0]));
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  searchPhoto(event.dataTransfer.files[0]);
});
back.addEventListener("click", () => history.back());

function open() {
  const s = fromAddress();
  s.title = (history.state && history.state.title) || null;
  query.value = s.similar ? query.value : s.q;
  search(s);
}

window.addEventListener("popstate", open);
showRelease();
open();
