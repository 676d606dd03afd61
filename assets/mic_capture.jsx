// Microphone capture: AudioWorklet -> 16 kHz PCM16 20 ms frames -> binary frames on
// /ws/voice. Echo cancellation, noise suppression and auto gain on. Renders the
// voice button (hands-free: tap to start/stop; push-to-talk: hold the button or the
// space bar), a level meter, a mic picker and a clear message when the mic is
// denied or missing. The socket (the tab's voice session: hello -> ready, ping/pong
// for the clock offset, kept in window.__voiceclawClockOffset for the audio queue)
// opens when the mic starts or a typed message is sent, never on mount: a page that
// is merely open holds no session and takes no one's mic. Everything the session
// needs travels on it: frames, controls, the conversation id and mute ("context",
// on every change), typed text ("text", once per message id and tab), the audio queue's
// playback reports ("playback").
// Playback control from the server (pause / resume / barge_in) is re-dispatched as
// window events for the audio queue. The socket carries the login cookie; a refusal
// (close code 4003: not logged in, or a foreign origin) stops the reconnect loop.
// While mounted, window.__voiceclawMicSend(obj) sends JSON.stringify(obj) on the
// socket when it is open (true) or does nothing (false), and
// window.__voiceclawVoiceSend(obj) sends it in order, opening the socket if needed:
// the audio queue reports through them. On unmount the socket closes a moment later,
// so the queue's last "stopped" report still goes out on it.
import React, { useEffect, useRef, useState } from "react";
import { getBackendURL, getToken } from "$/utils/state";
import env from "$/env.json";
import { tabList, remember } from "./tab_memory.js";

function cue(kind) {
  try {
    const C = window.__voiceclawCueCtx || (window.__voiceclawCueCtx = new (window.AudioContext || window.webkitAudioContext)());
    if (C.state === "suspended") C.resume();
    const o = C.createOscillator();
    const g = C.createGain();
    const f = { start: [660, 880], stop: [880, 660], working: [520, 520] }[kind] || [600, 600];
    o.frequency.setValueAtTime(f[0], C.currentTime);
    o.frequency.setValueAtTime(f[1], C.currentTime + 0.07);
    g.gain.setValueAtTime(0.0001, C.currentTime);
    g.gain.exponentialRampToValueAtTime(0.08, C.currentTime + 0.01);
    g.gain.exponentialRampToValueAtTime(0.0001, C.currentTime + 0.15);
    o.connect(g).connect(C.destination);
    o.start();
    o.stop(C.currentTime + 0.16);
  } catch (e) { /* cues are best effort */ }
}
if (typeof window !== "undefined") window.__voiceclawCue = cue;

const ACCESS_MESSAGE = "Not logged in (or the session ended): reload the page and log in.";

function wsURL() {
  const u = getBackendURL(env.EVENT);
  u.pathname = "/ws/voice";
  // the tab's token in the URL too (as Reflex's own socket has it): a balancer that
  // hashes it sends both of a tab's sockets to the same worker (README "Scaling out")
  u.search = "?token=" + encodeURIComponent(getToken());
  return u.toString();
}

const SAID_KEY = "voiceclaw:said-ids";

