"""Prompt expansion: the built-in expander writes the synthetic data's detailed style, and an OpenAI-style
endpoint is used when it answers and falls back, with a warning, when it does not (servers on 127.0.0.1)."""
import http.server
import json
import socket
import threading
import time

import pytest

from soraax.data import synthetic
from soraax.text.expand import DEFAULTS, builtin_expand, expand_prompt, parse_prompt


def test_builtin_expansion_is_the_training_captions_detailed_style():
    spec = synthetic.ClipSpec("square", "red", DEFAULTS["size"], "left", DEFAULTS["speed"], DEFAULTS["background"])
    assert expand_prompt("a red square moving left") == synthetic.caption_detailed(spec)
    # Every attribute the prompt names is kept; synonyms map to the dataset's words.
    full = synthetic.ClipSpec("circle", "blue", "small", "up", "quickly", "white")
    assert builtin_expand("a tiny blue ball moving upward fast on a white background") == \
        synthetic.caption_detailed(full)


def test_every_training_short_caption_expands_to_a_detailed_caption_of_the_same_clip():
    clips = synthetic.SyntheticClips(num_examples=40, seed=3)
    for i in range(len(clips)):
        example = clips[i]
        expanded = parse_prompt(builtin_expand(example["caption"], moving=bool(example["direction"])))
        for attribute in ("shape", "colour", "direction"):
            assert expanded[attribute] == example[attribute]


def test_images_and_unknown_subjects():
    assert "stands still" in builtin_expand("a green triangle", moving=False)
    assert builtin_expand("a lighthouse at dawn") == "a lighthouse at dawn"  # nothing to describe: unchanged
    with pytest.raises(TypeError, match="str prompt"):
        expand_prompt(None)


class _Handler(http.server.BaseHTTPRequestHandler):
    reply: bytes = b""
    status = 200
    delay = 0.0
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body))
        time.sleep(self.delay)
        try:
            self.send_response(self.status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(self.reply)
        except BrokenPipeError:  # the client gave up first (the timeout case)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("Handler", (_Handler,), {"seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def _completion(text):
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


def test_an_endpoint_that_answers_is_used(server):
    handler, url = server
    handler.reply = _completion("A large red square glides  to the left.\n")
    assert expand_prompt("a red square moving left", url=url, model="m") == "A large red square glides to the left."
    path, body = handler.seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "m"
    assert body["messages"][-1] == {"role": "user", "content": "a red square moving left"}


@pytest.mark.parametrize("status, reply, delay, reason", [
    (500, b"{}", 0.0, "HTTPError"),
    (200, b"not json", 0.0, "JSONDecodeError"),
    (200, json.dumps({"choices": []}).encode(), 0.0, "IndexError"),
    (200, _completion("   "), 0.0, "the completion is empty"),
    (200, _completion("late"), 2.0, "timed out"),
])
def test_an_endpoint_that_fails_falls_back_with_a_warning(server, status, reply, delay, reason):
    handler, url = server
    handler.status, handler.reply, handler.delay = status, reply, delay
    with pytest.warns(RuntimeWarning, match=reason) as caught:
        expanded = expand_prompt("a red square moving left", url=url, timeout=0.5)
    assert expanded == builtin_expand("a red square moving left")
    assert url in str(caught[0].message) and "built-in expander" in str(caught[0].message)


def test_an_unreachable_endpoint_falls_back_with_a_warning():
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.warns(RuntimeWarning, match=f"127.0.0.1:{port}/chat/completions failed"):
        expanded = expand_prompt("a blue circle", url=f"http://127.0.0.1:{port}", timeout=1.0)
    assert expanded == builtin_expand("a blue circle")
