// The review page's keys and live camera view. htmx does the filing; this picks the card a key
// acts on, moves on to the next card once one is filed, and refreshes the camera frame.
"use strict";

// A refused label (400) comes back as the card with its error: show it like any answer.
htmx.config.responseHandling = [
  { code: "204", swap: false },
  { code: "[2345]..", swap: true, error: false },
  { code: "...", swap: false, error: true },
];

function waitingCards() {
  return Array.from(document.querySelectorAll(".card[data-key]"));
}

// The card keys act on: the one with the focus, else the first waiting one.
function currentCard() {
  const focused = document.activeElement && document.activeElement.closest(".card[data-key]");
  return focused || waitingCards()[0] || null;
}

function focusCard(card) {
  if (card) {
    card.focus({ preventScroll: false });
    card.scrollIntoView({ block: "nearest" });
  }
}

document.addEventListener("keydown", (event) => {
  if (event.target.closest("input, textarea, select") || event.ctrlKey || event.metaKey || event.altKey) {
    return;
  }
  const card = currentCard();
  if (!card) {
    return;
  }
  const key = event.key.toLowerCase();
  const button = card.querySelector(`[data-shortcut="${key}"]`);
  if (button) {
    event.preventDefault();
    button.click();
    return;
  }
  if (key === "j" || key === "k") {
    const cards = waitingCards();
    const next = cards[cards.indexOf(card) + (key === "j" ? 1 : -1)];
    event.preventDefault();
    focusCard(next);
  }
});

// Once a card is filed, the next waiting card takes the focus so that keys go on working.
let nextAfterSwap = null;
document.addEventListener("htmx:beforeSwap", (event) => {
  const cards = waitingCards();
  const index = cards.indexOf(event.detail.target);
  nextAfterSwap = index >= 0 ? cards[index + 1] || cards[index - 1] || null : null;
});
document.addEventListener("htmx:afterSwap", (event) => {
  const swapped = document.getElementById(event.detail.target.id);
  if (event.detail.xhr.status >= 400 && swapped) {
    focusCard(swapped); // the same photo, with its error: try again
  } else {
    focusCard(nextAfterSwap);
  }
  nextAfterSwap = null;
});

// The camera view: load the next frame once the last one has arrived, about once a second.
function refreshCamera(image, status) {
  const every = Number(image.dataset.refresh) || 1000;
  const next = new Image();
  next.onload = () => {
    image.src = next.src;
    status.textContent = "live, refreshed every second";
    setTimeout(() => refreshCamera(image, status), every);
  };
  next.onerror = () => {
    fetch(next.src).then((answer) => answer.text()).then((text) => {
      let reason = text;
      try { reason = JSON.parse(text).error || text; } catch (error) { /* plain text */ }
      status.textContent = `camera unavailable: ${reason}`;
    }).catch(() => { status.textContent = "the bin does not answer"; });
    setTimeout(() => refreshCamera(image, status), every * 3);
  };
  next.src = `/review/camera.jpg?t=${Date.now()}`;
}

document.addEventListener("DOMContentLoaded", () => {
  const image = document.getElementById("camera");
  if (image) {
    refreshCamera(image, document.getElementById("camera-status"));
  }
  focusCard(waitingCards()[0]);
});
