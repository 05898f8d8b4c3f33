"""Argument checks shared by the layers, the model factory and the training helpers.

Each check returns the standardised value or raises a ValueError that names the
argument and the value received, in Keras' wording
("Expected bits in (2, 4, 8) or None. Received: bits=3").
"""

from keras_blpa.codes import VALID_BITS

__all__ = [
    "check_bits",
    "check_choice",
    "check_int",
    "check_int_pair",
    "check_number",
    "check_rank4",
    "check_shape",
]



def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value, name, minimum=1):
    """`value` if it is an int >= `minimum`."""
    if not _is_int(value) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"Expected {name} to be {what}. Received: {name}={value!r}")
    return value


def check_int_pair(value, name):
    """A pair of positive ints from an int or a pair."""
    pair = (value, value) if _is_int(value) else value
    try:
        pair = tuple(pair)
    except TypeError:
        pair = (value,)
    if len(pair) != 2 or not all(_is_int(v) and v > 0 for v in pair):
        raise ValueError(
            f"Expected {name} to be a positive int or a pair of positive ints. "
            f"Received: {name}={value!r}"
        )
    return pair


def check_number(value, name, low=None, high=None, low_open=False):
    """`value` as a float if it lies in [low, high] (or (low, high] with low_open)."""
    try:
        number = float(value)
        ok = not isinstance(value, bool) and number == number
    except (TypeError, ValueError):
        ok = False
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number <= high
    if not ok:
        if low is not None and high is not None:
            bound = f"in {'(' if low_open else '['}{low}, {high}]"
        elif low is not None:
            bound = f"{'>' if low_open else '>='} {low}"
        else:
            bound = f"<= {high}" if high is not None else "a number"
        raise ValueError(f"Expected {name} {bound}. Received: {name}={value!r}")
    return number


def check_choice(value, name, choices):
    """`value` if it is one of `choices`."""
    if isinstance(value, (list, dict, set)) or value not in choices:
        raise ValueError(f"Expected {name} in {tuple(choices)}. Received: {name}={value!r}")
    return value


def check_bits(bits, allow_none=True):
    """`bits` as an int in VALID_BITS (or None if allowed)."""
    if bits is None and allow_none:
        return None
    if not _is_int(bits) or bits not in VALID_BITS:
        allowed = f"{VALID_BITS}" + (" or None" if allow_none else "")
        raise ValueError(f"Expected bits in {allowed}. Received: bits={bits!r}")
    return bits


def check_rank4(shape, owner):
    """Raises unless `shape` is 4D (batch, height, width, channels)."""
    if shape is None or len(shape) != 4:
        raise ValueError(
            f"{owner} expects a 4D input (batch, height, width, channels). "
            f"Received: input_shape={None if shape is None else tuple(shape)}"
        )


def _dimension(d):
    """A positive int (from an int or a numpy int) or None; raises TypeError otherwise."""
    if d is None:
        return None
    if isinstance(d, bool) or not hasattr(d, "__index__") or d.__index__() < 1:
        raise TypeError
    return d.__index__()


def check_shape(value, name, rank):
    """`value` as a tuple of `rank` dimensions, each a positive int or None."""
    try:
        shape = tuple(_dimension(d) for d in value)
    except TypeError:
        shape = ()
    if len(shape) != rank:
        raise ValueError(
            f"Expected {name} to have {rank} dimensions (positive ints or None). "
            f"Received: {name}={value!r}"
        )
    return shape
