"""jobs/serve.py end to end: the real server (a subprocess on a free 127.0.0.1 port) with a tiny checkpoint the
trainer memorised two records into (trainer/tiny_demo.py), reached by the official `openai` client, plain HTTP
and a real headless Chromium (Selenium).

The expected answer is what jobs/vqa.py --greedy prints for the same image and question (another process, the
file read from disk rather than sent as a data URL), and the memorised answer of the shipped record.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.ray_nodes import free_port
from trainer.tiny_demo import EXAMPLES, shipped_record

openai = pytest.importorskip("openai", reason="pip install -e '.[test]' (the serve extra)")
ROOT = Path(__file__).resolve().parents[3]
IMAGES = EXAMPLES / "images"
TINY = ["--vit_transform", "56,28,14,3136", "--gen_vae_transform", "64,32,16", "--gen_vit_transform", "56,28,14,3136"]
START_S = 180


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_demo_ckpt) -> Path:
    return tiny_demo_ckpt      # tests/integration/conftest.py: trained once per session


class Server:
    def __init__(self, ckpt: Path, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve.py"), "--model_path", str(ckpt),
                                      "--port", str(self.port), "--model_name", "tiny", *TINY, *extra],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + START_S
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/", timeout=2).read()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the server did not start:\n{log.read_text()}")
                time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    s = Server(tiny_ckpt, tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    s.stop()


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, raw, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def vqa_record() -> tuple[Path, str, str]:
    rec = shipped_record("ct_mr_vqa", 0)
    prompt = rec["message"][0]["value"].split("<image>")[1].strip()
    return IMAGES / rec["input_img"][0]["path"], prompt, rec["message"][1]["value"]


def test_openai_client_equals_the_vqa_cli(server, tiny_ckpt):
    image, prompt, memorised = vqa_record()
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "vqa.py"), "--model_path", str(tiny_ckpt), "--image",
                        str(image), "--prompt", prompt, "--greedy", *TINY[:2]], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    expected = r.stdout.strip()
    assert expected == memorised

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": prompt}]}]
    done = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=512)
    assert done.choices[0].message.content == expected
    assert done.choices[0].finish_reason == "stop"

    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=512,
                                                stream=True):
        delta = chunk.choices[0].delta
        pieces.append(delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert len([p for p in pieces if p]) > 1          # streamed in pieces, not one blob
    assert "".join(pieces) == expected and finish == "stop"

    # max_tokens cuts the answer: the first 5 tokens (the tiny tokenizer has one token per character)
    short = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=5)
    assert short.choices[0].finish_reason == "length" and expected.startswith(short.choices[0].message.content)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    image, prompt, memorised = vqa_record()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(url: str):
        return client.chat.completions.create(model="tiny", temperature=0, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}])

    broken = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really a png").decode()
    with pytest.raises(openai.BadRequestError) as err:
        ask(broken)
    assert err.value.status_code == 400
    assert "messages[0].content[0].image_url.url: cannot decode the image" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        ask("http://example.org/chest.png")
    assert "http:// image URLs are refused: the server fetches nothing from the network" in err.value.message
    assert ask(data_url(image)).choices[0].message.content == memorised     # the next request succeeds

    # plain HTTP: an unknown field, a body that is not JSON, a prompt longer than the model's context
    status, body = post(f"{server.url}/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": "hi"}], "top_k": 3})
    assert status == 400 and body["error"]["message"].startswith("top_k: unknown field")
    status, body = post(f"{server.url}/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["message"].startswith("body: not JSON")
    status, body = post(f"{server.url}/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": "x" * 5000}]})
    assert status == 400 and "exceeds the model's context" in body["error"]["message"]
    status, body = post(f"{server.url}/v1/chat/completions", {"model": "tiny", "stream": True, "messages": [
        {"role": "user", "content": "x" * 5000}]})
    assert status == 400 and "exceeds the model's context" in body["error"]["message"]
    assert ask(data_url(image)).choices[0].message.content == memorised


def test_image_generation_extension_returns_a_png(server):
    from PIL import Image
    import io

    rec = shipped_record("he_to_ihc_edit", 0)
    status, body = post(f"{server.url}/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(IMAGES / rec["input_img"][0]["path"])}},
            {"type": "text", "text": rec["message"][0]["value"].strip()}]}],
        "image_generation": {"num_timesteps": 3, "understanding": "turn", "cfg_text_scale": 1.0}})
    assert status == 200, body
    message = body["choices"][0]["message"]
    assert message["content"] == rec["message"][1]["value"]          # the memorised understanding text
    png = Image.open(io.BytesIO(base64.b64decode(message["images"][0]["b64_json"])))
    assert png.format == "PNG" and png.size == (64, 64)
    status, body = post(f"{server.url}/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "A chest X-ray."}],
        "image_generation": {"num_timesteps": 2}})
    assert status == 400 and "larger than max_latent_size" in body["error"]["message"]   # 1024x1024 default


def test_api_key_and_warning(tiny_ckpt, tmp_path):
    s = Server(tiny_ckpt, tmp_path / "keyed.log", "--api-key", "s3cret", "--host", "0.0.0.0")
    try:
        url = f"http://127.0.0.1:{s.port}/v1"
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert err.value.status_code == 401
        req = urllib.request.Request(f"{url}/models")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 401 and "Authorization: Bearer" in json.loads(err.value.read())["error"]["message"]
        assert [m.id for m in openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0).models.list().data] == ["tiny"]
    finally:
        s.stop()
    assert "has no authentication" in (tmp_path / "keyed.log").read_text()


def test_user_mistakes_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "serve.py"), "--model_path", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing llm_config.json" in r.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium + chromium-driver (.ci/run installs them)")
def test_web_app_answers_in_a_real_browser(server):
    """Upload, ask, read the memorised answer; a follow-up; an error shown in the page; the image tab with
    its progress. MEDLOOM_SERVE_SCREENSHOT=PATH saves the README's screenshot (docs/serve.png)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image, prompt, memorised = vqa_record()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="medloom-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#vqa-image input[type=file]"))
        upload.send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#vqa-image img"))
        box = driver.find_element(By.CSS_SELECTOR, "#vqa-question textarea")
        box.send_keys(prompt)
        driver.find_element(By.CSS_SELECTOR, "#vqa-send").click()
        WebDriverWait(driver, 120).until(
            lambda d: memorised in d.find_element(By.CSS_SELECTOR, "#vqa-chat").text)
        shot = os.environ.get("MEDLOOM_SERVE_SCREENSHOT")
        if shot:
            driver.save_screenshot(shot)
        # a follow-up question: the conversation is replayed, a second answer appears under it
        driver.find_element(By.CSS_SELECTOR, "#vqa-question textarea").send_keys("And the window?")
        driver.find_element(By.CSS_SELECTOR, "#vqa-send").click()
        WebDriverWait(driver, 120).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#vqa-chat").get_attribute("innerHTML").count(
                'class="message-row') == 4 and d.find_element(By.CSS_SELECTOR, "#vqa-chat").text.split(
                "And the window?")[-1].strip())
        assert memorised in driver.find_element(By.CSS_SELECTOR, "#vqa-chat").text
        # an error is shown in the page and the app keeps answering: sampling with temperature 0 is refused
        driver.find_element(By.CSS_SELECTOR, "#vqa-greedy input").click()
        slider = driver.find_element(By.CSS_SELECTOR, "#vqa-temperature input[type=number]")
        slider.clear()
        slider.send_keys("0")
        box = driver.find_element(By.CSS_SELECTOR, "#vqa-question textarea")
        box.send_keys("again")
        driver.find_element(By.CSS_SELECTOR, "#vqa-send").click()
        WebDriverWait(driver, 60).until(lambda d: "temperature must be > 0" in d.find_element(By.TAG_NAME, "body").text)

        # the image tab: text-to-image at 64x64 in 4 steps, thinking mode on (its thought fills the text box)
        next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Image generation").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#gen-instruction textarea").is_displayed())
        driver.find_element(By.CSS_SELECTOR, "#gen-instruction textarea").send_keys("An axial CT slice.")
        for sel, value in (("#gen-size textarea, #gen-size input", "64x64"), ("#gen-steps input[type=number]", "4")):
            field = driver.find_element(By.CSS_SELECTOR, sel)
            field.clear()
            field.send_keys(value)
        driver.find_element(By.CSS_SELECTOR, "#gen-think input").click()
        driver.find_element(By.CSS_SELECTOR, "#gen-run").click()
        WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gen-out img"))
        assert "64x64 in" in driver.find_element(By.TAG_NAME, "body").text
        # progress while sampling: 100 timesteps (99 Euler steps) show "k/99 steps" over the output
        steps = driver.find_element(By.CSS_SELECTOR, "#gen-steps input[type=number]")
        steps.clear()
        steps.send_keys("100")
        driver.find_element(By.CSS_SELECTOR, "#gen-run").click()
        seen: set[str] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = driver.find_element(By.CSS_SELECTOR, "#gen-out").text
            seen |= {line for line in text.splitlines() if "/99 steps" in line}
            if seen:
                break
            time.sleep(0.05)
        assert seen, "no sampling progress shown"
        if shot:
            driver.save_screenshot(shot.replace(".png", "_image.png"))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
