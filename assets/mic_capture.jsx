// Microphone capture: AudioWorklet -> 16 kHz PCM16 20 ms frames -> binary frames on
// /ws/voice. Echo cancellation, noise suppression and auto gain on. Renders the
// voice button (hands-free: tap to start/stop; push-to-talk: hold the button or the
// space bar), a level meter, a mic picker and a clear message when the mic is
// denied or missing. The socket opens on mount (hello -> ready, ping/pong for the
// clock offset, kept in window.__voiceclawClockOffset for the audio queue).
import React, { useEffect, useRef, useState } from "react";
import { getBackendURL, getToken } from "$/utils/state";
import env from "$/env.json";

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

function wsURL() {
  const u = getBackendURL(env.EVENT);
  u.pathname = "/ws/voice";
  u.search = "";
  return u.toString();
}

export function MicCapture({ mode, stopSeq, disabled, onEvent, ...rest }) {
  const wsRef = useRef(null);
  const capRef = useRef(null); // {ctx, stream, node, src}
  const meterRef = useRef(null);
  const modeRef = useRef(mode);
  const [active, setActive] = useState(false);
  const [error, setError] = useState("");
  const [devices, setDevices] = useState([]);
  const [deviceId, setDeviceId] = useState("");
  const [takenOver, setTakenOver] = useState(false);
  const holdingRef = useRef(false);
  const emit = (s) => { try { onEvent && onEvent(s); } catch (e) {} };
  modeRef.current = mode;

  // ---- the socket -------------------------------------------------------
  const connect = () => {
    if (typeof window === "undefined") return;
    const ws = new WebSocket(wsURL());
    ws.binaryType = "arraybuffer";
    wsRef.current = ws;
    let pings = [];
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: "hello", client_token: getToken(), sample_rate: 16000, mode: modeRef.current }));
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      if (msg.type === "ready") {
        setTakenOver(false);
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
        window.dispatchEvent(new CustomEvent("voiceclaw:barge-in"));
      } else if (msg.type === "taken_over") {
        setTakenOver(true);
        stopCapture(false);
        emit("taken_over");
      } else if (msg.type === "error") {
        setError(msg.message || "error");
      }
    };
    ws.onclose = (ev) => {
      if (wsRef.current === ws) wsRef.current = null;
      if (ev.code === 4001) return; // taken over: do not reconnect and steal it back
      setTimeout(() => { if (!wsRef.current && !window.__voiceclawTakenOver) connect(); }, 1000);
    };
  };

  useEffect(() => {
    connect();
    refreshDevices();
    return () => { stopCapture(false); const ws = wsRef.current; wsRef.current = null; if (ws) ws.close(); };
  }, []);

  const send = (data) => {
    const ws = wsRef.current;
    if (ws && ws.readyState === 1) ws.send(data);
  };

  const refreshDevices = async () => {
    try {
      const all = await navigator.mediaDevices.enumerateDevices();
      setDevices(all.filter((d) => d.kind === "audioinput"));
    } catch (e) { /* no mediaDevices (insecure origin) */ }
  };

  // ---- capture ----------------------------------------------------------
  const startCapture = async () => {
    if (capRef.current) return true;
    setError("");
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      const m = "The browser gives the microphone only to secure pages (https or localhost).";
      setError(m); emit("error:" + m); return false;
    }
    if (!wsRef.current || wsRef.current.readyState !== 1) {
      window.__voiceclawTakenOver = false;
      if (!wsRef.current) connect();
      await new Promise((r) => setTimeout(r, 300));
    }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({
        audio: {
          deviceId: deviceId ? { exact: deviceId } : undefined,
          channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true,
        },
      });
      const ctx = new (window.AudioContext || window.webkitAudioContext)();
      if (ctx.state === "suspended") await ctx.resume();
      await ctx.audioWorklet.addModule("/mic_worklet.js");
      const src = ctx.createMediaStreamSource(stream);
      const node = new AudioWorkletNode(ctx, "voiceclaw-mic");
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
      capRef.current = { ctx, stream, node, src };
      refreshDevices();
      return true;
    } catch (e) {
      let m;
      if (e && (e.name === "NotAllowedError" || e.name === "SecurityError")) m = "Microphone permission was denied. Allow the microphone for this site in the browser's settings, or type below.";
      else if (e && (e.name === "NotFoundError" || e.name === "OverconstrainedError")) m = "No microphone was found. Plug one in or pick another, or type below.";
      else m = "Could not open the microphone: " + (e && e.message ? e.message : e);
      setError(m); emit("error:" + m);
      return false;
    }
  };

  const stopCapture = (tell) => {
    const c = capRef.current;
    capRef.current = null;
    holdingRef.current = false;
    if (c) {
      try { c.src.disconnect(); c.node.disconnect(); } catch (e) {}
      c.stream.getTracks().forEach((t) => t.stop());
      c.ctx.close();
    }
    if (meterRef.current) meterRef.current.style.width = "0%";
    setActive(false);
    if (tell) { send(JSON.stringify({ type: "stop" })); emit("stopped"); cue("stop"); }
  };

  // Stop button / new conversation on the page
  const firstStop = useRef(true);
  useEffect(() => {
    if (firstStop.current) { firstStop.current = false; return; }
    if (capRef.current) stopCapture(true);
    window.dispatchEvent(new CustomEvent("voiceclaw:barge-in"));
  }, [stopSeq]);

  useEffect(() => { send(JSON.stringify({ type: "mode", mode })); }, [mode]);

  // A tab whose mic was taken over (or whose socket dropped) takes it back when the
  // user presses the button here: the server then tells the other tab.
  const ensureSocket = () => new Promise((resolve) => {
    const ws = wsRef.current;
    if (ws && ws.readyState === 1) return resolve(true);
    if (!ws || ws.readyState > 1) connect();
    const t0 = Date.now();
    const poll = () => {
      const w = wsRef.current;
      if (w && w.readyState === 1) resolve(true);
      else if (Date.now() - t0 > 3000) resolve(false);
      else setTimeout(poll, 30);
    };
    poll();
  });

  const pttDown = async () => {
    if (holdingRef.current) return;
    holdingRef.current = true;
    window.dispatchEvent(new CustomEvent("voiceclaw:barge-in"));
    await ensureSocket();
    send(JSON.stringify({ type: "ptt_start" }));
    const ok = await startCapture();
    if (!ok) { holdingRef.current = false; return; }
    setActive(true); emit("listening"); cue("start");
  };
  const pttUp = () => {
    if (!holdingRef.current) return;
    holdingRef.current = false;
    send(JSON.stringify({ type: "ptt_end" }));
    setActive(false); emit("stopped"); cue("stop");
  };

  useEffect(() => {
    if (mode !== "push_to_talk") return;
    const isTyping = (t) => t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable);
    const down = (e) => { if (e.code === "Space" && !e.repeat && !isTyping(e.target)) { e.preventDefault(); pttDown(); } };
    const up = (e) => { if (e.code === "Space" && !isTyping(e.target)) { e.preventDefault(); pttUp(); } };
    window.addEventListener("keydown", down);
    window.addEventListener("keyup", up);
    return () => { window.removeEventListener("keydown", down); window.removeEventListener("keyup", up); };
  }, [mode]);

  const onClick = async () => {
    if (mode === "push_to_talk") return;
    if (active) { stopCapture(true); return; }
    await ensureSocket();
    const ok = await startCapture();
    if (ok) { setActive(true); emit("listening"); cue("start"); }
  };

  const label = mode === "push_to_talk" ? (active ? "Release to send" : "Hold to talk") : (active ? "Listening… tap to stop" : "Tap to talk");
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
      <select id="mic-picker" value={deviceId} onChange={(e) => { setDeviceId(e.target.value); if (capRef.current) { stopCapture(false); setTimeout(onClick, 50); } }}>
        <option value="">Default microphone</option>
        {devices.map((d, i) => <option key={d.deviceId || i} value={d.deviceId}>{d.label || "Microphone " + (i + 1)}</option>)}
      </select>
      {error ? <div id="mic-error" role="alert" className="vc-error">{error}</div> : null}
      {takenOver ? <div id="mic-taken-over" role="status">Another tab took over the microphone. <a href="#" onClick={(e) => { e.preventDefault(); window.__voiceclawTakenOver = false; connect(); }}>Use it here</a></div> : null}
    </div>
  );
}
