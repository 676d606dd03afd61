// Audio queue: plays the turn's chunk WAV URLs in order, gaplessly (Web Audio,
// scheduled back to back), fetching/decoding ahead while the current one plays.
// Reports (JSON string to onReport): first_playing (with the server-clock time,
// using the offset the mic socket measured), chunk (each chunk start), ended (queue
// drained), stopped (barge-in/stop, with how many chunks started). Stops at once on
// the window event "voiceclaw:barge-in" or when stopSeq changes.
// data-played-count: chunks that started playing in this turn.
import React, { useEffect, useRef } from "react";

function clientNow() { return performance.timeOrigin + performance.now(); }

export function AudioQueue({ urls, turnId, stopSeq, cue, onReport, ...rest }) {
  const el = useRef(null);
  const st = useRef(null);
  const report = (obj) => { try { onReport && onReport(JSON.stringify(obj)); } catch (e) {} };

  const ctx = () => {
    if (!window.__voiceclawPlayCtx) window.__voiceclawPlayCtx = new (window.AudioContext || window.webkitAudioContext)();
    const c = window.__voiceclawPlayCtx;
    if (c.state === "suspended") c.resume();
    return c;
  };

  const fresh = (turn) => ({ turn, buffers: [], fetching: new Set(), next: 0, at: 0, sources: [], started: 0, timers: [], stopped: false, endTimer: null });

  const setCount = (n) => { if (el.current) el.current.setAttribute("data-played-count", String(n)); };

  const stopAll = (tell) => {
    const s = st.current;
    if (!s) return;
    const wasPlaying = s.sources.length > 0 && !s.stopped;
    s.stopped = true;
    s.sources.forEach((src) => { try { src.stop(); } catch (e) {} });
    s.sources = [];
    s.timers.forEach(clearTimeout); s.timers = [];
    if (s.endTimer) clearTimeout(s.endTimer);
    if (el.current) el.current.setAttribute("data-state", "stopped");
    if (tell && wasPlaying) report({ event: "stopped", turn: s.turn, played: s.started, client_ms: clientNow() });
  };

  const schedule = () => {
    const s = st.current;
    if (!s || s.stopped) return;
    const c = ctx();
    while (s.buffers[s.next]) {
      const i = s.next;
      const buf = s.buffers[i];
      const src = c.createBufferSource();
      src.buffer = buf;
      src.connect(c.destination);
      const when = Math.max(s.at, c.currentTime + 0.01);
      src.start(when);
      s.at = when + buf.duration;
      s.sources.push(src);
      src.onended = () => { s.sources = s.sources.filter((x) => x !== src); };
      s.next += 1;
      const lat = (c.outputLatency || c.baseLatency || 0) * 1000;
      const delayMs = (when - c.currentTime) * 1000;
      const playAt = clientNow() + delayMs + lat;
      s.timers.push(setTimeout(() => {
        if (s.stopped || st.current !== s) return;
        s.started = Math.max(s.started, i + 1);
        setCount(s.started);
        if (el.current) el.current.setAttribute("data-state", "playing");
        if (i === 0) {
          const off = window.__voiceclawClockOffset;
          report({ event: "first_playing", turn: s.turn, index: 0, client_ms: playAt, server_ms: off === undefined ? null : playAt + off });
        } else {
          report({ event: "chunk", turn: s.turn, index: i });
        }
      }, Math.max(0, delayMs)));
      if (s.endTimer) clearTimeout(s.endTimer);
      s.endTimer = setTimeout(() => {
        if (s.stopped || st.current !== s || s.next < (s.known || 0)) return;
        if (el.current) el.current.setAttribute("data-state", "ended");
        report({ event: "ended", turn: s.turn, played: s.started });
      }, Math.max(0, (s.at - c.currentTime) * 1000) + 30);
    }
  };

  const load = (i, url) => {
    const s = st.current;
    if (s.fetching.has(i)) return;
    s.fetching.add(i);
    fetch(url, { credentials: "same-origin" })
      .then((r) => { if (!r.ok) throw new Error("HTTP " + r.status); return r.arrayBuffer(); })
      .then((data) => ctx().decodeAudioData(data))
      .then((buf) => { if (st.current === s && !s.stopped) { s.buffers[i] = buf; schedule(); } })
      .catch((e) => { console.warn("audio chunk failed", url, e); if (st.current === s) { s.buffers[i] = ctx().createBuffer(1, 1, 22050); schedule(); } });
  };

  // new turn -> new queue
  useEffect(() => {
    if (st.current && st.current.turn !== turnId) stopAll(false);
    if (!st.current || st.current.turn !== turnId) { st.current = fresh(turnId); setCount(0); if (el.current) el.current.setAttribute("data-state", "idle"); }
  }, [turnId]);

  // new URLs: fetch all of them now (they are short), play in order
  useEffect(() => {
    const s = st.current;
    if (!s || s.stopped || !urls) return;
    s.known = urls.length;
    urls.forEach((u, i) => load(i, u));
  }, [urls, turnId]);

  const firstStop = useRef(true);
  useEffect(() => {
    if (firstStop.current) { firstStop.current = false; return; }
    stopAll(true);
  }, [stopSeq]);

  useEffect(() => {
    if (!cue || typeof window === "undefined") return;
    if (cue.startsWith("still_working") && window.__voiceclawCue) window.__voiceclawCue("working");
  }, [cue]);

  useEffect(() => {
    const onBarge = () => stopAll(true);
    const unlock = () => { try { ctx(); } catch (e) {} };
    window.addEventListener("voiceclaw:barge-in", onBarge);
    window.addEventListener("pointerdown", unlock, { once: true });
    window.addEventListener("keydown", unlock, { once: true });
    return () => { window.removeEventListener("voiceclaw:barge-in", onBarge); };
  }, []);

  return <div id="audio-queue" ref={el} data-played-count="0" data-state="idle" {...rest} />;
}
