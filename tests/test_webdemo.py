"""The browser demo (book/demo.md, sur_lib.study.webdemo): the exported ONNX files, the page's
JavaScript (tokenizer, torch's noise, the world's complex prompts) against Python, and the
page itself in headless Chromium against PyTorch, pixel for pixel within the stated tolerance.

The JavaScript checks run it in Node (skipped without ``node``); the page checks need
Chromium (Debian ``chromium``; skipped without it). The exported files come from the built
book (``_build/html/demo/models``, or $SUR_BOOK_HTML) when it is there, else from
``webdemo.export_cached`` (the first export takes minutes on 2 CPU cores; later runs reuse it).
Timings are not tested here: ``python -m sur_lib.study.webdemo bench`` measures them.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sur_lib.world import evaluate
from sur_lib.world import toyworld as tw
from sur_lib.study import webdemo

ROOT = Path(__file__).resolve().parents[1]
HTML = Path(os.environ.get("SUR_BOOK_HTML", ROOT / "_build" / "html"))
JS = ROOT / "book" / "_extra" / "demo" / "sur-demo.js"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A folder of exported demo files (the built book's, else a cached export)."""
    built = HTML / "demo" / "models"
    if (built / webdemo.DEMO_JSON).is_file():
        return built
    return webdemo.export_cached(tmp_path_factory.mktemp("models"), log=lambda *a: None)


@pytest.fixture(scope="module")
def manifest(models):
    return json.loads((models / webdemo.DEMO_JSON).read_text())


