// Audio queue: plays the turn's chunk WAV URLs in order, gaplessly (Web Audio,
// scheduled back to back), fetching/decoding ahead while the current one plays.
// Reports (with voiceReports: on the tab's voice socket as {type: "playback", ...}
// through window.__voiceclawVoiceSend, which the mic component provides; else a JSON
// string to onReport): first_playing (with the server-clock time,
// using the offset the mic socket measured), chunk (each chunk start), ended (the
// turn's audio is complete -- the `done` prop -- and has all played; a drain while
// the LLM is slower than speech is not an end), stopped (barge-in/stop, or the page
// left mid-reply, with how many chunks started), mounted (once, when the queue mounts:
// a new page, whose queue has nothing of the previous page's playback). Leaving the
// page mid-reply is also sent on the mic socket (window.__voiceclawMicSend,
// {type: "playback_stopped", turn, played}): on a reload or a closed tab Reflex's
// own socket is already closed. Window events: "voiceclaw:barge-in" stops at once
// (detail.turn, when given, is the cut turn: it stays silent if it arrives later),
// "voiceclaw:pause" suspends playback (a tentative voice onset) and
// "voiceclaw:resume" continues it gaplessly from where it stopped. stopSeq changes
// stop it too. A turn that an earlier queue of this tab already played (the page was
// left and reopened, or reloaded) is never played again.
// data-played-count: chunks that started playing in this turn.
import React, { useEffect, useRef } from "react";
import { tabList, remember } from "./tab_memory.js";

function clientNow() { return performance.timeOrigin + performance.now(); }

// The playback context is ours alone: the mic capture and the sound cues open their
// own, so suspending this one pauses the reply and nothing else.
// `paused` is the state we WANT (a tentative voice onset); the context's `state`
// only changes once suspend()/resume() resolve, so both run on one promise chain
// and each step reads the wanted state when it runs (a quick pause then resume
// ends running, a pause during a pending resume ends suspended). Chunk starts are
// counted only while the context really runs (not while it is suspended by the
// autoplay policy or "interrupted" by iOS: lock screen, call, Siri).
let paused = false;
let pauseSafety = null;
const PAUSE_SAFETY_MS = 3000; // a pause nobody resolves (socket gone) ends by itself
const CTX_OP_TIMEOUT_MS = 1500; // a resume() held back by the autoplay policy must not block the chain
let ctxChain = Promise.resolve();
let ctxQueued = 0; // steps not started yet: one is enough, it reads the wanted state when it runs
const stateListeners = new Set();

// fromEvent: the context's own 'statechange' (not one of our suspend/resume steps settling)
function notifyCtxState(fromEvent) { stateListeners.forEach((fn) => { try { fn(fromEvent === true); } catch (e) {} }); }

function syncPlayCtx() {
  const c = typeof window !== "undefined" ? window.__voiceclawPlayCtx : null;
  if (!c || ctxQueued > 0) return;
  ctxQueued += 1;
  ctxChain = ctxChain.then(() => {
    ctxQueued -= 1;
    if (c.state === "closed") return undefined;
    let op = null;
    if (paused) { if (c.state !== "suspended") op = c.suspend(); }
    else if (c.state !== "running") op = c.resume();
    if (!op) return undefined;
    return Promise.race([op, new Promise((r) => setTimeout(r, CTX_OP_TIMEOUT_MS))]);
  }).catch(() => {}).then(() => notifyCtxState());
}

function playCtx(sync = true) {
  if (!window.__voiceclawPlayCtx) {
    const c = new (window.AudioContext || window.webkitAudioContext)();
    window.__voiceclawPlayCtx = c;
    const onState = () => notifyCtxState(true);
    try { c.addEventListener("statechange", onState); } catch (e) { c.onstatechange = onState; }
  }
  const c = window.__voiceclawPlayCtx;
  if (sync && !paused && c.state !== "running") syncPlayCtx();
  return c;
}

// playback really advances: wanted and actual state both "running"
function ctxRunning() {
  const c = typeof window !== "undefined" ? window.__voiceclawPlayCtx : null;
  return !!c && !paused && c.state === "running";
}

// A user gesture (pointerup / touchend / keydown, for good: iOS interrupts the
// context after a lock screen, a call or Siri and only a gesture resumes it).
// resume() must be called synchronously inside the gesture handler.
function unlockOnGesture() {
  try {
    const c = playCtx(false);
    if (!paused && c.state !== "running" && c.state !== "closed") { c.resume().then(notifyCtxState, () => {}); }
  } catch (e) {}
}

const PLAYED_KEY = "voiceclaw:played-turns";
const playedTurns = () => tabList(PLAYED_KEY);
const markPlayed = (turn) => remember(PLAYED_KEY, turn);

