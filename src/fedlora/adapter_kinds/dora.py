"""PEFT's DoRA: A, B and the weight magnitude `W.mag`; PEFT's own layers and saving.

Its layers rescale the merged weight by W.mag / ‖W + scaling · B A‖, so it has no plain low-rank factors
and does not run in lockstep.
"""

from __future__ import annotations

from ..core.components import DORA
from .base import AdapterKind


class DoraKind(AdapterKind):
    naming = DORA
    use_dora = True

    def export(self, am, state, out):
        self._save_with_peft(am, state, out)