@pytest.fixture(scope="module")
def backbone():
    from sur_lib.models import load_tiny_backbone
    from sur_lib.world.paths import TINY_MODEL_DIR

    return load_tiny_backbone(TINY_MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer():
    from sur_lib.infra.text_encoders import load_minilm

    return load_minilm()[0]


NODE_RUNNER = r"""
const vm = require('vm'), fs = require('fs');
const [jsPath, inPath] = process.argv.slice(2);
const ctx = { window: {}, document: { currentScript: null, getElementById: () => null }, console };
vm.createContext(ctx);
vm.runInContext(fs.readFileSync(jsPath, 'utf8'), ctx);
const api = ctx.window.surDemo, inp = JSON.parse(fs.readFileSync(inPath, 'utf8'));
const tok = new api.Tokenizer(inp.vocab, inp.text);
process.stdout.write(JSON.stringify({
  tokens: inp.texts.map(t => { const e = tok.encode(t);
    return { ids: Array.from(e.ids, Number), pieces: e.pieces, kept: e.kept, cut: e.cut }; }),
  randn: inp.seeds.map(s => Array.from(api.randn(s, inp.n))),
  complex: inp.prompts.map(p => { const r = api.readPrompt(inp.world, p); return r ? r.complex : null; }),
}));
"""


def run_js(tmp_path, **inp):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the page's JavaScript is checked in Node)")
    runner, data = tmp_path / "runner.js", tmp_path / "in.json"
    runner.write_text(NODE_RUNNER)
    data.write_text(json.dumps(inp))
    proc = subprocess.run([node, str(runner), str(JS), str(data)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _text_cfg(tokenizer):
    special = {n: tokenizer.convert_tokens_to_ids(getattr(tokenizer, f"{n}_token"))
               for n in ("cls", "sep", "pad", "unk")}
    return {"max_length": 48, "special": special, "max_input_chars_per_word": 100,
            "wordpiece_prefix": "##"}


# --------------------------------------------------------------------------- Python side
def test_read_prompt_gives_the_test_prompts_specs():
    """Every fixed and extended held-out prompt is read as its spec, and its complex prompt
    is the canonical one stored with it."""
    from sur_lib.world.extended_prompts import extended_prompts

    specs = tw.test_prompts() + extended_prompts()
    for spec in specs:
        got = webdemo.read_prompt(spec["text"])
        assert got is not None, spec["text"]
        assert (got["count"], got["noun"], got["arrangement"]) == \
            (spec["count"], spec["noun"], spec["arrangement"]), spec["text"]
        assert got["complex"] == spec["prompt"]


def test_read_prompt_free_text_and_unknown_nouns():
    assert webdemo.read_prompt("Three PLUMS  ")["complex"] == tw.canonical_complex_prompt(
        tw.Scene(3, "purple", "circle", None, "plum"))
    assert webdemo.read_prompt("I see 4 golf balls over there")["count"] == 4
    assert webdemo.read_prompt("an olive, alone")["count"] == 1
    for text in ("five kiwis", "", "!!!", "tomatoes", "seven tomatoes", "three tomato"):
        assert webdemo.read_prompt(text) is None, text


def test_int4_blocks_round_trip():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(50, 64)).astype(np.float32)
    packed, scale, offset = webdemo._int4_blocks(w.reshape(50, 2, 32))
    assert packed.dtype == np.uint8 and packed.shape == (50, 2, 16)
    q = np.concatenate([packed % 16, packed // 16], axis=-1).astype(np.float32)
    back = (q * scale.astype(np.float32) + offset.astype(np.float32)).reshape(50, 64)
    step = scale.astype(np.float32).reshape(50, 2, 1).repeat(32, -1).reshape(50, 64)
    err = np.abs(back - w)
    assert (err <= step / 2 + 1e-3 * np.abs(w) + 1e-6).all()  # half a step (fp16 offset aside)
    assert err.max() > 0  # 4 bits cannot hold normal floats exactly


@pytest.mark.parametrize("scheme,rel", [("int8", 0.02), ("int4", 0.2), ("fp16", 0.002)])
def test_quantize_model_keeps_outputs_close(tmp_path, scheme, rel):
    """A Linear + Embedding model: int8/int4/fp16 files are smaller, hold the narrow weights,
    and give outputs close to float32 (relative to the output scale), but not equal."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(1000, 64)
            self.lin = torch.nn.Linear(64, 512)

        def forward(self, ids):
            return self.lin(self.emb(ids))

    net = Net().eval()
    ids = torch.randint(0, 1000, (2, 7))
    path = tmp_path / "net.onnx"
    webdemo._export(net, (ids,), path, ["ids"], ["out"])
    q = webdemo.quantize_model(onnx.load(str(path)), scheme)
    qpath = tmp_path / f"net.{scheme}.onnx"
    onnx.save(q, str(qpath))
    assert qpath.stat().st_size < path.stat().st_size / {"int8": 3, "int4": 5, "fp16": 1.9}[scheme]
    kinds = {onnx.helper.tensor_dtype_to_np_dtype(i.data_type) for i in q.graph.initializer}
    assert np.dtype({"int8": np.int8, "int4": np.uint8, "fp16": np.float16}[scheme]) in kinds
    ref = net(ids).detach().numpy()
    out = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"]).run(None, {"ids": ids.numpy()})[0]
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < err < rel, err
    with pytest.raises(ValueError, match="scheme must be .* got 'int2'"):
        webdemo.quantize_model(onnx.load(str(path)), "int2")


def test_a_plan_is_rejected_at_its_first_image_beyond_the_tolerance_and_unchanged_images_are_reused(tmp_path):
    """``max_pixel_difference`` on a stand-in page: every image is checked when all stay within
    the tolerance; a plan stops at its first image beyond it; an image whose files (text encoder,
    rows, UNet, its adapter) are unchanged is not drawn again, one whose adapter changed is."""
    import numpy as np

    files = {"text_encoder": "te.onnx", "unet": "unet.onnx", "adapters": {"5": "a5.onnx"}}
    manifest = {"files": files, "embeddings": {"pattern": "rows-{:03d}.bin", "files": 2}}
    for name in ("te.onnx", "unet.onnx", "a5.onnx", "rows-000.bin", "rows-001.bin"):
        (tmp_path / name).write_bytes(b"weights")

    class Page:  # draws images whose difference from the reference is diffs[(prompt, step)]
        folder = tmp_path

        def __init__(self, diffs):
            self.manifest, self.diffs, self.drawn = manifest, diffs, []

        def generate(self, prompt, seed, step):
            self.drawn.append((prompt, step))
            return np.full((2, 2, 3), self.diffs[(prompt, step)], np.uint8)

    zero = np.zeros((2, 2, 3), np.uint8)
    refs = {(p, 0, step): zero for p in ("a", "b") for step in (None, 5)}
    known = {}
    page = Page({("a", None): 1, ("a", 5): 3, ("b", None): 2, ("b", 5): 1})
    assert webdemo.max_pixel_difference(page, refs, known=known) == {"max_diff": 3, "images": 4, "drawn": 4}
    (tmp_path / "a5.onnx").write_bytes(b"int4 weights")  # a plan for the adapter only
    page = Page({("a", None): 1, ("a", 5): 9, ("b", None): 2, ("b", 5): 1})
    assert webdemo.max_pixel_difference(page, refs, stop_above=8, known=known) == {
        "max_diff": 9, "images": 2, "drawn": 1}
    assert page.drawn == [("a", 5)]  # the base model's image was reused, b's were never needed
    (tmp_path / "a5.onnx").write_bytes(b"int8 weights")
    (tmp_path / "rows-001.bin").write_bytes(b"float16 rows")  # every image reads the rows
    page = Page({("a", None): 1, ("a", 5): 4, ("b", None): 2, ("b", 5): 5})
    assert webdemo.max_pixel_difference(page, refs, stop_above=8, known=known) == {
        "max_diff": 5, "images": 4, "drawn": 4}


def test_sampler_mirror_equals_generate(backbone):
    """``webdemo.sample`` (the page's sampler in Python: torch's noise, DDIM with the exported
    schedule, CFG) on the PyTorch UNet gives generate()'s image, to a pixel level."""
    from sur_lib.pipeline import generate, make_pipeline, prompt_embeddings

    class TorchUNet:  # the onnxruntime session interface, on the torch UNet
        def run(self, _, feeds):
            with torch.no_grad():
                out = backbone.unet(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                                    encoder_hidden_states=torch.from_numpy(feeds["states"])).sample
            return [out.numpy()]

    manifest = {"schedule": webdemo.ddim_schedule(backbone), "guidance": webdemo.GUIDANCE,
                "image_size": backbone.image_size}
    assert manifest["schedule"]["timesteps"][0] == 999 and len(manifest["schedule"]["timesteps"]) == 25
    cond, uncond = prompt_embeddings(backbone, ["three plums on a plate"])
    mine = webdemo.sample(TorchUNet(), cond.numpy(), uncond.numpy(), 3, manifest)[0]
    pipe = make_pipeline(backbone, "ddim", {"timestep_spacing": "trailing"})
    ref = generate(backbone, ["three plums on a plate"], pipe=pipe, guidance_scale=webdemo.GUIDANCE,
                   num_inference_steps=25, seed=3, output_type="np")[0]
    ref = np.clip(np.rint(ref * 255.0), 0, 255).astype(np.uint8)
    assert np.abs(mine.astype(int) - ref.astype(int)).max() <= 1


def test_cli_rejects_bad_arguments(capsys):
    from sur_lib.infra.cli import UsageError

    with pytest.raises(UsageError, match="--steps \\[7\\]"):
        webdemo.main(["export", "/tmp/never-written", "--steps", "7"])
    with pytest.raises(UsageError, match="--tolerance"):
        webdemo.main(["export", "/tmp/never-written", "--tolerance", "-1"])
    with pytest.raises(UsageError, match="give OUT_DIR"):
        webdemo.main(["export"])


# --------------------------------------------------------------------------- the export
def test_export_manifest_and_sizes(manifest, models, tmp_path, tokenizer):
    """Every file is there with its recorded size and hash; quantisation kept only what stayed
    within the tolerance; a reader who draws the check prompts at every step downloads less
    than 40 MB (page, scripts, gzipped wasm, models, the embedding rows of those prompts)."""
    import hashlib

    q = manifest["quantization"]
    assert q["max_diff_levels"] <= q["tolerance_levels"] == webdemo.TOLERANCE
    assert q["trials"][0]["plan"] == "float32"
    for trial in q["trials"][1:]:
        assert trial["kept"] == (trial["max_diff"] <= q["tolerance_levels"]), trial
    for name, size in manifest["sizes"].items():
        if name != webdemo.DEMO_JSON:
            assert (models / name).stat().st_size == size
            assert hashlib.sha256((models / name).read_bytes()).hexdigest() == manifest["sha256"][name]
    assert manifest["steps"] == list(webdemo.DEMO_STEPS)
    assert manifest["adapters"]["0"]["g_zero"] is True
    site = models.parents[1] if (models.parents[1] / "demo.html").is_file() else \
        webdemo.build_site(tmp_path / "site", models)
    size = webdemo.download_size(site, tokenizer=tokenizer)
    assert "demo/ort-wasm-simd.wasm.gz" in size["files"] and "demo/ort-wasm-simd.wasm" not in size["files"]
    assert 0 < size["row_files"] < manifest["embeddings"]["files"]
    assert size["total_bytes"] < 40e6, size["total_bytes"]


def test_exported_parts_match_torch(models, manifest, backbone, tokenizer):
    """The ONNX text encoder, adapters and UNet against PyTorch on real inputs: float32 parts
    to 1e-4, quantised parts within a few percent of the output's scale."""
    demo = webdemo.OrtDemo(models, tokenizer)
    chosen = manifest["quantization"]["chosen"]
    states = backbone.encode_prompts(["three plums on a plate"])
    ours = demo.encode("three plums on a plate")
    rel = np.abs(ours - states.numpy()).max() / np.abs(states.numpy()).max()
    assert rel < (0.1 if "text_encoder" in chosen else 1e-5), rel
    for step in webdemo.DEMO_STEPS:
        adapter = webdemo.load_adapter(step)
        with torch.no_grad():
            ref = adapter(states).c.numpy()
        out = demo.adapters[step].run(None, {"states": states.numpy()})[0]
        tol = 1e-5 if (step == 0 or "adapter" not in chosen) else 0.05
        assert np.abs(out - ref).max() / np.abs(ref).max() < tol, step
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 39])
    e = torch.cat([states, states])
    with torch.no_grad():
        ref = backbone.unet(x, t, encoder_hidden_states=e).sample.numpy()
    out = demo.unet.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "states": e.numpy()})[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() < (0.05 if "unet" in chosen else 1e-5)


# --------------------------------------------------------------------------- JavaScript in Node
def test_js_tokenizer_equals_hugging_face(tmp_path, tokenizer):
    texts = ["four tomatoes", "Three PLUMS on a plate!", "", "   ", "naïve café crème brûlée",
             "東京 tower", "a\u0000b\tc\u200bd", "supercalifragilistic" * 6, "emoji 🍅🍅",
             "İstanbul ΣΑΣ", " ".join(["tomatoes"] * 60), "don't-stop, 4.5 u.s.a",
             "exactly four christmas trees"]
    out = run_js(tmp_path, vocab=webdemo._vocab_text(tokenizer), text=_text_cfg(tokenizer),
                 texts=texts, seeds=[], n=16, prompts=[], world={})
    for text, got in zip(texts, out["tokens"]):
        ref = tokenizer([text], padding="max_length", max_length=48, truncation=True).input_ids[0]
        assert got["ids"] == ref, text
        assert got["pieces"] == len(tokenizer(text).input_ids) - 2, text
    long = out["tokens"][10]
    assert long["pieces"] == 60 and long["kept"] == 46 and long["cut"].split() == ["tomatoes"] * 14


def test_js_noise_equals_torch_randn(tmp_path):
    """torch.Generator('cpu').manual_seed(s) + torch.randn, reimplemented in the page; also a
    length that is not a multiple of 16 (torch redraws the tail)."""
    seeds, n = [0, 1, 12345, 2**31 - 1], 2 * 3072 + 8
    out = run_js(tmp_path, vocab="", text={}, texts=[], seeds=seeds, n=n, prompts=[], world={})
    for seed, got in zip(seeds, out["randn"]):
        ref = torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed)).numpy()
        assert np.abs(np.asarray(got, np.float32) - ref).max() < 1e-5, seed
    assert not np.allclose(out["randn"][0], out["randn"][1])


