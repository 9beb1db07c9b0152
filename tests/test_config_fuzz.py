"""Fuzzed configs never produce a traceback: any override of configs/tiny.py's keys, with any value of any
type, either validates or is one ConfigError line that starts with the key ("config.KEY: ...") - the
message `python -m soraax.train` prints as `error: ...` before anything compiles."""
import os

import ml_collections
from hypothesis import HealthCheck, given, settings, strategies as st

from soraax import config
from helpers import ROOT, TINY


def _leaves(node, prefix=""):
    for key, value in node.items():
        yield prefix + key, value  # a whole group too: it must be refused, not replaced
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")


DEFAULTS = dict(_leaves(config.load(TINY)))
KEYS = sorted(DEFAULTS)
# Values a user could mean: every choice the config offers, and paths that exist or do not.
MEANINGFUL = sorted({*config.TASKS, *config.SOURCES, *config.PACKERS, *config.DTYPES, *config.VAE_NORMS,
                     *config.TEXT_ENCODERS, "xla", "chunked", "splash", "cudnn", "none", "full", "dots",
                     "", "/nonexistent", ROOT, TINY, os.path.join(ROOT, "tests")})
EDGE_INTS = st.one_of(st.integers(-3, 70), st.integers(), st.integers(-2**70, 2**70),
                      st.sampled_from([0, -1, 2**31, 2**32, 2**63]))
EDGE_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([float("nan"), float("inf"), -0.0, 1e-300, 0.5, 1.0]))
SCALARS = st.one_of(st.none(), st.booleans(), EDGE_INTS, EDGE_FLOATS, st.text(max_size=12),
                    st.sampled_from(MEANINGFUL), st.binary(max_size=4))
ANY_VALUE = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=5).map(tuple),          # tuples of the wrong length or element type
    st.lists(st.integers(-2, 64), max_size=5).map(tuple),
    st.lists(st.integers(1, 64), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _of_its_type(key):
    """Values of the key's own type (what the command line lets through), to reach validate's range and
    cross-key checks rather than stop at the type check."""
    default = DEFAULTS[key]
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return EDGE_INTS
    if isinstance(default, float):
        return st.one_of(EDGE_FLOATS, EDGE_INTS)
    if isinstance(default, str):
        return st.one_of(st.sampled_from(MEANINGFUL), st.text(max_size=8))
    if isinstance(default, tuple):
        return st.lists(st.one_of(st.integers(-1, 40), st.sampled_from([1, 2, 4, 8, 16, 32])), max_size=5).map(tuple)
    return ANY_VALUE


OVERRIDE_KEYS = st.one_of(st.sampled_from(KEYS), st.sampled_from(["model.widht", "seed.x", "mesh.dcn.data", ""]),
                          st.text(max_size=10))


@st.composite
def overrides(draw):
    keys = draw(st.lists(OVERRIDE_KEYS, min_size=1, max_size=3, unique=True))
    return {key: draw(_of_its_type(key) if key in DEFAULTS and draw(st.booleans()) else ANY_VALUE)
            for key in keys}


def _is_clean(error: config.ConfigError) -> bool:
    message = str(error)
    return message.startswith(("config.", "unknown config key")) and "\n" not in message


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=overrides(), num_devices=st.sampled_from([None, 1, 8]))
def test_any_override_validates_or_is_one_clean_config_error(changes, num_devices):
    try:
        cfg = config.load(TINY, changes)
        config.validate(cfg, num_devices=num_devices)
    except config.ConfigError as error:  # any other exception fails the test, with its traceback
        assert _is_clean(error), repr(str(error))


@settings(max_examples=100, deadline=None)
@given(data=st.data(), key=st.sampled_from(KEYS))
def test_a_refused_single_override_names_its_key(data, key):
    value = data.draw(st.one_of(_of_its_type(key), ANY_VALUE))
    try:
        config.validate(config.load(TINY, {key: value}))
    except config.ConfigError as error:
        assert _is_clean(error), repr(str(error))
        # The key itself, or the key it collides with followed by the value given ("model.heads=5").
        leaf = key.rpartition(".")[2]
        assert leaf in str(error) or repr(value) in str(error) or str(value) in str(error), str(error)