export function AudioQueue({ urls, turnId, done, stopSeq, cue, onReport, voiceReports, ...rest }) {
  const el = useRef(null);
  const st = useRef(null);
  const doneRef = useRef(done);
  doneRef.current = done;
  const reportRef = useRef(onReport);
  reportRef.current = onReport;
  const voiceRef = useRef(!!voiceReports);
  voiceRef.current = !!voiceReports;
  const report = (obj) => {
    try {
      if (voiceRef.current) {
        const msg = { type: "playback", ...obj };
        // "mounted" only tells an open socket (a page that holds no session has nothing to reset)
        if (obj.event === "mounted") { if (window.__voiceclawMicSend) window.__voiceclawMicSend(msg); }
        else if (window.__voiceclawVoiceSend && !String(obj.turn || "").startsWith("replay-")) window.__voiceclawVoiceSend(msg); // a replay needs no session
        else if (window.__voiceclawMicSend) window.__voiceclawMicSend(msg);
        return;
      }
      if (reportRef.current) reportRef.current(JSON.stringify(obj));
    } catch (e) {}
  };
  const ctx = () => playCtx(true);

  const fresh = (turn) => ({ turn, buffers: [], fetching: new Set(), next: 0, at: 0, sources: [], started: 0, timers: [], pending: [], stopped: false, endTimer: null, ended: false, known: 0 });

  const setAttr = (k, v) => { if (el.current) el.current.setAttribute(k, v); };
  const setCount = (n) => setAttr("data-played-count", String(n));

  const clearTimers = (s) => {
    s.timers.forEach(clearTimeout); s.timers = [];
    if (s.endTimer) { clearTimeout(s.endTimer); s.endTimer = null; }
  };

  // leaving mid-reply: something was heard (a chunk started) and not all of the
  // reply known so far has played to its end (a chunk still sounding, or one known
  // but not scheduled yet); this turn is never played again (played-turns)
  const cutMidReply = (s) => {
    if (s.stopped || s.ended || s.started <= 0) return false;
    if (s.next < (s.known || 0)) return true; // more chunks were on their way
    const c = typeof window !== "undefined" ? window.__voiceclawPlayCtx : null;
    if (s.sources.length === 0 || (c && c.currentTime + 0.02 >= s.at)) return false; // all played to its end
    return true;
  };

  // tell: report "stopped" when it cut playback. leaving (pagehide / unmount): see cutMidReply;
  // the cut also goes on the mic socket (Reflex's socket may be closed already)
  const stopAll = (tell, leaving = false) => {
    const s = st.current;
    if (!s) return;
    const wasPlaying = leaving ? cutMidReply(s) : (!s.stopped && s.sources.length > 0);
    s.stopped = true;
    s.sources.forEach((src) => { try { src.stop(); } catch (e) {} });
    s.sources = [];
    s.pending = [];
    clearTimers(s);
    setAttr("data-state", "stopped");
    if (tell && wasPlaying) {
      if (leaving) {
        try { window.__voiceclawMicSend && window.__voiceclawMicSend({ type: "playback_stopped", turn: s.turn, played: s.started }); } catch (e) {}
      }
      report({ event: "stopped", turn: s.turn, played: s.started, client_ms: clientNow() });
    }
  };

  // chunk-start reports follow the context's clock (frozen while paused)
  const armStarts = (s) => {
    s.timers.forEach(clearTimeout); s.timers = [];
    if (!ctxRunning() || s.stopped) return; // re-armed on 'statechange' once it runs
    const c = ctx();
    const lat = (c.outputLatency || c.baseLatency || 0) * 1000;
    s.pending.forEach((p) => {
      const delayMs = (p.when - c.currentTime) * 1000;
      const playAt = clientNow() + Math.max(0, delayMs) + lat;
      s.timers.push(setTimeout(() => {
        if (s.stopped || st.current !== s || !ctxRunning()) return;
        s.pending = s.pending.filter((x) => x !== p);
        s.started = Math.max(s.started, p.i + 1);
        setCount(s.started);
        setAttr("data-state", "playing");
        if (p.i === 0) {
          const off = window.__voiceclawClockOffset;
          report({ event: "first_playing", turn: s.turn, index: 0, client_ms: playAt, server_ms: off === undefined ? null : playAt + off });
        } else {
          report({ event: "chunk", turn: s.turn, index: p.i });
        }
      }, Math.max(0, delayMs)));
    });
  };

  // "ended": everything known was scheduled, has played, and the turn is done producing audio
  const checkEnd = (s) => {
    if (s.stopped || st.current !== s || !ctxRunning() || s.ended || s.next === 0) return;
    if (s.next < (s.known || 0)) return; // more chunks are on their way
    const c = ctx();
    if (c.currentTime + 0.02 < s.at) { armEnd(s); return; }
    if (!doneRef.current) { setAttr("data-state", "waiting"); return; } // drained mid-reply: wait for the next chunk
    s.ended = true;
    setAttr("data-state", "ended");
    report({ event: "ended", turn: s.turn, played: s.started });
  };
  const armEnd = (s) => {
    if (s.endTimer) clearTimeout(s.endTimer);
    s.endTimer = null;
    if (!ctxRunning() || s.stopped) return;
    const c = ctx();
    s.endTimer = setTimeout(() => checkEnd(s), Math.max(0, (s.at - c.currentTime) * 1000) + 30);
  };

  const schedule = () => {
    const s = st.current;
    if (!s || s.stopped) return;
    const c = ctx();
    let added = false;
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
      s.pending.push({ i, when });
      added = true;
    }
    if (added) {
      markPlayed(s.turn);
      armStarts(s);
      armEnd(s);
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
      .catch((e) => { console.warn("audio chunk failed", url, e); if (st.current === s && !s.stopped) { s.buffers[i] = ctx().createBuffer(1, 1, 22050); schedule(); } });
  };

  // mounted: once per mount (never on a re-render), so the server knows a new page
  // (with a fresh queue) replaced the previous one and its playback
  const mountedSent = useRef(false);
  useEffect(() => {
    if (mountedSent.current) return;
    mountedSent.current = true;
    report({ event: "mounted", turn: turnId || "" });
  }, []);

  // new turn -> new queue; a turn an earlier queue of this tab played stays silent
  useEffect(() => {
    if (st.current && st.current.turn !== turnId) stopAll(false);
    if (!st.current || st.current.turn !== turnId) {
      const s = fresh(turnId);
      if (turnId && typeof window !== "undefined" && playedTurns().includes(turnId)) s.stopped = true;
      st.current = s;
      setCount(0);
      setAttr("data-state", "idle");
    }
  }, [turnId]);

  // new URLs: fetch all of them now (they are short), play in order
  useEffect(() => {
    const s = st.current;
    if (!s || s.stopped || !urls) return;
    s.known = Math.max(s.known || 0, urls.length);
    urls.forEach((u, i) => load(i, u));
  }, [urls, turnId]);

  // the turn finished producing audio: a drained queue has now ended
  useEffect(() => {
    const s = st.current;
    if (done && s && !s.stopped) checkEnd(s);
  }, [done]);

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
    const unpause = () => {
      if (pauseSafety) { clearTimeout(pauseSafety); pauseSafety = null; }
      if (!paused) return false;
      paused = false;
      return true;
    };
    // the context's real state changed (or a suspend/resume step settled)
    const onCtxState = (fromEvent) => {
      // a suspend()/resume() that settled after its timeout left the wrong state:
      // sync again (only on a real state change, so a resume the autoplay policy
      // holds back is not retried in a loop)
      const c = window.__voiceclawPlayCtx;
      if (fromEvent && c && c.state !== "closed"
          && ((paused && c.state === "running") || (!paused && (c.state === "suspended" || c.state === "interrupted")))) {
        syncPlayCtx();
      }
      const s = st.current;
      if (!s || s.stopped) return;
      if (ctxRunning()) {
        if (s.sources.length) setAttr("data-state", "playing");
        armStarts(s);
        armEnd(s);
      } else {
        clearTimers(s); // frozen: nothing counts as played
        if (s.sources.length) setAttr("data-state", "paused");
      }
    };
    stateListeners.add(onCtxState);
    const onBarge = (ev) => {
      // a cut turn never plays, even when its URLs arrive after this command
      const cut = ev && ev.detail && ev.detail.turn;
      if (cut && (!st.current || st.current.turn !== cut)) markPlayed(cut);
      stopAll(true);
      if (unpause()) syncPlayCtx();
    };
    const onPause = () => {
      const s = st.current;
      if (pauseSafety) clearTimeout(pauseSafety);
      pauseSafety = setTimeout(onResume, PAUSE_SAFETY_MS);
      if (paused) return;
      paused = true;
      syncPlayCtx();
      if (s) clearTimers(s);
      if (s && !s.stopped && s.sources.length) setAttr("data-state", "paused");
    };
    function onResume() {
      if (!unpause()) return;
      syncPlayCtx();
      onCtxState(); // still running (the suspend had not happened yet): re-arm now
    }
    window.addEventListener("voiceclaw:barge-in", onBarge);
    window.addEventListener("voiceclaw:pause", onPause);
    window.addEventListener("voiceclaw:resume", onResume);
    const gestures = ["pointerup", "touchend", "keydown"];
    gestures.forEach((g) => window.addEventListener(g, unlockOnGesture, true));
    // a reload or a closed tab runs no React cleanup: report the cut (best effort)
    const onPageHide = () => stopAll(true, true);
    window.addEventListener("pagehide", onPageHide);
    return () => {
      stateListeners.delete(onCtxState);
      window.removeEventListener("voiceclaw:barge-in", onBarge);
      window.removeEventListener("voiceclaw:pause", onPause);
      window.removeEventListener("voiceclaw:resume", onResume);
      gestures.forEach((g) => window.removeEventListener(g, unlockOnGesture, true));
      window.removeEventListener("pagehide", onPageHide);
      // leaving the page: nothing of this queue keeps playing; a reply cut here is
      // reported "stopped" with the chunks heard (the returning page never replays it)
      stopAll(true, true);
      if (unpause()) syncPlayCtx();
    };
  }, []);

  return <div id="audio-queue" ref={el} data-played-count="0" data-state="idle" {...rest} />;
}
