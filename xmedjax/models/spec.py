"""What an architecture declares about itself for the explain code (imports nothing heavy).

Each xmedjax model has a `spec` property returning a `ModelSpec`; `xmedjax.models.model_spec`
gets it from a model or from its (graphdef, state) split. Layer names are dotted attribute
paths, the ones `xmedjax.explain.capture` takes as `layer=` and the prefixes of the
model's parameter paths.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """An architecture's layers as the explain code needs them.

    Attributes:
      cam_target: the layer whose output the model sows as its own CAM target
        (`xmedjax.models.CAM_TARGET`), after a final ReLU where the model applies one
        (DenseNet121: relu(features)).
      cam_layers: earlier CAM target layers, deepest first (`cams.auto_cam_layer` takes the
        first whose grid is fine enough).
      stem: the parameter groups before the first stage, in forward order.
      stages: the parameter groups after the stem, in forward order, the head last.
      head: the linear classifier's attribute name (its `kernel` and `bias`).
    """

    cam_target: str
    cam_layers: tuple[str, ...]
    stem: tuple[str, ...]
    stages: tuple[str, ...]
    head: str

    def __post_init__(self):
        if not self.stages or self.stages[-1] != self.head:
            raise ValueError(f"the head {self.head!r} must be the last stage, got {self.stages}")

    @property
    def randomization_order(self) -> tuple[str, ...]:
        """Every parameter group from the head down: Adebayo et al.'s cascade.

        The stages in reverse, then the stem's groups in name order (the order
        explain_quality.json has always listed them in).
        """
        return (*reversed(self.stages), *sorted(self.stem))
