/* The SUR world in the browser (book/demo.md): the base model and the SUR-adapter, side by side.
 *
 * Loads the files that `python -m sur_lib.study.webdemo export` writes into demo/models/ and runs
 * them with ONNX Runtime Web (WebAssembly, SIMD, one thread; ort.wasm-core.min.js, vendored
 * next to this file). What happens for one image is sur_lib.pipeline.generate, step by step:
 *   tokenizer (WordPiece, as Hugging Face's BertTokenizer) -> MiniLM text encoder (once per
 *   prompt) -> SUR-adapter (once per prompt and step) -> initial noise from torch's CPU
 *   generator (mt19937 + Box-Muller, as torch.randn) -> 25 DDIM steps with classifier-free
 *   guidance (the UNet sees [empty prompt, prompt]) -> pixels.
 * Python mirror: sur_lib.study.webdemo (OrtDemo, sample); tests/test_webdemo.py compares the two.
 */
(function () {
  "use strict";
  var script = document.currentScript;
  var BASE = script ? script.src.replace(/[^/]*$/, "") : "demo/";
  var MODELS = BASE + "models/";

  // ------------------------------------------------------------------ can this browser run it?
  // wasm-feature-detect's SIMD probe: a module using v128 validates only with SIMD support.
  var SIMD_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1,
    0, 10, 10, 1, 8, 0, 65, 0, 253, 15, 253, 98, 11]);
  var NEED_MB = 512;

  function unsupported() {
    if (location.protocol === "file:") {
      return "This page loads its model files with fetch(), which browsers refuse for pages " +
        "opened from disk (file://). Serve the built book instead: " +
        "python -m http.server -d _build/html 8000, then open http://localhost:8000/demo.html";
    }
    if (typeof WebAssembly !== "object" || !WebAssembly.validate) {
      return "This browser has no WebAssembly, which the demo needs to run the models.";
    }
    if (!WebAssembly.validate(SIMD_PROBE)) {
      return "This browser's WebAssembly has no SIMD (fixed-width 128-bit vectors), which the " +
        "demo's ONNX Runtime build needs. Any Chrome/Edge >= 91, Firefox >= 89 or Safari >= 16.4 has it.";
    }
    if (navigator.deviceMemory && navigator.deviceMemory < 1) {
      return "This device reports " + navigator.deviceMemory + " GB of memory; the demo needs about " +
        NEED_MB + " MB free.";
    }
    try {  // can the engine reserve what the models take? (512 MB, freed at once)
      new WebAssembly.Memory({ initial: NEED_MB * 16, maximum: NEED_MB * 16 });
    } catch (e) {
      return "This browser could not reserve " + NEED_MB + " MB for WebAssembly (" + e.message +
        "); close other tabs or use a device with more memory.";
    }
    return null;
  }

  // ------------------------------------------------------------------ tokenizer (BERT WordPiece)
  // Hugging Face tokenizers' BertNormalizer (clean text, CJK spacing, strip accents, lowercase),
  // BertPreTokenizer (whitespace and punctuation) and WordPiece with "##" continuations.
  function isCJK(cp) {
    return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) ||
      (cp >= 0x20000 && cp <= 0x2A6DF) || (cp >= 0x2A700 && cp <= 0x2B73F) ||
      (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B820 && cp <= 0x2CEAF) ||
      (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
  }
  var CONTROL = /\p{C}/u, SPACE = /\s/u, MARK = /\p{Mn}/u;
  var PUNCT = /[\p{P}!-\/:-@\[-`{-~]/u;

  function normalize(text) {
    var out = "";
    for (var ch of text) {  // clean text and space out CJK characters
      var cp = ch.codePointAt(0);
      if (ch === "\t" || ch === "\n" || ch === "\r" || SPACE.test(ch)) { out += " "; continue; }
      if (cp === 0 || cp === 0xFFFD || CONTROL.test(ch)) continue;
      out += isCJK(cp) ? " " + ch + " " : ch;
    }
    var stripped = "";
    for (var c of out.normalize("NFD")) if (!MARK.test(c)) stripped += c;
    var lower = "";
    for (var l of stripped) lower += l.toLowerCase();  // per character, as Rust's to_lowercase
    return lower;
  }

  function preTokenize(text) {
    var words = [], cur = "";
    for (var ch of text) {
      if (SPACE.test(ch)) { if (cur) words.push(cur); cur = ""; }
      else if (PUNCT.test(ch)) { if (cur) words.push(cur); words.push(ch); cur = ""; }
      else cur += ch;
    }
    if (cur) words.push(cur);
    return words;
  }

  function Tokenizer(vocabText, cfg) {
    this.vocab = new Map();
    var lines = vocabText.split("\n");
    if (lines[lines.length - 1] === "") lines.pop();
    for (var i = 0; i < lines.length; i++) this.vocab.set(lines[i], i);
    this.cfg = cfg;
  }
  Tokenizer.prototype.wordpiece = function (word) {
    var chars = Array.from(word), unk = [this.cfg.special.unk];
    if (chars.length > this.cfg.max_input_chars_per_word) return unk;
    var ids = [], start = 0;
    while (start < chars.length) {
      var end = chars.length, found = -1;
      while (start < end) {
        var piece = chars.slice(start, end).join("");
        if (start > 0) piece = this.cfg.wordpiece_prefix + piece;
        if (this.vocab.has(piece)) { found = this.vocab.get(piece); break; }
        end -= 1;
      }
      if (found < 0) return unk;
      ids.push(found);
      start = end;
    }
    return ids;
  };
  /* text -> {ids: BigInt64Array(max_length) ([CLS] pieces [SEP] [PAD]...), pieces (count before
     the cut), kept, words: the pre-tokens, cut: the words that did not fit} */
  Tokenizer.prototype.encode = function (text) {
    var n = this.cfg.max_length, sp = this.cfg.special;
    var words = preTokenize(normalize(text)), pieces = [], wordOf = [];
    words.forEach(function (w, i) {
      this.wordpiece(w).forEach(function (id) { pieces.push(id); wordOf.push(i); });
    }, this);
    var kept = pieces.slice(0, n - 2);
    var ids = new BigInt64Array(n).fill(BigInt(sp.pad));
    ids[0] = BigInt(sp.cls);
    kept.forEach(function (id, i) { ids[i + 1] = BigInt(id); });
    ids[kept.length + 1] = BigInt(sp.sep);
    var cutFrom = kept.length < pieces.length ? wordOf[kept.length] : words.length;
    return { ids: ids, pieces: pieces.length, kept: kept.length, tokens: kept.length + 2,
             unknown: kept.filter(function (id) { return id === sp.unk; }).length,
             cut: words.slice(cutFrom).join(" ") };
  };

  // ------------------------------------------------------------------ torch.randn on the CPU
  // torch.Generator("cpu").manual_seed(seed) is an mt19937; torch.randn of >= 16 contiguous
  // floats fills uniforms u = (r & (2^24 - 1)) / 2^24 first, then turns each block of 16 into
  // normals with Box-Muller (u1 = 1 - u[j], u2 = u[j + 8]; cos -> j, sin -> j + 8).
  function MT19937(seed) {
    var mt = new Uint32Array(624);
    mt[0] = seed >>> 0;
    for (var i = 1; i < 624; i++) {
      var p = mt[i - 1] ^ (mt[i - 1] >>> 30);
      mt[i] = (Math.imul(1812433253, p) + i) >>> 0;
    }
    this.mt = mt; this.i = 624;
  }
  MT19937.prototype.next = function () {
    var mt = this.mt;
    if (this.i >= 624) {
      for (var k = 0; k < 624; k++) {
        var y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7fffffff);
        mt[k] = mt[(k + 397) % 624] ^ (y >>> 1) ^ ((y & 1) ? 0x9908b0df : 0);
      }
      this.i = 0;
    }
    var x = mt[this.i++];
    x ^= x >>> 11; x ^= (x << 7) & 0x9d2c5680; x ^= (x << 15) & 0xefc60000; x ^= x >>> 18;
    return x >>> 0;
  };
  function randn(seed, n) {
    if (n < 16) throw new Error("randn: torch's fast path needs >= 16 values, got " + n);
    var gen = new MT19937(seed), u = new Float32Array(n), out = new Float32Array(n);
    for (var i = 0; i < n; i++) u[i] = (gen.next() & 0xFFFFFF) / 16777216;
    function block(src, dst, at) {
      for (var j = 0; j < 8; j++) {
        var u1 = Math.fround(1 - src[at + j]), u2 = src[at + j + 8];
        var r = Math.fround(Math.sqrt(Math.fround(-2 * Math.fround(Math.log(u1)))));
        var theta = Math.fround(2 * Math.PI * u2);
        dst[at + j] = r * Math.fround(Math.cos(theta));
        dst[at + j + 8] = r * Math.fround(Math.sin(theta));
      }
    }
    for (var b = 0; b + 16 <= n; b += 16) block(u, out, b);
    if (n % 16) {  // torch redraws the last 16 values from fresh uniforms
      var tail = new Float32Array(16);
      for (var t = 0; t < 16; t++) tail[t] = (gen.next() & 0xFFFFFF) / 16777216;
      var res = new Float32Array(16);
      block(tail, res, 0);
      out.set(res, n - 16);
    }
    return out;
  }

  // ------------------------------------------------------------------ prompts of the SUR world
  function norm(text) { return text.toLowerCase().split(/\s+/).filter(Boolean).join(" "); }

  /* The complex prompt of a simple prompt about a world noun, as sur_lib.study.webdemo.read_prompt:
     an exact template match, else <number 2-6> <plural> or <a/an/one/single> <singular>. */
  function readPrompt(world, text) {
    var t = norm(text);
    if (Object.prototype.hasOwnProperty.call(world.prompts, t)) return { complex: world.prompts[t] };
    var joined = " " + (t.match(/[a-z0-9]+/g) || []).join(" ") + " ";
    var numbers = {};
    world.number_words.forEach(function (w, i) { if (i >= 2) numbers[w] = i; });
    for (var k = 2; k <= world.max_count; k++) numbers[String(k)] = k;
    var ones = ["a", "an", "one", "single", "1"];
    var nouns = Object.keys(world.nouns).sort(function (a, b) { return b.length - a.length; });
    function before(word) {
      var m = joined.match(new RegExp(" ([a-z0-9]+) " + word.replace(/[.*+?^${}()|[\]\\]/g, "\\$&") + " "));
      return m ? m[1] : null;
    }
    for (var i = 0; i < nouns.length; i++) {
      var noun = nouns[i], w = before(world.nouns[noun].plural);
      if (w !== null && numbers[w] !== undefined) return { complex: world.complex[noun + "|" + numbers[w] + "|"] };
      w = before(noun);
      if (w !== null && ones.indexOf(w) >= 0) return { complex: world.complex[noun + "|1|"] };
    }
    return null;
  }

  // ------------------------------------------------------------------ the models
  function Model(manifest, tokenizer) {
    this.m = manifest; this.tok = tokenizer; this.adapters = {}; this.cache = new Map();
    this.timings = []; this.encoderRuns = 0; this.rowFiles = {};
  }
  async function fetchBytes(url, onProgress) {
    var res = await fetch(url);
    if (!res.ok) throw new Error("could not load " + url + " (HTTP " + res.status + ")");
    var total = Number(res.headers.get("Content-Length")) || 0;
    if (!res.body || !total) return new Uint8Array(await res.arrayBuffer());
    var reader = res.body.getReader(), buf = new Uint8Array(total), at = 0;
    for (;;) {
      var r = await reader.read();
      if (r.done) break;
      buf.set(r.value, at); at += r.value.length;
      if (onProgress) onProgress(at, total);
    }
    return buf.subarray(0, at);
  }
  async function session(name, onProgress) {
    var bytes = await fetchBytes(MODELS + name, onProgress);
    return ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  }
  /* ONNX Runtime's wasm binary, fetched gzipped (2.8 instead of 10.6 MB) and unpacked by the
     browser; without DecompressionStream ONNX Runtime fetches the plain .wasm itself. */
  async function wasmPaths() {
    if (typeof DecompressionStream !== "function") return BASE;
    var res = await fetch(BASE + "ort-wasm-simd.wasm.gz");
    if (!res.ok) return BASE;
    var blob = await new Response(res.body.pipeThrough(new DecompressionStream("gzip"))).blob();
    return { "ort-wasm-simd.wasm": URL.createObjectURL(new Blob([blob], { type: "application/wasm" })) };
  }
  // float16 -> float32 (the embedding rows may be stored in half precision)
  var HALF = null;
  function halfTable() {
    if (HALF) return HALF;
    HALF = new Float32Array(65536);
    for (var h = 0; h < 65536; h++) {
      var s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
      HALF[h] = e === 0 ? s * f * Math.pow(2, -24) : e === 31 ? (f ? NaN : s * Infinity)
        : s * (1 + f / 1024) * Math.pow(2, e - 15);
    }
    return HALF;
  }
  Model.load = async function (onProgress) {
    ort.env.wasm.numThreads = 1;
    ort.env.wasm.simd = true;
    ort.env.wasm.proxy = false;
    onProgress("WebAssembly runtime");
    ort.env.wasm.wasmPaths = await wasmPaths();
    var manifest = await (await fetch(MODELS + "demo.json")).json();
    var vocab = await (await fetch(MODELS + manifest.files.vocab)).text();
    var model = new Model(manifest, new Tokenizer(vocab, manifest.text));
    onProgress("text encoder");
    model.textEncoder = await session(manifest.files.text_encoder, function (a, b) { onProgress("text encoder", a, b); });
    onProgress("UNet");
    model.unet = await session(manifest.files.unet, function (a, b) { onProgress("UNet", a, b); });
    model.uncond = (await model.encode("")).states;
    return model;
  };
  Model.prototype.adapter = async function (step, onProgress) {
    if (!this.adapters[step]) {
      var name = this.m.files.adapters[String(step)];
      if (!name) throw new Error("no adapter for step " + step + "; steps: " + this.m.steps.join(", "));
      this.adapters[step] = session(name, onProgress);  // a promise: loaded once
    }
    return this.adapters[step];
  };
  /* Rows of the word-embedding table for token ids, from the row files (fetched once each). */
  Model.prototype.rows = async function (ids) {
    var e = this.m.embeddings, D = e.dim, out = new Float32Array(ids.length * D);
    for (var i = 0; i < ids.length; i++) {
      var id = Number(ids[i]), k = Math.floor(id / e.rows_per_file);
      if (!this.rowFiles[k]) {
        var url = MODELS + e.pattern.replace("{:04d}", String(k).padStart(4, "0"));
        this.rowFiles[k] = fetchBytes(url).then(function (b) {
          var buf = b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
          if (e.dtype === "float32") return new Float32Array(buf);
          var h = new Uint16Array(buf), t = halfTable(), f = new Float32Array(h.length);
          for (var j = 0; j < h.length; j++) f[j] = t[h[j]];
          return f;
        });
      }
      var rows = await this.rowFiles[k], r = id % e.rows_per_file;
      out.set(rows.subarray(r * D, (r + 1) * D), i * D);
    }
    return out;
  };
  /* prompt -> {states: Float32Array [1, N, D], info: the tokenizer's encode()}: once per prompt */
  Model.prototype.encode = async function (text) {
    var key = "enc:" + text;
    if (!this.cache.has(key)) {
      var enc = this.tok.encode(text), n = this.m.text.max_length;
      var x = await this.rows(enc.ids);
      var out = await this.textEncoder.run({ word_embeddings: new ort.Tensor("float32", x, [1, n, x.length / n]) });
      this.encoderRuns += 1;
      this.cache.set(key, { states: out.states.data, info: enc });
    }
    return this.cache.get(key);
  };
  Model.prototype.adapt = async function (text, step) {
    var key = "ad:" + step + ":" + text;
    if (!this.cache.has(key)) {
      var enc = await this.encode(text), s = await this.adapter(step);
      var dims = [1, this.m.text.max_length, enc.states.length / this.m.text.max_length];
      var out = await s.run({ states: new ort.Tensor("float32", enc.states, dims) });
      this.cache.set(key, out.c.data);
    }
    return this.cache.get(key);
  };
  /* One image: DDIM with CFG from the noise of image `index` of a generate(..., seed,
     num_images_per_prompt > index) call. Returns Uint8Array [H, W, 3]. */
  Model.prototype.sample = async function (cond, seed, index, onStep) {
    var m = this.m, S = m.image_size, P = 3 * S * S, sc = m.schedule, g = m.guidance;
    var x = randn(seed, P * (index + 1)).slice(P * index);
    var states = new Float32Array(2 * cond.length);
    states.set(this.uncond, 0); states.set(cond, cond.length);
    var statesT = new ort.Tensor("float32", states, [2, m.text.max_length, cond.length / m.text.max_length]);
    var t0 = performance.now();
    for (var i = 0; i < sc.timesteps.length; i++) {
      var t = BigInt(sc.timesteps[i]);
      var both = new Float32Array(2 * P);
      both.set(x, 0); both.set(x, P);
      var out = await this.unet.run({
        sample: new ort.Tensor("float32", both, [2, 3, S, S]),
        timestep: new ort.Tensor("int64", new BigInt64Array([t, t]), [2]),
        states: statesT });
      var eps2 = out.noise.data, at = sc.alpha_prod_t[i], ap = sc.alpha_prod_t_prev[i];
      var eps = new Float32Array(P), x0 = new Float32Array(P);
      for (var k = 0; k < P; k++) {
        eps[k] = eps2[k] + g * (eps2[P + k] - eps2[k]);
        x0[k] = (x[k] - Math.sqrt(1 - at) * eps[k]) / Math.sqrt(at);
      }
      threshold(x0, sc);
      for (var j = 0; j < P; j++) x[j] = Math.sqrt(ap) * x0[j] + Math.sqrt(1 - ap) * eps[j];
      if (onStep) onStep(i + 1, sc.timesteps.length);
    }
    this.timings.push(performance.now() - t0);
    return toPixels(x, S);
  };
  function threshold(x0, sc) {
    if (sc.thresholding) {  // diffusers' dynamic thresholding: s = quantile(|x0|, ratio), in [1, max]
      var a = Float64Array.from(x0, Math.abs).sort(), pos = sc.dynamic_thresholding_ratio * (a.length - 1);
      var lo = Math.floor(pos), hi = Math.min(lo + 1, a.length - 1);
      var s = a[lo] + (a[hi] - a[lo]) * (pos - lo);
      s = Math.min(Math.max(s, 1), sc.sample_max_value);
      for (var i = 0; i < x0.length; i++) x0[i] = Math.min(Math.max(x0[i], -s), s) / s;
    } else if (sc.clip_sample) {
      var r = sc.clip_sample_range;
      for (var j = 0; j < x0.length; j++) x0[j] = Math.min(Math.max(x0[j], -r), r);
    }
  }
  function rint(v) {  // round half to even, as numpy's rint
    var f = Math.floor(v), d = v - f;
    return d > 0.5 || (d === 0.5 && f % 2 !== 0) ? f + 1 : f;
  }
  function toPixels(x, S) {  // [3, S, S] in [-1, 1] -> uint8 [S, S, 3]
    var px = new Uint8Array(S * S * 3);
    for (var c = 0; c < 3; c++) for (var i = 0; i < S * S; i++) {
      var v = Math.fround(Math.fround(Math.min(Math.max(x[c * S * S + i], -1), 1) / 2) + 0.5);
      px[i * 3 + c] = rint(Math.fround(Math.min(Math.max(v, 0), 1) * 255));
    }
    return px;
  }
  /* Cosine of the prompt's mean word-token state with each training noun's (demo.json). */
  Model.prototype.nearest = function (enc, k) {
    var D = enc.states.length / this.m.text.max_length, n = enc.info.tokens;
    var from = n > 2 ? 1 : 0, to = n > 2 ? n - 1 : 1, mean = new Float64Array(D);
    for (var i = from; i < to; i++) for (var d = 0; d < D; d++) mean[d] += enc.states[i * D + d] / (to - from);
    var vecs = this.m.noun_vectors;
    return Object.keys(vecs).map(function (noun) {
      var v = vecs[noun], dot = 0, a = 0, b = 0;
      for (var d = 0; d < D; d++) { dot += mean[d] * v[d]; a += mean[d] * mean[d]; b += v[d] * v[d]; }
      return { noun: noun, cosine: dot / Math.sqrt(a * b) };
    }).sort(function (p, q) { return q.cosine - p.cosine; }).slice(0, k || 3);
  };

  // ------------------------------------------------------------------ the page
  var api = { randn: randn, normalize: normalize, Tokenizer: Tokenizer, readPrompt: readPrompt,
              unsupported: unsupported };
  window.surDemo = api;
  var root = document.getElementById("sur-demo");
  if (!root) return;
  function $(sel) { return root.querySelector(sel); }
  function say(sel, text, cls) {  // a message, styled as an error / ok / plain
    var el = $(sel);
    el.textContent = text;
    el.classList.remove("sur-error", "sur-ok", "sur-warning");
    if (cls) el.classList.add(cls);
  }
  function imageElement(px, S, title) {
    var c = document.createElement("canvas");
    c.width = S; c.height = S; c.title = title; c.className = "sur-img";
    var ctx = c.getContext("2d"), im = ctx.createImageData(S, S);
    for (var i = 0; i < S * S; i++) {
      im.data[4 * i] = px[3 * i]; im.data[4 * i + 1] = px[3 * i + 1];
      im.data[4 * i + 2] = px[3 * i + 2]; im.data[4 * i + 3] = 255;
    }
    ctx.putImageData(im, 0, 0);
    return c;
  }

  var problem = unsupported();
  if (problem) { say(".sur-status", problem, "sur-error"); api.ready = Promise.reject(new Error(problem)); api.ready.catch(function () {}); return; }

  var model = null, busy = Promise.resolve(), drawn = 0;
  var slider = $(".sur-step"), stepLabel = $(".sur-step-label");
  function currentStep() { return model ? model.m.steps[Number(slider.value)] : null; }
  function showStep() { if (model) stepLabel.textContent = currentStep().toLocaleString("en"); }

  /* Draw one column: n images of `text` (base model, or through the adapter of `step`). */
  async function column(sel, text, seed, n, step, label) {
    var box = $(sel + " .sur-images");
    box.textContent = "";
    var cond = step === null ? (await model.encode(text)).states : await model.adapt(text, step);
    for (var i = 0; i < n; i++) {
      var px = await model.sample(cond, seed, i, function (s, total) {
        $(".sur-progress").value = drawn + s / total;
        say(".sur-status", "drawing " + label + ", image " + (i + 1) + " of " + n + ": DDIM step " + s + " of " + total);
      });
      drawn += 1;
      var img = imageElement(px, model.m.image_size, label + " #" + (i + 1));
      img.dataset.pixels = btoa(String.fromCharCode.apply(null, px));
      box.appendChild(img);
    }
  }

  async function draw(what) {
    var text = $(".sur-prompt").value, seed = Number($(".sur-seed").value), n = Number($(".sur-n").value);
    var notes = $(".sur-notes");
    notes.textContent = "";
    function note(msg, cls) { var p = document.createElement("p"); p.textContent = msg; p.className = cls || ""; notes.appendChild(p); }
    if (!text.trim()) { say(".sur-status", "Type a prompt first, e.g. \"four tomatoes\".", "sur-error"); return; }
    if (!/\p{L}/u.test(text)) { say(".sur-status", "This prompt has no words (no letters): type a narrative prompt such as \"three plums on a plate\".", "sur-error"); return; }
    if (!Number.isInteger(seed) || seed < 0 || seed > 2147483647) { say(".sur-status", "The seed must be a whole number from 0 to 2147483647.", "sur-error"); return; }
    var enc = await model.encode(text), info = enc.info;
    if (info.kept > 0 && info.unknown === info.kept) { say(".sur-status", "The text encoder knows none of this prompt's tokens (all [UNK]); type English words.", "sur-error"); return; }
    if (info.pieces > info.kept) note("Your prompt has " + info.pieces + " word pieces; the text encoder reads only the first " + info.kept + " (its window is " + model.m.text.max_length + " tokens with [CLS] and [SEP]). Cut: \u201c" + info.cut + "\u201d", "sur-warning");
    var near = model.nearest(enc, 3);
    $(".sur-nearest").textContent = near.map(function (x) { return x.noun + " (" + x.cosine.toFixed(3) + ")"; }).join(", ");
    var spec = readPrompt(model.m.world, text), step = currentStep();
    var columns = what === "adapter" ? 1 : (spec ? 3 : 2);
    drawn = 0;
    $(".sur-progress").max = columns * n;
    $(".sur-adapter h4").textContent = "SUR-adapter, step " + step.toLocaleString("en");
    if (what !== "adapter") await column(".sur-base", text, seed, n, null, "base model");
    say(".sur-status", "loading the adapter of step " + step + " ...");
    await model.adapter(step);
    await column(".sur-adapter", text, seed, n, step, "adapter (step " + step + ")");
    if (what !== "adapter") {
      var cx = $(".sur-complex .sur-images"), ct = $(".sur-complex .sur-complex-text");
      if (spec) { ct.textContent = "\u201c" + spec.complex + "\u201d"; await column(".sur-complex", spec.complex, seed, n, null, "complex prompt"); }
      else { cx.textContent = ""; ct.textContent = "Unavailable: the complex prompt is known only for the SUR world's nouns (" + Object.keys(model.m.world.nouns).join(", ") + "), with a number 1-6."; }
    }
    var ms = model.timings.slice(-n).reduce(function (a, b) { return a + b; }, 0) / n;
    say(".sur-status", "Done: " + (drawn) + " images, " + (ms / 1000).toFixed(2) + " s per image (25 DDIM steps with CFG, one thread).", "sur-ok");
    root.dataset.drawn = String(Number(root.dataset.drawn || 0) + 1);
  }
  function queue(what) {
    busy = busy.then(function () { root.dataset.busy = "1"; return draw(what); })
      .catch(function (e) { say(".sur-status", "Error: " + e.message, "sur-error"); })
      .then(function () { root.dataset.busy = "0"; });
    return busy;
  }

  api.ready = Model.load(function (what, a, b) {
    say(".sur-status", "loading the " + what + (b ? ": " + (a / 1e6).toFixed(1) + " of " + (b / 1e6).toFixed(1) + " MB" : " ..."));
  }).then(function (m) {
    model = api.model = m;
    slider.max = String(m.m.steps.length - 1);
    slider.value = String(m.m.steps.length - 1);
    showStep();
    var total = Object.values(m.m.sizes).reduce(function (a, b) { return a + b; }, 0);
    $(".sur-quant").textContent = "Weights: " + (Object.entries(m.m.quantization.chosen).map(function (e) { return e[0] + " " + e[1]; }).join(", ") || "all float32") +
      "; the images differ from PyTorch's by at most " + m.m.quantization.max_diff_levels + " of 255 levels on the export's check set (tolerance " + m.m.quantization.tolerance_levels + "). Model files: " + (total / 1e6).toFixed(1) + " MB, plus " + (m.m.embeddings.bytes / m.m.embeddings.files / 1e3).toFixed(0) + " kB of embedding rows per file a prompt's tokens fall in.";
    root.querySelectorAll("button, input, select").forEach(function (el) { el.disabled = false; });
    say(".sur-status", "Ready. Type a prompt and press Draw.", "sur-ok");
    root.dataset.ready = "1";
    return m;
  });
  api.ready.catch(function (e) { say(".sur-status", "Could not load the models: " + e.message, "sur-error"); });
  api.draw = queue;
  $(".sur-go").addEventListener("click", function () { queue("all"); });
  $(".sur-prompt").addEventListener("keydown", function (e) { if (e.key === "Enter") queue("all"); });
  $(".sur-reseed").addEventListener("click", function () { $(".sur-seed").value = String(Math.floor(Math.random() * 1e6)); queue("all"); });
  slider.addEventListener("input", showStep);
  slider.addEventListener("change", function () { if ($(".sur-base .sur-images").children.length) queue("adapter"); });
})();
