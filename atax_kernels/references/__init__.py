"""Capability references that are not live gradients: the EMA fold of captured gradients (:mod:`.ema`) and the
stored orthonormal subspace (:mod:`.subspace`)."""