def test_js_complex_prompts_equal_python(tmp_path, manifest):
    prompts = [p for p, *_ in webdemo.world_prompts()[::7]] + [
        "Three PLUMS  ", "I see 4 golf balls over there", "an olive, alone", "five kiwis", "",
        "seven tomatoes", "three tomato", "a christmas tree and a pine tree"]
    out = run_js(tmp_path, vocab="", text={}, texts=[], seeds=[], n=16, prompts=prompts,
                 world=manifest["world"])
    for prompt, got in zip(prompts, out["complex"]):
        ref = webdemo.read_prompt(prompt)
        assert got == (ref["complex"] if ref else None), prompt


# --------------------------------------------------------------------------- the page in Chromium
@pytest.fixture(scope="module")
def page(models, tmp_path_factory):
    """The demo page open in headless Chromium, served from a local HTTP server: the built
    book's page if there is one, else the same markup and scripts in a bare page."""
    from sur_lib.infra.headless import Chromium, chromium_path, serve

    if chromium_path() is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    site = HTML if (HTML / "demo.html").is_file() and (HTML / "demo" / "models").is_dir() else \
        webdemo.build_site(tmp_path_factory.mktemp("site"), models)
    server, url = serve(site)
    try:
        with Chromium(timeout=120) as browser:
            webdemo.open_page(browser, url + "demo.html")
            browser.url = url
            yield browser
    finally:
        server.shutdown()


