"""Analysis on top of the primitives.

* ``metrics``: the ICL score (``icl_score``, optionally under an ablation), per window, from losses.
* ``icl_ablation``: how much of the ICL depends on some heads: ``icl_share_removed`` (also
  ``interventions.icl_share_removed``), ``icl_share_from_losses``, ``share_removed``.
* ``scores``: head scores and the induction-head rule.
"""
