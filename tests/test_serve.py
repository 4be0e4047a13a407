"""``llada-onnx serve`` exercised as users do: a real server process on 127.0.0.1, the real OpenAI client, concurrent
streaming clients, and the web page in the system's headless Chromium."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from llada_onnx.runtime import Pipeline
from llada_onnx.serve.process import LocalServer

PROMPTS = ["ROMEO.", "JULIET.", "Enter HAMLET.", "What light", "KING. Speak", "My lord,", "O", "First Citizen."]


class Server(LocalServer):
    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", "16")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def default_pipe():
    return Pipeline.from_pretrained()


@pytest.fixture(scope="module")
def chat_server(tiny_onnx):
    s = Server("--model", str(tiny_onnx), api_key="s3cret")
    yield s
    s.stop()


def test_completion_is_pipeline_generate(server, default_pipe):
    out = server.client().completions.create(model="x", prompt="ROMEO.", max_tokens=32)
    assert out.choices[0].text == default_pipe.generate("ROMEO.", gen_length=32)[0]
    assert out.choices[0].finish_reason in ("length", "stop")
    prompt_tokens = len(default_pipe.codec.encode("ROMEO."))
    assert out.usage.prompt_tokens == prompt_tokens and 0 < out.usage.completion_tokens <= 32
    assert out.usage.total_tokens == prompt_tokens + out.usage.completion_tokens


def test_streaming_sends_the_same_text_as_it_becomes_final(server):
    client = server.client()
    whole = client.completions.create(model="x", prompt="JULIET.", max_tokens=64,
                                      extra_body={"block_length": 16}).choices[0].text
    pieces, finish = [], None
    for chunk in client.completions.create(model="x", prompt="JULIET.", max_tokens=64, stream=True,
                                           extra_body={"block_length": 16}):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1 and finish in ("length", "stop")


def test_sampler_fields_and_seed(server, default_pipe):
    client = server.client()
    kw = dict(model="x", prompt="Enter HAMLET.", max_tokens=32, temperature=1.0)
    a, b, c = (client.completions.create(**kw, seed=seed).choices[0].text for seed in (5, 5, 6))
    assert a == b == default_pipe.generate("Enter HAMLET.", gen_length=32, temperature=1.0, seed=5)[0] != c
    fast = client.completions.create(model="x", prompt="O", max_tokens=32,
                                     extra_body={"threshold": 0.9, "block_length": 8}).choices[0].text
    assert fast == default_pipe.generate("O", gen_length=32, threshold=0.9, block_length=8)[0]


def test_stop_strings_cut_the_text(server, default_pipe):
    full = default_pipe.generate("ROMEO.", gen_length=32)[0]
    stop = full.strip().split()[2]
    out = server.client().completions.create(model="x", prompt="ROMEO.", max_tokens=32, stop=stop)
    assert out.choices[0].text == full[:full.find(stop)] and out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"prompt": "x", "frobnicate": 1}).encode(), "unknown field frobnicate"),
    (json.dumps({"prompt": "x", "top_p": 0.5}).encode(), "top_p 0.5 is not supported"),
    (json.dumps({"prompt": "x", "n": 2}).encode(), "n 2 is not supported"),
    (json.dumps({"prompt": "x", "max_tokens": 30, "block_length": 8}).encode(), "max_tokens (30) must be a multiple"),
    (json.dumps({"prompt": "x " * 600, "max_tokens": 32}).encode(), "exceeds the model's max_sequence_length"),
    (json.dumps({"prompt": ["a", "b"]}).encode(), "one request per prompt"),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), "temperature must be >= 0"),
])
def test_bad_requests_are_4xx_and_the_server_keeps_serving(server, body, message):
    status, reply = server.post("/v1/completions", body, {"Content-Type": "application/json"})
    assert status == 400 and message in reply["error"]["message"], reply
    assert server.health()["status"] == "ok"


def test_the_openai_client_sees_a_bad_request(server):
    with pytest.raises(openai.BadRequestError, match="base model without a chat template"):
        server.client().chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])


def test_chat_with_an_instruct_export_and_an_api_key(chat_server, tiny_onnx):
    messages = [{"role": "user", "content": "the king"}]
    with pytest.raises(openai.AuthenticationError):
        chat_server.client().chat.completions.create(model="x", messages=messages)
    status, reply = chat_server.post("/v1/chat/completions", json.dumps({"messages": messages}).encode())
    assert status == 401 and "Authorization: Bearer" in reply["error"]["message"]
    client = chat_server.client("s3cret")
    assert [m.id for m in client.models.list().data] == [tiny_onnx.name]
    out = client.chat.completions.create(model="x", messages=messages, max_tokens=16, extra_body={"block_length": 8})
    pipe = Pipeline.from_pretrained(tiny_onnx)
    ids, _ = pipe.codec.encode_batch([messages], chat=True)
    want = pipe.generate_ids(ids, gen_length=16, block_length=8, early_stop=True)
    assert out.choices[0].message.content == pipe.codec.decode(want[0, ids.shape[1]:])
    assert out.usage.prompt_tokens == ids.shape[1]
    roles = [c.choices[0].delta.role for c in client.chat.completions.create(
        model="x", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True})
        if c.choices]
    assert roles[0] == "assistant"


def test_concurrent_streaming_clients_each_get_their_own_text(server, default_pipe):
    """32 streaming clients at once: every request completes with exactly the text it gets alone, the model calls
    are shared, and the server's memory stays bounded."""
    alone = {p: default_pipe.generate(p, gen_length=32)[0] for p in PROMPTS}
    before_calls, before_rss = server.health()["model_calls"], server.rss_mb()

    def one(i: int) -> tuple[str, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        stream = server.client().completions.create(model="x", prompt=prompt, max_tokens=32, stream=True)
        return prompt, "".join(chunk.choices[0].text for chunk in stream)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(text == alone[prompt] for prompt, text in results)
    calls = server.health()["model_calls"] - before_calls
    assert calls < 32 * 32 / 4, f"{calls} model calls for 32 requests of 32 steps: not batched"
    assert server.rss_mb() - before_rss < 300
    assert server.health()["running"] == 0


def test_greedy_and_sampling_requests_batched_together_get_their_own_text(server, default_pipe):
    """Requests that sample (their step needs the logits) and greedy ones in flight together."""
    settings = [dict(temperature=1.0, seed=i) if i % 2 else {} for i in range(8)]
    alone = [default_pipe.generate(PROMPTS[i], gen_length=32, **s)[0] for i, s in enumerate(settings)]

    def one(i: int) -> str:
        return server.client().completions.create(model="x", prompt=PROMPTS[i], max_tokens=32,
                                                  **settings[i]).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == alone


def test_a_client_that_goes_away_frees_its_slot(server):
    body = json.dumps({"prompt": "ROMEO.", "max_tokens": 256, "stream": True}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=30)
    response.readline()  # the first event: the request is running
    assert server.health()["running"] == 1
    response.close()
    deadline = time.time() + 20
    while server.health()["running"] and time.time() < deadline:
        time.sleep(0.1)
    assert server.health()["running"] == 0


def test_requests_beyond_the_queue_get_429():
    s = Server("--max-batch", "1", "--max-queue", "1")
    try:
        body = json.dumps({"prompt": "ROMEO.", "max_tokens": 128}).encode()
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: s.post("/v1/completions", body), range(6)))
        codes = sorted(code for code, _ in replies)
        assert codes[0] == 200 and 429 in codes, codes
        assert all("retry later" in r["error"]["message"] for code, r in replies if code == 429)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def llada2_export(tmp_path_factory):
    from llada_onnx.export import export
    from llada_onnx.models.tiny import make_tiny_llada2_checkpoint

    ckpt = make_tiny_llada2_checkpoint(tmp_path_factory.mktemp("llada2-ckpt"))
    out = tmp_path_factory.mktemp("llada2-export") / "onnx"
    export(ckpt, out, progress=False)
    return out