CASES = [("four tomatoes", 0, None), ("four tomatoes", 0, 5000), ("three plums on a plate", 1, 500),
         ("a tower of four dice", 2, 2000), ("three plums on a plate", 1, 0)]


def test_page_draws_pytorchs_images(page, manifest, backbone):
    """The page's images equal pipeline.generate's for the same prompt, seed and step, within
    the export's tolerance, and the judge reads them the same way."""
    from sur_lib.pipeline import generate, make_pipeline

    pipe = make_pipeline(backbone, "ddim", {"timestep_spacing": "trailing"})
    tol = manifest["quantization"]["tolerance_levels"]
    worst, agree = 0, 0
    for prompt, seed, step in CASES:
        mine, _ = webdemo.page_image(page, prompt, seed, step)
        adapter = webdemo.load_adapter(step) if step is not None else None
        ref = generate(backbone, [prompt], adapter=adapter, pipe=pipe, seed=seed,
                       num_inference_steps=25, guidance_scale=webdemo.GUIDANCE, output_type="np")[0]
        ref = np.clip(np.rint(ref * 255.0), 0, 255).astype(np.uint8)
        diff = int(np.abs(mine.astype(int) - ref.astype(int)).max())
        worst = max(worst, diff)
        assert diff <= tol, (prompt, seed, step, diff)
        spec = dict(webdemo.read_prompt(prompt), type="counting")
        a, b = evaluate.score(mine, spec), evaluate.score(ref, spec)
        agree += a == b
        ja, jb = evaluate.judge(mine), evaluate.judge(ref)
        assert (ja["count"], ja["color"], ja["shape"]) == (jb["count"], jb["color"], jb["shape"]), \
            (prompt, seed, step, ja["count"], jb["count"])
    assert agree == len(CASES)
    print(f"page vs PyTorch: max difference {worst} levels over {len(CASES)} images (tolerance {tol})")


