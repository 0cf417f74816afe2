"""Parameters and MACs (one multiply-add = 1), with Attentive Normalization's own ops counted.

``count_cost`` traces a model with fvcore and counts AN's own ops under the conventions stated
in :mod:`an_search.cost.handles`; ``an_site_macs`` gives one site's figure analytically and
``an_param_delta`` the parameters it adds.
"""

from __future__ import annotations

from .analytic import an_param_delta, an_site_macs
from .count import UNIT, CostReport, count_cost

__all__ = ["UNIT", "CostReport", "an_param_delta", "an_site_macs", "count_cost"]