@pytest.fixture(scope="module")
def llada2_server(llada2_export):
    s = Server("--model", str(llada2_export))
    yield s
    s.stop()


LLADA2_PROMPTS = ["the king", "the queen said", "a lord", "the king and the queen", "my lord", "the"]


def test_block_diffusion_requests_get_pipeline_generates_text(llada2_server, llada2_export):
    """A LLaDA2 export served: completions and chat equal Pipeline.generate's text under the block sampler's own
    settings (threshold, editing, top_k/top_p sampling), streaming sends it block by block as blocks finish, and
    concurrent requests each get the text they get alone."""
    pipe = Pipeline.from_pretrained(llada2_export)
    client = llada2_server.client()
    assert llada2_server.health()["sampler"] == "block_diffusion"
    grid = [{}, dict(block_length=8, threshold=0.5), dict(block_length=8, editing_threshold=0.5, max_post_steps=2),
            dict(temperature=1.0, top_p=0.9, seed=3, extra_body={"top_k": 50})]
    for settings in grid:
        kw = {k: v for k, v in settings.items() if k not in ("extra_body", "temperature", "top_p", "seed")}
        extra = dict(settings.get("extra_body", {}), **kw)
        out = client.completions.create(model="x", prompt="the king", max_tokens=32, extra_body=extra,
                                        **{k: settings[k] for k in ("temperature", "top_p", "seed") if k in settings})
        plain = {k: v for k, v in settings.items() if k != "extra_body"}
        want = pipe.generate("the king", chat=False, gen_length=32, **plain, **settings.get("extra_body", {}))[0]
        assert out.choices[0].text == want, settings
    pieces = [c.choices[0].text for c in client.completions.create(model="x", prompt="the king", max_tokens=32,
                                                                     stream=True, extra_body={"block_length": 8})]
    assert "".join(pieces) == pipe.generate("the king", chat=False, gen_length=32, block_length=8)[0]
    messages = [{"role": "user", "content": "the king"}]
    chat = client.chat.completions.create(model="x", messages=messages, max_tokens=16)
    assert chat.choices[0].message.content == pipe.generate([messages], gen_length=16)[0]

    alone = {p: pipe.generate(p, chat=False, gen_length=32)[0] for p in LLADA2_PROMPTS}

    def one(prompt: str) -> str:
        stream = client.completions.create(model="x", prompt=prompt, max_tokens=32, stream=True)
        return "".join(chunk.choices[0].text for chunk in stream)

    with ThreadPoolExecutor(len(LLADA2_PROMPTS)) as pool:
        assert dict(zip(LLADA2_PROMPTS, pool.map(one, LLADA2_PROMPTS))) == alone
    assert llada2_server.health()["running"] == 0


