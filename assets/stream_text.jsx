// Streaming reply text: the server sends a window of the last few segments
// (segBase = index of segments[0]); this keeps the whole list, so an update
// carries only the newest pieces instead of the whole reply. A window that starts
// past what this component holds (a page opened mid-stream) leaves a gap: it shows
// what it has and invents nothing; ChatState.on_load resends the whole list once
// (segBase 0), which fills the gap.
import React, { useRef } from "react";

export function StreamText({ turnId, segBase, segments, ...rest }) {
  const store = useRef({ turn: null, parts: [] });
  if (store.current.turn !== turnId) store.current = { turn: turnId, parts: [] };
  const base = Number(segBase) || 0;
  (segments || []).forEach((s, i) => { store.current.parts[base + i] = s; });
  let text = "";
  for (const p of store.current.parts) text += p || "";
  return <div {...rest} style={{ whiteSpace: "pre-wrap" }}>{text}</div>;
}
