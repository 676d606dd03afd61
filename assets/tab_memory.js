// Small lists a browser tab keeps across reloads (sessionStorage), newest last, capped:
// the turns whose audio this tab played (audio_queue.jsx) and the typed messages it
// sent (mic_capture.jsx). A reloaded page must neither play nor send those again.
const lists = {};

export function tabList(key) {
  if (!lists[key]) {
    let saved = [];
    try { saved = JSON.parse(window.sessionStorage.getItem(key) || "[]"); } catch (e) {}
    lists[key] = Array.isArray(saved) ? saved : [];
  }
  return lists[key];
}

export function remember(key, item, cap = 50) {
  if (!item) return;
  const list = tabList(key);
  if (list.includes(item)) return;
  list.push(item);
  while (list.length > cap) list.shift();
  try { window.sessionStorage.setItem(key, JSON.stringify(list)); } catch (e) {}
}