def test_second_image_of_a_column_is_generates_second_image(page, backbone):
    from sur_lib.pipeline import generate

    mine, _ = webdemo.page_image(page, "four tomatoes", 5, None, index=1)
    ref = generate(backbone, ["four tomatoes"], seed=5, num_inference_steps=25, guidance_scale=2.0,
                   num_images_per_prompt=2, output_type="np",
                   scheduler=__import__("diffusers").DDIMScheduler.from_config(
                       backbone.scheduler.config, timestep_spacing="trailing"))[1]
    ref = np.clip(np.rint(ref * 255.0), 0, 255).astype(np.uint8)
    assert np.abs(mine.astype(int) - ref.astype(int)).max() <= webdemo.TOLERANCE


def _ui_draw(page, prompt, seed=0, n=1, timeout=300):
    before = page.evaluate("Number(document.getElementById('sur-demo').dataset.drawn || 0)")
    page.evaluate(f"""(() => {{ const r = document.getElementById('sur-demo');
      r.querySelector('.sur-prompt').value = {json.dumps(prompt)};
      r.querySelector('.sur-seed').value = '{seed}';
      r.querySelector('.sur-n').value = '{n}';
      r.querySelector('.sur-go').click(); return true; }})()""")
    page.wait_for(f"document.getElementById('sur-demo').dataset.busy === '0' && "
                  f"(Number(document.getElementById('sur-demo').dataset.drawn || 0) > {before} || "
                  f"/sur-error/.test(document.querySelector('.sur-status').className))", timeout=timeout)
    return page.evaluate("""(() => { const r = document.getElementById('sur-demo');
      const t = s => r.querySelector(s).textContent;
      const n = s => r.querySelectorAll(s + ' canvas').length;
      return {status: t('.sur-status'), error: /sur-error/.test(r.querySelector('.sur-status').className),
              notes: t('.sur-notes'), nearest: t('.sur-nearest'), complex: t('.sur-complex .sur-complex-text'),
              base: n('.sur-base'), adapter: n('.sur-adapter'), cplx: n('.sur-complex'),
              encoder: surDemo.model.encoderRuns}; })()""")


