// AudioWorklet: mono capture -> 16 kHz 16-bit PCM frames of 20 ms (320 samples),
// resampled here (Firefox will not open a 16 kHz context on a 48 kHz mic), plus an
// RMS level for the meter. Linear-interpolation resampler with a running phase.
class VoiceClawMic extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / 16000;
    this.pos = 0; // fractional read position into the incoming stream
    this.prev = 0; // last sample of the previous block
    this.frame = new Int16Array(320);
    this.n = 0;
    this.levelAcc = 0;
    this.levelN = 0;
  }
  process(inputs) {
    const input = inputs[0];
    if (!input || !input[0]) return true;
    const ch = input[0];
    const len = ch.length;
    for (let i = 0; i < len; i++) { this.levelAcc += ch[i] * ch[i]; }
    this.levelN += len;
    // samples indexed -1 (prev) .. len-1 (this block)
    while (this.pos < len - 1) {
      const i0 = Math.floor(this.pos);
      const frac = this.pos - i0;
      const a = i0 < 0 ? this.prev : ch[i0];
      const b = ch[i0 + 1];
      let v = a + (b - a) * frac;
      v = Math.max(-1, Math.min(1, v));
      this.frame[this.n++] = v < 0 ? v * 0x8000 : v * 0x7fff;
      if (this.n === 320) {
        const out = this.frame;
        this.port.postMessage({ pcm: out.buffer }, [out.buffer]);
        this.frame = new Int16Array(320);
        this.n = 0;
      }
      this.pos += this.ratio;
    }
    this.pos -= len;
    this.prev = ch[len - 1];
    if (this.levelN >= 1600) {
      this.port.postMessage({ level: Math.sqrt(this.levelAcc / this.levelN) });
      this.levelAcc = 0;
      this.levelN = 0;
    }
    return true;
  }
}
registerProcessor("voiceclaw-mic", VoiceClawMic);