def test_block_diffusion_text_is_final_only_up_to_the_samplers_mark(llada2_export):
    """Block diffusion may still edit an unfinished block, so the streamed text is the tokens before the
    sampler's ``final_until``, not those before the first mask."""
    import numpy as np

    from llada_onnx.serve.protocol import FinalText

    codec = Pipeline.from_pretrained(llada2_export).codec
    words = codec.encode("the king and the queen")
    mask = codec.manifest.id("mask_token_id")
    prompt = codec.encode("my lord")
    row = np.array(prompt + words + [mask] * 3)
    final = FinalText(codec, len(prompt), len(words) + 3, [])
    assert codec.decode(words[:2]) and final.update(row, len(prompt)) == "" and final.update(row, len(prompt) + 2) == codec.decode(words[:2])
    assert final.update(row, len(prompt) + len(words)) == codec.decode(words)[len(codec.decode(words[:2])):]
    assert not final.finished and final.text == codec.decode(words)


@pytest.mark.parametrize("body, message", [
    ({"remasking": "random"}, "unknown field remasking"),
    ({"cfg_scale": 1.0}, "unknown field cfg_scale"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"max_post_steps": 2}, "max_post_steps needs editing_threshold"),
    ({"max_tokens": 4096}, "max_sequence_length"),
])
def test_block_diffusion_refuses_llada_fields_and_bad_settings(llada2_server, body, message):
    status, reply = llada2_server.post("/v1/completions", json.dumps({"prompt": "the king", **body}).encode(),
                                       {"Content-Type": "application/json"})
    assert status == 400 and message in reply["error"]["message"], reply
    assert llada2_server.health()["status"] == "ok"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.parametrize("which", ["server", "llada2_server"])
def test_the_web_page_streams_and_draws_the_canvas(request, which, tmp_path):
    """The page in headless Chromium streams an answer and draws every position of the canvas; for a LLaDA2 export
    it hides LLaDA's cache and remasking (settings block diffusion does not take)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert _chromium() and shutil.which("chromedriver"), "the page test needs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    server = request.getfixturevalue(which)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text)
        hidden = [not e.is_displayed() for e in browser.find_elements(By.CLASS_NAME, "llada")]
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("32")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(lambda b: "done" in b.find_element(By.ID, "status").text)
        answer = browser.find_element(By.ID, "answer").text
        cells = browser.find_elements(By.CSS_SELECTOR, "#canvas span")
        masked = browser.find_elements(By.CSS_SELECTOR, "#canvas span.masked")
        steps = int(browser.find_element(By.ID, "status").text.split("·")[1].split()[0])
        browser.save_screenshot(str(tmp_path / "page.png"))
        print("screenshot:", tmp_path / "page.png")
    finally:
        browser.quit()
    assert len(cells) == 32 and not masked and hidden == [which == "llada2_server"] * 2
    if which == "server":  # LLaDA: one token a step; block diffusion commits several above its threshold
        assert answer.strip() and steps == 32


def test_ray_serve_replicas_serve_the_same_api(default_pipe):
    """A local Ray cluster with 2 CPU replicas behind Ray Serve's proxy: 16 concurrent streaming clients through the
    OpenAI client get the texts they get alone, and both replicas take requests (each names itself in
    ``system_fingerprint``)."""
    alone = {p: default_pipe.generate(p, gen_length=32)[0] for p in PROMPTS}
    with Server("--ray", "--replicas", "2", "--num-cpus", "0.5", timeout=300) as s:
        def one(i: int) -> tuple[str, str, set]:
            prompt = PROMPTS[i % len(PROMPTS)]
            chunks = list(s.client().completions.create(model="x", prompt=prompt, max_tokens=32, stream=True))
            return prompt, "".join(c.choices[0].text for c in chunks), {c.system_fingerprint for c in chunks}

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(32)))
        assert all(text == alone[prompt] for prompt, text, _ in results)
        assert len(set().union(*(replica for _, _, replica in results))) == 2  # both replicas answered
        status, reply = s.post("/v1/completions", json.dumps({"prompt": "x", "top_p": 0.2}).encode())
        assert status == 400 and "top_p" in reply["error"]["message"]
