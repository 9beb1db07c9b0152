"""Prompt expansion (recaptioning): a user's short prompt -> the detailed caption style a model was trained on.

Sora, like DALL-E 3, trains on long descriptive captions written by a captioner and at sampling time has a
language model rewrite a short prompt into that style. Here that is one pluggable function:

    expand_prompt("a red square moving left")
    -> "A large red square moves slowly to the left across a plain black background. The camera is static
        and nothing else is in view."

The built-in expander knows the synthetic dataset's vocabulary (soraax/data/synthetic.py) and fills in what
the prompt leaves out with fixed, documented defaults (`DEFAULTS`), so it is deterministic and offline. With
`url` it asks an OpenAI-compatible chat endpoint (`POST {url}/chat/completions`; `$OPENAI_API_KEY` is sent
as a bearer token when set) and falls back to the built-in expander, with a warning that says why, when the
endpoint is unreachable, slow, or answers with anything but a completion.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
import warnings

from soraax.data import synthetic

# What a prompt leaves unsaid becomes: the size that reads best at low resolution, the slower speed (the
# object stays in view longest) and the most common background of the training mix's first examples.
DEFAULTS = {"size": "large", "speed": "slowly", "background": "black"}

_WORDS = {
    "shape": {**{s: s for s in synthetic.SHAPES}, **{s + "s": s for s in synthetic.SHAPES}, "ball": "circle",
              "disc": "circle", "disk": "circle", "box": "square", "rhombus": "diamond"},
    "colour": {**{c: c for c in synthetic.COLOURS}, "violet": "purple", "turquoise": "cyan"},
    "size": {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large",
             "huge": "large"},
    "direction": {"left": "left", "leftward": "left", "leftwards": "left", "right": "right",
                  "rightward": "right", "rightwards": "right", "up": "up", "upward": "up", "upwards": "up",
                  "down": "down", "downward": "down", "downwards": "down"},
    "speed": {"slowly": "slowly", "slow": "slowly", "quickly": "quickly", "quick": "quickly", "fast": "quickly",
              "rapidly": "quickly"},
    "background": {**{b: b for b in synthetic.BACKGROUNDS}, "gray": "grey"},
}

SYSTEM_PROMPT = (
    "You rewrite short prompts for a text-to-video model into the detailed caption style it was trained on. "
    "Answer with the caption alone, one or two sentences, naming the object's size, colour and shape, how it "
    "moves (speed and direction) or that it stands still, and the background. Examples:\n"
    + "\n".join(synthetic.caption_detailed(spec) for spec in (
        synthetic.ClipSpec("square", "red", "large", "left", "slowly", "black"),
        synthetic.ClipSpec("circle", "blue", "small", None, None, "white"))))


def parse_prompt(prompt: str) -> dict[str, str]:
    """The synthetic attributes a prompt names, by word ('' for each one it does not name); the first word
    of each kind wins. Object colours and background names share no word (synthetic.py), so "a red square on
    a white background" parses without looking at word order."""
    found = {attribute: "" for attribute in _WORDS}
    for word in re.findall(r"[a-z]+", prompt.lower()):
        for attribute, words in _WORDS.items():
            if word in words and not found[attribute]:
                found[attribute] = words[word]
    return found


def builtin_expand(prompt: str, *, moving: bool | None = None) -> str:
    """The detailed caption of the prompt's attributes, defaults filling the gaps; the prompt itself when it
    names neither a shape nor a colour (there is no subject to describe). `moving=False` describes an image."""
    found = parse_prompt(prompt)
    if not found["shape"] and not found["colour"]:
        return prompt
    moving = bool(found["direction"]) if moving is None else moving
    spec = synthetic.ClipSpec(
        shape=found["shape"] or "square", colour=found["colour"] or "red", size=found["size"] or DEFAULTS["size"],
        direction=(found["direction"] or "right") if moving else None,
        speed=(found["speed"] or DEFAULTS["speed"]) if moving else None,
        background=found["background"] or DEFAULTS["background"])
    return synthetic.caption_detailed(spec)


def _chat_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _ask_endpoint(prompt: str, url: str, model: str, timeout: float) -> str:
    body = json.dumps({"model": model, "temperature": 0, "messages": [
        {"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    request = urllib.request.Request(_chat_url(url), data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.loads(response.read().decode("utf-8"))
    text = answer["choices"][0]["message"]["content"]
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the completion is empty")
    return " ".join(text.split())


def expand_prompt(prompt: str, *, url: str = "", model: str = "gpt-4o-mini", timeout: float = 10.0,
                  moving: bool | None = None) -> str:
    """A detailed caption for `prompt`: from the chat endpoint at `url` if given and it answers within
    `timeout` seconds, else from `builtin_expand` (with a warning naming the endpoint and the reason)."""
    if not isinstance(prompt, str):
        raise TypeError(f"expand_prompt wants a str prompt; got {type(prompt).__name__}")
    if url:
        try:
            return _ask_endpoint(prompt, url, model, timeout)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
            # URLError, timeouts and refused connections are OSErrors; a bad answer is one of the others.
            warnings.warn(f"prompt expansion at {_chat_url(url)} failed ({type(error).__name__}: {error}); "
                          "using the built-in expander", RuntimeWarning, stacklevel=2)
    return builtin_expand(prompt, moving=moving)
