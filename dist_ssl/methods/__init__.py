"""Method registry: name -> Method class (one file per method)."""

from __future__ import annotations

import difflib

from dist_ssl.errors import UserError
from dist_ssl.methods.base import Method
from dist_ssl.methods.fixmatch import FixMatch
from dist_ssl.methods.flexmatch import FlexMatch
from dist_ssl.methods.freematch import FreeMatch
from dist_ssl.methods.mpl import MPL
from dist_ssl.methods.pseudo_label import PseudoLabel
from dist_ssl.methods.smpl import SMPL
from dist_ssl.methods.softmatch import SoftMatch
from dist_ssl.methods.supervised import Supervised

METHODS: dict[str, type[Method]] = {
    "supervised": Supervised,
    "pseudo_label": PseudoLabel,
    "fixmatch": FixMatch,
    "freematch": FreeMatch,
    "softmatch": SoftMatch,
    "flexmatch": FlexMatch,
    "mpl": MPL,
    "smpl": SMPL,
}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        near = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"unknown method '{name}'{hint}; choose from: {', '.join(METHODS)}")
    return METHODS[name]