def test_page_controls(page):
    """Typing and drawing through the page: three columns for a world noun, the complex
    column unavailable for another noun, nearest training nouns listed, the text encoder run
    once per prompt, clear messages for an empty, a letterless and a too-long prompt."""
    got = _ui_draw(page, "four tomatoes", seed=7)
    assert not got["error"] and (got["base"], got["adapter"], got["cplx"]) == (1, 1, 1), got
    assert got["complex"].strip("\u201c\u201d") == webdemo.read_prompt("four tomatoes")["complex"]
    assert got["nearest"].split(" (")[0] == "tomato", got["nearest"]
    runs = got["encoder"]
    again = _ui_draw(page, "four tomatoes", seed=8)  # same prompt, new seed: no encoder run
    assert again["encoder"] == runs
    kiwi = _ui_draw(page, "five kiwis on a plate")
    assert (kiwi["base"], kiwi["adapter"], kiwi["cplx"]) == (1, 1, 0)
    assert kiwi["complex"].startswith("Unavailable") and "tomato" in kiwi["complex"]
    assert kiwi["encoder"] == runs + 1  # one more prompt, one more run (complex: none)
    assert len(kiwi["nearest"].split(", ")) == 3
    for bad, words in (("", "Type a prompt"), ("1234 !! 🍅", "no words"), ("ᚠᚢᚦ ᚨᚱ", "[UNK]")):
        res = _ui_draw(page, bad)
        assert res["error"] and words in res["status"], (bad, res["status"])
    long = _ui_draw(page, "a photo of " + " ".join(["four tomatoes"] * 30))
    assert not long["error"] and "reads only the first 46" in long["notes"], long["notes"]


