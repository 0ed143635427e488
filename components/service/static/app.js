// The search page: results as you type (debounced), photo search by upload or drop.
"use strict";

const query = document.getElementById("q");
const photo = document.getElementById("photo");
const drop = document.getElementById("drop");
const statusLine = document.getElementById("status");
const list = document.getElementById("results");
const release = document.getElementById("release");
const K = 24;
let latest = 0; // answers to older requests are dropped

let shownRelease = null;

function showRelease() {
  fetch("/version").then((r) => r.json()).then((v) => {
    if (!v.release) return;
    shownRelease = v.release;
    release.textContent = "release: " + v.release + " · model v" + v.model.version;
  }).catch(() => {});
}

function show(answer, what) {
  list.replaceChildren();
  if (answer.release !== shownRelease) showRelease(); // a new release was swapped in
  statusLine.textContent = answer.results.length + " results for " + what;
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
    item.append(title, score);
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

let timer = null;
query.addEventListener("input", () => {
  clearTimeout(timer);
  const text = query.value.trim();
  if (!text) {
    list.replaceChildren();
    statusLine.textContent = "";
    return;
  }
  timer = setTimeout(() => {
    const url = "/search?k=" + K + "&q=" + encodeURIComponent(text);
    run({ url, init: {} }, '"' + text + '"');
  }, 250);
});

function searchPhoto(file) {
  if (!file) return;
  const form = new FormData();
  form.append("photo", file);
  run({ url: "/search/image?k=" + K, init: { method: "POST", body: form } }, "photo " + file.name);
}

photo.addEventListener("change", () => searchPhoto(photo.files[0]));
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  searchPhoto(event.dataTransfer.files[0]);
});

showRelease();