export function MicCapture({ mode, stopSeq, disabled, busy, onEvent, conversationId, muted, sayId, sayText, ...rest }) {
  const wsRef = useRef(null);
  const lastWsRef = useRef(null); // the socket being closed on unmount (still takes the last reports)
  const capRef = useRef(null); // {ctx, stream, node, src}
  const meterRef = useRef(null);
  const modeRef = useRef(mode);
  const [active, setActive] = useState(false);
  const [error, setError] = useState("");
  const [devices, setDevices] = useState([]);
  const [deviceId, setDeviceId] = useState("");
  const [takenOver, setTakenOver] = useState(false);
  const holdingRef = useRef(false);
  // refs for what timers and window listeners read (no stale closures)
  const deviceRef = useRef("");
  const activeRef = useRef(false);
  const busyRef = useRef(!!busy);
  const refusedRef = useRef(false); // the server wants an access token: do not reconnect
  const disposedRef = useRef(false); // unmounted (another page): never reconnect from here
  const ctlQueueRef = useRef([]); // control messages waiting for the socket (sent in order on "ready"; dropped when it closes)
  const capGenRef = useRef(0); // bumped by stopCapture and mode switches: a capture still opening is abandoned
  const primedRef = useRef(null); // mic AudioContext created inside the tap (iOS needs that)
  const contextRef = useRef({ conversation_id: conversationId || "", muted: !!muted });
  contextRef.current = { conversation_id: conversationId || "", muted: !!muted };
  const onEventRef = useRef(onEvent);
  onEventRef.current = onEvent;
  busyRef.current = !!busy;
  const emit = (s) => { try { onEventRef.current && onEventRef.current(s); } catch (e) {} };
  modeRef.current = mode;
  const setActiveBoth = (v) => { activeRef.current = v; setActive(v); };

  // ---- the socket -------------------------------------------------------
  const connect = () => {
    if (typeof window === "undefined" || refusedRef.current || disposedRef.current) return;
    // a new socket (there is no live one): nothing queued for an older socket is meant for it
    ctlQueueRef.current = [];
    const ws = new WebSocket(wsURL());
    ws.binaryType = "arraybuffer";
    wsRef.current = ws;
    lastWsRef.current = ws;
    let pings = [];
    ws.onopen = () => {
      const hello = { type: "hello", client_token: getToken(), sample_rate: 16000, mode: modeRef.current, ...contextRef.current };
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      if (msg.type === "ready") {
        setTakenOver(false);
        const queued = ctlQueueRef.current; ctlQueueRef.current = [];
        queued.forEach((m) => { if (ws.readyState === 1) ws.send(m); });
        for (let i = 0; i < 5; i++) setTimeout(() => {
          if (ws.readyState === 1) ws.send(JSON.stringify({ type: "ping", client_time_ms: performance.timeOrigin + performance.now() }));
        }, i * 150);
      } else if (msg.type === "pong") {
        const now = performance.timeOrigin + performance.now();
        const rtt = now - msg.client_time_ms;
        pings.push({ rtt, offset: msg.server_time_ms - (msg.client_time_ms + rtt / 2) });
        pings.sort((a, b) => a.rtt - b.rtt);
        window.__voiceclawClockOffset = pings[0].offset; // the fastest round trip is the most accurate
      } else if (msg.type === "barge_in") {
        // detail.turn: the reply cut; its URLs may still be on their way (Reflex socket)
        window.dispatchEvent(new CustomEvent("voiceclaw:barge-in", { detail: { turn: msg.turn || "" } }));
      } else if (msg.type === "pause") {
        window.dispatchEvent(new CustomEvent("voiceclaw:pause"));
      } else if (msg.type === "resume") {
        window.dispatchEvent(new CustomEvent("voiceclaw:resume"));
      } else if (msg.type === "taken_over") {
        setTakenOver(true);
        stopCapture(false);
        emit("taken_over");
      } else if (msg.type === "error") {
        setError(msg.message || "error");
      }
    };
    ws.onclose = (ev) => {
      // nothing queued is meant for a later socket (a stale ptt_start or barge_in
      // must not act on a new session); a newer socket already current keeps its queue
      if (wsRef.current === ws) { wsRef.current = null; ctlQueueRef.current = []; }
      if (disposedRef.current) return;
      if (ev.code === 4001) return; // taken over: do not reconnect and steal it back
      if (ev.code === 4002) return; // this tab opened a newer socket
      if (ev.code === 4003) { // refused: not logged in (or a foreign Origin); retrying cannot help
        refusedRef.current = true;
        stopCapture(false);
        setError(ACCESS_MESSAGE);
        emit("error:" + ACCESS_MESSAGE);
        return;
      }
      setTimeout(() => { if (!disposedRef.current && !wsRef.current && !window.__voiceclawTakenOver && !refusedRef.current) connect(); }, 1000);
    };
  };

  useEffect(() => {
    disposedRef.current = false;
    window.__voiceclawMicMounted = true;
    refreshDevices();
    const md = typeof navigator !== "undefined" ? navigator.mediaDevices : null;
    const onDeviceChange = () => { refreshDevices(); };
    if (md && md.addEventListener) md.addEventListener("devicechange", onDeviceChange);
    const micSend = (obj) => {
      const ws = wsRef.current || lastWsRef.current;
      if (!ws || ws.readyState !== 1) return false;
      try { ws.send(JSON.stringify(obj)); return true; } catch (e) { return false; }
    };
    const voiceSend = (obj) => sendCtl(obj);
    window.__voiceclawMicSend = micSend;
    window.__voiceclawVoiceSend = voiceSend;
    return () => {
      disposedRef.current = true;
      window.__voiceclawMicMounted = false;
      if (md && md.removeEventListener) md.removeEventListener("devicechange", onDeviceChange);
      stopCapture(false);
      dropPrimed();
      ctlQueueRef.current = [];
      const ws = wsRef.current; wsRef.current = null;
      // a moment later: the audio queue's cleanup (after this one) still reports on it
      setTimeout(() => {
        if (window.__voiceclawMicSend === micSend) window.__voiceclawMicSend = undefined;
        if (window.__voiceclawVoiceSend === voiceSend) window.__voiceclawVoiceSend = undefined;
        if (ws) { ws.onclose = null; ws.onmessage = null; try { ws.close(); } catch (e) {} }
      }, 50);
    };
  }, []);

  // binary audio frames: only on an open socket (stale audio is worthless)
  const send = (data) => {
    const ws = wsRef.current;
    if (ws && ws.readyState === 1) ws.send(data);
  };
  // control messages: sent in order, queued until the socket is ready when it is not open
  // (a ptt_end must never be dropped while its ptt_start goes out later)
  const sendCtl = (obj) => {
    const data = JSON.stringify(obj);
    const ws = wsRef.current;
    if (ws && ws.readyState === 1 && ctlQueueRef.current.length === 0) { ws.send(data); return; }
    if (disposedRef.current) {
      const last = lastWsRef.current;
      if (last && last.readyState === 1) { try { last.send(data); } catch (e) {} }
      return;
    }
    // no live socket: a new one (connect drops what was queued for the old one), then queue for it
    if (!ws || ws.readyState > 1) { window.__voiceclawTakenOver = false; connect(); }
    ctlQueueRef.current.push(data);
    if (ctlQueueRef.current.length > 20) ctlQueueRef.current.shift();
  };

  const refreshDevices = async () => {
    try {
      const all = await navigator.mediaDevices.enumerateDevices();
      const inputs = all.filter((d) => d.kind === "audioinput");
      if (disposedRef.current) return;
      setDevices(inputs);
      // the picked microphone was unplugged: back to the default one
      if (deviceRef.current && inputs.length && !inputs.some((d) => d.deviceId === deviceRef.current)) {
        deviceRef.current = "";
        setDeviceId("");
      }
    } catch (e) { /* no mediaDevices (insecure origin) */ }
  };

  // iOS Safari starts (or resumes) an AudioContext only inside the user's gesture:
  // create the mic context synchronously in the tap handler, before any await.
  const primeCtx = () => {
    if (capRef.current || typeof window === "undefined") return;
    try {
      if (!primedRef.current || primedRef.current.state === "closed") primedRef.current = new (window.AudioContext || window.webkitAudioContext)();
      if (primedRef.current.state !== "running") primedRef.current.resume().catch(() => {});
    } catch (e) { primedRef.current = null; }
    try { const C = window.__voiceclawCueCtx; if (C && C.state !== "running") C.resume().catch(() => {}); } catch (e) {}
  };
  const dropPrimed = () => {
    const c = primedRef.current; primedRef.current = null;
    if (c && c.state !== "closed") { try { c.close(); } catch (e) {} }
  };

  // ---- capture ----------------------------------------------------------
  const startCapture = async () => {
    if (capRef.current) return true;
    const gen = capGenRef.current;
    // stopCapture or a mode switch happened meanwhile (or the page is gone): this capture is not wanted
    const cancelled = () => capGenRef.current !== gen || disposedRef.current;
    if (refusedRef.current) { setError(ACCESS_MESSAGE); emit("error:" + ACCESS_MESSAGE); return false; }
    setError("");
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      const m = "The browser gives the microphone only to secure pages (https or localhost).";
      setError(m); emit("error:" + m); return false;
    }
    if (!wsRef.current || wsRef.current.readyState !== 1) {
      window.__voiceclawTakenOver = false;
      if (!wsRef.current) connect();
      await new Promise((r) => setTimeout(r, 300));
      if (cancelled()) return false;
    }
    let ctx = null;
    let stream = null;
    let src = null;
    let node = null;
    // tear down what this (abandoned) start opened
    const abandon = () => {
      try { if (src) src.disconnect(); if (node) node.disconnect(); } catch (e) {}
      if (stream) stream.getTracks().forEach((t) => t.stop());
      if (ctx && ctx.state !== "closed") { try { ctx.close(); } catch (e) {} }
      return false;
    };
    try {
      const wanted = deviceRef.current;
      stream = await navigator.mediaDevices.getUserMedia({
        audio: {
          deviceId: wanted ? { exact: wanted } : undefined,
          channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true,
        },
      });
      if (disposedRef.current) { stream.getTracks().forEach((t) => t.stop()); dropPrimed(); return false; }
      if (cancelled()) return abandon();
      ctx = primedRef.current && primedRef.current.state !== "closed" ? primedRef.current : new (window.AudioContext || window.webkitAudioContext)();
      primedRef.current = null;
      if (ctx.state !== "running") await ctx.resume();
      if (cancelled()) return abandon();
      await ctx.audioWorklet.addModule("/mic_worklet.js");
      if (cancelled()) return abandon();
      src = ctx.createMediaStreamSource(stream);
      node = new AudioWorkletNode(ctx, "voiceclaw-mic");
      node.port.onmessage = (ev) => {
        const d = ev.data;
        if (d.pcm) {
          if (modeRef.current === "push_to_talk" && !holdingRef.current) return;
          send(d.pcm);
        } else if (d.level !== undefined && meterRef.current) {
          meterRef.current.style.width = Math.min(100, Math.round(d.level * 400)) + "%";
        }
      };
      src.connect(node);
      const sink = ctx.createGain(); sink.gain.value = 0; node.connect(sink).connect(ctx.destination);
      if (capRef.current || disposedRef.current) { // a concurrent start won (keep that one), or the page is gone
        try { src.disconnect(); node.disconnect(); } catch (e) {}
        stream.getTracks().forEach((t) => t.stop());
        ctx.close();
        return !disposedRef.current;
      }
      capRef.current = { ctx, stream, node, src };
      if (modeRef.current !== "push_to_talk") sendCtl({ type: "mic", on: true }); // claims the account's mic
      refreshDevices();
      return true;
    } catch (e) {
      if (ctx && ctx.state !== "closed") { try { ctx.close(); } catch (x) {} }
      dropPrimed();
      if (disposedRef.current) return false;
      let m;
      if (e && (e.name === "NotAllowedError" || e.name === "SecurityError")) m = "Microphone permission was denied. Allow the microphone for this site in the browser's settings, or type below.";
      else if (e && (e.name === "NotFoundError" || e.name === "OverconstrainedError")) m = "No microphone was found. Plug one in or pick another, or type below.";
      else m = "Could not open the microphone: " + (e && e.message ? e.message : e);
      setError(m); emit("error:" + m);
      return false;
    }
  };

  const stopCapture = (tell) => {
    capGenRef.current += 1; // a capture still opening is abandoned
    const c = capRef.current;
    capRef.current = null;
    holdingRef.current = false;
    if (c) {
      try { c.src.disconnect(); c.node.disconnect(); } catch (e) {}
      c.stream.getTracks().forEach((t) => t.stop());
      c.ctx.close();
    }
    if (meterRef.current) meterRef.current.style.width = "0%";
    setActiveBoth(false);
    if (tell) { sendCtl({ type: "stop" }); emit("stopped"); cue("stop"); }
    else if (c && wsRef.current && wsRef.current.readyState === 1) sendCtl({ type: "mic", on: false });
  };

  // Stop button / new conversation on the page
  const firstStop = useRef(true);
  useEffect(() => {
    if (firstStop.current) { firstStop.current = false; return; }
    if (capRef.current) stopCapture(true);
    else if (wsRef.current && wsRef.current.readyState === 1) sendCtl({ type: "stop" }); // a typed reply stops too
    window.dispatchEvent(new CustomEvent("voiceclaw:barge-in"));
  }, [stopSeq]);

  // the conversation id and mute: the session learns every change (a new socket's hello carries them)
  const firstContext = useRef(true);
  useEffect(() => {
    if (firstContext.current) { firstContext.current = false; return; }
    if (wsRef.current && wsRef.current.readyState === 1) sendCtl({ type: "context", ...contextRef.current });
  }, [conversationId, muted]);

  // a typed message: the session runs the turn (the socket opens for it if needed).
  // Each message has its own id and a tab sends an id once: a reloaded page renders
  // first with the default state, then gets the last message back with its state, and
  // keying on a counter that went 0 -> N there sent the last typed message again (a
  // second turn, its reply played again: seen in test_typed_turn_streams_and_plays)
  useEffect(() => {
    if (!sayId || !sayText || tabList(SAID_KEY).includes(sayId)) return;
    remember(SAID_KEY, sayId);
    sendCtl({ type: "text", text: sayText });
  }, [sayId]);

  // a mode switch stops the capture cleanly: push-to-talk keeps the capture open
  // between presses and hands-free sends every frame, so a capture carried over would
  // either drop audio under "Release to send" or stream a hot mic under "Tap to talk".
  // The server is told "stop" only when no reply runs (a "stop" interrupts it).
  const firstMode = useRef(true);
  useEffect(() => {
    if (firstMode.current) { firstMode.current = false; return; }
    capGenRef.current += 1; // a capture still opening (e.g. at the permission prompt) is abandoned
    const wasActive = activeRef.current;
    if (holdingRef.current) sendCtl({ type: "ptt_end" });
    holdingRef.current = false;
    if (capRef.current || wasActive) {
      stopCapture(false);
      if (wasActive) {
        if (!busyRef.current) sendCtl({ type: "stop" });
        emit("stopped"); cue("stop");
      }
    }
    // only on an open socket: a new socket's hello carries the mode (no reconnect
    // just for this, least of all in a tab whose mic was taken over)
    if (wsRef.current && wsRef.current.readyState === 1) sendCtl({ type: "mode", mode });
  }, [mode]);

  // A tab whose mic was taken over (or whose socket dropped) takes it back when the
  // user presses the button here: the server then tells the other tab.
  const ensureSocket = () => new Promise((resolve) => {
    if (disposedRef.current) return resolve(false);
    const ws = wsRef.current;
    if (ws && ws.readyState === 1) return resolve(true);
    if (!ws || ws.readyState > 1) connect();
    const t0 = Date.now();
    const poll = () => {
      const w = wsRef.current;
      if (disposedRef.current) resolve(false);
      else if (w && w.readyState === 1) resolve(true);
      else if (Date.now() - t0 > 3000) resolve(false);
      else setTimeout(poll, 30);
    };
    poll();
  });

  // push-to-talk: ptt_start goes out (or is queued) at once, so a ptt_end of an early
  // release always follows it; after each await the press is re-checked: a release
  // meanwhile (e.g. at the permission prompt) ends it without "listening" or the cue
  const pressRef = useRef(0);
  const pttDown = async () => {
    if (holdingRef.current) return;
    holdingRef.current = true;
    const press = ++pressRef.current;
    const still = () => holdingRef.current && pressRef.current === press && !disposedRef.current;
    primeCtx();
    window.dispatchEvent(new CustomEvent("voiceclaw:barge-in"));
    sendCtl({ type: "ptt_start" });
    await ensureSocket();
    if (!still()) { dropPrimed(); return; }
    const ok = await startCapture();
    if (!ok) {
      dropPrimed();
      if (still()) { holdingRef.current = false; sendCtl({ type: "ptt_end" }); }
      return;
    }
    if (!still()) return;
    setActiveBoth(true); emit("listening"); cue("start");
  };
  const pttUp = () => {
    if (!holdingRef.current) return;
    holdingRef.current = false;
    sendCtl({ type: "ptt_end" });
    if (activeRef.current) { setActiveBoth(false); emit("stopped"); cue("stop"); }
  };
  // the space-bar listeners call the latest handlers
  const pttRef = useRef({ down: pttDown, up: pttUp });
  pttRef.current = { down: pttDown, up: pttUp };

  useEffect(() => {
    if (mode !== "push_to_talk") return;
    // space on a focused control keeps its own meaning (a button, the mode select's
    // trigger, a text field...); the voice button itself is the exception
    const CONTROLS = "input, textarea, select, button, a[href], [contenteditable], [role=combobox], [role=button], [role=switch], [role=checkbox], [role=option], [role=listbox], [role=menuitem], [role=slider], [role=textbox], [role=tab]";
    const ownsSpace = (t) => {
      if (!t || !t.closest) return false;
      if (t.closest("#voice-button")) return false;
      if (t.isContentEditable) return true;
      return !!t.closest(CONTROLS);
    };
    const down = (e) => {
      if (e.code !== "Space" || e.repeat || e.defaultPrevented || ownsSpace(e.target)) return;
      e.preventDefault(); pttRef.current.down();
    };
    const up = (e) => {
      if (e.code !== "Space" || !holdingRef.current) return;
      e.preventDefault(); pttRef.current.up();
    };
    // a key released while the window had no focus never sends keyup
    const lost = () => { if (holdingRef.current) pttRef.current.up(); };
    const onVisibility = () => { if (document.visibilityState === "hidden") lost(); };
    window.addEventListener("keydown", down);
    window.addEventListener("keyup", up);
    window.addEventListener("blur", lost);
    document.addEventListener("visibilitychange", onVisibility);
    return () => {
      window.removeEventListener("keydown", down);
      window.removeEventListener("keyup", up);
      window.removeEventListener("blur", lost);
      document.removeEventListener("visibilitychange", onVisibility);
    };
  }, [mode]);

  const onClick = async () => {
    if (modeRef.current === "push_to_talk") return;
    const playing = typeof document !== "undefined" && document.querySelector("#audio-queue[data-state='playing'], #audio-queue[data-state='paused']");
    if (busyRef.current || playing) {
      // the assistant is thinking or speaking: the tap interrupts it (and keeps or starts listening)
      if (!activeRef.current) primeCtx();
      window.dispatchEvent(new CustomEvent("voiceclaw:barge-in"));
      sendCtl({ type: "barge_in" });
      if (activeRef.current) return;
    } else if (activeRef.current) { stopCapture(true); return; }
    else primeCtx();
    await ensureSocket();
    if (disposedRef.current) { dropPrimed(); return; }
    const ok = await startCapture();
    if (!ok) dropPrimed();
    else if (!disposedRef.current) { setActiveBoth(true); emit("listening"); cue("start"); }
  };

  // another microphone picked: restart capture on it, interrupting nothing
  const switchDevice = async (id) => {
    deviceRef.current = id;
    setDeviceId(id);
    if (!capRef.current) return;
    const holding = holdingRef.current;
    stopCapture(false);
    holdingRef.current = holding;
    const ok = await startCapture();
    if (ok && (modeRef.current !== "push_to_talk" || holdingRef.current)) setActiveBoth(true);
    else if (!ok) emit("stopped");
  };

  const label = mode === "push_to_talk"
    ? (active ? "Release to send" : "Hold to talk")
    : (active ? (busy ? "Listening… tap to interrupt" : "Listening… tap to stop") : "Tap to talk");
  return (
    <div {...rest} className="vc-mic">
      <button
        id="voice-button"
        type="button"
        disabled={disabled}
        data-active={active ? "true" : "false"}
        className={"vc-voice-button" + (active ? " vc-active" : "")}
        onClick={onClick}
        onPointerDown={mode === "push_to_talk" ? (e) => { e.preventDefault(); pttDown(); } : undefined}
        onPointerUp={mode === "push_to_talk" ? pttUp : undefined}
        onPointerLeave={mode === "push_to_talk" ? pttUp : undefined}
      >{label}</button>
      <div className="vc-meter" aria-label="input level"><div id="level-meter" ref={meterRef} style={{ width: "0%" }} /></div>
      <select id="mic-picker" value={deviceId} onChange={(e) => { switchDevice(e.target.value); }}>
        <option value="">Default microphone</option>
        {devices.map((d, i) => <option key={d.deviceId || i} value={d.deviceId}>{d.label || "Microphone " + (i + 1)}</option>)}
      </select>
      {error ? <div id="mic-error" role="alert" className="vc-error">{error}</div> : null}
      {takenOver ? <div id="mic-taken-over" role="status">Another tab took over the microphone. <a href="#" onClick={(e) => { e.preventDefault(); window.__voiceclawTakenOver = false; setTakenOver(false); onClick(); }}>Use it here</a></div> : null}
    </div>
  );
}