def test_page_explains_what_it_cannot_do(page):
    """No WebAssembly SIMD, or a page opened from disk: a message, not a blank."""
    s = page.call("Page.addScriptToEvaluateOnNewDocument",
                  {"source": "WebAssembly.validate = function () { return false; };"}, session=True)
    try:
        page.open(page.url + "demo.html")
        status = page.wait_for("document.querySelector('.sur-status').textContent.includes('SIMD') && "
                               "document.querySelector('.sur-status').textContent")
        assert "no SIMD" in status
    finally:
        page.call("Page.removeScriptToEvaluateOnNewDocument", {"identifier": s["identifier"]}, session=True)
    page.call("Page.addScriptToEvaluateOnNewDocument", {"source": "Object.defineProperty(navigator, "
              "'deviceMemory', {get: () => 0.5});"}, session=True)
    page.open(page.url + "demo.html")
    assert "0.5 GB" in page.wait_for("document.querySelector('.sur-status').textContent.includes('GB') && "
                                     "document.querySelector('.sur-status').textContent")


def test_book_hook_skips_builds_without_the_demo(tmp_path):
    """The Sphinx hook exports only after a successful HTML build that has demo.html."""
    import sys

    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    try:
        import sur_book_html
    finally:
        sys.path.pop(0)

    class App:
        outdir = str(tmp_path)

        class builder:
            format = "html"

        class config:
            sur_demo_export = True

    sur_book_html._demo_files(App, None)  # no demo.html: nothing written
    (tmp_path / "demo.html").write_text("<html></html>")
    sur_book_html._demo_files(App, RuntimeError("build failed"))  # a failed build: nothing
    App.config.sur_demo_export = False
    sur_book_html._demo_files(App, None)  # switched off: nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.html"]


def test_book_hook_starts_the_export_beside_the_chapters_and_waits_for_it(tmp_path, monkeypatch):
    """With the demo page in the book and no cached export, the build starts
    ``webdemo export --cached`` in its own process (one torch thread) as it begins, and waits
    for it when it has finished; a failed build kills it; a cached export starts nothing."""
    import sys

    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    try:
        import sur_book_html
    finally:
        sys.path.pop(0)
    started = []

    class Proc:
        killed = waited = False

        def __init__(self, argv, env, **kw):
            self.argv, self.env = argv, env
            started.append(self)

        def kill(self):
            self.killed = True

        def poll(self):
            return 0 if self.waited else None

        def wait(self):
            self.waited = True
            return 0

    monkeypatch.setattr(sur_book_html.subprocess, "Popen", Proc)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "demo.md").write_text("# demo")

    def app(cached):
        monkeypatch.setattr(webdemo, "is_cached", lambda: cached)

        class App:
            srcdir, outdir, doctreedir = tmp_path / "src", tmp_path / "html", tmp_path / "build" / ".doctrees"

            class builder:
                format = "html"

            class config:
                sur_demo_export = True

        sur_book_html._start_demo_export(App)
        return App

    a = app(cached=True)
    assert a.sur_demo_export_proc is None and not started
    a = app(cached=False)
    (proc,) = started
    assert proc.argv[1:] == ["-m", "sur_lib.study.webdemo", "export", "--cached"]
    assert proc.env["OMP_NUM_THREADS"] == "1"
    sur_book_html._demo_files(a, RuntimeError("build failed"))
    assert proc.killed and not proc.waited
    a = app(cached=False)
    sur_book_html._demo_files(a, None)  # no demo.html in this build: waited for, nothing else
    assert started[1].waited and not started[1].killed
    assert not (tmp_path / "html").exists()
